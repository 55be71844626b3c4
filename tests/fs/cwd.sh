#!/bin/bash
# The working directory never breaks (issue 11): CWD_ITER (default 200) times, make a
# directory through fs/, enter it, wait, and ask for the working directory three ways
# (the shell, coreutils' pwd, Perl's getcwd), while one process on the host and one in
# the guest keep creating and deleting entries in the same parent.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
d=$FSDIR g=$GREL
n=${CWD_ITER:-200}
stop=$WORK/stop
churn() {
  local k=0
  while [ ! -e "$stop" ]; do
    k=$((k + 1))
    touch "$d/host-churn.$k"; mkdir "$d/host-dir.$k"
    rm -f "$d/host-churn.$k"; rmdir "$d/host-dir.$k"
  done
}
churn & host_churn=$!
# The guest churns until told to stop (a write-only exec returns when it ends).
( printf '%s' "i=0; while [ ! -e $g/stop-guest ]; do i=\$((i+1)); touch $g/guest-churn.\$i; mkdir $g/guest-dir.\$i; rm -f $g/guest-churn.\$i; rmdir $g/guest-dir.\$i; done" > "$VMDIR/exec" ) & guest_churn=$!
cleanup() { touch "$stop" "$d/stop-guest" 2>/dev/null || true; wait "$host_churn" "$guest_churn" 2>/dev/null || true; }
on_exit cleanup
for i in $(seq 1 "$n"); do
  out=$(cd "$d" && mkdir "w$i" && cd "w$i" && sleep 0.2 && pwd && /bin/pwd \
    && perl -MCwd -e 'my $c = getcwd() or exit 1; print "$c\n"' 2>&1) \
    || fail "iteration $i: $out"
  case "$out" in *deleted*|*"couldn't find"*) fail "iteration $i: $out" ;; esac
done
cleanup
note "$n working directories survived (with host and guest churn in the parent)"
