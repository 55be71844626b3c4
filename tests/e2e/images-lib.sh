#!/bin/bash
# Helpers for the image tests (t-4*): test images built from Debian's static busybox with
# umoci, a throwaway registry on loopback, and image cleanup. Sourced after lib.sh.
# Needs: umoci, skopeo, docker-registry, curl (mount-helpers/ensure-deps installs them).
set -euo pipefail

BB=${BANDSOX_BUSYBOX:-${BANDSOX_CACHE:-/var/cache/bandsox}/busybox/bin/busybox}
IMG_WORK=$(mktemp -d /var/tmp/bandsox-img-test.XXXXXX)
IMAGES=""
REG_PID=""

# Images go after the test's VMs (on_exit runs newest first, so this entry removes the
# VMs itself; lib.sh's own cleanup_vms then finds nothing left).
images_cleanup() {
  for i in ${IMAGES:-}; do
    if [ -d "$MNT/images/$i" ]; then rmdir "$MNT/images/$i" 2>/dev/null || true; fi
  done
  if [ -n "${REG_PID:-}" ]; then kill "$REG_PID" 2>/dev/null || true; fi
  rm -rf "$IMG_WORK"
}
on_exit 'cleanup_vms; images_cleanup'

need_tools() {
  for t in umoci skopeo docker-registry curl; do
    command -v "$t" >/dev/null || fail "$t is missing (run mount-helpers/ensure-deps)"
  done
  [ -x "$BB" ] || fail "no static busybox at $BB (run mount-helpers/ensure-deps)"
}

# ctl_ok COMMAND: a global ctl command must succeed; prints the ctl result.
ctl_ok() {
  printf '%s\n' "$1" > "$MNT/ctl" || fail "[$1] failed: $(cat "$MNT/ctl")"
  cat "$MNT/ctl"
}

# import_ok NAME SOURCE [opts]: import and remember the image for cleanup.
import_ok() {
  IMAGES="$IMAGES $1"
  ctl_ok "import $*" >&2
  [ -f "$MNT/images/$1/info" ] || fail "images/$1/info missing after import"
}

pull_ok() {
  IMAGES="$IMAGES $1"
  ctl_ok "pull $*" >&2
}

# info_field IMAGE KEY: a top-level scalar of images/IMAGE/info.
info_field() {
  sed -n "s/^  \"$2\": \"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}$/\1/p" "$MNT/images/$1/info" | head -n1
}

# mk_rootfs DIR: a small root filesystem: busybox, applet symlinks, users, files.
mk_rootfs() {
  _d=$1
  mkdir -p "$_d/bin" "$_d/etc" "$_d/tmp" "$_d/root" "$_d/home/app" "$_d/srv"
  cp "$BB" "$_d/bin/busybox"
  for _a in $("$BB" --list); do
    [ "$_a" = busybox ] || ln -sf busybox "$_d/bin/$_a"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:App:/home/app:/bin/sh\n' > "$_d/etc/passwd"
  printf 'root:x:0:\nstaff:x:50:app\napp:x:1000:\n' > "$_d/etc/group"
  chown 1000:1000 "$_d/home/app"
  chmod 1777 "$_d/tmp"
  echo "lower" > "$_d/etc/removed"
  echo "old" > "$_d/etc/replaced"
  mkdir -p "$_d/data/sub"
  echo 1 > "$_d/data/old1"; echo 2 > "$_d/data/sub/old2"
  ln "$_d/bin/busybox" "$_d/bin/hardbb"
}

# mk_oci LAYOUT: tags v1 (one layer + config) and v2 (v1 + a layer deleting/replacing
# files + a hand-made layer with an opaque directory).
mk_oci() {
  _l=$1
  umoci init --layout "$_l"
  umoci new --image "$_l:v1"
  umoci unpack --image "$_l:v1" "$IMG_WORK/b1" >/dev/null
  mk_rootfs "$IMG_WORK/b1/rootfs"
  umoci repack --image "$_l:v1" "$IMG_WORK/b1"
  umoci config --image "$_l:v1" --config.env GREETING=hello --config.env PATH=/bin \
    --config.workingdir /srv/app --config.user app \
    --config.entrypoint /bin/sh --config.entrypoint -c \
    --config.cmd 'echo main-ran; id -u; pwd; echo $GREETING'
  rm -rf "$IMG_WORK/b1"
  umoci tag --image "$_l:v1" v2
  umoci unpack --image "$_l:v2" "$IMG_WORK/b2" >/dev/null
  rm "$IMG_WORK/b2/rootfs/etc/removed"
  echo "new" > "$IMG_WORK/b2/rootfs/etc/replaced"
  umoci repack --image "$_l:v2" "$IMG_WORK/b2"
  rm -rf "$IMG_WORK/b2"
  mkdir -p "$IMG_WORK/opq/data"
  : > "$IMG_WORK/opq/data/.wh..wh..opq"
  echo fresh > "$IMG_WORK/opq/data/fresh"
  tar -C "$IMG_WORK/opq" --owner=0 --group=0 -cf "$IMG_WORK/opq.tar" data
  umoci raw add-layer --image "$_l:v2" "$IMG_WORK/opq.tar"
  umoci config --image "$_l:v2" --config.env GREETING=v2
}

# registry_with_test_image: the tools, the test image of mk_oci at $IMG_WORK/oci and a
# loopback registry (REG) to push it to.
registry_with_test_image() {
  need_tools
  mk_oci "$IMG_WORK/oci"
  start_registry
}

# start_registry: a docker-registry on a free loopback port; sets REG (host:port).
# With REG_HTPASSWD=FILE (bcrypt htpasswd) it requires basic auth; push then uses REG_CREDS.
start_registry() {
  _rd=$IMG_WORK/registry
  mkdir -p "$_rd/data"
  for _try in 1 2 3 4 5; do
    _port=$(( 20000 + $(od -An -N2 -tu2 /dev/urandom) % 20000 ))
    ss -ltn 2>/dev/null | has ":$_port " && continue
    cat > "$_rd/config.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $_rd/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$_port
EOF
    if [ -n "${REG_HTPASSWD:-}" ]; then
      printf 'auth:\n  htpasswd:\n    realm: bandsox-test\n    path: %s\n' "$REG_HTPASSWD" >> "$_rd/config.yml"
    fi
    docker-registry serve "$_rd/config.yml" > "$_rd/log" 2>&1 &
    REG_PID=$!
    if wait_for 15 registry_answers "$_port"; then
      REG=127.0.0.1:$_port
      return 0
    fi
    kill "$REG_PID" 2>/dev/null || true
  done
  fail "the registry did not start: $(tail -n 5 "$_rd/log")"
}

registry_answers() {
  case $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/v2/") in 200|401) return 0;; esac
  return 1
}

# push LAYOUT:TAG REPO:TAG
push() {
  skopeo copy -q --dest-tls-verify=false ${REG_CREDS:+--dest-creds "$REG_CREDS"} "oci:$1" "docker://$REG/$2" >/dev/null \
    || fail "skopeo copy $1 to $REG/$2 failed"
}

# create_vm NAME [key=value...]: create a VM through ctl (removed on exit).
create_vm() {
  VMS="${VMS:-} $1"
  printf 'create %s\n' "$*" > "$MNT/ctl" \
    || fail "create $* failed: $(cat "$MNT/ctl"); state: $(cat "$MNT/$1/state" 2>/dev/null || true)"
}

# run_in VM SCRIPT: run SCRIPT through exec; prints its output.
run_in() {
  printf '%s\n' "$2" > "$MNT/$1/exec" || fail "exec [$2] in $1 failed"
  cat "$MNT/$1/exec"
}

# no_partial NAME: neither the image nor a build directory is left behind.
no_partial() {
  [ ! -e "$MNT/images/$1" ] || fail "images/$1 exists after a failure"
  ! ls -a "$STATE/images" | has "^\.tmp-" || fail "a .tmp build directory was left: $(ls -a "$STATE/images")"
}
