#!/bin/bash
# An image with no shell at all (one static binary, like FROM scratch): it boots, its
# entrypoint runs as runs/main, and exec of a script fails at once with a clear message.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/images-lib.sh"
need_tools
W=$IMG_WORK
L=$W/scratch
umoci init --layout "$L"
umoci new --image "$L:1"
umoci unpack --image "$L:1" "$W/b" >/dev/null
mkdir -p "$W/b/rootfs/app"
cp "$BB" "$W/b/rootfs/app/busybox"
umoci repack --image "$L:1" "$W/b"
umoci config --image "$L:1" --config.entrypoint /app/busybox --config.cmd echo \
  --config.cmd "hello from scratch" --config.user 65534:65534
import_ok t43 "$L"
create_vm t43a image=t43 autostart=1
wait_for 30 grep -qx 0 "$MNT/t43a/runs/main/status" || fail "runs/main: $(cat "$MNT/t43a/runs/main/status") $(cat "$MNT/t43a/runs/main/output")"
assert_eq "hello from scratch" "$(cat "$MNT/t43a/runs/main/output")"
start=$(date +%s)
# The exec transaction starts at close; bash ignores close errors, so the reason is in
# the run: status `lost: ...` and a line in its output.
echo 'echo hi' > "$MNT/t43a/exec" || true
[ $(( $(date +%s) - start )) -lt 10 ] || fail "exec without a shell took too long"
assert_contains "$(cat "$MNT/t43a/runs/last/status")" "lost: "
assert_contains "$(cat "$MNT/t43a/runs/last/status")" "no /bin/sh"
assert_contains "$(cat "$MNT/t43a/exec")" "bandsox: cannot start the command: this image has no /bin/sh"
# A #! line naming a binary the image has works (it gets the script path as argument).
printf '#!/app/busybox echo\n' > "$MNT/t43a/exec" || fail "#! exec failed"
assert_contains "$(cat "$MNT/t43a/exec")" "/run/bandsox/script-"
note "scratch image ok"
