#!/usr/bin/env python3
"""Measures larderd's start-up time (used by bench/disk-vs-nginx.sh).

    startup-time.py EXPECTED_OBJECTS STDERR_FILE -- LARDERD [ARGS...]

Starts the command and prints two numbers of seconds from just before exec: until the
"larderd listening on http://ADDR" line on its stdout (larderd serves from then on), and until
/api/v1/stats reports EXPECTED_OBJECTS objects in the disk tier (the index, which larderd loads
in the background, is complete; this also shows that a fast start did not skip the scan). Then
stops it with SIGTERM. Exits non-zero, saying why, if larderd exits early, prints no such line
within 120 s, does not reach the object count within 120 s, or does not stop cleanly.
"""

import json
import os
import selectors
import signal
import subprocess
import sys
import time
import urllib.request


def main() -> int:
    expected = int(sys.argv[1])
    stderr_path = sys.argv[2]
    cmd = sys.argv[sys.argv.index("--") + 1:]
    with open(stderr_path, "ab") as err:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        buf = b""
        addr = None
        while addr is None:
            if time.monotonic() - started > 120:
                proc.kill()
                proc.wait()
                print("startup-time: no 'larderd listening on' line within 120 s", file=sys.stderr)
                return 1
            if not sel.select(timeout=1):
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                rc = proc.wait()
                print(f"startup-time: larderd exited with status {rc} before listening "
                      f"(stderr in {stderr_path})", file=sys.stderr)
                return 1
            buf += chunk
            for line in buf.split(b"\n")[:-1]:
                if line.startswith(b"larderd listening on "):
                    addr = line.split(b" ")[-1].decode().strip()
                    break
        elapsed = time.monotonic() - started
        objects = None
        loaded = None
        while time.monotonic() - started < 120:
            try:
                with urllib.request.urlopen(f"{addr}/api/v1/stats", timeout=30) as r:
                    stats = json.load(r)
                objects = sum(t.get("objects", 0) for t in stats.get("tiers", []))
            except Exception as e:  # noqa: BLE001 - report whatever went wrong
                objects = f"error: {e}"
            if objects == expected:
                loaded = time.monotonic() - started
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            print("startup-time: larderd did not stop within 30 s of SIGTERM", file=sys.stderr)
            return 1
        if objects != expected:
            print(f"startup-time: /api/v1/stats reports {objects} objects, expected {expected}",
                  file=sys.stderr)
            return 1
        if rc != 0:
            print(f"startup-time: larderd exited with status {rc} after SIGTERM", file=sys.stderr)
            return 1
    print(f"{elapsed:.3f} {loaded:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
