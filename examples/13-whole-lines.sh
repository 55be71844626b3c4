#!/bin/bash
# Control files take whole lines, whatever the writes: a command split over two writes
# runs once, whole; a line over 64 KiB and a script over 1 MiB run nothing; a program
# that checks close(2) learns that its command was lost. See docs/tree.md,
# "Writing control files" and "exec".
set -euo pipefail
B=${BANDSOX_MNT:-/mnt/bandsox}
mkdir "$B/demo13" || exit 1
# Two writes, one command (creates "demo13b", never "demo13").
perl -e 'syswrite STDOUT, "create demo1"; syswrite STDOUT, "3b\n"' > "$B/ctl"
ls "$B"
# A line longer than 64 KiB: "Argument list too long", nothing runs.
perl -e 'print "create x", "y" x 70000, "\n"' > /tmp/long-line && cat /tmp/long-line > "$B/ctl" || true
cat "$B/ctl"
# A script over 1 MiB: E2BIG, and not even its first line runs.
{ echo 'echo RAN'; head -c 1100000 /dev/zero | tr '\0' '#'; } > /tmp/big.sh
cat /tmp/big.sh > "$B/demo13/exec" || true
# close() says when a run was lost (the VM is killed while the command runs).
(sleep 2; echo kill > "$B/demo13/ctl") &
perl -MPOSIX -e '$fd = POSIX::open("$ARGV[0]", O_WRONLY); POSIX::write($fd, "sleep 60\n", 9);
  POSIX::close($fd) // print "close: $!\n"' "$B/demo13/exec"    # close: Host is down
cat "$B/demo13/runs/last/status"                                # lost: ...
wait
rm -f /tmp/long-line /tmp/big.sh
rmdir "$B/demo13" "$B/demo13b"
