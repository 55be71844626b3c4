#!/bin/bash
# Images from a Dockerfile: build with the host's builder (buildah, installed by setup),
# run the image's CMD at boot (autostart=1), read its output, clean up.
set -euo pipefail
B=${BANDSOX_MNT:-/mnt/bandsox}
BB=${BANDSOX_BUSYBOX:-/var/cache/bandsox/busybox/bin/busybox}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$BB" "$work/busybox"
cat > "$work/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
ENV GREETING=hello
WORKDIR /srv
CMD ["/bin/sh", "-c", "echo $GREETING from $(pwd)"]
DOCKERFILE
echo "build demo7b $work headroom=16" > "$B/ctl"
cat "$B/ctl"                       # ok: image demo7b (build, 1 layers, ... MiB disk, ... ms)
echo 'create demo7bvm image=demo7b autostart=1' > "$B/ctl"
i=0; until [ "$(cat "$B/demo7bvm/runs/main/status")" = 0 ] || [ $i -ge 100 ]; do sleep 0.2; i=$((i+1)); done
cat "$B/demo7bvm/runs/main/output" # hello from /srv
rmdir "$B/demo7bvm"
rmdir "$B/images/demo7b"
