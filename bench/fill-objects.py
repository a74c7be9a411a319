#!/usr/bin/env python3
"""Uploads many small objects to a running larderd (used by bench/disk-vs-nginx.sh).

    fill-objects.py HOST:PORT NAMESPACE COUNT [SIZE] [THREADS]

PUTs COUNT objects of SIZE bytes (default 100) as NAMESPACE/obj-000000 ... over THREADS
keep-alive connections (default 16). Exits non-zero, naming the first failure, if any PUT is not
answered 200/201.
"""

import http.client
import os
import sys
import threading
import time


def main() -> int:
    addr, namespace, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    size = int(sys.argv[4]) if len(sys.argv) > 4 else 100
    threads = int(sys.argv[5]) if len(sys.argv) > 5 else 16
    host, port = addr.rsplit(":", 1)
    failures: list[str] = []
    lock = threading.Lock()

    def worker(tid: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        for i in range(tid, count, threads):
            body = (b"%06d:" % i) + os.urandom(size // 2).hex().encode()[: size - 7]
            path = f"/api/v1/object/{namespace}/obj-{i:06d}"
            try:
                conn.request("PUT", path, body=body,
                             headers={"Content-Type": "application/octet-stream"})
                resp = conn.getresponse()
                text = resp.read()
                if resp.status not in (200, 201):
                    with lock:
                        failures.append(f"PUT {path}: {resp.status} {text[:200]!r}")
                    return
            except (OSError, http.client.HTTPException) as e:
                with lock:
                    failures.append(f"PUT {path}: {type(e).__name__}: {e}")
                return
        conn.close()

    started = time.monotonic()
    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.monotonic() - started
    if failures:
        print(f"fill-objects: {len(failures)} thread(s) failed; first: {failures[0]}",
              file=sys.stderr)
        return 1
    print(f"fill-objects: {count} objects of {size} B in {elapsed:.1f} s "
          f"({count / elapsed:.0f} PUT/s, {threads} connections)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
