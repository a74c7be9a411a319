#!/usr/bin/env python3
"""bench/make-git-repo.py DIR — a large bare git repository for bench/git-restore.sh.

Shaped like the issue's anchor (a real 109 MiB repository with 23,000 commits and 3,072 files)
and like real source trees (ripgrep's files average 13.7 KB): FILES text files of about
FILE_BYTES, then COMMITS commits on `main`, each replacing a run of lines (about EDIT_BYTES) in
CHANGED files with new pseudo-random ones, so that history is made of deltas as in a real
repository and outweighs the working tree in the pack; plus a few executables, a symlink and
tags every 1,000 commits. Deterministic (fixed seed and dates), made with `git fast-import`
and packed with a full delta search (`git repack -adf`), in a few minutes.

Knobs (environment): COMMITS=23000 FILES=3072 CHANGED=2 FILE_BYTES=12000 EDIT_BYTES=1200
"""
import os
import random
import subprocess
import sys


def main() -> None:
    dest = sys.argv[1]
    commits = int(os.environ.get("COMMITS", "23000"))
    files = int(os.environ.get("FILES", "3072"))
    changed = int(os.environ.get("CHANGED", "2"))
    size = int(os.environ.get("FILE_BYTES", "12000"))
    edit = int(os.environ.get("EDIT_BYTES", "1200"))
    rng = random.Random(42)
    alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _(){};=+-*/"

    def lines(n_bytes: int) -> list:
        # Text-like lines of random tokens: compressible like source code.
        out, total = [], 0
        while total < n_bytes:
            line = bytes(rng.choice(alphabet) for _ in range(rng.randint(20, 90))) + b"\n"
            out.append(line)
            total += len(line)
        return out

    tree = {}

    def edited(i: int) -> bytes:
        old = tree[i]
        start = rng.randrange(len(old))
        new = lines(edit)
        tree[i] = old[:start] + new + old[start + len(new):]
        return b"".join(tree[i])

    def path(i: int) -> str:
        return f"src/mod{i % 48:02d}/sub{i % 7}/file{i:05d}.rs"

    subprocess.run(["git", "-c", "init.defaultBranch=main", "init", "-q", "--bare", dest], check=True)
    subprocess.run(["git", "-C", dest, "symbolic-ref", "HEAD", "refs/heads/main"], check=True)
    fi = subprocess.Popen(
        ["git", "-C", dest, "fast-import", "--quiet", "--done"], stdin=subprocess.PIPE
    )
    w = fi.stdin
    when = 1_600_000_000
    for n in range(commits):
        when += 97
        message = f"change {n}\n".encode()
        w.write(b"commit refs/heads/main\n")
        w.write(f"committer Bench <bench@example.com> {when} +0000\n".encode())
        w.write(b"data %d\n%s\n" % (len(message), message))
        if n == 0:
            for i in range(files):
                tree[i] = lines(size)
                data = b"".join(tree[i])
                w.write(b"M 644 inline %s\ndata %d\n" % (path(i).encode(), len(data)) + data + b"\n")
            for i in range(4):
                data = b"#!/bin/sh\necho tool %d\n" % i
                w.write(b"M 755 inline bin/tool%d\ndata %d\n" % (i, len(data)) + data + b"\n")
            target = path(0).encode()
            w.write(b"M 120000 inline link-to-first\ndata %d\n%s\n" % (len(target), target))
        else:
            for _ in range(changed):
                i = rng.randrange(files)
                data = edited(i)
                p = path(i).encode()
                w.write(b"M 644 inline %s\ndata %d\n" % (p, len(data)) + data + b"\n")
        w.write(b"\n")
        if n % 1000 == 999:
            w.write(f"reset refs/tags/v{n // 1000}\nfrom refs/heads/main\n\n".encode())
    w.write(b"done\n")
    w.close()
    if fi.wait() != 0:
        sys.exit("git fast-import failed")
    # One pack with deltas searched as a real server's would be after gc.
    subprocess.run(["git", "-C", dest, "repack", "-adfq"], check=True)


if __name__ == "__main__":
    main()
