#!/bin/bash
# End-to-end tests: mount a private BandSox-FS tree and run every t-*.sh against it with
# real VMs (QEMU; TCG where KVM cannot run guests). Prints "N passed, N failed".
# Usage: tests/e2e/run.sh [PATTERN]   (needs root, the guest kernel and busybox that
#          mount-helpers/ensure-deps (or setup) extracts into /var/cache/bandsox, and this
#          tree's builds: target/release/bandsox and the static agent, agent/build-static.sh)
#        BANDSOX_E2E_BACKEND=firecracker tests/e2e/run.sh   (every VM on that backend)
#        BANDSOX_E2E_VSOCK=1 tests/e2e/run.sh   (QEMU with the agent on virtio-vsock through
#          vhost-device-vsock, as on Firecracker; only the tests marked "# vsock: yes")
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
BANDSOX=${BANDSOX:-$repo/target/release/bandsox}
BANDSOX_DEVTOOLS=${BANDSOX_DEVTOOLS:-$repo/target/release/bandsox-devtools}
work=${BANDSOX_TEST_DIR:-/var/tmp/bandsox-e2e}
MNT=$work/mnt
STATE=$work/state
export MNT STATE BANDSOX BANDSOX_DEVTOOLS
# Nothing here depends on what the host runs (mount-helpers/setup's /mnt/bandsox, its
# daemon, /var/lib/bandsox, /etc/bandsox/limits): the suite has its own mount point,
# state directory (guest artefacts built from this tree's agent) and limits file, and a
# client that falls back to the environment finds these.
export BANDSOX_MOUNT=$MNT BANDSOX_STATE_DIR=$STATE
pattern=${1:-}

cleanup() {
  "$BANDSOX" unmount "$MNT" >/dev/null 2>&1 || true
  # Kill every VMM (and vsock helper) of the test state dir (VMs outlive the daemon).
  for p in "$STATE"/vms/*/vmm.pid "$STATE"/vms/*/vhost-vsock.pid; do
    # Only a pid whose command line names this VM's directory (or, jailed, its jail id)
    # is ours to kill.
    [ -f "$p" ] || continue
    pid=$(cat "$p" 2>/dev/null) || continue; d=$(dirname "$p")
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -F -e "$d" -e "--id bx-$(basename "$d") " >/dev/null \
      && kill -9 "$pid" 2>/dev/null || true
  done
  pkill -f "bandsox mount $MNT" 2>/dev/null || true
}

# The limits file of the test daemon (empty: the host-derived defaults); tests that
# change limits write it and restore it. Never the host's /etc/bandsox/limits.
# Exported as BANDSOX_LIMITS too, so a daemon a test restarts by itself reads it as well.
LIMITS=$work/limits
BANDSOX_LIMITS=$LIMITS
export LIMITS BANDSOX_LIMITS
VSOCK=${BANDSOX_E2E_VSOCK:-0}
if [ "$VSOCK" = 1 ]; then export BANDSOX_QEMU_VSOCK=1; fi
start_daemon() {
  BANDSOX_LOG=${BANDSOX_LOG:-info} "$BANDSOX" mount "$MNT" --state-dir "$STATE" --limits "$LIMITS"
}
export -f start_daemon 2>/dev/null || true

cleanup
rm -rf "$work"
mkdir -p "$MNT" "$STATE"
: > "$LIMITS"
# The guest artefacts (kernel, initramfs with this tree's agent, base image), built from
# the extracted kernel and busybox in well under a second.
agent_bin=$repo/target/x86_64-unknown-linux-gnu/release/bandsox-agent
cache=${BANDSOX_CACHE:-/var/cache/bandsox}
[ -x "$agent_bin" ] || { echo "no static agent at $agent_bin: run agent/build-static.sh"; exit 1; }
AGENT=$agent_bin
export AGENT
"$BANDSOX" guest-build --state-dir "$STATE" --agent "$agent_bin" --kernel-root "$cache/kernel" \
  --busybox "$cache/busybox/bin/busybox" >"$work/guest-build.log" 2>&1 \
  || { echo "guest-build failed (mount-helpers/ensure-deps extracts the kernel and busybox):"; cat "$work/guest-build.log"; exit 1; }
# The same stories on each backend: BANDSOX_E2E_BACKEND=qemu (default) or firecracker.
BACKEND=${BANDSOX_E2E_BACKEND:-qemu}
export BACKEND
echo "backend=$BACKEND" > "$STATE/defaults"
echo "e2e backend: $BACKEND$([ "$VSOCK" = 1 ] && echo ' (agent over virtio-vsock: vhost-device-vsock)')"
start_daemon || { echo "daemon failed to start"; cat "$STATE/daemon.log"; exit 1; }

passed=0; failed=0; failed_names=""
for t in "$here"/t-*.sh; do
  name=$(basename "$t" .sh)
  if [ -n "$pattern" ] && [[ "$name" != *$pattern* ]]; then continue; fi
  if [ "$VSOCK" = 1 ] && ! grep -qx '# vsock: yes' "$t"; then continue; fi
  # Every test starts with a mounted daemon (a test may restart it).
  mountpoint -q "$MNT" || start_daemon || echo "daemon failed to start again (see $STATE/daemon.log)"
  start=$(date +%s)
  # A test may ask for more than the default 300 s with a "# timeout: SECONDS" line.
  limit=$(sed -n 's/^# timeout: \([0-9][0-9]*\)$/\1/p' "$t" | head -n1)
  if timeout -k 5 "${limit:-300}" bash "$t" > "$work/$name.log" 2>&1; then
    passed=$((passed+1)); echo "ok   $name ($(( $(date +%s) - start ))s)"
  else
    failed=$((failed+1)); failed_names="$failed_names $name"
    echo "FAIL $name ($(( $(date +%s) - start ))s)"; sed 's/^/     | /' "$work/$name.log" | tail -n 40
  fi
  # No VM may leak from one test into the next.
  for v in "$MNT"/*/; do
    v=$(basename "$v"); case "$v" in images|snapshots) continue;; esac
    if [ -d "$MNT/$v" ]; then rmdir "$MNT/$v" 2>/dev/null || true; fi
  done
done
if [ "$failed" -gt 0 ]; then
  echo "--- daemon log (tail) ---"; tail -n 60 "$STATE/daemon.log"
fi
cleanup
echo "e2e: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
