#!/bin/bash
# POSIX semantics through fs/, as a program sees them: every errno of the namespace
# operations (EEXIST, EISDIR, ENOTDIR, ENOTEMPTY, EINVAL, EPERM, ENAMETOOLONG, ELOOP,
# EBADF, ENODATA, ...), link counts, modes (setuid cleared by chown, setgid directory
# inheritance, sticky), timestamps to the nanosecond, xattr flags, unlinked-but-open
# files, mmap, locks, copy_file_range. The expected lines are what ext4 answers on Linux.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
command -v python3 >/dev/null || fail "python3 missing (mount-helpers/ensure-deps installs it)"
[ "$(id -u)" = 0 ] || { note "SKIP: needs root (chown, mknod)"; exit 0; }
got=$(python3 - "$FSDIR" <<'PYEOF'
import errno, fcntl, mmap, os, stat, sys, time
os.chdir(sys.argv[1])
def t(name, f):
    try:
        r = f()
        print(f"{name}: ok{'' if r is None else ' ' + str(r)}")
    except OSError as e:
        print(f"{name}: {errno.errorcode.get(e.errno, e.errno)}")
def mode(p): return oct(os.lstat(p).st_mode)
def touch(p): os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
t("mkdir", lambda: os.mkdir("d", 0o755))
t("mkdir again", lambda: os.mkdir("d", 0o755))
t("create excl", lambda: os.close(os.open("f", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)))
t("create excl again", lambda: os.open("f", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
t("unlink dir", lambda: os.unlink("d"))
t("rmdir file", lambda: os.rmdir("f"))
t("link dir", lambda: os.link("d", "dl"))
t("mkdir sub", lambda: os.mkdir("d/x"))
t("rmdir nonempty", lambda: os.rmdir("d"))
t("mkdir e", lambda: os.mkdir("e"))
t("rename dir over nonempty", lambda: os.rename("e", "d"))
t("rename dir over file", lambda: os.rename("d", "f"))
t("rename file over dir", lambda: os.rename("f", "e"))
t("rename dir into itself", lambda: os.rename("d", "d/x/y"))
t("nlink dir", lambda: os.stat("d").st_nlink)
t("link", lambda: os.link("f", "g"))
t("nlink file", lambda: os.stat("f").st_nlink)
t("name 256", lambda: os.mkdir("a" * 256))
t("name 255", lambda: os.mkdir("a" * 255))
t("symlink 1023", lambda: os.symlink("x" * 1023, "sl"))
t("readlink", lambda: len(os.readlink("sl")))
t("symlink mode", lambda: mode("sl"))
t("mkfifo", lambda: os.mkfifo("fifo", 0o600))
t("fifo mode", lambda: mode("fifo"))
t("mknod chr", lambda: os.mknod("chr", 0o600 | stat.S_IFCHR, os.makedev(1, 3)))
t("chr rdev", lambda: (os.major(os.lstat("chr").st_rdev), os.minor(os.lstat("chr").st_rdev)))
t("chmod 4755", lambda: os.chmod("f", 0o4755))
t("mode", lambda: mode("f"))
t("chown", lambda: os.chown("f", 65534, 65534))
t("mode after chown", lambda: mode("f"))
t("owner", lambda: (os.stat("g").st_uid, os.stat("g").st_gid))
t("truncate", lambda: os.truncate("f", 1000))
t("size", lambda: os.stat("f").st_size)
def ctime_on_chmod():
    a = os.stat("g").st_ctime_ns; time.sleep(0.05); os.chmod("g", 0o600)
    return os.stat("g").st_ctime_ns > a
t("ctime on chmod", ctime_on_chmod)
def dir_mtime():
    a = os.stat("d").st_mtime_ns; time.sleep(0.05); touch("d/new")
    return os.stat("d").st_mtime_ns > a
t("dir mtime on create", dir_mtime)
t("utime", lambda: os.utime("g", ns=(1_000_000_123, 2_000_000_456)))
t("utime read", lambda: (os.stat("g").st_atime_ns, os.stat("g").st_mtime_ns))
t("utime symlink", lambda: os.utime("sl", ns=(5_000_000_000, 6_000_000_007), follow_symlinks=False))
t("symlink mtime", lambda: os.lstat("sl").st_mtime_ns)
t("open dir for write", lambda: os.open("d", os.O_WRONLY))
t("open under file", lambda: os.open("f/x", os.O_RDONLY))
t("O_DIRECTORY on file", lambda: os.open("f", os.O_RDONLY | os.O_DIRECTORY))
t("O_NOFOLLOW on symlink", lambda: os.open("sl", os.O_RDONLY | os.O_NOFOLLOW))
t("rename missing", lambda: os.rename("nope", "x"))
t("unlink missing", lambda: os.unlink("nope"))
def append():
    fd = os.open("g", os.O_WRONLY | os.O_APPEND); os.write(fd, b"ab"); os.write(fd, b"cd"); os.close(fd)
    return os.stat("g").st_size
t("O_APPEND", append)
t("O_TRUNC", lambda: (os.close(os.open("g", os.O_WRONLY | os.O_TRUNC)), os.stat("g").st_size)[1])
t("rename onto own hard link", lambda: (os.rename("f", "g"), os.path.exists("f"))[1])
t("namemax", lambda: os.statvfs(".").f_namemax)
t("xattr set", lambda: os.setxattr("g", "user.a", b"1"))
t("xattr create existing", lambda: os.setxattr("g", "user.a", b"2", os.XATTR_CREATE))
t("xattr replace missing", lambda: os.setxattr("g", "user.b", b"2", os.XATTR_REPLACE))
t("xattr get missing", lambda: os.getxattr("g", "user.zz"))
t("xattr list", lambda: sorted(os.listxattr("g")))
t("rmdir dot", lambda: os.rmdir("d/."))
t("sticky", lambda: (os.mkdir("st"), os.chmod("st", 0o1777), mode("st"))[2])
t("setgid dir", lambda: (os.mkdir("sg"), os.chown("sg", 0, 4321), os.chmod("sg", 0o2775),
                         os.mkdir("sg/sub"), touch("sg/file"),
                         (os.stat("sg/sub").st_gid, mode("sg/sub"), os.stat("sg/file").st_gid))[5])
os.mkdir("a"); os.mkdir("b"); os.mkdir("a/sub")
t("rename dir across", lambda: os.rename("a/sub", "b/sub"))
t("nlink after", lambda: (os.stat("a").st_nlink, os.stat("b").st_nlink))
def unlinked_open():
    fd = os.open("u", os.O_CREAT | os.O_RDWR, 0o644); os.write(fd, b"hello"); os.unlink("u")
    n = os.fstat(fd).st_nlink; os.lseek(fd, 0, 0); d = os.read(fd, 10); os.close(fd)
    return (n, d)
t("read after unlink", unlinked_open)
def write_rdonly():
    touch("r"); fd = os.open("r", os.O_RDONLY)
    try: os.write(fd, b"y")
    finally: os.close(fd)
t("write O_RDONLY", write_rdonly)
def ftruncate_rdonly():
    fd = os.open("r", os.O_RDONLY)
    try: os.ftruncate(fd, 0)
    finally: os.close(fd)
t("ftruncate O_RDONLY", ftruncate_rdonly)
def fallocate():
    fd = os.open("fa", os.O_CREAT | os.O_RDWR, 0o644); os.posix_fallocate(fd, 0, 8192)
    n = os.fstat(fd).st_size; os.close(fd); return n
t("fallocate", fallocate)
def cfr():
    with open("src", "wb") as f: f.write(b"z" * 10000)
    i = os.open("src", os.O_RDONLY); o = os.open("dst", os.O_CREAT | os.O_WRONLY, 0o644)
    n = os.copy_file_range(i, o, 10000); os.close(i); os.close(o)
    with open("dst", "rb") as f: return (n, f.read() == b"z" * 10000)
t("copy_file_range", cfr)
def mm():
    with open("m", "wb") as f: f.write(b"\0" * 4096)
    fd = os.open("m", os.O_RDWR); m = mmap.mmap(fd, 4096); m[0:5] = b"mmapd"; m.flush(); m.close(); os.close(fd)
    with open("m", "rb") as f: return f.read(5)
t("mmap shared write", mm)
def locks():
    fd = os.open("lk", os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); os.close(fd)
t("flock and lockf", locks)
def readdir_removed():
    os.mkdir("gone"); fd = os.open("gone", os.O_RDONLY | os.O_DIRECTORY); os.rmdir("gone")
    r = os.listdir(fd); os.close(fd); return r
t("readdir removed dir", readdir_removed)
here = os.getcwd()
def create_in_removed():
    os.mkdir("gone2"); os.chdir("gone2"); os.rmdir("../gone2")
    try: os.open("x", os.O_CREAT | os.O_WRONLY, 0o644)
    finally: os.chdir(here)
t("create in removed dir", create_in_removed)
PYEOF
)
expected=$(cat <<'EOF'
mkdir: ok
mkdir again: EEXIST
create excl: ok
create excl again: EEXIST
unlink dir: EISDIR
rmdir file: ENOTDIR
link dir: EPERM
mkdir sub: ok
rmdir nonempty: ENOTEMPTY
mkdir e: ok
rename dir over nonempty: ENOTEMPTY
rename dir over file: ENOTDIR
rename file over dir: EISDIR
rename dir into itself: EINVAL
nlink dir: ok 3
link: ok
nlink file: ok 2
name 256: ENAMETOOLONG
name 255: ok
symlink 1023: ok
readlink: ok 1023
symlink mode: ok 0o120777
mkfifo: ok
fifo mode: ok 0o10600
mknod chr: ok
chr rdev: ok (1, 3)
chmod 4755: ok
mode: ok 0o104755
chown: ok
mode after chown: ok 0o100755
owner: ok (65534, 65534)
truncate: ok
size: ok 1000
ctime on chmod: ok True
dir mtime on create: ok True
utime: ok
utime read: ok (1000000123, 2000000456)
utime symlink: ok
symlink mtime: ok 6000000007
open dir for write: EISDIR
open under file: ENOTDIR
O_DIRECTORY on file: ENOTDIR
O_NOFOLLOW on symlink: ELOOP
rename missing: ENOENT
unlink missing: ENOENT
O_APPEND: ok 1004
O_TRUNC: ok 0
rename onto own hard link: ok True
namemax: ok 255
xattr set: ok
xattr create existing: EEXIST
xattr replace missing: ENODATA
xattr get missing: ENODATA
xattr list: ok ['user.a']
rmdir dot: EINVAL
sticky: ok 0o41777
setgid dir: ok (4321, '0o42755', 4321)
rename dir across: ok
nlink after: ok (2, 3)
read after unlink: ok (0, b'hello')
write O_RDONLY: EBADF
ftruncate O_RDONLY: EINVAL
fallocate: ok 8192
copy_file_range: ok (10000, True)
mmap shared write: ok b'mmapd'
flock and lockf: ok
readdir removed dir: ok []
create in removed dir: ENOENT
EOF
)
if [ "$got" != "$expected" ]; then
  diff <(echo "$expected") <(echo "$got") >&2 || true
  fail "fs/ answered differently from ext4 (expected < > got)"
fi
note "$(echo "$got" | wc -l) POSIX checks as on ext4"
