#!/bin/bash
# git init/add/commit inside fs/; git status in the guest agrees.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
repo=$FSDIR/repo
mkdir -p "$repo/src"
for i in $(seq 1 30); do printf 'line %s\n' "$i" > "$repo/src/f$i.txt"; done
printf '#!/bin/sh\necho run\n' > "$repo/run.sh"; chmod +x "$repo/run.sh"
cd "$repo"
git init -q . || fail "git init"
git add -A || fail "git add"
git -c user.name=t -c user.email=t@example.com commit -q -m init || fail "git commit"
[ -z "$(git status --porcelain)" ] || fail "host git status not clean"
printf 'changed\n' >> src/f1.txt
host_status=$(git status --porcelain)
assert_eq " M src/f1.txt" "$host_status" "host git status after a change"
git -c user.name=t -c user.email=t@example.com commit -q -am second || fail "second commit"
git fsck >/dev/null 2>&1 || fail "git fsck"
cd /
# Give the guest a git: the host's binary and its libraries, copied in through fs/.
gitbin=$(command -v git)
if ! (guest "command -v git") >/dev/null 2>&1; then
  mkdir -p "$FSROOT/usr/local/bin"
  cp "$gitbin" "$FSROOT/usr/local/bin/git"
  for lib in $(ldd "$gitbin" | grep -o '/[^ ]*'); do
    mkdir -p "$FSROOT$(dirname "$lib")"
    cp -L "$lib" "$FSROOT$lib"
  done
fi
guest_status=$(guest "cd $GREL/repo && git status --porcelain && git log --format=%s | tr '\n' ' '")
assert_eq "second init " "$guest_status" "guest git status + log"
note "git: two commits; the guest sees a clean tree"
