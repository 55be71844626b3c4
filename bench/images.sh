#!/bin/bash
# Image benchmarks (root; after mount-helpers/setup; needs umoci, skopeo, docker-registry):
#  1. import of a 200 MiB image (a busybox rootfs + 200 MiB of incompressible files),
#     as a rootfs tarball and as an OCI layout;
#  2. pull of the same image from a loopback registry (blob cache emptied first) vs.
#     `skopeo copy` of it to a local directory: download phase and whole pull;
#  3. boot time (mkdir → agent answers) of the imported image vs. base.
# Usage: bench/images.sh [ROUNDS]   (default 3; medians are printed)
set -euo pipefail
rounds=${1:-3}
work=${BANDSOX_BENCH_DIR:-/var/tmp/bandsox-bench-images}
. "$(dirname "$0")/lib.sh"
BB=${BANDSOX_BUSYBOX:-/var/cache/bandsox/busybox/bin/busybox}
bench_mount
now() { date +%s%N; }
ms() { echo $(( ($2 - $1) / 1000000 )); }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ctl() { printf '%s\n' "$1" > "$MNT/ctl" || { cat "$MNT/ctl" >&2; exit 1; }; }

src=$work/src; mkdir -p "$src/rootfs/bin" "$src/rootfs/etc" "$src/rootfs/data"
cp "$BB" "$src/rootfs/bin/busybox"; ln -s busybox "$src/rootfs/bin/sh"
for i in $(seq 1 50); do head -c $((4 << 20)) /dev/urandom > "$src/rootfs/data/f$i"; done
tar -C "$src/rootfs" -cf "$src/root.tar" .
umoci init --layout "$src/oci" && umoci new --image "$src/oci:1"
umoci unpack --image "$src/oci:1" "$src/b" >/dev/null && cp -a "$src/rootfs/." "$src/b/rootfs/"
umoci repack --image "$src/oci:1" "$src/b" && rm -rf "$src/b"
size=$(du -sm "$src/rootfs" | cut -f1)

t_tar=(); t_oci=()
for r in $(seq 1 "$rounds"); do
  t0=$(now); ctl "import bt$r $src/root.tar"; t1=$(now); t_tar+=("$(ms "$t0" "$t1")")
  t0=$(now); ctl "import bo$r $src/oci"; t1=$(now); t_oci+=("$(ms "$t0" "$t1")")
done

# Registry.
rd=$work/registry; mkdir -p "$rd/data"
port=$(( 20000 + $(od -An -N2 -tu2 /dev/urandom) % 20000 ))
printf 'version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' "$rd/data" "$port" > "$rd/config.yml"
docker-registry serve "$rd/config.yml" > "$rd/log" 2>&1 & reg=$!
trap 'kill $reg 2>/dev/null; cleanup' EXIT
for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.2; done
skopeo copy -q --dest-tls-verify=false "oci:$src/oci:1" "docker://127.0.0.1:$port/b/img:1"
t_pull=(); t_fetch=(); t_skopeo=()
for r in $(seq 1 "$rounds"); do
  rm -rf "$STATE/cache"
  t0=$(now); ctl "pull bp$r 127.0.0.1:$port/b/img:1"; t1=$(now); t_pull+=("$(ms "$t0" "$t1")")
  t_fetch+=("$(grep "images/bp$r pull-fetched" "$STATE/events.log" | tail -n1 | sed 's/.*fetch_ms=\([0-9]*\).*/\1/')")
  rm -rf "$work/skopeo"
  t0=$(now); skopeo copy -q --src-tls-verify=false "docker://127.0.0.1:$port/b/img:1" "dir:$work/skopeo"; t1=$(now)
  t_skopeo+=("$(ms "$t0" "$t1")")
done

# Boot: imported image vs base, interleaved.
b_img=(); b_base=()
for r in $(seq 1 "$rounds"); do
  ctl "create vi$r image=bt1"; b_img+=("$(sed -n 's/.*"boot_ms": \([0-9]*\).*/\1/p' "$MNT/vi$r/info")"); rmdir "$MNT/vi$r"
  ctl "create vb$r image=base"; b_base+=("$(sed -n 's/.*"boot_ms": \([0-9]*\).*/\1/p' "$MNT/vb$r/info")"); rmdir "$MNT/vb$r"
done

m() { printf '%s\n' "$@" | median; }
echo "image content: ${size} MiB (rounds: $rounds)"
echo "import rootfs tar:       median $(m "${t_tar[@]}") ms  (${t_tar[*]})"
echo "import OCI layout:       median $(m "${t_oci[@]}") ms  (${t_oci[*]})"
echo "pull (whole, cold cache): median $(m "${t_pull[@]}") ms  (${t_pull[*]})"
echo "pull download phase:     median $(m "${t_fetch[@]}") ms  (${t_fetch[*]})"
echo "skopeo copy to dir:      median $(m "${t_skopeo[@]}") ms  (${t_skopeo[*]})"
echo "boot imported image:     median $(m "${b_img[@]}") ms  (${b_img[*]})"
echo "boot base:               median $(m "${b_base[@]}") ms  (${b_base[*]})"
