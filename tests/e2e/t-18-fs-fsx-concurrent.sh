#!/bin/bash
# Random-offset I/O against a reference, and 8 concurrent writers/readers.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm fsx
FSX_OPS=600 fs_scenario fsx fsx
fs_scenario concurrent fsx
