#!/bin/bash
# Issue 11 on a real VM (256 MiB): a 100,000-entry directory and a 200,000-file tree are
# listed and walked through fs/ with no EMFILE/ENFILE/OOM, and the agent's descriptors
# and memory stay under the documented bounds (tests/fs/scale.sh).
# timeout: 1200
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm scl
fs_scenario scale scl
