# Story 3 (second half): rsync -a of a 5,000-file tree into fs/; a second
# rsync -a --itemize-changes reports nothing to do.
. "$(dirname "$0")/lib.sh"
new_vm rs
fs_scenario rsync rs
