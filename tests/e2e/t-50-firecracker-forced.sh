#!/bin/bash
# timeout: 180
# The Firecracker backend through the mount, on a host whose KVM cannot run guests
# (BANDSOX_FORCE_FIRECRACKER=1, test only): its guest never boots, so each VM is killed
# within a second of starting. With the real binaries (PATH, else ../shared/firecracker/bin):
# - the forced backend shows in info and events;
# - as root with a jailer beside the binary, VMs are jailed by default; the shared boot
#   files keep owner and mode; without a jailer they run unjailed;
# - a VMM killed mid-boot: state names its exit status and Firecracker's own error, the
#   console holds no Firecracker log line;
# - rmdir leaves no process, no jail, no directory;
# - a snapshot in a format this Firecracker cannot read is refused by clone with EINVAL
#   and a message naming both versions, leaving nothing behind;
# - `firecracker` and `jailer` on PATH as symlinks (release tarballs, update-alternatives):
#   the jailed start gets past the API socket (the jail is named after the resolved
#   binary) and the VM is still booting after the 10 s API deadline.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
repo=$(cd "$(dirname "$0")/../.." && pwd)
bindir=$(cd "$repo/.." && pwd)/shared/firecracker/bin
fc_new=$(command -v firecracker || true)
fc_old=
if [ -z "$fc_new" ] && [ -d "$bindir" ]; then
  fc_new=$(ls "$bindir"/firecracker-* 2>/dev/null | sort -V | tail -n1)
  fc_old=$(ls "$bindir"/firecracker-* 2>/dev/null | sort -V | head -n1)
  [ "$fc_old" = "$fc_new" ] && fc_old=
fi
if [ -z "$fc_new" ]; then
  echo "!!! SKIPPED t-50: no firecracker on PATH and no $bindir"
  exit 0
fi

restart_forced() { # FIRECRACKER [ENV=VALUE...]
  _fc=$1; shift
  "$BANDSOX" unmount "$MNT" >/dev/null 2>&1 || true
  for _ in $(seq 1 50); do [ -z "$(daemon_pid)" ] && break; sleep 0.1; done
  env "$@" BANDSOX_FORCE_FIRECRACKER=1 BANDSOX_FIRECRACKER="$_fc" BANDSOX_LOG=info \
    "$BANDSOX" mount "$MNT" --state-dir "$STATE" || fail "forced daemon did not start"
}
# Back to the suite's own daemon whatever happens (run.sh remounts it).
on_exit '"$BANDSOX" unmount "$MNT" >/dev/null 2>&1 || true'

boot_stat() { stat -c '%n %u:%g %a %i' "$STATE"/boot/vmlinuz "$STATE"/boot/initrd \
  "$STATE"/boot/vmlinux 2>/dev/null || true; }

# The id of VM $1 once its VMM runs (vmm.pid written), within 10 s; empty otherwise.
vmm_started() {
  for _ in $(seq 1 100); do
    _id=$(sed -n 's/.*"id": *"\([0-9a-f]*\)".*/\1/p' "$MNT/$1/info" 2>/dev/null | head -n1)
    if [ -n "$_id" ] && [ -s "$STATE/vms/$_id/vmm.pid" ]; then echo "$_id"; return; fi
    sleep 0.1
  done
}

# Start VM $1 (backend=firecracker) in the background, kill its VMM with signal $2 as
# soon as it runs, and wait for the create to give up. Prints the VM directory.
start_and_kill() {
  _vm=$1 _sig=$2
  ( echo "create $_vm backend=firecracker memory=128" > "$MNT/ctl" ) 2>/dev/null &
  _w=$!
  _id=$(vmm_started "$_vm")
  [ -n "$_id" ] || { kill $_w 2>/dev/null; fail "$_vm: no VMM started"; }
  _pid=$(cat "$STATE/vms/$_id/vmm.pid")
  sleep 0.3   # let it reach InstanceStart (the create is waiting for the agent)
  kill "-$_sig" "$_pid"
  # On kvm_pvm hosts a vCPU inside KVM_RUN can take a minute to come out, and Firecracker's
  # shutdown (its error already logged) waits for it: SIGKILL after 5 s.
  wait_for 5 gone "$_pid" || { note "$_vm: VMM still alive 5 s after SIG$_sig: SIGKILL"; kill -9 "$_pid"; }
  wait $_w && fail "$_vm: create succeeded although its VMM was killed"
  wait_for 10 gone "$_pid" || fail "$_vm: VMM $_pid still alive"
  echo "$STATE/vms/$_id"
}

# ---- the newest binary, jailed by default (root, jailer beside it or on PATH) ----------
restart_forced "$fc_new"
grep -q "FORCED by BANDSOX_FORCE_FIRECRACKER=1" "$STATE/daemon.log" 2>/dev/null \
  || note "(daemon log does not mention the forced backend; checked in info/events below)"
before=$(boot_stat)
dir=$(start_and_kill fcj BUS)
state=$(cat "$MNT/fcj/state")
note "state: $state"
assert_contains "$state" "failed: the VMM exited before the agent answered: Firecracker " "state"
case "$state" in
  *"Firecracker exited with status "*|*"Firecracker was killed by signal 9 (SIGKILL)"*) ;;
  *) fail "state names no exit status: $state";;
esac
assert_contains "$state" "intercepting signal 7" "state (Firecracker's own error line)"
case "$state" in *"Listening on API socket"*) fail "the API banner is not a reason: $state";; esac
if grep -q "Listening on API socket\|API server started" "$MNT/fcj/console"; then
  fail "Firecracker's log reached the guest console: $(head -c 300 "$MNT/fcj/console")"
fi
info=$(cat "$MNT/fcj/info")
assert_contains "$info" '"backend": "firecracker"' "info"
assert_contains "$info" '"backend_forced": "BANDSOX_FORCE_FIRECRACKER=1' "info"
grep " fcj created " "$MNT/events" | has "forced: BANDSOX_FORCE_FIRECRACKER=1" \
  || fail "created event does not say forced: $(grep ' fcj ' "$MNT/events")"
grep " fcj booting " "$MNT/events" | has "forced" || fail "booting event does not say forced"
if [ -n "$(command -v jailer || ls "$(dirname "$fc_new")"/jailer* 2>/dev/null)" ]; then
  [ -d "$dir/jail" ] || fail "root with a jailer found, but the VM was not jailed"
  note "jailed: $(cd "$dir" && ls -d jail/*/*/root)"
  # The shared boot files keep owner, mode and inode (vmlinux is made on first launch).
  after=$(boot_stat)
  while read -r line; do
    echo "$after" | has -xF "$line" || fail "shared boot file changed: was [$line], now [$(echo "$after" | grep "^${line%% *} ")]"
  done <<< "$before"
  echo "$after" | has " 0:0 644 " || fail "boot files not root 0644: $after"
  note "boot files unchanged: $(echo "$after" | tr '\n' ';')"
fi
rmdir "$MNT/fcj" || fail "rmdir fcj"
[ ! -e "$dir" ] || fail "VM directory left: $(ls -la "$dir")"
[ ! -e "$MNT/fcj" ] || fail "fcj still listed"

# SIGKILL: the reason says so (no Firecracker error line to add).
dir=$(start_and_kill fck KILL)
state=$(cat "$MNT/fck/state")
assert_contains "$state" "was killed by signal 9 (SIGKILL)" "state after SIGKILL"
rmdir "$MNT/fck" || fail "rmdir fck"

# A snapshot in a newer format than this Firecracker reads: clone refuses up front.
snap=$STATE/snapshots/fcnew
mkdir -p "$snap"
: > "$snap/state"; : > "$snap/memory"; : > "$snap/disk.ext4"
python3 - "$snap/info.json" "$STATE/boot" <<'EOF'
import json, sys, hashlib, os
out, boot = sys.argv[1], sys.argv[2]
def ident(p):
    d = open(p, 'rb').read()
    return {"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
info = {
  "name": "fcnew", "source_vm": "elsewhere", "source_id": "0123456789ab",
  "created": "2026-12-01T00:00:00Z", "backend": "firecracker", "vcpus": 1,
  "memory_mib": 128, "disk_mib": 8, "image": "base",
  "config": {"image": "base", "vcpus": 1, "memory_mib": 128, "disk_mib": None,
             "net": "none", "backend": "firecracker"},
  "kernel": ident(os.path.join(boot, "vmlinuz")), "initrd": ident(os.path.join(boot, "initrd")),
  "sizes": {"state_bytes": 0, "memory_bytes": 0, "disk_bytes": 0,
            "disk_allocated_bytes": 0, "total_allocated_bytes": 0},
  "disk_copy": "sparse copy", "create_ms": 1, "paused_ms": 1,
  "owner_uid": 0, "owner_gid": 0,
  "saved": {"state_file": "state", "memory_file": "memory",
            "restore": {"firecracker_version": "99.1.0-future", "snapshot_format": "99.0.0"}},
}
json.dump(info, open(out, "w"))
EOF
[ -d "$MNT/snapshots/fcnew" ] || fail "planted snapshot not listed: $(ls "$MNT/snapshots"; tail -n 3 "$STATE/daemon.log")"
vms_before=$(ls "$STATE/vms" | wc -l)
write_expect_error "$MNT/ctl" "clone fcnew fcc count=2" "Invalid argument"
msg=$(cat "$MNT/ctl")
note "clone refused: $msg"
assert_contains "$msg" "99.1.0-future" "clone error"
assert_contains "$msg" "$("$fc_new" --version 2>/dev/null | sed -n 's/^Firecracker v//p' | head -n1)" "clone error"
assert_contains "$msg" "v99.0.0" "clone error"
[ ! -e "$MNT/fcc-1" ] || fail "a clone was created"
assert_eq "$vms_before" "$(ls "$STATE/vms" | wc -l)" "VM directories after the refused clone"
rmdir "$MNT/snapshots/fcnew" || fail "rmdir of the planted snapshot"

# ---- the older binary (no jailer beside it): unjailed by default -----------------------
if [ -n "$fc_old" ]; then
  restart_forced "$fc_old"
  dir=$(start_and_kill fco BUS)
  state=$(cat "$MNT/fco/state")
  assert_contains "$state" "failed: the VMM exited before the agent answered: Firecracker " "state ($fc_old)"
  assert_contains "$state" "intercepting signal 7" "state ($fc_old)"
  [ ! -d "$dir/jail" ] || fail "jailed although no jailer is beside $fc_old"
  assert_contains "$(cat "$MNT/fco/info")" '"backend_forced"' "info ($fc_old)"
  rmdir "$MNT/fco" || fail "rmdir fco"
  [ ! -e "$dir" ] || fail "VM directory left"
else
  note "one binary only: the unjailed default is not checked here"
fi

# ---- `firecracker` and `jailer` on PATH as symlinks (release tarballs, update-alternatives) --
jailer_bin=$(command -v jailer || ls "$(dirname "$(readlink -f "$fc_new")")"/jailer* 2>/dev/null | sort -V | tail -n1 || true)
if [ "$(id -u)" = 0 ] && [ -n "$jailer_bin" ]; then
  links=$(mktemp -d /tmp/bx-fclinks.XXXXXX)
  on_exit "rm -rf '$links'"
  ln -s "$(readlink -f "$fc_new")" "$links/firecracker"
  ln -s "$(readlink -f "$jailer_bin")" "$links/jailer"
  resolved=$(basename "$(readlink -f "$fc_new")")
  # No BANDSOX_FIRECRACKER: the daemon finds `firecracker` (the link) on PATH.
  restart_forced "" PATH="$links:$PATH"
  t0=$(date +%s)
  ( echo "create fcl backend=firecracker memory=128" > "$MNT/ctl" ) 2>/dev/null &
  w=$!
  id=$(vmm_started fcl)
  [ -n "$id" ] || { kill $w 2>/dev/null; fail "fcl: no VMM started ($(cat "$MNT/fcl/state" 2>/dev/null))"; }
  dir=$STATE/vms/$id
  wait_for 10 test -S "$dir/jail/$resolved/bx-$id/root/api.sock" \
    || fail "no API socket in the jail named after $resolved: $(cd "$dir" && find jail -maxdepth 3); state: $(cat "$MNT/fcl/state")"
  [ ! -e "$dir/jail/firecracker" ] || fail "a jail named after the link: $(cd "$dir" && find jail -maxdepth 3)"
  # Past the 10 s the launch waits for the API socket: still booting (the guest never
  # boots here), not failed.
  while [ $(( $(date +%s) - t0 )) -lt 12 ]; do sleep 0.5; done
  state=$(cat "$MNT/fcl/state")
  case "$state" in booting*) ;; *) fail "symlinked install: state after 12 s: $state";; esac
  note "symlinked firecracker and jailer: jailed as $resolved, $state after 12 s"
  pid=$(cat "$dir/vmm.pid")
  kill -9 "$pid"
  wait $w && fail "fcl: create succeeded although its VMM was killed"
  rmdir "$MNT/fcl" || fail "rmdir fcl"
  [ ! -e "$dir" ] || fail "VM directory left"
else
  note "not root or no jailer: the symlinked install is not checked here"
fi
