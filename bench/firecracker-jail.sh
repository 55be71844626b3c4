#!/bin/bash
# What jailing a Firecracker VM costs per start (issue 13; figures go to docs/benchmarks.md).
# Not a test: prints numbers, each a ratio of two things measured interleaved in this run.
#  1. putting the shared boot files (the ELF vmlinux and the initramfs) into a fresh jail:
#     hard links, untouched (what the backend does) vs. private copies handed to the jailed
#     uid (the alternative when the files are not readable by it; the chown-the-shared-inode
#     approach it replaces cost nothing but changed the shared files);
#  2. process start until the API socket answers GET /version: through the jailer (which
#     copies the Firecracker binary into the jail, makes device nodes, chroots, drops
#     privileges) vs. Firecracker started directly.
# Usage: bench/firecracker-jail.sh [ROUNDS]  (root; real binaries on PATH or in
#        ../shared/firecracker/bin; boot files from $BOOT, default the e2e or installed state)
set -euo pipefail
rounds=${1:-9}
repo=$(cd "$(dirname "$0")/.." && pwd)
bindir=$(cd "$repo/.." && pwd)/shared/firecracker/bin
fc=$(command -v firecracker || ls "$bindir"/firecracker-* 2>/dev/null | sort -V | tail -n1 || true)
jailer=$(command -v jailer || ls "$bindir"/jailer* 2>/dev/null | head -n1 || true)
[ -n "$fc" ] && [ -n "$jailer" ] || { echo "no firecracker/jailer found"; exit 1; }
boot=${BOOT:-}
for b in "$boot" /var/tmp/bandsox-e2e/state/boot /var/lib/bandsox/boot; do
  [ -n "$b" ] && [ -f "$b/vmlinux" ] && [ -f "$b/initrd" ] && { boot=$b; break; }
done
[ -f "$boot/vmlinux" ] || { echo "no boot/vmlinux (launch one Firecracker VM first, or set BOOT)"; exit 1; }
work=$(mktemp -d /var/tmp/bsx-bench-jail.XXXXXX)
pids=()
# shellcheck disable=SC2154 # p is the loop variable inside the trap's own text
trap 'for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
now_us() { echo $(( $(date +%s%N) / 1000 )); }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b == 0) print "n/a"; else printf "%.1f", a/b }'; }
echo "binaries: $fc, $jailer; boot files: $boot"

echo "== 1. boot files into a fresh jail root: hard link vs copy ($rounds rounds, interleaved)"
# In one process (python3), so only the file operations are timed, as in the daemon.
python3 - "$boot" "$work/j" "$rounds" <<'PY'
import os, shutil, statistics, sys, time
boot, work, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
files = [os.path.join(boot, f) for f in ("vmlinux", "initrd")]
size = sum(os.path.getsize(f) for f in files)
res = {"link": [], "copy": []}
for i in range(rounds):
    for how in ("link", "copy"):
        root = os.path.join(work, f"{how}{i}")
        os.makedirs(root)
        os.sync()
        t0 = time.perf_counter()
        for f in files:
            dst = os.path.join(root, os.path.basename(f))
            if how == "link":
                os.link(f, dst)
            else:
                shutil.copyfile(f, dst)
                os.chown(dst, 65534, 65534)
        res[how].append((time.perf_counter() - t0) * 1e6)
        shutil.rmtree(root)
l, c = statistics.median(res["link"]), statistics.median(res["copy"])
print(f"link median {l:.0f} us; copy median {c:.0f} us (+{size >> 20} MiB of disk per running VM); "
      f"copy/link {c / l:.0f}")
PY

echo "== 2. start -> API answers: jailer vs direct ($rounds rounds, interleaved)"
: > "$work/jailed"; : > "$work/direct"
api_up() { # socket: wait until GET /version answers
  for _ in $(seq 1 2000); do
    curl -s -o /dev/null --max-time 1 --unix-socket "$1" http://localhost/version && return 0
    sleep 0.002
  done
  return 1
}
for i in $(seq 1 "$rounds"); do
  for how in jailed direct; do
    d=$work/vm-$how-$i; mkdir -p "$d/jail"
    t0=$(now_us)
    if [ $how = jailed ]; then
      "$jailer" --id "bx-bench$i" --exec-file "$fc" --uid 65534 --gid 65534 \
        --chroot-base-dir "$d/jail" -- --api-sock api.sock >/dev/null 2>&1 &
      sock=$d/jail/$(basename "$fc")/bx-bench$i/root/api.sock
    else
      "$fc" --api-sock "$d/api.sock" --id "bx-bench$i" >/dev/null 2>&1 &
      sock=$d/api.sock
    fi
    pid=$!; pids+=("$pid")
    api_up "$sock" || { echo "API of $how did not come up"; exit 1; }
    echo $(( $(now_us) - t0 )) >> "$work/$how"
    kill -9 "$pid"; wait "$pid" 2>/dev/null || true
    rm -rf "$d"
  done
done
j=$(median < "$work/jailed"); d=$(median < "$work/direct")
echo "jailed median ${j} us; direct median ${d} us; jailed/direct $(ratio "$j" "$d") (+$(( (j - d) / 1000 )) ms per start)"
