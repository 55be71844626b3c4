#!/bin/bash
# Build bandsox-agent as ONE statically linked binary (glibc, crt-static) for the guest
# initramfs, and print its path.
#
#   agent/build-static.sh            # from anywhere in the repository
#
# The musl target is not installable on our build machines, so this uses the host's
# x86_64-unknown-linux-gnu target with `-C target-feature=+crt-static`. The agent uses no
# NSS functions (no getpwnam, no hostname lookups), so static glibc is safe here.
# Result: target/x86_64-unknown-linux-gnu/release/bandsox-agent
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release -p bandsox-agent --target x86_64-unknown-linux-gnu >&2
bin="$(pwd)/target/x86_64-unknown-linux-gnu/release/bandsox-agent"
if command -v ldd >/dev/null 2>&1; then
    case "$(ldd "$bin" 2>&1)" in
        *"statically linked"*|*"not a dynamic executable"*) ;;
        *) echo "build-static.sh: $bin is dynamically linked:" >&2; ldd "$bin" >&2; exit 1 ;;
    esac
fi
echo "$bin"
