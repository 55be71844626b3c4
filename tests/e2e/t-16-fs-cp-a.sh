#!/bin/bash
# cp -a of every kind of file into fs/ and back keeps contents, metadata and xattrs.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm cpa
fs_scenario cp-a cpa
