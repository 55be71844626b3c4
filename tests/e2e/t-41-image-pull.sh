#!/bin/bash
# pull from a throwaway loopback registry: multi-layer image with whiteouts, the blob
# cache (a second tag sharing layers downloads nothing), ENV/WORKDIR/USER, and the
# entrypoint as runs/main with autostart=1.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/images-lib.sh"
registry_with_test_image
W=$IMG_WORK
push "$W/oci:v1" t/app:v1
push "$W/oci:v2" t/app:v2
push "$W/oci:v2" t/other:same
note "registry at $REG"

pull_ok t41-v2 "$REG/t/app:v2"
assert_eq registry "$(info_field t41-v2 kind)"
assert_eq "http://$REG/t/app:v2" "$(info_field t41-v2 reference)"
assert_eq 3 "$(info_field t41-v2 layers)"
tail -n 300 "$MNT/events" | has "images/t41-v2 pull-progress layer=3/3" || fail "no pull progress events"
# The same image under another name and repository: every blob comes from the cache.
pull_ok t41-same "http://$REG/t/other:same"
tail -n 50 "$MNT/events" | grep "images/t41-same pull-fetched" | has "downloaded_bytes=0 " \
  || fail "second pull downloaded again: $(grep 't41-same pull-fetched' "$MNT/events" | tail -n1)"
# v1 shares its first layer with v2: only its config downloads.
pull_ok t41-v1 "$REG/t/app:v1"
tail -n 50 "$MNT/events" | grep "images/t41-v1 pull-fetched" | has "cached_blobs=1 " \
  || fail "v1 did not reuse the shared layer: $(grep 't41-v1 pull-fetched' "$MNT/events" | tail -n1)"
# Pinned by digest works too.
dg=$(info_field t41-v2 digest)
pull_ok t41-pin "$REG/t/app@$dg"
assert_eq "$dg" "$(info_field t41-pin digest)"

create_vm t41a image=t41-v2 autostart=1
wait_for 30 grep -qE '^[0-9]+$' "$MNT/t41a/runs/main/status" \
  || fail "runs/main did not finish: $(cat "$MNT/t41a/runs/main/status" 2>&1)"
assert_eq 0 "$(cat "$MNT/t41a/runs/main/status")" "entrypoint status"
assert_eq "$(printf 'main-ran\n1000\n/srv/app\nv2')" "$(cat "$MNT/t41a/runs/main/output")" "entrypoint output"
out=$(run_in t41a 'echo $(id -un) $(pwd) $GREETING; cat /etc/replaced; ls /data; test -e /etc/removed || echo removed-gone')
assert_eq "$(printf 'app /srv/app v2\nnew\nfresh\nremoved-gone')" "$out" "pulled image contents"
# After a restart the entrypoint runs again.
echo restart > "$MNT/t41a/ctl" || fail "restart failed: $(cat "$MNT/t41a/ctl")"
wait_for 30 grep -qx 0 "$MNT/t41a/runs/main/status" || fail "runs/main after restart: $(cat "$MNT/t41a/runs/main/status")"
assert_contains "$(cat "$MNT/t41a/runs/main/cmd")" "/bin/sh -c"
note "pull, cache, config and autostart ok"
