# git inside fs/; git status in the guest agrees.
. "$(dirname "$0")/lib.sh"
new_vm git
fs_scenario git git
