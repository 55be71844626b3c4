#!/bin/bash
# Shared by the bench scripts: a private state directory under $work (copies of the
# installed guest artefacts), mounted at $MNT; unmounted and its VMMs killed on exit.
# Set `work` before sourcing; BANDSOX defaults to the release build; BANDSOX_MAIN_STATE
# names the state directory whose boot/ and images/ are copied (default /var/lib/bandsox).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BANDSOX=${BANDSOX:-$repo/target/release/bandsox}
BANDSOX_DEVTOOLS=${BANDSOX_DEVTOOLS:-$repo/target/release/bandsox-devtools}
# shellcheck disable=SC2154 # `work` is set by the sourcing script (see above)
MNT=$work/mnt; STATE=$work/state
cleanup() {
  "$BANDSOX" unmount "$MNT" >/dev/null 2>&1 || true
  for p in "$STATE"/vms/*/vmm.pid; do [ -f "$p" ] && kill -9 "$(cat "$p")" 2>/dev/null || true; done
}
trap cleanup EXIT
cleanup; rm -rf "$work"; mkdir -p "$MNT" "$STATE"
# BANDSOX_MAIN_STATE: where the guest artefacts come from (default: the installed ones).
main_state=${BANDSOX_MAIN_STATE:-/var/lib/bandsox}
cp -a --reflink=auto "$main_state/boot" "$main_state/images" "$STATE/"

# bench_mount: mount the private tree (the environment decides the backend).
bench_mount() { "$BANDSOX" mount "$MNT" --state-dir "$STATE"; }
