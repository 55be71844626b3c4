//! The reader over real images made by `mkfs.ext4 -d` (e2fsprogs, no root needed), and
//! over truncated, garbled and mutated ones: those must give errors, never a panic or
//! an allocation sized by the image.
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::nodes::child;
use super::reader::{read_at, Image};

/// `len` bytes that say where they are.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from(i % 251).unwrap_or(0))
        .collect()
}

fn mkfs(extra: &[&str], tree: &Path, img: &Path, size: &str) -> bool {
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .args(extra)
        .arg("-d")
        .arg(tree)
        .arg(img)
        .arg(size)
        .output();
    match out {
        Ok(o) if o.status.success() => true,
        Ok(o) => panic!("mkfs.ext4: {}", String::from_utf8_lossy(&o.stderr)),
        // e2fsprogs missing: nothing to test against.
        Err(_) => false,
    }
}

/// A tree with files, a nested directory, a symlink, a big file and odd modes, as an
/// ext4 image; `None` without mkfs.ext4.
fn image(dir: &Path, extra: &[&str]) -> Option<PathBuf> {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("etc/deep/er")).unwrap();
    std::fs::write(tree.join("etc/hostname"), "vm1\n").unwrap();
    std::fs::write(tree.join("etc/deep/er/leaf"), "leaf").unwrap();
    std::fs::write(tree.join("big"), pattern(300 * 1024)).unwrap();
    std::fs::write(tree.join("secret"), "s").unwrap();
    std::fs::set_permissions(tree.join("secret"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("etc/hostname", tree.join("link")).unwrap();
    for i in 0..120 {
        std::fs::write(tree.join(format!("etc/f{i:03}")), format!("{i}")).unwrap();
    }
    let img = dir.join("disk.ext4");
    mkfs(extra, &tree, &img, "16M").then_some(img)
}

fn names(img: &Image, path: &[u8]) -> Vec<Vec<u8>> {
    let mut l = img.list(path).unwrap();
    let mut out = Vec::new();
    while let Some(e) = l.next_entry().unwrap() {
        out.push(e.name);
    }
    out.sort();
    out
}

#[test]
fn reads_an_image_made_by_mkfs() {
    let d = tempfile::tempdir().unwrap();
    for extra in [&[][..], &["-b", "4096"][..], &["-O", "^has_journal"][..]] {
        let Some(img) = image(d.path(), extra) else {
            return;
        };
        let i = Image::open(&img).unwrap();
        let root = names(&i, b"/");
        for n in ["big", "etc", "link", "secret"] {
            assert!(root.contains(&n.as_bytes().to_vec()), "{n} in {root:?}");
        }
        assert_eq!(names(&i, b"/etc").len(), 122);
        let m = i.stat(b"/secret").unwrap();
        assert_eq!(m.mode(), 0o640);
        assert_eq!(super::reader::attr(&m).mode, libc::S_IFREG | 0o640);
        assert_eq!(i.read_link(b"/link").unwrap(), b"etc/hostname");
        assert_eq!(
            super::reader::attr(&i.stat(b"/link").unwrap()).mode & libc::S_IFMT,
            libc::S_IFLNK
        );
        assert!(i.stat(b"/etc").unwrap().is_dir());
        assert_eq!(i.stat(b"/nope").unwrap_err().errno, libc::ENOENT);
        // Sequential reads, a seek back, and a read past the end.
        let mut f = i.open_file(b"/big").unwrap();
        let mut all = Vec::new();
        loop {
            let chunk = read_at(&mut f, all.len() as u64, 128 * 1024).unwrap();
            if chunk.is_empty() {
                break;
            }
            all.extend(chunk);
        }
        assert_eq!(all, pattern(300 * 1024));
        assert_eq!(read_at(&mut f, 1000, 10).unwrap(), pattern(1010)[1000..]);
        assert!(read_at(&mut f, 1 << 40, 10).unwrap().is_empty());
        let mut f = i.open_file(b"/etc/deep/er/leaf").unwrap();
        assert_eq!(read_at(&mut f, 0, 4096).unwrap(), b"leaf");
        assert_eq!(i.open_file(b"/etc").unwrap_err().errno, libc::EINVAL);
        assert_eq!(i.read_link(b"/big").unwrap_err().errno, libc::EINVAL);
        std::fs::remove_dir_all(d.path().join("tree")).unwrap();
    }
}

#[test]
fn not_ext4_and_truncated_images_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("x");
    std::fs::write(&p, b"").unwrap();
    assert_eq!(Image::open(&p).err().unwrap().errno, libc::ENODATA);
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    let e = Image::open(&p).err().unwrap();
    assert_eq!(e.errno, libc::ENODATA, "{}", e.message);
    // An MBR: a partitioned disk.
    let mut mbr = vec![0u8; 1 << 20];
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    std::fs::write(&p, &mbr).unwrap();
    let e = Image::open(&p).err().unwrap();
    assert!(e.message.contains("partition"), "{}", e.message);
    let Some(img) = image(d.path(), &[]) else {
        return;
    };
    let full = std::fs::read(&img).unwrap();
    for len in [3000, full.len() / 2, full.len() - 1] {
        std::fs::write(&p, &full[..len]).unwrap();
        let e = Image::open(&p).err().unwrap();
        assert_eq!(e.errno, libc::EIO, "{len}: {}", e.message);
        assert!(e.message.contains("truncated"), "{}", e.message);
    }
}

/// Put `v` at `at` of the superblock of image bytes `b`.
fn poke(b: &mut [u8], at: usize, v: &[u8]) {
    b[1024 + at..1024 + at + v.len()].copy_from_slice(v);
}

#[test]
fn garbage_superblocks_are_refused_without_huge_allocations() {
    let d = tempfile::tempdir().unwrap();
    let Some(img) = image(d.path(), &["-O", "^metadata_csum"]) else {
        return;
    };
    let full = std::fs::read(&img).unwrap();
    let p = d.path().join("bad");
    // Block count (hi) of 2^62 blocks; block size 2^40; blocks per group 1 (so one
    // group descriptor per block); inodes per group 0.
    let cases: [(usize, &[u8]); 5] = [
        (0x150, &0x4000_0000u32.to_le_bytes()),
        (0x18, &30u32.to_le_bytes()),
        (0x20, &1u32.to_le_bytes()),
        (0x28, &0u32.to_le_bytes()),
        (0x58, &0xffffu16.to_le_bytes()),
    ];
    for (at, v) in cases {
        let mut b = full.clone();
        poke(&mut b, at, v);
        std::fs::write(&p, &b).unwrap();
        let e = Image::open(&p).err().unwrap();
        assert_eq!(e.errno, libc::EIO, "field {at:#x}: {}", e.message);
    }
    // Random bytes over the whole superblock, magic kept.
    let mut rng = Rng(0x5eed);
    for _ in 0..50 {
        let mut b = full.clone();
        for x in &mut b[1024..2048] {
            *x = rng.byte();
        }
        poke(&mut b, 0x38, &0xef53u16.to_le_bytes());
        std::fs::write(&p, &b).unwrap();
        if let Ok(i) = Image::open(&p) {
            walk(&i);
        }
    }
}

#[test]
fn huge_inode_sizes_do_not_allocate() {
    let d = tempfile::tempdir().unwrap();
    let Some(img) = image(d.path(), &[]) else {
        return;
    };
    // debugfs (e2fsprogs) sets inode fields in place.
    for (file, size) in [("link", "0x10000000000"), ("big", "0xffffffffffff")] {
        let ok = Command::new("debugfs")
            .args(["-w", "-R", &format!("sif /{file} size {size}")])
            .arg(&img)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return;
        }
    }
    let i = Image::open(&img).unwrap();
    assert_eq!(i.read_link(b"/link").unwrap_err().errno, libc::EIO);
    // Refused as corrupt (more blocks than the extents hold), or read in bounded chunks:
    // never a 256 TiB buffer.
    match i.open_file(b"/big") {
        Ok(mut f) => {
            assert!(read_at(&mut f, 0, 4096).is_ok_and(|d| d.len() <= 4096));
            let _ = read_at(&mut f, 0xffff_0000_0000, 4096);
        }
        Err(e) => assert_eq!(e.errno, libc::EIO, "{}", e.message),
    }
}

/// xorshift64: mutations the same every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap()
    }
}

/// Everything a client could do to an image: list every directory, stat every entry,
/// read every file and link. Errors are fine; the walk is bounded.
fn walk(i: &Image) {
    let mut todo = vec![b"/".to_vec()];
    let mut seen = 0;
    while let Some(dir) = todo.pop() {
        let Ok(mut l) = i.list(&dir) else { continue };
        while let Ok(Some(e)) = l.next_entry() {
            seen += 1;
            if seen > 5000 {
                return;
            }
            let p = child(&dir, &e.name);
            let Ok(m) = i.stat(&p) else { continue };
            if m.is_dir() && p.len() < 512 {
                todo.push(p);
            } else if m.is_symlink() {
                let _ = i.read_link(&p);
            } else if let Ok(mut f) = i.open_file(&p) {
                let _ = read_at(&mut f, 0, 64 * 1024);
                let _ = read_at(&mut f, m.len().saturating_sub(10), 64 * 1024);
            }
        }
    }
}

#[test]
fn mutated_images_give_errors_not_panics() {
    let d = tempfile::tempdir().unwrap();
    let Some(img) = image(d.path(), &[]) else {
        return;
    };
    let full = std::fs::read(&img).unwrap();
    // Metadata lives in the first blocks of the 16 MiB image: mutate there.
    let span = full.len().min(1 << 20);
    let p = d.path().join("m");
    let mut rng = Rng(42);
    let mut opened = 0;
    for round in 0..300 {
        let mut b = full.clone();
        for _ in 0..1 + round % 40 {
            let at = rng.below(span);
            b[at] = rng.byte();
        }
        std::fs::write(&p, &b).unwrap();
        let res = std::panic::catch_unwind(|| {
            if let Ok(i) = Image::open(&p) {
                walk(&i);
                true
            } else {
                false
            }
        });
        match res {
            Ok(o) => opened += usize::from(o),
            Err(_) => panic!("round {round}: the reader panicked"),
        }
    }
    // Most mutations hit data the checks catch or do not touch: both paths ran.
    assert!(opened > 0);
}
