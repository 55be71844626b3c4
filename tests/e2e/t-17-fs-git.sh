#!/bin/bash
# git inside fs/; git status in the guest agrees.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm git
fs_scenario git git
