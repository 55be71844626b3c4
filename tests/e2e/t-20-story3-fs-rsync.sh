# Story 3 (second half): rsync -a of a 5,000-file tree into fs/; a second
# rsync -a --itemize-changes reports nothing to do. About 8 round trips per file through
# an emulated guest: ~200 s on a 2-core TCG host, so it gets more than the default limit.
# timeout: 600
. "$(dirname "$0")/lib.sh"
new_vm rs
fs_scenario rsync rs
