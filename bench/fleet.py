#!/usr/bin/env python3
"""bench/fleet.py — the generator and report of bench/fleet.sh (issue 13, item 5).

Run through bench/fleet.sh, which builds the binaries, starts the throw-away S3 server and
exports its settings; this script starts the larderd replicas, seeds the objects, runs the
simulated CI clients, checks every answer, and prints the report. Python 3.11 standard library
only. Every setting is an environment variable (see CONFIG below and the header of fleet.sh).

Content, so that every body can be checked without knowing BLAKE3 (the ETag): each revision is
a deterministic function of a seed written in its first bytes.
  large objects: 1 MiB blocks, each starting with a 32-byte header (magic, key index, seed,
                 block index, object size) followed by 1 MiB of `random.Random(seed)` bytes; a
                 body mixing two revisions has blocks of two seeds, a shifted one wrong indexes.
  small objects: a 20-byte header (magic, key index, seed, revision) followed by
                 `random.Random(seed)` bytes.
The ETag each revision got from its PUT is recorded, so the ETag a client reports for a body
must be the one recorded for the seed the body carries.
"""

import collections
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time


def env_int(name, default):
    return int(os.environ.get(name, default))


def env_float(name, default):
    return float(os.environ.get(name, default))


CONFIG = {
    # the fleet
    "REPLICAS": env_int("REPLICAS", 5),
    "BASE_PORT": env_int("BASE_PORT", 18230),
    "REVALIDATE": os.environ.get("REVALIDATE", "2s"),
    # the load
    "CLIENTS": env_int("CLIENTS", 200),
    "DURATION": env_float("DURATION", 180),
    "MAX_OPS": env_int("MAX_OPS", 1_000_000),
    "THINK_MS": env_float("THINK_MS", 50),
    "W_GET_LARGE": env_float("W_GET_LARGE", 10),
    "W_GET_SMALL": env_float("W_GET_SMALL", 70),
    "W_PUT_SMALL": env_float("W_PUT_SMALL", 15),
    "W_RESTORE": env_float("W_RESTORE", 3),
    "W_OVERWRITE_LARGE": env_float("W_OVERWRITE_LARGE", 1),
    "W_SAVE": env_float("W_SAVE", 1),
    "LARGE_SLOTS": env_int("LARGE_SLOTS", 12),
    "RESTORE_SLOTS": env_int("RESTORE_SLOTS", 2),
    "OVERWRITE_INTERVAL": env_float("OVERWRITE_INTERVAL", 8),
    "OVERWRITE_MAX_MIB": env_int("OVERWRITE_MAX_MIB", 1024),
    "SAVE_INTERVAL": env_float("SAVE_INTERVAL", 20),
    "GET_CONCURRENCY": env_int("GET_CONCURRENCY", 8),
    "GET_CHUNK": os.environ.get("GET_CHUNK", "8MiB"),
    # the objects
    "LARGE_COUNT": env_int("LARGE_COUNT", 8),
    "LARGE_MIN_MIB": env_int("LARGE_MIN_MIB", 64),
    "LARGE_MAX_MIB": env_int("LARGE_MAX_MIB", 128),
    "SMALL_COUNT": env_int("SMALL_COUNT", 2000),
    "SMALL_MIN_KIB": env_int("SMALL_MIN_KIB", 4),
    "SMALL_MAX_KIB": env_int("SMALL_MAX_KIB", 64),
    "SNAPSHOTS": env_int("SNAPSHOTS", 2),
    "SNAPSHOT_FILES": env_int("SNAPSHOT_FILES", 1000),
    "SEED": env_int("SEED", 1),
}
WORK = os.environ["WORK"]
LARDERD = os.environ["LARDERD_BIN"]
LARDER = os.environ["LARDER_BIN"]
BUCKET = os.environ["S3_BUCKET"]
S3_DIR = os.environ.get("S3_DIR", "")
NS = "fleet"
BLOCK = 1 << 20
LARGE_HEADER = struct.Struct("<4sIQQQ")  # magic, key index, seed, block index, size
SMALL_HEADER = struct.Struct("<4sIQI")  # magic, key index, seed, revision
SAVE_ID = "SAVE_ID"  # file in a snapshot tree naming the save it came from
STALE_MARGIN = 1.0  # seconds of slack on the revalidation window for the staleness check
MIB = 1 << 20


def bare(etag):
    """An ETag without its quotes (headers and logs quote it, the CLI's JSON does not)."""
    return etag.strip('"') if etag else etag


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_seconds(s):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", s.strip())
    if not m:
        raise ValueError(f"not a duration: {s}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[m.group(2)]


# --------------------------------------------------------------------------------------------
# Content
# --------------------------------------------------------------------------------------------

_base_cache = {}
_base_lock = threading.Lock()


def large_base(seed):
    with _base_lock:
        b = _base_cache.get(seed)
        if b is None:
            b = _base_cache[seed] = random.Random(seed).randbytes(BLOCK)
        return b


def large_blocks(key_index, seed, size):
    """The body of a large revision, as 1 MiB pieces."""
    base = large_base(seed)
    for i in range((size + BLOCK - 1) // BLOCK):
        n = min(BLOCK, size - i * BLOCK)
        block = LARGE_HEADER.pack(b"LFLG", key_index, seed, i, size) + base[LARGE_HEADER.size:]
        yield block[:n]


def small_body(key_index, seed, rev):
    r = random.Random(seed)
    size = r.randint(CONFIG["SMALL_MIN_KIB"] * 1024, CONFIG["SMALL_MAX_KIB"] * 1024)
    return SMALL_HEADER.pack(b"LFSM", key_index, seed, rev) + r.randbytes(size - SMALL_HEADER.size)


# --------------------------------------------------------------------------------------------
# What was written: every revision, with its seed and the ETag its PUT answered
# --------------------------------------------------------------------------------------------


class Registry:
    def __init__(self):
        self.lock = threading.Lock()
        self.seeds = {}  # seed -> dict(kind, key, rev, size, etag)
        self.small_keys = []  # key names (grows with new keys)
        self.small_index = {}  # key -> index
        self.small_revs = {}  # key -> list of (rev, seed, put_done or None) in rev order
        self.small_owner = {}  # key -> client id that may write it (one writer per key)
        self.large_keys = []
        self.large_sizes = {}
        self.next_seed = CONFIG["SEED"] * 1_000_000_000
        self.snapshots = {}  # key -> list of manifests (one per tree variant)
        self.snapshot_saves = {}  # key -> {save id: (variant, ETag)}

    def new_seed(self):
        with self.lock:
            self.next_seed += 1
            return self.next_seed

    def reserve_small_key(self, key, owner):
        """Gives the key its index (written into its bodies); readers do not see it yet."""
        with self.lock:
            idx = self.small_index[key] = len(self.small_index)
            self.small_revs[key] = []
            self.small_owner[key] = owner
            return idx

    def publish_small_key(self, key):
        with self.lock:
            self.small_keys.append(key)

    def record(self, seed, **kw):
        with self.lock:
            self.seeds[seed] = kw


REG = Registry()


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.lat = collections.defaultdict(list)  # op -> [seconds]
        self.count = collections.Counter()  # op -> completed ops (incl. errors)
        self.bytes = collections.Counter()  # op -> body bytes moved
        self.errors = collections.Counter()  # op -> errors
        self.restarts = collections.Counter()  # op -> CLI restarts after the object changed (412)
        self.gaveup = collections.Counter()  # op -> CLI gave up after its bounded restarts
        self.notes = collections.Counter()  # free-form counters
        self.error_samples = []
        self.error_kinds = collections.Counter()
        self.cli_rss = collections.defaultdict(int)  # op -> max KiB
        self.verify_seconds = 0.0

    def done(self, op, seconds, nbytes=0):
        with self.lock:
            self.count[op] += 1
            self.lat[op].append(seconds)
            self.bytes[op] += nbytes

    def error(self, op, what, seconds=None):
        with self.lock:
            self.count[op] += 1
            self.errors[op] += 1
            self.error_kinds[f"{op}: {error_kind(what)}"] += 1
            if seconds is not None:
                self.lat[op].append(seconds)
            if len(self.error_samples) < 200:
                self.error_samples.append({"t": round(time.time() - T0, 3), "op": op, "what": what})
            n = sum(self.errors.values())
        if n <= 20 and not STOPPING.is_set():
            log(f"ERROR {op}: {what}")

    def note(self, name, n=1):
        with self.lock:
            self.notes[name] += n


def error_kind(what):
    """A short class of an error message, for the summary."""
    m = re.search(r"status (\d+)", what)
    if m:
        reason = re.search(r"b'([^'\\]{0,80})", what)
        return f"answered {m.group(1)}" + (f" ({reason.group(1)})" if reason else "")
    for needle, kind in (("MIXES", "body mixes revisions"), ("(stale)", "stale read"),
                         ("went backwards", "read went backwards"), ("corrupt", "corrupt body"),
                         ("exited", "CLI failed"), ("ETag", "wrong ETag"),
                         ("Error", "transport error")):
        if needle in what:
            return kind
    return what[:60]


STATS = Stats()
STOPPING = threading.Event()  # set when the run is stopped early: no more error lines
T0 = time.time()


# --------------------------------------------------------------------------------------------
# HTTP helpers (small objects, seeding, metrics)
# --------------------------------------------------------------------------------------------


def port_of(r):
    return CONFIG["BASE_PORT"] + r


def url_of(r):
    return f"http://127.0.0.1:{port_of(r)}"


class Conns:
    """One keep-alive connection per replica, for one client thread."""

    def __init__(self):
        self.c = {}
        self.last_used = {}

    def request(self, r, method, path, body=None, headers=None):
        """Returns (status, headers dict lower-case, body bytes). One retry on a fresh connection
        when a reused connection turns out closed before any answer (what every HTTP client does
        for an idempotent request or one whose body was not consumed)."""
        for attempt in (0, 1):
            conn = self.c.get(r)
            fresh = conn is None
            if fresh:
                conn = self.c[r] = http.client.HTTPConnection("127.0.0.1", port_of(r), timeout=300)
            try:
                idle = time.time() - self.last_used.get(r, time.time())
                conn.request(method, path, body=body, headers=headers or {})
                resp = conn.getresponse()
                data = resp.read()
                self.last_used[r] = time.time()
                hdrs = {k.lower(): v for k, v in resp.getheaders()}
                if resp.will_close:
                    conn.close()
                    self.c.pop(r, None)
                return resp.status, hdrs, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                conn.close()
                self.c.pop(r, None)
                if fresh or attempt == 1:
                    raise
                # larderd closes keep-alive connections idle longer than --header-timeout (30 s)
                STATS.note("reconnects after the server closed a keep-alive connection idle "
                           + (">= 29 s" if idle >= 29 else "< 29 s"))
            except Exception:
                conn.close()
                self.c.pop(r, None)
                raise

    def close(self):
        for c in self.c.values():
            c.close()


def obj_path(key):
    return f"/api/v1/object/{NS}/{key}"


def put_stream(r, key, pieces, size):
    """PUT from an iterator of bytes on a fresh connection; returns (status, etag, text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port_of(r), timeout=600)
    try:
        conn.request("PUT", obj_path(key), body=pieces, headers={"Content-Length": str(size)})
        resp = conn.getresponse()
        text = resp.read()
        return resp.status, resp.getheader("ETag"), text[:300]
    finally:
        conn.close()


def scrape(r):
    conn = http.client.HTTPConnection("127.0.0.1", port_of(r), timeout=30)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text):
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = METRIC_LINE.match(line)
        if m:
            out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def msum(metrics, name, label_filter=""):
    return sum(v for (n, l), v in metrics.items() if n == name and label_filter in l)


def labels_of(metrics, name, label):
    res = collections.Counter()
    for (n, l), v in metrics.items():
        if n == name:
            m = re.search(label + r'="([^"]*)"', l)
            res[m.group(1) if m else ""] += v
    return res


def rgw_perf():
    """RGW's own request counters from its admin socket (every S3 request, multipart parts too)."""
    if not S3_DIR:
        return None
    asok = os.path.join(S3_DIR, "run", "client.rgw.a.asok")
    try:
        out = subprocess.run(["ceph", "--admin-daemon", asok, "perf", "dump"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
        return json.loads(out).get("rgw")
    except Exception as e:
        log(f"cannot read RGW perf counters: {e}")
        return None


# --------------------------------------------------------------------------------------------
# Process accounting
# --------------------------------------------------------------------------------------------

CLK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK
    except OSError:
        return None


def proc_status(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])  # KiB
    except OSError:
        return None


def machine_busy():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def s3_pids():
    pids = {}
    run = os.path.join(S3_DIR, "run") if S3_DIR else ""
    if run and os.path.isdir(run):
        for name in os.listdir(run):
            if name.endswith(".pid") and name != "s3.pid":
                try:
                    with open(os.path.join(run, name)) as f:
                        pids[name[:-4]] = int(f.read().strip())
                except (OSError, ValueError):
                    pass
    return pids


# --------------------------------------------------------------------------------------------
# The replicas
# --------------------------------------------------------------------------------------------

REPLICAS = []  # dicts: port, pid, proc, log path, out path


def start_replicas():
    n = CONFIG["REPLICAS"]
    env = dict(os.environ)
    # Access lines (key, tier, ETag) and the fill's end (key, ETag, result) are what the
    # fills-per-cold-object figure is computed from; warnings are counted too.
    env["LARDER_LOG"] = "info,larderd::access=info,larder_tier::tiered::fill=debug"
    env["LARDER_LOG_FORMAT"] = "json"
    pidfile = os.path.join(WORK, "replicas.pids")
    for r in range(n):
        d = os.path.join(WORK, f"replica{r}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        out = open(os.path.join(WORK, f"replica{r}.out"), "wb")
        err = open(os.path.join(WORK, f"replica{r}.log"), "wb")
        args = [LARDERD, "--listen", f"127.0.0.1:{port_of(r)}", "--data-dir", d,
                "--s3-bucket", BUCKET, "--s3-prefix", "fleet", "--revalidate-after",
                CONFIG["REVALIDATE"]] + os.environ.get("LARDERD_ARGS", "").split()
        p = subprocess.Popen(args, stdout=out, stderr=err, env=env, start_new_session=True)
        REPLICAS.append({"r": r, "proc": p, "pid": p.pid, "log": err.name})
        with open(pidfile, "a") as f:
            f.write(f"{p.pid}\n")
    for rep in REPLICAS:
        deadline = time.time() + 60
        while True:
            with open(os.path.join(WORK, f"replica{rep['r']}.out"), "rb") as f:
                if b"listening" in f.read():
                    break
            if rep["proc"].poll() is not None or time.time() > deadline:
                with open(rep["log"], "rb") as f:
                    sys.stderr.write(f.read()[-3000:].decode(errors="replace"))
                raise SystemExit(f"replica {rep['r']} did not start")
            time.sleep(0.1)
    log(f"{n} replicas listening on ports {port_of(0)}..{port_of(n - 1)}")


def stop_replicas():
    for rep in REPLICAS:
        if rep["proc"].poll() is None:
            rep["proc"].send_signal(signal.SIGTERM)
    for rep in REPLICAS:
        try:
            rep["proc"].wait(timeout=40)
        except subprocess.TimeoutExpired:
            rep["proc"].kill()
            rep["proc"].wait()


# --------------------------------------------------------------------------------------------
# Seeding
# --------------------------------------------------------------------------------------------


def seed_large(i, r, seed=None, size=None):
    key = REG.large_keys[i]
    size = size or REG.large_sizes[key]
    seed = seed or REG.new_seed()
    # Registered before the PUT: a PUT answered with an error may still have committed (a 5xx
    # says nothing either way), and readers may then get this revision.
    REG.record(seed, kind="large", key=key, size=size, etag=None, put="pending")
    try:
        status, etag, text = put_stream(r, key, large_blocks(i, seed, size), size)
    except Exception:
        REG.seeds[seed]["put"] = "failed"
        raise
    if status not in (200, 201) or not etag:
        REG.seeds[seed]["put"] = "failed"
        raise RuntimeError(f"PUT {key} via replica {r}: {status} {text!r}")
    with REG.lock:
        REG.seeds[seed].update(etag=etag, put="ok")
    return seed, etag


def write_tree(root, files, variant, rnd):
    """A directory tree like a dependency cache: many small files in a few dozen directories,
    one 4 MiB file. Returns its manifest {relative path: sha256 hex}."""
    manifest = {}
    os.makedirs(root)
    for f in range(files):
        rel = f"d{f % 40:02d}/sub{f % 7}/file{f}.dat"
        size = rnd.randint(1, 32 * 1024) if f else 4 * MIB
        data = f"{variant}:{rel}:".encode() + rnd.randbytes(size)
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
        manifest[rel] = hashlib.sha256(data).hexdigest()
    return manifest


def tree_manifest(root):
    manifest = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                manifest[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return manifest


CLIS = set()  # process groups of the CLIs running now
CLI_LOCK = threading.Lock()


def kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def larder_cli(args, timeout=900):
    """Runs the larder CLI under GNU time; returns (exit code, stdout, stderr tail, max RSS KiB,
    seconds). Not wait4's ru_maxrss of our own child: a child spawned by this big Python process
    starts with its resident size, which Linux keeps in the high-water mark across exec."""
    errf = os.path.join(WORK, "tmp", f"stderr-{threading.get_ident()}")
    rssf = errf + ".rss"
    t = time.time()
    with open(errf, "wb") as err:
        # its own process group, so that stopping the run stops the CLI under `time` too
        p = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", rssf, LARDER] + args,
                             stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    with CLI_LOCK:
        CLIS.add(p.pid)
    timer = threading.Timer(timeout, kill_group, (p.pid,))
    timer.daemon = True
    timer.start()
    try:
        out = p.stdout.read()
        p.stdout.close()
        p.wait()
    finally:
        timer.cancel()
        with CLI_LOCK:
            CLIS.discard(p.pid)
    secs = time.time() - t
    with open(errf, "rb") as f:
        err = f.read()[-2000:].decode(errors="replace")
    os.unlink(errf)
    rss = 0
    try:
        with open(rssf) as f:
            rss = int(f.read().split()[-1])
        os.unlink(rssf)
    except (OSError, ValueError, IndexError):
        pass
    return p.returncode, out.decode(errors="replace"), err, rss, secs


def save_snapshot(key, variant, r):
    """Saves one of the two trees of a snapshot key, with a SAVE_ID file that makes every save's
    archive (and ETag) unique, so that fills can be counted per ETag. At most one save runs at a
    time."""
    tree = os.path.join(WORK, "trees", f"{key.replace('/', '_')}.{variant}")
    save_id = str(REG.new_seed())
    with open(os.path.join(tree, SAVE_ID), "w") as f:
        f.write(save_id)
    with REG.lock:  # before the save: one that fails may still have committed
        REG.snapshot_saves.setdefault(key, {})[save_id] = (variant, None)
    code, out, err, _rss, secs = larder_cli(["--url", url_of(r), "-q", "save", NS, key, tree,
                                             "--json", "--level", "1"])
    if code != 0:
        return None, secs, f"larder save exited {code}: {err.strip()[-400:]}"
    summary = json.loads(out)
    with REG.lock:
        REG.snapshot_saves.setdefault(key, {})[save_id] = (variant, bare(summary["etag"]))
    return summary, secs, None


def seed_all():
    rnd = random.Random(CONFIG["SEED"])
    n = CONFIG["REPLICAS"]
    # large objects, each written through a different replica (which then holds it on disk)
    lc = CONFIG["LARGE_COUNT"]
    lo, hi = CONFIG["LARGE_MIN_MIB"], CONFIG["LARGE_MAX_MIB"]
    for i in range(lc):
        key = f"large/artifact-{i}.tar.zst"
        mib = lo + (hi - lo) * i // max(1, lc - 1)
        REG.large_keys.append(key)
        REG.large_sizes[key] = mib * MIB + rnd.randint(0, 4095)  # not a multiple of any chunk
    t = time.time()
    threads = [threading.Thread(target=seed_large, args=(i, i % n)) for i in range(lc)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    total = sum(REG.large_sizes.values())
    log(f"seeded {lc} large objects, {total / MIB:.0f} MiB, in {time.time() - t:.1f} s")
    # small objects, each through a replica in turn; each key has one writer client
    t = time.time()
    sc = CONFIG["SMALL_COUNT"]
    for i in range(sc):
        REG.reserve_small_key(f"small/entry-{i}", i % CONFIG["CLIENTS"])
        REG.publish_small_key(f"small/entry-{i}")
    errors = []

    def seed_small(part):
        conns = Conns()
        for i in range(part, sc, 16):
            key = REG.small_keys[i]
            seed = REG.new_seed()
            body = small_body(i, seed, 0)
            status, hdrs, text = conns.request(i % n, "PUT", obj_path(key), body=body)
            if status not in (200, 201):
                errors.append(f"PUT {key}: {status} {text[:200]!r}")
                continue
            REG.record(seed, kind="small", key=key, rev=0, size=len(body), etag=hdrs.get("etag"))
            REG.small_revs[key].append((0, seed, time.time()))
        conns.close()

    threads = [threading.Thread(target=seed_small, args=(p,)) for p in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise SystemExit(f"seeding small objects failed: {errors[:3]}")
    log(f"seeded {sc} small objects in {time.time() - t:.1f} s")
    # snapshots: two variants of each tree, the first one saved now
    t = time.time()
    os.makedirs(os.path.join(WORK, "trees"), exist_ok=True)
    for s in range(CONFIG["SNAPSHOTS"]):
        key = f"snapshots/deps-{s}.tar.zst"
        manifests = []
        for variant in "ab":
            root = os.path.join(WORK, "trees", f"{key.replace('/', '_')}.{variant}")
            manifests.append(write_tree(root, CONFIG["SNAPSHOT_FILES"], variant,
                                        random.Random(f"{s}{variant}")))
        REG.snapshots[key] = manifests
        etag, _secs, err = save_snapshot(key, "a", s % n)
        if err:
            raise SystemExit(f"seeding {key}: {err}")
    log(f"saved {CONFIG['SNAPSHOTS']} snapshots of {CONFIG['SNAPSHOT_FILES']} files in "
        f"{time.time() - t:.1f} s")


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


class ReadHistory:
    """Per replica and small key: the revisions unpinned GETs returned and when, to check that
    reads on one replica never go backwards."""

    def __init__(self):
        self.lock = threading.Lock()
        self.h = {}  # (replica, key) -> [floor_rev, [(done, rev)...]]

    def check_and_add(self, r, key, started, done, rev):
        with self.lock:
            e = self.h.setdefault((r, key), [-1, []])
            floor, entries = e
            prior = max([floor] + [rv for d, rv in entries if d < started])
            entries.append((done, rev))
            if len(entries) > 32:
                # fold answers older than any request still running into the floor
                cutoff = time.time() - 600
                e[0] = max([floor] + [rv for d, rv in entries if d < cutoff])
                e[1] = [(d, rv) for d, rv in entries if d >= cutoff]
            return prior


HISTORY = ReadHistory()


def check_small_body(key, r, status, hdrs, body, started, done):
    """Returns None if the answer is right, else what is wrong."""
    if status != 200:
        return f"GET {key} via replica {r}: status {status} {body[:200]!r}"
    if len(body) < SMALL_HEADER.size:
        return f"GET {key} via replica {r}: {len(body)}-byte body"
    magic, kidx, seed, rev = SMALL_HEADER.unpack_from(body)
    if magic != b"LFSM" or kidx != REG.small_index.get(key):
        return f"GET {key} via replica {r}: body of another object (magic {magic!r}, key {kidx})"
    info = REG.seeds.get(seed)
    if info is None or info["key"] != key:
        return f"GET {key} via replica {r}: seed {seed} never written to this key"
    if body != small_body(kidx, seed, rev):
        return f"GET {key} via replica {r}: body of seed {seed} rev {rev} is corrupt"
    if info.get("put") == "failed":
        # its PUT was answered with an error, yet the revision is served: it had committed
        STATS.note("get_small: served a revision whose PUT had been answered with an error")
    elif info.get("put") == "pending":
        STATS.note("get_small: served a revision whose PUT was still waiting for its answer")
    if info.get("etag") and bare(hdrs.get("etag")) != bare(info["etag"]):
        return (f"GET {key} via replica {r}: ETag {hdrs.get('etag')} but revision {rev} was "
                f"stored as {info['etag']}")
    prior = HISTORY.check_and_add(r, key, started, done, rev)
    if rev < prior:
        return (f"GET {key} via replica {r}: revision {rev} after this replica had returned "
                f"revision {prior} (reads went backwards)")
    # bounded staleness: a revision acknowledged longer than the window before the GET began
    window = parse_seconds(CONFIG["REVALIDATE"]) + STALE_MARGIN
    with REG.lock:
        revs = list(REG.small_revs[key])
    newest_due = max([rv for rv, _s, pd in revs if pd is not None and pd < started - window],
                     default=-1)
    if rev < newest_due:
        return (f"GET {key} via replica {r}: revision {rev}, but revision {newest_due} was "
                f"acknowledged more than {window:.1f} s before the GET started (stale)")
    if newest_due > 0:
        STATS.note("get_small: answers that had to show an overwrite (staleness checked)")
    if prior > 0:
        STATS.note("get_small: answers checked against a newer revision seen on the replica")
    return None


def check_large_file(key, path, reported_etag):
    """Checks a downloaded large object block by block against the revision its first block
    names. Returns (None, size) or (problem, 0)."""
    kidx = REG.large_keys.index(key)
    with open(path, "rb") as f:
        got = os.fstat(f.fileno()).st_size
        first = f.read(LARGE_HEADER.size)
        if len(first) < LARGE_HEADER.size:
            return (f"{key}: {got}-byte body", 0)
        magic, k, seed, _idx, size = LARGE_HEADER.unpack(first)
        info = REG.seeds.get(seed)
        if magic != b"LFLG" or k != kidx or info is None or info["key"] != key:
            return (f"{key}: first block is not of a revision of this key (magic {magic!r}, key "
                    f"{k}, seed {seed})", 0)
        if got != info["size"]:
            return (f"{key}: {got} bytes, the revision of seed {seed} has {info['size']}", 0)
        f.seek(0)
        base = large_base(seed)
        bad = []
        seeds = collections.Counter()
        for i in range((size + BLOCK - 1) // BLOCK):
            block = f.read(BLOCK)
            n = min(BLOCK, size - i * BLOCK)
            expected = LARGE_HEADER.pack(b"LFLG", kidx, seed, i, size) + base[LARGE_HEADER.size:n]
            if block == expected[:n]:
                seeds[seed] += 1
                continue
            # diagnose: whose block is it?
            if len(block) >= LARGE_HEADER.size:
                m2, k2, s2, i2, z2 = LARGE_HEADER.unpack_from(block)
                seeds[s2] += 1
                if len(bad) < 4:
                    bad.append(f"block {i}: header says key {k2} seed {s2} block {i2} size {z2}")
            else:
                seeds["short"] += 1
                bad.append(f"block {i}: {len(block)} bytes")
    if bad:
        what = "MIXES revisions" if len(seeds) > 1 else "is corrupt"
        return (f"{key}: body {what}: blocks per seed {dict(seeds)}; {bad}", 0)
    if info.get("put") == "failed":
        STATS.note("get_large: got a revision whose PUT had been answered with an error")
    elif info.get("put") == "pending":
        STATS.note("get_large: got a revision whose PUT was still waiting for its answer")
    if info.get("etag") and bare(reported_etag) != bare(info["etag"]):
        return (f"{key}: the CLI reports ETag {reported_etag}, the revision it wrote (seed {seed})"
                f" was stored as {info['etag']}", 0)
    return None, got


# --------------------------------------------------------------------------------------------
# Operations of a client
# --------------------------------------------------------------------------------------------


class Gate:
    """A bounded number of slots, optionally at most one start per `interval` seconds, and a
    budget (e.g. bytes of overwrites)."""

    def __init__(self, slots, interval=0.0, budget=None):
        self.sem = threading.Semaphore(slots)
        self.interval = interval
        self.last = 0.0
        self.lock = threading.Lock()
        self.budget = budget

    def try_enter(self, cost=0):
        if not self.sem.acquire(blocking=False):
            return False
        with self.lock:
            now = time.time()
            if (self.interval and now - self.last < self.interval) or (
                    self.budget is not None and self.budget < cost):
                self.sem.release()
                return False
            self.last = now
            if self.budget is not None:
                self.budget -= cost
        return True

    def leave(self):
        self.sem.release()


ACTIVE_DL = collections.Counter()  # large key -> downloads in progress
OVERWRITING = set()
ACTIVE_LOCK = threading.Lock()


class Client:
    def __init__(self, cid, gates, deadline, ops_left):
        self.cid = cid
        self.rnd = random.Random(f"client-{cid}-{CONFIG['SEED']}")
        self.conns = Conns()
        self.gates = gates
        self.deadline = deadline
        self.ops_left = ops_left
        self.dl = os.path.join(WORK, "dl", f"c{cid}.bin")
        self.restore_dir = os.path.join(WORK, "restore", f"c{cid}")
        self.new_keys = 0
        self.mine = [k for k, o in REG.small_owner.items() if o == cid]
        self.urls = ",".join(url_of(r) for r in range(CONFIG["REPLICAS"]))

    def run(self):
        ops = ["get_large", "get_small", "put_small", "restore", "overwrite_large", "save"]
        weights = [CONFIG["W_GET_LARGE"], CONFIG["W_GET_SMALL"], CONFIG["W_PUT_SMALL"],
                   CONFIG["W_RESTORE"], CONFIG["W_OVERWRITE_LARGE"], CONFIG["W_SAVE"]]
        think = CONFIG["THINK_MS"] / 1000
        while time.time() < self.deadline and self.ops_left.take():
            op = self.rnd.choices(ops, weights)[0]
            try:
                if not getattr(self, op)():
                    STATS.note(f"{op} drawn while its slots were taken: did get_small")
                    self.get_small()
            except Exception as e:  # a bug of the generator must not hide as a hang
                STATS.error(op, f"generator exception {type(e).__name__}: {e}")
            if think:
                time.sleep(self.rnd.expovariate(1 / think))
        self.conns.close()

    # small objects -------------------------------------------------------------------------

    def get_small(self):
        with REG.lock:
            key = self.rnd.choice(REG.small_keys)
        r = self.rnd.randrange(CONFIG["REPLICAS"])
        t = time.time()
        try:
            status, hdrs, body = self.conns.request(r, "GET", obj_path(key))
        except Exception as e:
            STATS.error("get_small", f"GET {key} via replica {r}: {type(e).__name__}: {e}",
                        time.time() - t)
            return True
        done = time.time()
        problem = check_small_body(key, r, status, hdrs, body, t, done)
        if problem:
            STATS.error("get_small", problem, done - t)
        else:
            STATS.done("get_small", done - t, len(body))
        return True

    def put_small(self):
        """A new cache entry (half the time) or a new revision of a key this client owns (each
        key has one writer, so its revisions have an order the checks can use)."""
        new = self.rnd.random() < 0.5 or not self.mine
        if new:
            key = f"small/new/c{self.cid}-{self.new_keys}"
            self.new_keys += 1
            kidx = REG.reserve_small_key(key, self.cid)
            rev = 0
        else:
            key = self.rnd.choice(self.mine)
            kidx = REG.small_index[key]
            with REG.lock:
                rev = REG.small_revs[key][-1][0] + 1
        seed = REG.new_seed()
        body = small_body(kidx, seed, rev)
        r = self.rnd.randrange(CONFIG["REPLICAS"])
        REG.record(seed, kind="small", key=key, rev=rev, size=len(body), etag=None, put="pending")
        t = time.time()
        try:
            status, hdrs, text = self.conns.request(r, "PUT", obj_path(key), body=body)
        except Exception as e:
            STATS.error("put_small", f"PUT {key} via replica {r}: {type(e).__name__}: {e}",
                        time.time() - t)
            with REG.lock:  # it may or may not have been stored: readers may see it, unordered
                REG.small_revs[key].append((rev, seed, None))
                REG.seeds[seed]["put"] = "failed"
            return True
        done = time.time()
        expected = 201 if new else 200
        ok = status in (200, 201)
        with REG.lock:
            REG.seeds[seed].update(etag=hdrs.get("etag") if ok else None,
                                   put="ok" if ok else "failed")
            REG.small_revs[key].append((rev, seed, done if ok else None))
        if new and ok:
            REG.publish_small_key(key)  # readers pick it only once acknowledged
            self.mine.append(key)
        if status != expected:
            STATS.error("put_small", f"PUT {key} via replica {r}: status {status} (expected "
                                     f"{expected}) {text[:200]!r}", done - t)
        else:
            STATS.done("put_small", done - t, len(body))
        return True

    # large objects -------------------------------------------------------------------------

    def get_large(self):
        if not self.gates["large"].try_enter():
            return False
        try:
            key = self.rnd.choice(REG.large_keys)
            with ACTIVE_LOCK:
                ACTIVE_DL[key] += 1
            try:
                self._get_large(key)
            finally:
                with ACTIVE_LOCK:
                    ACTIVE_DL[key] -= 1
        finally:
            self.gates["large"].leave()
        return True

    def _get_large(self, key):
        args = ["--url", self.urls, "-q", "get", NS, key, "-o", self.dl, "--no-sync", "--json",
                "--concurrency", str(CONFIG["GET_CONCURRENCY"]), "--chunk-size",
                CONFIG["GET_CHUNK"]]
        code, out, err, rss, secs = larder_cli(args)
        with STATS.lock:
            STATS.cli_rss["get_large"] = max(STATS.cli_rss["get_large"], rss)
        if code != 0:
            if "changed during the download" in err:
                # the CLI's bounded restarts ran out while the key kept changing: clean, retried
                with STATS.lock:
                    STATS.gaveup["get_large"] += 1
            else:
                STATS.error("get_large", f"larder get {key} exited {code}: {err.strip()[-600:]}",
                            secs)
            self._rm(self.dl)
            return
        try:
            summary = json.loads(out)
        except ValueError:
            STATS.error("get_large", f"larder get {key}: no JSON summary: {out[:200]!r}", secs)
            return
        tv = time.time()
        problem, size = check_large_file(key, self.dl, summary.get("etag"))
        with STATS.lock:
            STATS.verify_seconds += time.time() - tv
        self._rm(self.dl)
        if problem:
            STATS.error("get_large", problem, secs)
            return
        STATS.done("get_large", secs, size)
        with STATS.lock:
            STATS.restarts["get_large"] += summary.get("restarts", 0)
            STATS.notes["get_large: CLI retries after transient failures"] += summary.get("retries", 0)
            STATS.notes["get_large: ranges hedged"] += summary.get("hedged", 0)
            for rep in summary.get("replicas", []):
                if rep.get("diverged"):
                    STATS.notes["get_large: a replica dropped as diverged"] += 1
                if rep.get("failures"):
                    STATS.notes["get_large: failed range attempts"] += rep["failures"]

    def overwrite_large(self):
        with ACTIVE_LOCK:
            candidates = [k for k in REG.large_keys if k not in OVERWRITING]
            if not candidates:
                return False
            busiest = max(ACTIVE_DL[k] for k in candidates)
            key = self.rnd.choice([k for k in candidates if ACTIVE_DL[k] == busiest])
            size = REG.large_sizes[key]
            if not self.gates["overwrite"].try_enter(size):
                return False
            OVERWRITING.add(key)
            if busiest:
                STATS.notes["overwrite_large: started while the key was being downloaded"] += 1
        try:
            r = self.rnd.randrange(CONFIG["REPLICAS"])
            t = time.time()
            try:
                seed, _etag = seed_large(REG.large_keys.index(key), r)
                STATS.done("overwrite_large", time.time() - t, size)
            except Exception as e:
                STATS.error("overwrite_large", f"{type(e).__name__}: {e}", time.time() - t)
        finally:
            with ACTIVE_LOCK:
                OVERWRITING.discard(key)
            self.gates["overwrite"].leave()
        return True

    # snapshots -----------------------------------------------------------------------------

    def restore(self):
        if not self.gates["restore"].try_enter():
            return False
        try:
            key = self.rnd.choice(list(REG.snapshots))
            shutil.rmtree(self.restore_dir, ignore_errors=True)
            args = ["--url", self.urls, "-q", "restore", NS, key, self.restore_dir, "--no-sync",
                    "--json", "--concurrency", str(CONFIG["GET_CONCURRENCY"])]
            code, out, err, rss, secs = larder_cli(args)
            with STATS.lock:
                STATS.cli_rss["restore"] = max(STATS.cli_rss["restore"], rss)
            if code != 0:
                if "changed during the download" in err:
                    with STATS.lock:
                        STATS.gaveup["restore"] += 1
                else:
                    STATS.error("restore", f"larder restore {key} exited {code}: "
                                           f"{err.strip()[-600:]}", secs)
                return True
            summary = json.loads(out)
            tv = time.time()
            got = tree_manifest(self.restore_dir)
            with STATS.lock:
                STATS.verify_seconds += time.time() - tv
            save_id = None
            try:
                with open(os.path.join(self.restore_dir, SAVE_ID)) as f:
                    save_id = f.read()
            except OSError:
                pass
            got.pop(SAVE_ID, None)
            with REG.lock:
                variant, etag = REG.snapshot_saves.get(key, {}).get(save_id, (None, None))
            want = REG.snapshots[key]["ab".index(variant)] if variant else None
            if variant is None:
                STATS.error("restore", f"{key}: restored tree names save {save_id!r}, never "
                                       f"saved to this key", secs)
            elif got != want:
                diff = [p for p in set(got) | set(want) if got.get(p) != want.get(p)]
                STATS.error("restore", f"{key}: restored tree differs from variant {variant} of "
                                       f"save {save_id} ({len(got)} files; e.g. "
                                       f"{sorted(diff)[:3]})", secs)
            elif etag is None:
                STATS.note("restore: got a save that had failed (it had committed)")
                STATS.done("restore", secs, summary.get("size", 0))
            elif bare(summary.get("etag")) != etag:
                STATS.error("restore", f"{key}: ETag {summary.get('etag')}, but save {save_id} "
                                       f"was stored as {etag}", secs)
            else:
                STATS.done("restore", secs, summary.get("size", 0))
                with STATS.lock:
                    STATS.restarts["restore"] += summary.get("restarts", 0)
        finally:
            shutil.rmtree(self.restore_dir, ignore_errors=True)
            self.gates["restore"].leave()
        return True

    def save(self):
        if not self.gates["save"].try_enter():
            return False
        try:
            key = self.rnd.choice(list(REG.snapshots))
            variant = self.rnd.choice("ab")
            saved, secs, err = save_snapshot(key, variant, self.rnd.randrange(CONFIG["REPLICAS"]))
            if err:
                STATS.error("save", f"{key}: {err}", secs)
            else:
                STATS.done("save", secs, saved.get("archive_size", 0))
        finally:
            self.gates["save"].leave()
        return True

    @staticmethod
    def _rm(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class OpsLeft:
    def __init__(self, n):
        self.n = n
        self.lock = threading.Lock()

    def take(self):
        with self.lock:
            if self.n <= 0:
                return False
            self.n -= 1
            return True


# --------------------------------------------------------------------------------------------
# Logs: cold revisions and fills per replica
# --------------------------------------------------------------------------------------------


def read_log_window(path, start, end):
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    for line in data.splitlines():
        try:
            yield json.loads(line)
        except ValueError:
            continue


def analyse_log(path, start, end):
    cold = collections.defaultdict(int)  # (key, etag) -> requests served from S3
    served = set()
    fills = collections.Counter()  # (key, etag) -> fills ended
    fill_results = collections.Counter()
    warnings = collections.Counter()
    for ev in read_log_window(path, start, end):
        fields = ev.get("fields", {})
        target = ev.get("target", "")
        level = ev.get("level", "")
        if target == "larderd::access":
            key = fields.get("key", "")
            status = fields.get("status")
            if status in (200, 206) and fields.get("ns") == NS:
                served.add((key, bare(fields.get("etag"))))
                if fields.get("tier") == "s3":
                    cold[(key, bare(fields.get("etag")))] += 1
        elif fields.get("message") == "fill ended" or (
                fields.get("message") == "fill abandoned"):
            span = ev.get("span", {}) or {}
            key, etag = span.get("key"), span.get("etag")
            if key is None:
                for s in ev.get("spans", []):
                    if s.get("name") == "fill":
                        key, etag = s.get("key"), s.get("etag")
            result = fields.get("result", "failed")
            fill_results[result] += 1
            if result != "unneeded":  # "unneeded": the revision was on disk already, no copy
                fills[(key, bare(etag))] += 1
        if level in ("WARN", "ERROR"):
            warnings[f"{level} {fields.get('message', '')[:80]}"] += 1
    return cold, served, fills, fill_results, warnings


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def pct(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def main():
    # bench/fleet.sh stops the run with SIGTERM (on its own exit, Ctrl-C or a timeout)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for d in ("dl", "restore", "tmp", "trees"):
        shutil.rmtree(os.path.join(WORK, d), ignore_errors=True)
        os.makedirs(os.path.join(WORK, d))
    try:
        start_replicas()
        run()
    finally:
        STOPPING.set()
        with CLI_LOCK:
            for pgid in CLIS:
                kill_group(pgid)
        stop_replicas()


def run():
    global T0
    seed_all()
    # let every replica's view of the seeded keys age past the revalidation window
    time.sleep(parse_seconds(CONFIG["REVALIDATE"]) + 1)

    before = {r: parse_metrics(scrape(r)) for r in range(CONFIG["REPLICAS"])}
    rgw_before = rgw_perf()
    log_start = {rep["r"]: os.path.getsize(rep["log"]) for rep in REPLICAS}
    cpu_before = {f"larderd-{rep['r']}": proc_cpu(rep["pid"]) for rep in REPLICAS}
    s3p = s3_pids()
    cpu_before.update({name: proc_cpu(pid) for name, pid in s3p.items()})
    gen_before = os.times()
    busy_before = machine_busy()
    load_before = os.getloadavg()

    gates = {
        "large": Gate(CONFIG["LARGE_SLOTS"]),
        "restore": Gate(CONFIG["RESTORE_SLOTS"]),
        "overwrite": Gate(1, CONFIG["OVERWRITE_INTERVAL"], CONFIG["OVERWRITE_MAX_MIB"] * MIB),
        "save": Gate(1, CONFIG["SAVE_INTERVAL"]),
    }
    ops_left = OpsLeft(CONFIG["MAX_OPS"])
    T0 = time.time()
    deadline = T0 + CONFIG["DURATION"]
    clients = [Client(c, gates, deadline, ops_left) for c in range(CONFIG["CLIENTS"])]
    threads = [threading.Thread(target=c.run, name=f"client-{c.cid}", daemon=True)
               for c in clients]
    log(f"{len(threads)} clients for {CONFIG['DURATION']:.0f} s (at most {CONFIG['MAX_OPS']} ops)")
    for th in threads:
        th.start()
    # sample the replicas' RSS while the load runs; progress every 15 s
    rss_peak = collections.Counter()
    last = 0
    while any(th.is_alive() for th in threads):
        time.sleep(0.5)
        for rep in REPLICAS:
            v = proc_status(rep["pid"], "VmRSS")
            if v:
                rss_peak[rep["r"]] = max(rss_peak[rep["r"]], v)
        if time.time() - last >= 15:
            last = time.time()
            with STATS.lock:
                done = sum(STATS.count.values())
                errs = sum(STATS.errors.values())
            log(f"t={time.time() - T0:.0f}s ops={done} errors={errs} "
                f"load={os.getloadavg()[0]:.1f}")
        if time.time() > deadline + 900:
            log("clients still running 15 min after the deadline; giving up on them")
            STATS.note("clients abandoned after the deadline")
            break
    elapsed = time.time() - T0
    gen_after = os.times()
    busy_after = machine_busy()
    load_after = os.getloadavg()
    cpu_after = {f"larderd-{rep['r']}": proc_cpu(rep["pid"]) for rep in REPLICAS}
    cpu_after.update({name: proc_cpu(pid) for name, pid in s3p.items()})
    log(f"load done after {elapsed:.1f} s; waiting for fills to settle")
    # fills started by the load end on their own; wait until the counters stop moving
    prev = None
    for _ in range(60):
        cur = [msum(parse_metrics(scrape(r)), "larder_fills_total")
               for r in range(CONFIG["REPLICAS"])]
        if cur == prev:
            break
        prev = cur
        time.sleep(2)
    after = {r: parse_metrics(scrape(r)) for r in range(CONFIG["REPLICAS"])}
    rgw_after = rgw_perf()
    log_end = {rep["r"]: os.path.getsize(rep["log"]) for rep in REPLICAS}
    hwm = {rep["r"]: proc_status(rep["pid"], "VmHWM") for rep in REPLICAS}
    report(elapsed, before, after, rgw_before, rgw_after, log_start, log_end, hwm, rss_peak,
           cpu_before, cpu_after, gen_before, gen_after, busy_before, busy_after,
           load_before, load_after)


def report(elapsed, before, after, rgw_before, rgw_after, log_start, log_end, hwm, rss_peak,
           cpu_before, cpu_after, gen_before, gen_after, busy_before, busy_after,
           load_before, load_after):
    n = CONFIG["REPLICAS"]
    def is_large(key):  # large artifacts and snapshots (MiBs); small/... are the small objects
        return not (key or "").startswith("small/")

    client_ops = sum(STATS.count.values())
    # per replica, from metrics and logs
    per = []
    for r in range(n):
        d = {k: after[r].get(k, 0) - before[r].get(k, 0) for k in after[r]}
        cold, served, fills, fill_results, warnings = analyse_log(
            REPLICAS[r]["log"], log_start[r], log_end[r])
        # A cold revision: one this replica had to read from S3 — a request it served from S3
        # (access line with tier s3), or a fill of it (a request following a fill's spool is
        # logged with tier disk).
        cold_set = set(cold) | set(fills)
        cold_large = {k for k in cold_set if is_large(k[0])}
        cold_small = cold_set - cold_large
        fills_large = sum(v for k, v in fills.items() if is_large(k[0]))
        fills_small = sum(v for k, v in fills.items() if not is_large(k[0]))
        multi = {f"{k[0]} {k[1][:12]}": v for k, v in fills.items() if v > 1}
        s3_by_op = labels_of(d, "larder_s3_request_duration_seconds_count", "op")
        per.append({
            "replica": r,
            "http_requests": msum(d, "larder_http_requests_total"),
            "http_by_status": dict(labels_of(d, "larder_http_requests_total", "status")),
            "s3_requests_counted_by_larderd": sum(s3_by_op.values()),
            "s3_requests_by_op": dict(s3_by_op),
            "s3_errors": msum(d, "larder_s3_errors_total"),
            "s3_body_reads": msum(d, "larder_s3_body_reads_total"),
            "fills_total_metric": dict(labels_of(d, "larder_fills_total", "result")),
            "fill_follower_fallbacks": msum(d, "larder_fill_follower_fallbacks_total"),
            "fills_logged": dict(fill_results),
            "fills_large": fills_large,
            "fills_small": fills_small,
            "cold_large": len(cold_large),
            "cold_small": len(cold_small),
            "requests_served_from_s3_large": sum(cold[k] for k in cold_large),
            "requests_served_from_s3_small": sum(cold[k] for k in cold_small),
            "revisions_filled_more_than_once": multi,
            "fills_without_a_request_logged_as_served_from_s3": len(set(fills) - set(cold)),
            "served_from_s3_but_never_filled": sorted(f"{k} {e}" for k, e in set(cold) - set(fills))[:50],
            "served_from_s3_but_never_filled_count": len(set(cold) - set(fills)),
            "panics": msum(d, "larder_request_panics_total"),
            "limit_rejections": msum(d, "larder_limit_rejections_total"),
            "warnings": dict(warnings),
            "rss_peak_kib": hwm[r],
            "rss_sampled_peak_kib": rss_peak[r],
            "cpu_seconds": (cpu_after[f"larderd-{r}"] or 0) - (cpu_before[f"larderd-{r}"] or 0),
        })
    http_total = sum(p["http_requests"] for p in per)
    s3_larderd = sum(p["s3_requests_counted_by_larderd"] for p in per)
    rgw_req = rgw_failed = None
    if rgw_before and rgw_after and "req" in rgw_after:
        rgw_req = rgw_after["req"] - rgw_before["req"]
        rgw_failed = rgw_after.get("failed_req", 0) - rgw_before.get("failed_req", 0)
    gen_cpu = (gen_after.user + gen_after.system + gen_after.children_user
               + gen_after.children_system) - (gen_before.user + gen_before.system
                                               + gen_before.children_user
                                               + gen_before.children_system)
    cli_cpu = (gen_after.children_user + gen_after.children_system) - (
        gen_before.children_user + gen_before.children_system)
    busy = (busy_after[0] - busy_before[0]) / CLK
    larderd_cpu = sum(p["cpu_seconds"] for p in per)
    s3_cpu = sum((cpu_after[k] or 0) - (cpu_before[k] or 0) for k in cpu_after
                 if not k.startswith("larderd-"))
    ops = ["get_large", "get_small", "put_small", "overwrite_large", "restore", "save"]
    op_rows = []
    for op in ops:
        lat = STATS.lat.get(op, [])
        op_rows.append({
            "op": op, "count": STATS.count[op], "per_second": STATS.count[op] / elapsed,
            "mib_per_second": STATS.bytes[op] / MIB / elapsed,
            "p50_ms": pct(lat, 50) * 1000, "p99_ms": pct(lat, 99) * 1000,
            "max_ms": (max(lat) * 1000) if lat else float("nan"),
            "restarts_after_412": STATS.restarts[op], "gave_up_changing": STATS.gaveup[op],
            "errors": STATS.errors[op],
        })
    commit = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse",
                             "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "commit": commit, "config": CONFIG, "cores": os.cpu_count(),
        "load_average_before": load_before, "load_average_after": load_after,
        "elapsed_seconds": elapsed, "client_ops": client_ops, "operations": op_rows,
        "replicas": per, "rgw_requests": rgw_req, "rgw_perf_before": rgw_before,
        "rgw_perf_after": rgw_after, "http_requests_to_replicas": http_total,
        "s3_requests_counted_by_larderd": s3_larderd,
        "cpu_seconds": {"machine_busy": busy, "larderd_all": larderd_cpu, "s3_server": s3_cpu,
                        "generator_python": gen_cpu - cli_cpu, "larder_cli_children": cli_cpu},
        "cli_peak_rss_kib": dict(STATS.cli_rss), "verify_seconds": STATS.verify_seconds,
        "notes": dict(STATS.notes), "error_kinds": dict(STATS.error_kinds),
        "error_samples": STATS.error_samples,
        "large_objects": {k: REG.large_sizes[k] for k in REG.large_keys},
        "large_revisions_written": sum(1 for s in REG.seeds.values() if s["kind"] == "large"),
    }
    with open(os.path.join(WORK, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)

    # ---- Markdown ---------------------------------------------------------------------------
    c = CONFIG
    out = []
    w = out.append
    w(f"Run: {result['date_utc']} UTC, commit {commit}; {os.cpu_count()} cores, load average "
      f"{load_before[0]:.1f} before / {load_after[0]:.1f} after. **The generator, the "
      f"{n} larderd replicas, the larder CLIs and the S3 server (Ceph RGW) all share these "
      f"{os.cpu_count()} cores over loopback**; every figure below is measured that way.")
    w("")
    w(f"Fleet: {n} replicas over one bucket (`--revalidate-after {c['REVALIDATE']}`), "
      f"{c['CLIENTS']} clients for {elapsed:.0f} s (limit {c['DURATION']:.0f} s or "
      f"{c['MAX_OPS']} ops), think time {c['THINK_MS']:.0f} ms mean between ops. Objects: "
      f"{c['LARGE_COUNT']} large of {c['LARGE_MIN_MIB']}–{c['LARGE_MAX_MIB']} MiB, "
      f"{c['SMALL_COUNT']} small of {c['SMALL_MIN_KIB']}–{c['SMALL_MAX_KIB']} KiB (plus the "
      f"new keys PUT during the run), {c['SNAPSHOTS']} snapshots of {c['SNAPSHOT_FILES']} files. "
      f"Mix weights get_large {c['W_GET_LARGE']:g} / get_small {c['W_GET_SMALL']:g} / put_small "
      f"{c['W_PUT_SMALL']:g} / restore {c['W_RESTORE']:g} / overwrite_large "
      f"{c['W_OVERWRITE_LARGE']:g} / save {c['W_SAVE']:g}; at most {c['LARGE_SLOTS']} large "
      f"gets and {c['RESTORE_SLOTS']} restores at once, one large overwrite per "
      f"{c['OVERWRITE_INTERVAL']:g} s (≤ {c['OVERWRITE_MAX_MIB']} MiB in all), one save per "
      f"{c['SAVE_INTERVAL']:g} s; an op drawn while its slots are taken becomes a get_small.")
    w("")
    w("| operation | ops | ops/s | MiB/s | p50 ms | p99 ms | max ms | object changed: CLI restarts / gave up, retried | errors |")
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in op_rows:
        w(f"| {row['op']} | {row['count']} | {row['per_second']:.1f} | "
          f"{row['mib_per_second']:.1f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
          f"{row['max_ms']:.1f} | {row['restarts_after_412']} / {row['gave_up_changing']} | "
          f"{row['errors']} |")
    tot_bytes = sum(STATS.bytes.values())
    w(f"| **all** | {client_ops} | {client_ops / elapsed:.1f} | {tot_bytes / MIB / elapsed:.1f} "
      f"| | | | {sum(STATS.restarts.values())} / {sum(STATS.gaveup.values())} | "
      f"**{sum(STATS.errors.values())}** |")
    w("")
    w("| replica | HTTP requests | S3 requests (larderd's count) | cold revisions: large / small | fills: large / small | **fills per cold revision** (goal 1): large / small | S3 body reads per cold revision | revisions filled more than once | answers other than 2xx | peak RSS (VmHWM) | CPU s |")
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for p in per:
        cl, cs = p["cold_large"], p["cold_small"]
        fl, fs = p["fills_large"], p["fills_small"]
        ratio_l = f"{fl / cl:.2f}" if cl else "—"
        ratio_s = f"{fs / cs:.2f}" if cs else "—"
        reads = f"{p['s3_body_reads'] / (cl + cs):.2f}" if cl + cs else "—"
        other = ", ".join(f"{st}: {v:.0f}" for st, v in sorted(p["http_by_status"].items())
                          if not st.startswith("2") and v) or "none"
        w(f"| {p['replica']} | {p['http_requests']:.0f} | "
          f"{p['s3_requests_counted_by_larderd']:.0f} | {cl} / {cs} | {fl} / {fs} | "
          f"{ratio_l} / {ratio_s} | {reads} | {len(p['revisions_filled_more_than_once'])} | "
          f"{other} | "
          f"{(p['rss_peak_kib'] or 0) / 1024:.0f} MiB | {p['cpu_seconds']:.0f} |")
    w("")
    ratio = f"{rgw_req / client_ops:.2f}" if rgw_req is not None and client_ops else "n/a"
    ratio_http = f"{rgw_req / http_total:.3f}" if rgw_req is not None and http_total else "n/a"
    w(f"- **S3 requests per client request: {ratio}** (RGW's own count: {rgw_req} requests, "
      f"multipart parts included, {rgw_failed} of them answered with an error status such as "
      f"404 or 412, for {client_ops} client operations; {ratio_http} per HTTP "
      f"request the replicas answered, {http_total:.0f} of them). larderd's own count "
      f"(`larder_s3_request_duration_seconds_count`, which leaves out multipart parts and "
      f"completions): {s3_larderd:.0f} ({sum(p['s3_errors'] for p in per):.0f} of them "
      f"failed, `larder_s3_errors_total`), by kind "
      f"{dict(sum((collections.Counter(p['s3_requests_by_op']) for p in per), collections.Counter()))}.")
    all_l = [p["fills_large"] / p["cold_large"] for p in per if p["cold_large"]]
    all_s = [p["fills_small"] / p["cold_small"] for p in per if p["cold_small"]]
    if all_l:
        w(f"- **Fills per cold object per replica** (goal 1): large {min(all_l):.2f}–"
          f"{max(all_l):.2f}, small {min(all_s, default=0):.2f}–{max(all_s, default=0):.2f} "
          f"(large: the large objects and snapshots; a cold revision: one (key, ETag) a replica "
          f"served from S3 (tier `s3` in its access log) or filled; a fill: a `fill ended` or "
          f"`fill abandoned` line of that replica's log for that revision that copied or tried "
          f"to copy it; revisions served from S3 and never filled: "
          f"{sum(p['served_from_s3_but_never_filled_count'] for p in per)}; fills that found "
          f"the revision on disk already and copied nothing: "
          f"{sum(p['fills_logged'].get('unneeded', 0) for p in per)}; fill results "
          f"{dict(sum((collections.Counter(p['fills_logged']) for p in per), collections.Counter()))}).")
    w(f"- **Errors: {sum(STATS.errors.values())}** (goal 0); first samples in results.json. "
      f"\"object changed\" counts the CLI's restarts after a 412 (the download then "
      f"completed with one revision) and downloads the CLI gave up after its bounded restarts "
      f"(exit 1, nothing written; the client goes on with its next op): clean, not errors. "
      f"Latency: from the request (or the CLI's start) to the last byte (or its exit); a "
      f"large get includes its restarts, not the generator's check of the file.")
    w(f"- CPU seconds over the run: machine busy {busy:.0f} of {elapsed * os.cpu_count():.0f} "
      f"available; larderd replicas {larderd_cpu:.0f}, S3 server (mon, osd, rgw) {s3_cpu:.0f}, "
      f"larder CLIs {cli_cpu:.0f}, Python generator {gen_cpu - cli_cpu:.0f}, everything else "
      f"(kernel threads, other processes on the machine) "
      f"{busy - larderd_cpu - s3_cpu - gen_cpu:.0f}.")
    w(f"- Peak RSS of one larder CLI: get {STATS.cli_rss.get('get_large', 0) / 1024:.0f} MiB, "
      f"restore {STATS.cli_rss.get('restore', 0) / 1024:.0f} MiB.")
    if STATS.notes:
        w("- Counts: " + "; ".join(f"{k}: {v}" for k, v in sorted(STATS.notes.items())) + ".")
    bad = {p["replica"]: p["warnings"] for p in per if p["warnings"]}
    if bad:
        w(f"- Server warnings and errors logged during the run: {json.dumps(bad)}")
    if STATS.error_kinds:
        w("- Errors by kind: " + "; ".join(f"{k}: {v}" for k, v in STATS.error_kinds.most_common())
          + ".")
    if STATS.error_samples:
        w("- First errors:")
        for e in STATS.error_samples[:8]:
            w(f"  - t={e['t']} s {e['op']}: {e['what'][:300]}")
    print("\n".join(out), flush=True)
    if sum(STATS.errors.values()):
        sys.exit(3)


if __name__ == "__main__":
    main()
