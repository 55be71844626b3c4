//! The guest initramfs: an uncompressed cpio (newc) archive.
//!
//! Contents (all owned by root, mtime 0 so equal inputs give byte-identical output):
//! ```text
//! /init                                   the static bandsox-agent (0755)
//! /etc/bandsox/modules.load               absolute module paths, dependencies first
//! /etc/bandsox/kernel-version             the kernel release the modules belong to
//! /lib/modules/<ver>/kernel/...ko         the modules listed above (0644)
//! /proc /sys /dev /run /tmp /newroot /root /etc   empty directories (/tmp 1777)
//! /dev/console (c 5:1, 0600), /dev/null (c 1:3, 0666)
//! ```
//! Uncompressed because the kernel unpacks it faster than it inflates gzip under TCG, and
//! the archive is only a few MiB.
//!
//! Invariants: every parent directory appears before its children; every path is
//! relative (no leading `/`, no `..`); the archive ends with the `TRAILER!!!` entry.
use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;

use cpio::newc::{trailer, Builder};

use super::GuestError;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;

/// What goes into the initramfs.
#[derive(Debug)]
pub struct InitramfsContents<'a> {
    /// The agent binary's bytes (becomes `/init`).
    pub agent: &'a [u8],
    /// Kernel release (`lib/modules/<ver>`).
    pub kernel_version: &'a str,
    /// `lib/modules/<ver>` on the host.
    pub module_dir: &'a Path,
    /// Module paths relative to `module_dir`, in load order.
    pub modules: &'a [String],
}

enum Body<'a> {
    Dir,
    File(std::borrow::Cow<'a, [u8]>),
    Char(u32, u32),
}

struct Entry<'a> {
    name: String,
    perm: u32,
    body: Body<'a>,
}

/// Write the archive to `out`.
pub fn write_initramfs<W: Write>(
    contents: &InitramfsContents<'_>,
    out: W,
) -> Result<W, GuestError> {
    let modroot = format!("lib/modules/{}", contents.kernel_version);
    let mut load_list = String::new();
    let mut entries: Vec<Entry<'_>> = vec![Entry {
        name: "init".into(),
        perm: 0o755,
        body: Body::File(contents.agent.into()),
    }];
    for rel in contents.modules {
        check_relative(rel)?;
        if !rel.ends_with(".ko") {
            return Err(GuestError::Invalid(format!(
                "module {rel} is compressed; the guest loads plain .ko files only"
            )));
        }
        let host = contents.module_dir.join(rel);
        let bytes = std::fs::read(&host).map_err(|e| GuestError::io(host.clone(), e))?;
        load_list.push_str(&format!("/{modroot}/{rel}\n"));
        entries.push(Entry {
            name: format!("{modroot}/{rel}"),
            perm: 0o644,
            body: Body::File(bytes.into()),
        });
    }
    entries.push(Entry {
        name: "etc/bandsox/modules.load".into(),
        perm: 0o644,
        body: Body::File(load_list.into_bytes().into()),
    });
    entries.push(Entry {
        name: "etc/bandsox/kernel-version".into(),
        perm: 0o644,
        body: Body::File(format!("{}\n", contents.kernel_version).into_bytes().into()),
    });
    entries.push(Entry {
        name: "dev/console".into(),
        perm: 0o600,
        body: Body::Char(5, 1),
    });
    entries.push(Entry {
        name: "dev/null".into(),
        perm: 0o666,
        body: Body::Char(1, 3),
    });

    // Directories: the fixed ones plus every parent of every entry, parents first.
    let mut dirs: BTreeSet<String> = ["proc", "sys", "dev", "run", "tmp", "newroot", "root", "etc"]
        .into_iter()
        .map(String::from)
        .collect();
    for e in &entries {
        let mut p = e.name.as_str();
        while let Some((parent, _)) = p.rsplit_once('/') {
            dirs.insert(parent.to_string());
            p = parent;
        }
    }
    // BTreeSet order puts "a" before "a/b": parents precede children.
    let mut all: Vec<Entry<'_>> = dirs
        .into_iter()
        .map(|d| Entry {
            perm: match d.as_str() {
                "tmp" => 0o1777,
                "root" => 0o700,
                _ => 0o755,
            },
            name: d,
            body: Body::Dir,
        })
        .collect();
    all.extend(entries);

    let mut out = out;
    for (i, e) in all.iter().enumerate() {
        let ino =
            u32::try_from(i + 1).map_err(|_| GuestError::Invalid("too many entries".into()))?;
        let b = Builder::new(&e.name).ino(ino).uid(0).gid(0).mtime(0);
        out = match &e.body {
            Body::Dir => b.mode(S_IFDIR | e.perm).nlink(2).write(out, 0).finish(),
            Body::Char(major, minor) => b
                .mode(S_IFCHR | e.perm)
                .rdev_major(*major)
                .rdev_minor(*minor)
                .write(out, 0)
                .finish(),
            Body::File(data) => {
                let size = u32::try_from(data.len())
                    .map_err(|_| GuestError::Invalid(format!("{} is larger than 4 GiB", e.name)))?;
                let mut w = b.mode(S_IFREG | e.perm).write(out, size);
                w.write_all(data).and_then(|()| w.finish())
            }
        }
        .map_err(|e| GuestError::io("initramfs".into(), e))?;
    }
    trailer(out).map_err(|e| GuestError::io("initramfs".into(), e))
}

fn check_relative(rel: &str) -> Result<(), GuestError> {
    if rel.is_empty() || rel.starts_with('/') || rel.split('/').any(|c| c == ".." || c.is_empty()) {
        return Err(GuestError::Invalid(format!("bad module path {rel:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cpio::newc::Reader;
    use std::io::Read;

    fn read_all(mut data: &[u8]) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let mut r = Reader::new(data).unwrap();
            if r.entry().is_trailer() {
                break;
            }
            let e = r.entry();
            let (name, mode, maj, min) = (
                e.name().to_string(),
                e.mode(),
                e.rdev_major(),
                e.rdev_minor(),
            );
            let mut body = Vec::new();
            r.read_to_end(&mut body).unwrap();
            out.push((name, mode, maj, min, body));
            data = r.finish().unwrap();
        }
        out
    }

    fn sample() -> (tempfile::TempDir, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("kernel/drivers/virtio");
        std::fs::create_dir_all(&m).unwrap();
        std::fs::write(m.join("virtio_ring.ko"), b"RING").unwrap();
        std::fs::write(m.join("virtio.ko"), b"VIRTIO!").unwrap();
        let modules = vec![
            "kernel/drivers/virtio/virtio_ring.ko".to_string(),
            "kernel/drivers/virtio/virtio.ko".to_string(),
        ];
        let c = InitramfsContents {
            agent: b"\x7fELF-agent",
            kernel_version: "6.1.0-test",
            module_dir: dir.path(),
            modules: &modules,
        };
        let bytes = write_initramfs(&c, Vec::new()).unwrap();
        (dir, bytes)
    }

    #[test]
    fn archive_parses_back() {
        let (_dir, bytes) = sample();
        let entries = read_all(&bytes);
        let get = |n: &str| {
            entries
                .iter()
                .find(|e| e.0 == n)
                .unwrap_or_else(|| panic!("{n} missing"))
        };
        let init = get("init");
        assert_eq!(init.1, S_IFREG | 0o755);
        assert_eq!(init.4, b"\x7fELF-agent");
        assert_eq!(
            String::from_utf8(get("etc/bandsox/modules.load").4.clone()).unwrap(),
            "/lib/modules/6.1.0-test/kernel/drivers/virtio/virtio_ring.ko\n\
             /lib/modules/6.1.0-test/kernel/drivers/virtio/virtio.ko\n"
        );
        assert_eq!(
            get("lib/modules/6.1.0-test/kernel/drivers/virtio/virtio.ko").4,
            b"VIRTIO!"
        );
        let console = get("dev/console");
        assert_eq!((console.1, console.2, console.3), (S_IFCHR | 0o600, 5, 1));
        assert_eq!(get("tmp").1, S_IFDIR | 0o1777);
        for d in [
            "proc",
            "sys",
            "dev",
            "run",
            "newroot",
            "lib/modules/6.1.0-test/kernel",
        ] {
            assert_eq!(get(d).1 & 0o170_000, S_IFDIR, "{d}");
        }
        // Parents before children.
        for (i, e) in entries.iter().enumerate() {
            if let Some((parent, _)) = e.0.rsplit_once('/') {
                let p = entries.iter().position(|x| x.0 == parent).unwrap();
                assert!(p < i, "{parent} after {}", e.0);
            }
        }
        // Deterministic.
        assert_eq!(bytes, sample().1);
    }

    /// GNU cpio agrees with our reading, if it is installed.
    #[test]
    fn gnu_cpio_lists_it() {
        let (_dir, bytes) = sample();
        let child = std::process::Command::new("cpio")
            .args(["-it", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn();
        let Ok(mut child) = child else {
            eprintln!(
                "SKIP gnu_cpio_lists_it: no cpio binary (mount-helpers/ensure-deps installs it)"
            );
            return;
        };
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let list = String::from_utf8(out.stdout).unwrap();
        for n in ["init", "dev/console", "etc/bandsox/modules.load", "newroot"] {
            assert!(list.lines().any(|l| l == n), "{n} not in {list}");
        }
    }

    #[test]
    fn bad_module_paths_rejected() {
        for bad in ["/abs.ko", "../x.ko", "a//b.ko", "x.ko.xz"] {
            let modules = vec![bad.to_string()];
            let c = InitramfsContents {
                agent: b"",
                kernel_version: "v",
                module_dir: Path::new("/nonexistent"),
                modules: &modules,
            };
            assert!(matches!(
                write_initramfs(&c, Vec::new()),
                Err(GuestError::Invalid(_))
            ));
        }
    }
}
