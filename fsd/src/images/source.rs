//! What kind of thing an `import` SOURCE is, decided from its contents (never its name).
//!
//! - a directory with `oci-layout` → OCI image layout; with `manifest.json` → an unpacked
//!   `docker save`; any other directory → a root filesystem tree;
//! - a file with the ext4 superblock magic → ext4 image;
//! - a (gzip/zstd/plain) tar whose members look like an image archive (`oci-layout`,
//!   `index.json`, `manifest.json`, `blobs/...`, `<64 hex>/...`, `<64 hex>.json|.tar`,
//!   `repositories`) → oci-archive (when it has `oci-layout`) or docker-save; a tar with
//!   any other member → rootfs tarball. Only members up to the first decisive one are read.
use std::io::{BufReader, Read};
use std::path::Path;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Ext4,
    Directory,
    OciLayout,
    DockerSaveDir,
    OciArchive,
    DockerSave,
    RootfsTar,
}

impl SourceKind {
    pub fn name(self) -> &'static str {
        match self {
            SourceKind::Ext4 => "ext4",
            SourceKind::Directory => "directory",
            SourceKind::OciLayout => "oci-layout",
            SourceKind::DockerSaveDir => "docker-save-dir",
            SourceKind::OciArchive => "oci-archive",
            SourceKind::DockerSave => "docker-save",
            SourceKind::RootfsTar => "rootfs-tar",
        }
    }
}

/// Offset and value of the ext4 (ext2/3) superblock magic.
const EXT_MAGIC_AT: usize = 1024 + 0x38;
const EXT_MAGIC: [u8; 2] = [0x53, 0xef];

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Does this archive member belong to an image archive (as opposed to a root fs)?
fn image_member(name: &str) -> bool {
    let first = name.split('/').find(|c| !c.is_empty() && *c != ".");
    match first {
        None => true,
        Some("blobs" | "index.json" | "manifest.json" | "oci-layout" | "repositories") => true,
        // `<hex>/layer.tar` (docker), `<hex>.json` / `<hex>.tar` (docker, skopeo).
        Some(c) => c.split('.').next().is_some_and(is_hex64),
    }
}

pub fn detect(path: &Path) -> Result<SourceKind> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::not_found(format!("source {}: {e}", path.display())))?;
    if meta.is_dir() {
        if path.join("oci-layout").is_file() {
            return Ok(SourceKind::OciLayout);
        }
        if path.join("manifest.json").is_file() {
            return Ok(SourceKind::DockerSaveDir);
        }
        return Ok(SourceKind::Directory);
    }
    if !meta.is_file() {
        return Err(Error::invalid(format!(
            "source {} is neither a file nor a directory",
            path.display()
        )));
    }
    let mut f = std::fs::File::open(path)?;
    let mut head = vec![0u8; 2048];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    if n >= EXT_MAGIC_AT + 2 && head[EXT_MAGIC_AT..EXT_MAGIC_AT + 2] == EXT_MAGIC {
        return Ok(SourceKind::Ext4);
    }
    let f = std::fs::File::open(path)?;
    let dec = super::Decoder::new(BufReader::new(f))?;
    classify_tar(dec).map_err(|e| e.with_context(&format!("source {}", path.display())))
}

/// Classify a tar stream by its members.
pub fn classify_tar(r: impl Read) -> Result<SourceKind> {
    let mut archive = tar::Archive::new(r);
    let mut has_layout = false;
    let mut has_manifest = false;
    let mut any = false;
    let entries = archive
        .entries()
        .map_err(|e| Error::invalid(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| {
            Error::invalid(format!(
                "not a tar archive, ext4 image or directory (or a corrupt one): {e}"
            ))
        })?;
        any = true;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if !image_member(&name) {
            return Ok(SourceKind::RootfsTar);
        }
        let clean = name.trim_start_matches("./");
        has_layout |= clean == "oci-layout";
        has_manifest |= clean == "manifest.json";
    }
    match (any, has_layout, has_manifest) {
        (false, ..) => Err(Error::invalid("empty archive")),
        (_, true, _) => Ok(SourceKind::OciArchive),
        (_, false, true) => Ok(SourceKind::DockerSave),
        _ => Err(Error::invalid(
            "archive has neither oci-layout nor manifest.json: not an image archive",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(names: &[&str]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for n in names {
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, n, &b"x"[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn classifies_tars() {
        let h = "0".repeat(64);
        assert_eq!(
            classify_tar(&tar_of(&["oci-layout", "index.json", "blobs/sha256/x"])[..]).unwrap(),
            SourceKind::OciArchive
        );
        assert_eq!(
            classify_tar(
                &tar_of(&[
                    &format!("{h}/layer.tar"),
                    &format!("{h}.json"),
                    "manifest.json",
                    "repositories"
                ])[..]
            )
            .unwrap(),
            SourceKind::DockerSave
        );
        // Modern docker save: both files; the OCI layout wins.
        assert_eq!(
            classify_tar(
                &tar_of(&[
                    "blobs/sha256/a",
                    "index.json",
                    "manifest.json",
                    "oci-layout"
                ])[..]
            )
            .unwrap(),
            SourceKind::OciArchive
        );
        assert_eq!(
            classify_tar(&tar_of(&["./bin/sh", "etc/passwd"])[..]).unwrap(),
            SourceKind::RootfsTar
        );
        assert_eq!(
            classify_tar(&tar_of(&["index.json", "bin/sh"])[..]).unwrap(),
            SourceKind::RootfsTar
        );
        assert!(classify_tar(&tar_of(&["index.json"])[..]).is_err());
        assert!(classify_tar(&[0u8; 1024][..]).is_err());
        assert!(classify_tar(&b"garbage that is no tar at all"[..]).is_err());
    }

    #[test]
    fn detects_files_and_dirs() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        assert_eq!(detect(p).unwrap(), SourceKind::Directory);
        std::fs::create_dir(p.join("lay")).unwrap();
        std::fs::write(p.join("lay/oci-layout"), "{}").unwrap();
        assert_eq!(detect(&p.join("lay")).unwrap(), SourceKind::OciLayout);
        let mut ext = vec![0u8; 4096];
        ext[EXT_MAGIC_AT..EXT_MAGIC_AT + 2].copy_from_slice(&EXT_MAGIC);
        std::fs::write(p.join("disk"), &ext).unwrap();
        assert_eq!(detect(&p.join("disk")).unwrap(), SourceKind::Ext4);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar_of(&["etc/hostname"])).unwrap();
        std::fs::write(p.join("r.tgz"), gz.finish().unwrap()).unwrap();
        assert_eq!(detect(&p.join("r.tgz")).unwrap(), SourceKind::RootfsTar);
        let zs = zstd::encode_all(&tar_of(&["oci-layout", "index.json"])[..], 1).unwrap();
        std::fs::write(p.join("a.tar.zst"), zs).unwrap();
        assert_eq!(
            detect(&p.join("a.tar.zst")).unwrap(),
            SourceKind::OciArchive
        );
        assert_eq!(detect(&p.join("missing")).unwrap_err().errno, libc::ENOENT);
    }
}
