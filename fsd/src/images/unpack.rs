//! Unpacking a source into the staging tree: the layers of a registry manifest, or a
//! local archive (OCI layout, `docker save`, plain tarball), a directory or an ext4 file.
//!
//! Invariants:
//! - Layers apply in manifest order; every blob is verified against its digest, and a
//!   `docker save` layer against the config's `diff_ids`.
//! - Member paths are resolved inside their root and sizes are never trusted
//!   ([`layers::Budget`]).
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde::Deserialize;

use super::layers::{self, Budget, Mode};
use super::oci::{self, BlobStore, Digest};
use super::reading::{drain, Counting, Decoder, Progress};
use super::source::SourceKind;
use super::{new_budget, Unpacked, Work};
use crate::error::{Error, Result};

/// Apply the layers of `manifest` from `store` into `rootfs`.
pub fn apply_manifest(
    store: &dyn BlobStore,
    manifest: &oci::Manifest,
    rootfs: &Path,
    progress: &Progress,
) -> Result<oci::ImageConfigFile> {
    let cdigest = manifest.config.digest()?;
    let config: oci::ImageConfigFile = oci::parse_json(
        &store.read_json_blob(&cdigest, &format!("config {cdigest}"))?,
        "image config",
    )?;
    let mut budget = new_budget();
    let n = manifest.layers.len();
    for (i, d) in manifest.layers.iter().enumerate() {
        progress.check_deadline()?;
        let digest = d.digest()?;
        let what = format!("layer {}/{n} ({digest})", i + 1);
        let verified = store.open_verified(&digest, d.size(), &what)?;
        let counting = Counting {
            inner: verified,
            progress,
            label: format!("layer={}/{n}", i + 1),
            total: d.size(),
            done: 0,
        };
        apply_one(
            BufReader::with_capacity(256 * 1024, counting),
            rootfs,
            &mut budget,
            &what,
            None,
        )?;
        progress.progress(
            "import-progress",
            &format!("layer={}/{n} done bytes={}", i + 1, budget.bytes),
            true,
        );
    }
    Ok(config)
}

/// Decompress and apply one layer stream, then read it to its end so its digest is
/// checked. `diff_id`, when given, is verified over the uncompressed stream.
fn apply_one<R: BufRead>(
    r: R,
    rootfs: &Path,
    budget: &mut Budget,
    what: &str,
    diff_id: Option<Digest>,
) -> Result<()> {
    let ctx = |e: Error| e.with_context(what);
    let dec = Decoder::new(r).map_err(ctx)?;
    match diff_id {
        Some(id) => {
            let v = oci::VerifyingReader::new(dec, id, None, what);
            let (_, mut v) = layers::apply_tar(rootfs, v, Mode::Layer, budget).map_err(ctx)?;
            drain(&mut v, what)?;
        }
        None => {
            let (_, mut dec) = layers::apply_tar(rootfs, dec, Mode::Layer, budget).map_err(ctx)?;
            drain(&mut dec, what)?;
            drain(&mut dec.into_inner(), what)?;
        }
    }
    Ok(())
}

/// Unpack a local `source` of `kind` into `work`.
pub fn unpack_local(
    source: &Path,
    kind: SourceKind,
    work: &Work,
    tag: Option<&str>,
    progress: &Progress,
) -> Result<Unpacked> {
    let mut out = Unpacked {
        kind: kind.name().to_string(),
        ..Default::default()
    };
    match kind {
        SourceKind::Ext4 => {
            crate::disk::clone_disk(source, &work.disk())
                .map_err(|e| Error::io(format!("cannot copy {}: {e}", source.display())))?;
            out.ext4 = true;
        }
        SourceKind::Directory => out.tree = Some(source.to_path_buf()),
        SourceKind::RootfsTar => {
            let f = std::fs::File::open(source)?;
            let total = f.metadata().ok().map(|m| m.len());
            let counting = Counting {
                inner: f,
                progress,
                label: "rootfs".into(),
                total,
                done: 0,
            };
            let dec = Decoder::new(BufReader::with_capacity(256 * 1024, counting))?;
            out.kind = match dec.compression() {
                "gzip" => "rootfs-tar.gz",
                "zstd" => "rootfs-tar.zst",
                _ => "rootfs-tar",
            }
            .into();
            let (_, mut dec) =
                layers::apply_tar(&work.rootfs(), dec, Mode::Plain, &mut new_budget())?;
            drain(&mut dec, "rootfs tarball")?;
            out.layers = 1;
        }
        SourceKind::OciLayout => {
            unpack_oci_layout(source, &work.rootfs(), tag, progress, &mut out)?
        }
        SourceKind::DockerSaveDir => {
            unpack_docker_save(source, &work.rootfs(), progress, &mut out)?
        }
        SourceKind::OciArchive | SourceKind::DockerSave => {
            // Unpack the archive (plain files only, paths checked), then read it as a dir.
            let dir = work.unpacked();
            std::fs::create_dir_all(&dir)?;
            let f = std::fs::File::open(source)?;
            let dec = Decoder::new(BufReader::with_capacity(256 * 1024, f))?;
            let (_, mut dec) = layers::apply_tar(&dir, dec, Mode::Plain, &mut new_budget())
                .map_err(|e| e.with_context("image archive"))?;
            drain(&mut dec, "image archive")?;
            if kind == SourceKind::OciArchive {
                unpack_oci_layout(&dir, &work.rootfs(), tag, progress, &mut out)?;
            } else {
                unpack_docker_save(&dir, &work.rootfs(), progress, &mut out)?;
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(out)
}

fn unpack_oci_layout(
    dir: &Path,
    rootfs: &Path,
    tag: Option<&str>,
    progress: &Progress,
    out: &mut Unpacked,
) -> Result<()> {
    let index_bytes = oci::read_limited(layers::open_in_root(dir, "index.json")?, "index.json")?;
    let index: oci::AnyManifest = oci::parse_json(&index_bytes, "index.json")?;
    let entries = index.manifests.clone().unwrap_or_default();
    if entries.is_empty() {
        return Err(Error::invalid("index.json lists no manifests"));
    }
    let store = oci::DirStore {
        dir: dir.to_path_buf(),
    };
    let ref_name = |d: &oci::Descriptor| {
        d.annotations
            .as_ref()
            .and_then(|a| a.get("org.opencontainers.image.ref.name").cloned())
    };
    let tags: Vec<String> = entries.iter().filter_map(ref_name).collect();
    let entries: Vec<oci::Descriptor> = match tag {
        Some(t) => {
            let hit: Vec<_> = entries
                .iter()
                .filter(|d| ref_name(d).as_deref() == Some(t))
                .cloned()
                .collect();
            if hit.is_empty() {
                return Err(Error::not_found(format!(
                    "no image tagged {t:?} in the layout (tags: {})",
                    tags.join(", ")
                )));
            }
            hit
        }
        None => entries,
    };
    let chosen = oci::choose_from_index(&entries).map_err(|e| {
        if entries.len() > 1 && tags.len() > 1 {
            Error::invalid(format!(
                "the layout holds several images (tags: {}); choose one with tag=NAME",
                tags.join(", ")
            ))
        } else {
            e
        }
    })?;
    out.reference = chosen
        .annotations
        .as_ref()
        .and_then(|a| a.get("org.opencontainers.image.ref.name").cloned());
    let digest = chosen.digest()?;
    let bytes = store.read_json_blob(&digest, &format!("manifest {digest}"))?;
    let manifest = oci::resolve_manifest(&store, bytes, digest)?;
    out.digest = Some(manifest.digest.to_string());
    out.layers = manifest.layers.len();
    out.config = Some(apply_manifest(&store, &manifest, rootfs, progress)?);
    Ok(())
}

#[derive(Deserialize)]
struct DockerSaveEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// The digest a docker-save member path encodes (`<hex>.json`, `blobs/sha256/<hex>`).
fn digest_from_member(path: &str) -> Option<Digest> {
    let base = path.rsplit('/').next()?;
    let hex = base.strip_suffix(".json").unwrap_or(base);
    Digest::parse(&format!("sha256:{hex}")).ok()
}

fn unpack_docker_save(
    dir: &Path,
    rootfs: &Path,
    progress: &Progress,
    out: &mut Unpacked,
) -> Result<()> {
    let bytes = oci::read_limited(layers::open_in_root(dir, "manifest.json")?, "manifest.json")?;
    let entries: Vec<DockerSaveEntry> = oci::parse_json(&bytes, "manifest.json")?;
    let [entry] = entries.as_slice() else {
        return Err(Error::invalid(format!(
            "manifest.json lists {} images; import takes archives of exactly one",
            entries.len()
        )));
    };
    out.reference = entry.repo_tags.as_ref().and_then(|t| t.first().cloned());
    let cfg_file = layers::open_in_root(dir, &entry.config)?;
    let cfg_bytes = match digest_from_member(&entry.config) {
        Some(d) => oci::read_limited(
            oci::VerifyingReader::new(cfg_file, d.clone(), None, "image config"),
            "image config",
        )?,
        None => oci::read_limited(cfg_file, "image config")?,
    };
    let config: oci::ImageConfigFile = oci::parse_json(&cfg_bytes, "image config")?;
    out.digest = Some(Digest::of(&cfg_bytes).to_string());
    let diff_ids = &config.rootfs.diff_ids;
    if !diff_ids.is_empty() && diff_ids.len() != entry.layers.len() {
        return Err(Error::invalid(format!(
            "the config lists {} layers, manifest.json {}",
            diff_ids.len(),
            entry.layers.len()
        )));
    }
    let mut budget = new_budget();
    let n = entry.layers.len();
    for (i, member) in entry.layers.iter().enumerate() {
        progress.check_deadline()?;
        let what = format!("layer {}/{n} ({member})", i + 1);
        let f = layers::open_in_root(dir, member).map_err(|e| e.with_context(&what))?;
        let total = f.metadata().ok().map(|m| m.len());
        let counting = Counting {
            inner: f,
            progress,
            label: format!("layer={}/{n}", i + 1),
            total,
            done: 0,
        };
        let diff_id = diff_ids.get(i).map(|d| Digest::parse(d)).transpose()?;
        apply_one(
            BufReader::with_capacity(256 * 1024, counting),
            rootfs,
            &mut budget,
            &what,
            diff_id,
        )?;
        progress.progress(
            "import-progress",
            &format!("layer={}/{n} done bytes={}", i + 1, budget.bytes),
            true,
        );
    }
    out.layers = n;
    out.config = Some(config);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::events::EventLog;

    fn layer(files: &[(&str, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (n, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, n, data.as_bytes()).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn progress(dir: &Path) -> Progress {
        let log = Arc::new(EventLog::open(&dir.join("events.log")).unwrap());
        Progress::new(log, "t", Instant::now() + Duration::from_secs(60))
    }

    fn work(dir: &Path) -> Work {
        let w = Work {
            dir: dir.join("work"),
        };
        std::fs::create_dir_all(w.rootfs()).unwrap();
        w
    }

    #[test]
    fn docker_save_dir_applies_layers_and_checks_diff_ids() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("save");
        std::fs::create_dir_all(src.join("l1")).unwrap();
        std::fs::create_dir_all(src.join("l2")).unwrap();
        let l1 = layer(&[("etc/a", "1"), ("etc/b", "2")]);
        let l2 = layer(&[("etc/.wh.a", ""), ("etc/b", "3")]);
        std::fs::write(src.join("l1/layer.tar"), &l1).unwrap();
        std::fs::write(src.join("l2/layer.tar"), &l2).unwrap();
        let config = |ids: &[String]| {
            serde_json::json!({"architecture":"amd64","os":"linux",
                "config":{"Env":["X=1"],"User":"1:2"},
                "rootfs":{"type":"layers","diff_ids":ids}})
            .to_string()
        };
        let good = [Digest::of(&l1).to_string(), Digest::of(&l2).to_string()];
        std::fs::write(src.join("cfg.json"), config(&good)).unwrap();
        std::fs::write(
            src.join("manifest.json"),
            r#"[{"Config":"cfg.json","RepoTags":["x:1"],"Layers":["l1/layer.tar","l2/layer.tar"]}]"#,
        )
        .unwrap();
        let w = work(d.path());
        let p = progress(d.path());
        let u = unpack_local(&src, SourceKind::DockerSaveDir, &w, None, &p).unwrap();
        assert_eq!(u.layers, 2);
        assert_eq!(u.reference.as_deref(), Some("x:1"));
        assert_eq!(u.config.unwrap().config.user, "1:2");
        assert!(!w.rootfs().join("etc/a").exists());
        assert_eq!(
            std::fs::read_to_string(w.rootfs().join("etc/b")).unwrap(),
            "3"
        );
        // A wrong diff_id fails the import.
        let bad = [good[0].clone(), Digest::of(b"x").to_string()];
        std::fs::write(src.join("cfg.json"), config(&bad)).unwrap();
        let w2 = Work {
            dir: d.path().join("work2"),
        };
        std::fs::create_dir_all(w2.rootfs()).unwrap();
        let e = unpack_local(&src, SourceKind::DockerSaveDir, &w2, None, &p).unwrap_err();
        assert!(e.message.contains("digest mismatch"), "{}", e.message);
        // Member paths cannot leave the archive directory.
        std::fs::write(
            src.join("manifest.json"),
            r#"[{"Config":"../../etc/passwd","Layers":[]}]"#,
        )
        .unwrap();
        assert!(unpack_local(&src, SourceKind::DockerSaveDir, &w2, None, &p).is_err());
    }

    #[test]
    fn oci_layout_with_gzip_and_zstd_layers() {
        let d = tempfile::tempdir().unwrap();
        let lay = d.path().join("lay");
        std::fs::create_dir_all(lay.join("blobs/sha256")).unwrap();
        let put = |bytes: &[u8]| -> (String, usize) {
            let dg = Digest::of(bytes);
            std::fs::write(lay.join(dg.blob_path()), bytes).unwrap();
            (dg.to_string(), bytes.len())
        };
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &layer(&[("a/one", "1")])).unwrap();
        let (g, gl) = put(&gz.finish().unwrap());
        let (z, zl) = put(&zstd::encode_all(&layer(&[("a/two", "2")])[..], 1).unwrap());
        let (c, cl) = put(br#"{"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/x"]}}"#);
        let manifest = serde_json::json!({"schemaVersion":2,"mediaType":oci::MT_OCI_MANIFEST,
            "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":c,"size":cl},
            "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":g,"size":gl},
                      {"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":z,"size":zl}]})
        .to_string();
        let (m, ml) = put(manifest.as_bytes());
        std::fs::write(lay.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        std::fs::write(
            lay.join("index.json"),
            serde_json::json!({"schemaVersion":2,"manifests":[{"mediaType":oci::MT_OCI_MANIFEST,
                "digest":m,"size":ml,"annotations":{"org.opencontainers.image.ref.name":"v1"}}]})
            .to_string(),
        )
        .unwrap();
        let w = work(d.path());
        let p = progress(d.path());
        let u = unpack_local(&lay, SourceKind::OciLayout, &w, Some("v1"), &p).unwrap();
        assert_eq!((u.layers, u.reference.as_deref()), (2, Some("v1")));
        assert_eq!(u.digest.as_deref(), Some(m.as_str()));
        assert!(w.rootfs().join("a/one").exists() && w.rootfs().join("a/two").exists());
        // Corrupt the zstd layer (same size): the import fails on its digest.
        let zp = lay.join(Digest::parse(&z).unwrap().blob_path());
        let mut bytes = std::fs::read(&zp).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&zp, bytes).unwrap();
        let w2 = Work {
            dir: d.path().join("w2"),
        };
        std::fs::create_dir_all(w2.rootfs()).unwrap();
        assert!(unpack_local(&lay, SourceKind::OciLayout, &w2, None, &p).is_err());
        std::fs::remove_file(&zp).unwrap();
        let e = unpack_local(&lay, SourceKind::OciLayout, &w2, None, &p).unwrap_err();
        assert_eq!(e.errno, libc::ENOENT, "{}", e.message);
    }

    #[test]
    fn docker_save_member_digests() {
        let hex = "a".repeat(64);
        assert!(digest_from_member(&format!("{hex}.json")).is_some());
        assert!(digest_from_member(&format!("blobs/sha256/{hex}")).is_some());
        assert!(digest_from_member("config.json").is_none());
    }
}
