#!/bin/bash
# Keystroke echo through `bandsox attach` vs. a raw `exec` round trip, on one VM in one
# run. Echo: `bandsox attach VM -- cat` runs in a local pseudo-terminal (as in a real
# terminal); the time from writing one byte to the local terminal to the guest
# terminal's echo of it appearing there (local terminal → attach → runs/<n>/terminal →
# daemon → agent → guest line discipline, and back). Peer: `echo true > VM/exec`
# (open, write, close waits for exit). Not a test: prints numbers (docs/benchmarks.md).
# Usage: bench/keystroke-echo.sh [N]   (root; after mount-helpers/setup --no-mount)
set -euo pipefail
n=${1:-200}
work=/var/tmp/bandsox-bench-echo
. "$(dirname "$0")/lib.sh"
# Boot this tree's agent when its static build exists (agent/build-static.sh): terminal
# runs need an agent that speaks ExecWith.
agent_bin=$repo/target/x86_64-unknown-linux-gnu/release/bandsox-agent
cache=${BANDSOX_CACHE:-/var/cache/bandsox}
if [ -x "$agent_bin" ] && [ -d "$cache/kernel" ]; then
  "$BANDSOX" guest-build --state-dir "$STATE" --agent "$agent_bin" --kernel-root "$cache/kernel" \
    --busybox "$cache/busybox/bin/busybox" > "$work/guest-build.log" 2>&1
fi
bench_mount
mkdir "$MNT/echo"
python3 - "$BANDSOX" "$MNT" echo "$n" <<'PY'
import os, pty, select, statistics, sys, time

bandsox, mnt, vm, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
exec_path = os.path.join(mnt, vm, "exec")

def exec_round_trip():
    t0 = time.perf_counter()
    fd = os.open(exec_path, os.O_WRONLY)
    os.write(fd, b"true\n")
    os.close(fd)
    return time.perf_counter() - t0

def read_until(fd, want, deadline):
    buf = b""
    while want not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SystemExit(f"no echo within the deadline; got {buf!r}")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            buf += os.read(fd, 4096)
    return buf

def drain(fd, quiet=0.5):
    got = b""
    while select.select([fd], [], [], quiet)[0]:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the attach process ended
            data = b""
        if not data:
            return got
        got += data
    return got

for _ in range(5):
    exec_round_trip()  # warm up
env = dict(os.environ, BANDSOX_MOUNT=mnt)
pid, fd = pty.fork()
if pid == 0:
    os.execve(bandsox, [bandsox, "attach", vm, "--", "cat"], env)
first = drain(fd, 2.0)
try:
    os.write(fd, b"")
except OSError:
    raise SystemExit(f"bandsox attach ended at once: {first!r}")
echo, raw = [], []
for i in range(n):
    # Interleaved, so both see the same machine state.
    raw.append(exec_round_trip())
    key = b"abcdefghij"[i % 10 : i % 10 + 1]
    t0 = time.perf_counter()
    os.write(fd, key)
    read_until(fd, key, time.monotonic() + 10)
    echo.append(time.perf_counter() - t0)
    if i % 50 == 49:
        os.write(fd, b"\r")
        drain(fd, 0.2)
os.write(fd, b"\r\x04")
drain(fd, 1.0)
os.waitpid(pid, 0)
me, mr = statistics.median(echo), statistics.median(raw)
q = lambda xs, p: sorted(xs)[int(len(xs) * p)]
print(f"keystroke echo via attach: median {me*1e3:.2f} ms, p90 {q(echo, .9)*1e3:.2f} ms (n={n})")
print(f"exec round trip (echo true > exec): median {mr*1e3:.2f} ms, p90 {q(raw, .9)*1e3:.2f} ms (n={n})")
print(f"ratio echo/exec (medians): {me/mr:.3f} (target <= 1.5)")
PY
rmdir "$MNT/echo"
