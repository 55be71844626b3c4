#!/usr/bin/env python3
"""Per-operation latency medians on one directory (used by bench/fs-peer.sh).

Usage: fsops.py DIR [N]
Prints one line per operation: "<name> <median_us>". Every operation runs N times
(default 300) on fresh names, in DIR (which must exist and be empty). The caller drops
caches where a row says "cold"; this script never does.
"""
import os
import statistics
import sys
import time

ns = time.perf_counter_ns


def median_us(samples):
    return statistics.median(samples) / 1000.0


def timed(fn, items):
    out = []
    for it in items:
        t0 = ns()
        fn(it)
        out.append(ns() - t0)
    return out


def main():
    d = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    os.chdir(d)
    names = [f"f{i}" for i in range(n)]
    data = b"x" * 100
    res = {}

    def create(name):
        fd = os.open(name, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.close(fd)

    res["create_write_close"] = timed(create, names)

    def chmod_utime(name):
        os.chmod(name, 0o600)
        os.utime(name, (1_000_000_000, 1_000_000_000))

    res["chmod_utime"] = timed(chmod_utime, names)
    res["rename"] = timed(lambda nm: os.rename(nm, "r" + nm), names)
    # The first lstat of each name after its rename.
    res["lstat_after_rename"] = timed(lambda nm: os.lstat("r" + nm), names)
    # A repeat of the same file: should be a kernel cache hit.
    res["lstat_warm"] = timed(lambda nm: os.lstat("r" + names[0]), names)

    def stat_missing(name):
        try:
            os.stat("missing-" + name)
        except FileNotFoundError:
            return
        raise SystemExit("missing name exists")

    res["stat_missing"] = timed(stat_missing, names)

    def getxattr_absent(name):
        try:
            os.getxattr("r" + name, "user.absent", follow_symlinks=False)
        except OSError:
            pass

    # fs/ answers this from the xattr names its entries carry: the kernel↔daemon part
    # of a request alone.
    res["getxattr_absent"] = timed(getxattr_absent, names)
    res["unlink"] = timed(lambda nm: os.unlink("r" + nm), names)

    # readdir of 1,000 entries (names only, like `ls` without -l).
    os.mkdir("rd")
    for i in range(1000):
        open(f"rd/e{i}", "wb").close()
    res["readdir_1000"] = timed(lambda _: os.listdir("rd"), range(20))

    for k in ["create_write_close", "chmod_utime", "rename", "lstat_after_rename",
              "lstat_warm", "stat_missing", "getxattr_absent", "unlink", "readdir_1000"]:
        print(f"{k} {median_us(res[k]):.1f}")


if __name__ == "__main__":
    main()
