#!/bin/bash
# build NAME DIR: a Dockerfile built with the host's builder (buildah, installed by setup)
# becomes an image: COPY, RUN, ENV, WORKDIR, CMD honoured; bad input fails cleanly.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/images-lib.sh"
need_tools
command -v buildah >/dev/null || fail "buildah missing (run mount-helpers/ensure-deps)"
W=$IMG_WORK
mkdir -p "$W/ctx"
cp "$BB" "$W/ctx/busybox"
cat > "$W/ctx/Dockerfile" <<'EOF'
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
RUN echo built > /etc/built && mkdir -p /srv/app /home/app && printf 'root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n' > /etc/passwd && printf 'root:x:0:\napp:x:1000:\n' > /etc/group
ENV GREETING=from-dockerfile
WORKDIR /srv/app
USER app
CMD ["/bin/sh", "-c", "echo $GREETING $(id -u) $(pwd)"]
EOF
import_ok_build() { IMAGES="$IMAGES $1"; ctl_ok "build $*" >&2; }
import_ok_build t46 "$W/ctx" headroom=16
assert_eq build "$(info_field t46 kind)"
assert_eq "build:$W/ctx" "$(info_field t46 reference)"
tail -n 50 "$MNT/events" | has "images/t46 build-progress STEP 3/" || fail "no build progress events"
[ -s "$STATE/images/t46/build.log" ] || fail "no build.log kept with the image"
! buildah images --format '{{.Name}}' 2>/dev/null | has bandsox-build || fail "the builder's temporary tag was left"

create_vm t46a image=t46 autostart=1
wait_for 30 grep -qx 0 "$MNT/t46a/runs/main/status" || fail "CMD did not run: $(cat "$MNT/t46a/runs/main/status")"
assert_eq "from-dockerfile 1000 /srv/app" "$(cat "$MNT/t46a/runs/main/output")" "CMD output"
assert_eq built "$(run_in t46a 'cat /etc/built')" "RUN step"

# Bad input: a failing RUN step, a missing Dockerfile, a relative path.
mkdir -p "$W/bad"
printf 'FROM scratch\nCOPY nosuchfile /x\n' > "$W/bad/Dockerfile"
write_expect_error "$MNT/ctl" "build t46b $W/bad" "Invalid argument"
assert_contains "$(cat "$MNT/ctl")" "buildah failed" "ctl after a failing build"
no_partial t46b
tail -n 20 "$MNT/events" | has "images/t46b build-failed" || fail "no build-failed event"
write_expect_error "$MNT/ctl" "build t46c $W/bad file=Nope" "No such file"
no_partial t46c
write_expect_error "$MNT/ctl" "build t46d relative/dir" "Invalid argument"
assert_eq ok "$(run_in t46a 'echo ok')"
note "build ok"
