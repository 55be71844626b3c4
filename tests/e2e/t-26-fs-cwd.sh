#!/bin/bash
# Issue 11 on a real VM: 200 working directories under fs/ survive while the host and the
# guest churn entries in their parent (tests/fs/cwd.sh).
# timeout: 600
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm cwd
fs_scenario cwd cwd
