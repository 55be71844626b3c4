#!/bin/bash
# Stable identity (issue 11): a file keeps its st_ino across renames (host and guest side),
# hard links, the kernel forgetting it and pause/resume; plain readdir's d_ino equals
# lstat's st_ino for every entry (mount points in the guest root included); hard links
# stay linked through tar and rsync -aH; rename follows POSIX for every file type.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
d=$FSDIR g=$GREL
ino() { stat -c %i "$1"; }

echo a > "$d/a"
i=$(ino "$d/a")
mv "$d/a" "$d/b"
assert_eq "$i" "$(ino "$d/b")" "st_ino after mv"
ln "$d/b" "$d/c"
assert_eq "$i" "$(ino "$d/c")" "st_ino of a hard link"
sync
echo 2 > /proc/sys/vm/drop_caches
assert_eq "$i" "$(ino "$d/b")" "st_ino after the kernel forgot the inode"
guest "mv $g/b $g/e" >/dev/null
within 2 test -e "$d/e" || fail "guest rename not visible"
assert_eq "$i" "$(ino "$d/e")" "st_ino after a guest-side rename"
echo pause > "$VMDIR/ctl"
echo resume > "$VMDIR/ctl"
assert_eq "$i" "$(ino "$d/e")" "st_ino after pause/resume"
mkdir "$d/dir"
di=$(ino "$d/dir")
mv "$d/dir" "$d/dir2"
assert_eq "$di" "$(ino "$d/dir2")" "st_ino of a renamed directory"
note "st_ino stable across mv, ln, drop_caches, guest mv, pause/resume"

# d_ino of plain listings (os.scandir's inode() is getdents' d_ino) == lstat's st_ino.
check_dino() {
  python3 - "$1" <<'EOF'
import os, sys
bad = []
for e in os.scandir(sys.argv[1]):
    st = os.lstat(e.path)
    if e.inode() != st.st_ino:
        bad.append((e.name, e.inode(), st.st_ino))
sys.exit(f"d_ino != st_ino: {bad}" if bad else 0)
EOF
}
mkdir "$d/many"
for n in $(seq 1 50); do echo "$n" > "$d/many/f$n"; done
mkdir "$d/many/sub"; ln -s f1 "$d/many/link"; mkfifo "$d/many/fifo"
check_dino "$d/many"
sync; echo 2 > /proc/sys/vm/drop_caches
check_dino "$d/many"
check_dino "$FSROOT"
note "d_ino equals st_ino (a directory, after drop_caches, and the root with its mounts)"

# Hard links survive tar and rsync -aH into fs/; find -samefile finds every name.
src=$WORK/hl
mkdir -p "$src/sub"
echo data > "$src/x"; ln "$src/x" "$src/y"; ln "$src/x" "$src/sub/z"
check_links() {
  local t=$1 what=$2
  local xi; xi=$(ino "$t/x")
  assert_eq "$xi" "$(ino "$t/y")" "$what: y linked to x"
  assert_eq "$xi" "$(ino "$t/sub/z")" "$what: sub/z linked to x"
  assert_eq 3 "$(stat -c %h "$t/x")" "$what: link count"
  assert_eq 3 "$(find "$t" -samefile "$t/x" | wc -l)" "$what: find -samefile"
}
mkdir "$d/tar"
tar c -C "$src" . | tar x -C "$d/tar"
check_links "$d/tar" "tar"
rsync -aH "$src/" "$d/rsync/"
check_links "$d/rsync" "rsync -aH"
assert_eq 3 "$(guest "stat -c %h $g/rsync/x")" "the guest's link count"
note "hard links kept by tar and rsync -aH; find -samefile finds all names"

# POSIX rename for every file type: onto a new name and over an existing one of the same
# kind. The moved inode keeps number, mode and link count; the old name is gone.
python3 - "$d/ren" <<'EOF'
import errno, os, socket, stat, sys
base = sys.argv[1]
os.mkdir(base)
def make(path, kind):
    if kind == "reg":
        with open(path, "w") as f: f.write("x")
    elif kind == "dir": os.mkdir(path)
    elif kind == "symlink": os.symlink("target", path)
    elif kind == "fifo": os.mkfifo(path)
    elif kind == "sock":
        s = socket.socket(socket.AF_UNIX); s.bind(path); s.close()
    elif kind == "chr": os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    elif kind == "blk": os.mknod(path, 0o600 | stat.S_IFBLK, os.makedev(7, 0))
for kind in ["reg", "dir", "symlink", "fifo", "sock", "chr", "blk"]:
    for over in (False, True):
        src, dst = f"{base}/{kind}-src-{over}", f"{base}/{kind}-dst-{over}"
        make(src, kind)
        if over:
            make(dst, kind)
        before = os.lstat(src)
        os.rename(src, dst)
        after = os.lstat(dst)
        for field in ("st_ino", "st_mode", "st_nlink"):
            if getattr(before, field) != getattr(after, field):
                sys.exit(f"rename of {kind} (over={over}): {field} {getattr(before, field)} -> {getattr(after, field)}")
        try:
            os.lstat(src)
            sys.exit(f"rename of {kind}: the old name still exists")
        except FileNotFoundError:
            pass
        # The listing agrees.
        names = os.listdir(base)
        if os.path.basename(src) in names or os.path.basename(dst) not in names:
            sys.exit(f"rename of {kind}: listing {names}")
# A directory cannot replace a non-empty one, nor a file a directory.
os.mkdir(f"{base}/full"); open(f"{base}/full/f", "w").close(); os.mkdir(f"{base}/empty")
for args, want in [((f"{base}/empty", f"{base}/full"), (errno.ENOTEMPTY, errno.EEXIST)),
                   ((f"{base}/reg-dst-True", f"{base}/full"), (errno.EISDIR,)),
                   ((f"{base}/full", f"{base}/reg-dst-True"), (errno.ENOTDIR,))]:
    try:
        os.rename(*args)
        sys.exit(f"rename {args} succeeded")
    except OSError as e:
        if e.errno not in want:
            sys.exit(f"rename {args}: errno {e.errno}, expected {want}")
EOF
note "rename keeps inode, mode and nlink for every file type; errors as POSIX says"
