#!/bin/bash
# pull from a registry that requires credentials (docker-registry with htpasswd, basic
# auth): anonymous pulls are refused with EACCES and a clear message; credentials from a
# docker-style config ($DOCKER_CONFIG/config.json, `auths` with base64 user:password, as
# `docker login` writes it) make the pull work; a wrong password is refused again.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/images-lib.sh"
need_tools
W=$IMG_WORK
pw="s3cret-$$"
/usr/bin/python3 -W ignore -c \
  'import crypt, sys; print("tester:" + crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))' \
  "$pw" > "$W/htpasswd" || fail "cannot make a bcrypt htpasswd"
mk_oci "$W/oci"
REG_HTPASSWD=$W/htpasswd start_registry
REG_CREDS="tester:$pw" push "$W/oci:v2" t/private:v2
code=$(curl -s -o /dev/null -w '%{http_code}' "http://$REG/v2/t/private/tags/list")
assert_eq 401 "$code" "anonymous registry access"

# restart_daemon [ENV=VALUE...]: stop the daemon gracefully, start it with ENV.
restart_daemon() {
  "$BANDSOX" unmount "$MNT" || fail "unmount failed"
  wait_for 20 sh -c "! mountpoint -q '$MNT'" || fail "still mounted"
  env "$@" BANDSOX_LOG="${BANDSOX_LOG:-info}" "$BANDSOX" mount "$MNT" --state-dir "$STATE" \
    || fail "daemon restart failed"
}
docker_config() {
  mkdir -p "$W/docker"
  printf '{"auths":{"%s":{"auth":"%s"}}}\n' "$REG" "$(printf 'tester:%s' "$1" | base64 -w0)" \
    > "$W/docker/config.json"
}
finish() {
  # Later tests get a daemon without this test's credentials.
  mountpoint -q "$MNT" && "$BANDSOX" unmount "$MNT" >/dev/null 2>&1
  wait_for 20 sh -c "! mountpoint -q '$MNT'"
  BANDSOX_LOG="${BANDSOX_LOG:-info}" "$BANDSOX" mount "$MNT" --state-dir "$STATE" || true
}
on_exit finish

# No credentials: refused, clear, nothing left.
write_expect_error "$MNT/ctl" "pull t45a $REG/t/private:v2" "Permission denied"
assert_contains "$(cat "$MNT/ctl")" "error: pull t45a" "ctl after an anonymous pull"
no_partial t45a

# The right credentials in a docker config.
docker_config "$pw"
restart_daemon DOCKER_CONFIG="$W/docker"
pull_ok t45b "$REG/t/private:v2"
assert_eq 3 "$(info_field t45b layers)" "layers pulled with credentials"
create_vm t45vm image=t45b
assert_eq "app v2" "$(run_in t45vm 'echo $(id -un) $GREETING')" "the private image runs"

# A wrong password (the config is read at every pull).
rm -rf "$STATE/cache"
docker_config "wrong-$pw"
write_expect_error "$MNT/ctl" "pull t45c $REG/t/private:v2" "Permission denied"
no_partial t45c
note "registry credentials ok"
