//! OCI image formats: digests, descriptors, manifests, indexes and image configs, and
//! reading them from a blob store (an OCI layout directory, an unpacked image archive, or
//! the pull cache).
//!
//! Invariants: every blob read through [`BlobStore::open_verified`] is checked against its
//! digest before its last byte is handed out, so a mismatch fails the read (and the import)
//! instead of producing a subtly wrong image; JSON documents are read with a size limit
//! ([`MAX_JSON`]) and never trusted to be small.
use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::error::{Error, Result};

/// Largest manifest, index or config accepted.
pub const MAX_JSON: u64 = 8 * 1024 * 1024;

pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// A validated content digest (`sha256:<64 hex>` or `sha512:<128 hex>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    pub algorithm: String,
    pub hex: String,
}

impl Digest {
    pub fn parse(s: &str) -> Result<Digest> {
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| Error::invalid(format!("bad digest {s:?}: expected ALGORITHM:HEX")))?;
        let len = match alg {
            "sha256" => 64,
            "sha512" => 128,
            _ => {
                return Err(Error::invalid(format!(
                    "unsupported digest algorithm {alg:?} (sha256 and sha512 are)"
                )))
            }
        };
        if hex.len() != len || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(Error::invalid(format!("bad digest {s:?}")));
        }
        Ok(Digest {
            algorithm: alg.to_string(),
            hex: hex.to_string(),
        })
    }

    pub fn of(data: &[u8]) -> Digest {
        let mut h = Hasher::new("sha256");
        h.update(data);
        h.finish()
    }

    /// `blobs/<alg>/<hex>` (the path inside an OCI layout).
    pub fn blob_path(&self) -> PathBuf {
        PathBuf::from("blobs").join(&self.algorithm).join(&self.hex)
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.algorithm, self.hex)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Incremental digest of one algorithm.
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(algorithm: &str) -> Hasher {
        match algorithm {
            "sha512" => Hasher::Sha512(sha2::Sha512::new()),
            _ => Hasher::Sha256(sha2::Sha256::new()),
        }
    }
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }
    pub fn finish(self) -> Digest {
        match self {
            Hasher::Sha256(h) => Digest {
                algorithm: "sha256".into(),
                hex: hex(&h.finalize()),
            },
            Hasher::Sha512(h) => Digest {
                algorithm: "sha512".into(),
                hex: hex(&h.finalize()),
            },
        }
    }
}

/// A reader that hashes what passes through and, at end of stream, fails with EIO-like
/// `InvalidData` unless the content matches `expected` (digest and, if known, size).
pub struct VerifyingReader<R> {
    inner: R,
    hasher: Option<Hasher>,
    expected: Digest,
    size: Option<u64>,
    read: u64,
    what: String,
}

impl<R: Read> VerifyingReader<R> {
    pub fn new(inner: R, expected: Digest, size: Option<u64>, what: impl Into<String>) -> Self {
        VerifyingReader {
            inner,
            hasher: Some(Hasher::new(&expected.algorithm)),
            expected,
            size,
            read: 0,
            what: what.into(),
        }
    }
    pub fn bytes_read(&self) -> u64 {
        self.read
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if let Some(size) = self.size {
            if self.read > size {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{}: more than the {size} bytes its descriptor says",
                        self.what
                    ),
                ));
            }
        }
        match self.hasher.as_mut() {
            Some(h) if n > 0 => h.update(&buf[..n]),
            Some(_) => {
                let actual = self.hasher.take().map(Hasher::finish);
                if actual.as_ref() != Some(&self.expected) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "{}: digest mismatch: expected {}, got {}",
                            self.what,
                            self.expected,
                            actual.map(|d| d.to_string()).unwrap_or_default()
                        ),
                    ));
                }
                if let Some(size) = self.size {
                    if self.read != size {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("{}: {} bytes, descriptor says {size}", self.what, self.read),
                        ));
                    }
                }
            }
            None => {}
        }
        Ok(n)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<HashMap<String, String>>,
}

impl Descriptor {
    pub fn digest(&self) -> Result<Digest> {
        Digest::parse(&self.digest)
    }
    pub fn size(&self) -> Option<u64> {
        u64::try_from(self.size).ok().filter(|s| *s > 0)
    }
}

/// An image index or a manifest (distinguished by the presence of `manifests`).
#[derive(Debug, Clone, Deserialize)]
pub struct AnyManifest {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    #[serde(default)]
    pub manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Option<Vec<Descriptor>>,
}

#[derive(Debug, Clone)]
pub struct Manifest {
    pub digest: Digest,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// The container part of an image config (what the agent applies).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ContainerConfig {
    #[serde(rename = "Env", default, deserialize_with = "null_default")]
    pub env: Vec<String>,
    #[serde(rename = "WorkingDir", default, deserialize_with = "null_default")]
    pub working_dir: String,
    #[serde(rename = "User", default, deserialize_with = "null_default")]
    pub user: String,
    #[serde(rename = "Entrypoint", default, deserialize_with = "null_default")]
    pub entrypoint: Vec<String>,
    #[serde(rename = "Cmd", default, deserialize_with = "null_default")]
    pub cmd: Vec<String>,
}

fn null_default<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// The image config blob.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct ImageConfigFile {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default, deserialize_with = "null_default")]
    pub config: ContainerConfig,
    #[serde(default)]
    pub rootfs: RootFs,
}

pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::invalid(format!("{what}: invalid JSON: {e}")))
}

/// Where blobs come from.
pub trait BlobStore {
    /// The raw bytes of blob `digest` (not yet verified).
    fn open(&self, digest: &Digest) -> Result<Box<dyn Read + Send>>;

    /// A reader that fails at its end unless the blob matches `digest` (and `size`).
    fn open_verified(
        &self,
        digest: &Digest,
        size: Option<u64>,
        what: &str,
    ) -> Result<VerifyingReader<Box<dyn Read + Send>>> {
        Ok(VerifyingReader::new(
            self.open(digest)?,
            digest.clone(),
            size,
            what,
        ))
    }

    /// A whole small blob, verified.
    fn read_json_blob(&self, digest: &Digest, what: &str) -> Result<Vec<u8>> {
        let r = self.open_verified(digest, None, what)?;
        read_limited(r, what)
    }
}

/// Read at most [`MAX_JSON`] bytes (more is an error).
pub fn read_limited(r: impl Read, what: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    r.take(MAX_JSON + 1)
        .read_to_end(&mut out)
        .map_err(|e| Error::invalid(format!("{what}: {e}")))?;
    if out.len() as u64 > MAX_JSON {
        return Err(Error::invalid(format!(
            "{what} is larger than {MAX_JSON} bytes"
        )));
    }
    Ok(out)
}

/// Blobs under `<dir>/blobs/<alg>/<hex>` (OCI layouts, unpacked archives, the pull cache).
pub struct DirStore {
    pub dir: PathBuf,
}

impl BlobStore for DirStore {
    fn open(&self, digest: &Digest) -> Result<Box<dyn Read + Send>> {
        let rel = digest.blob_path();
        let f = super::layers::open_in_root(&self.dir, &rel.to_string_lossy())
            .map_err(|_| Error::not_found(format!("blob {digest} is missing")))?;
        Ok(Box::new(std::io::BufReader::with_capacity(256 * 1024, f)))
    }
}

/// Is this the platform we run (linux/amd64)?
pub fn is_our_platform(p: &Platform) -> bool {
    p.os == "linux" && (p.architecture == "amd64" || p.architecture == "x86_64")
}

/// Pick the linux/amd64 entry of an index (or the only entry when none names a platform).
pub fn choose_from_index(manifests: &[Descriptor]) -> Result<Descriptor> {
    if let Some(d) = manifests
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(is_our_platform))
    {
        return Ok(d.clone());
    }
    let unlabelled: Vec<_> = manifests.iter().filter(|d| d.platform.is_none()).collect();
    if unlabelled.len() == 1 {
        return Ok(unlabelled[0].clone());
    }
    let offered: Vec<String> = manifests
        .iter()
        .filter_map(|d| d.platform.as_ref())
        .map(|p| format!("{}/{}", p.os, p.architecture))
        .collect();
    Err(Error::not_found(format!(
        "no linux/amd64 image in the index (it has: {})",
        if offered.is_empty() {
            "nothing usable".to_string()
        } else {
            offered.join(", ")
        }
    )))
}

/// Follow an index (or a manifest) down to the linux/amd64 image manifest. `bytes` are the
/// document whose digest is `digest`; nested documents come from `store`.
pub fn resolve_manifest(store: &dyn BlobStore, bytes: Vec<u8>, digest: Digest) -> Result<Manifest> {
    let mut bytes = bytes;
    let mut digest = digest;
    for _ in 0..4 {
        let m: AnyManifest = parse_json(&bytes, "manifest")?;
        if let Some(list) = &m.manifests {
            let d = choose_from_index(list)?;
            digest = d.digest()?;
            bytes = store.read_json_blob(&digest, &format!("manifest {digest}"))?;
            continue;
        }
        let (Some(config), Some(layers)) = (m.config, m.layers) else {
            return Err(Error::invalid(format!(
                "manifest {digest} has no config or layers (media type {:?})",
                m.media_type
            )));
        };
        return Ok(Manifest {
            digest,
            config,
            layers,
        });
    }
    Err(Error::invalid("image indexes nested too deeply"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_parse_and_reject() {
        let d = Digest::of(b"hello");
        assert_eq!(
            d.to_string(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
        for bad in [
            "sha256:abc",
            "md5:00",
            "sha256:../../../../etc/passwd0000000000000000000000000000000000000",
            "nocolon",
            "sha256:2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn verifying_reader_checks_digest_and_size() {
        let data = b"layer bytes".to_vec();
        let good = Digest::of(&data);
        let mut out = Vec::new();
        VerifyingReader::new(&data[..], good.clone(), Some(data.len() as u64), "x")
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, data);
        let wrong = Digest::of(b"other");
        let e = VerifyingReader::new(&data[..], wrong, None, "layer 1")
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(e.to_string().contains("digest mismatch"), "{e}");
        let e = VerifyingReader::new(&data[..], good.clone(), Some(3), "x")
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
        let e = VerifyingReader::new(&data[..], good, Some(100), "x")
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(e.to_string().contains("descriptor says"), "{e}");
    }

    #[test]
    fn index_selects_linux_amd64() {
        let mk = |os: &str, arch: &str, n: u8| Descriptor {
            media_type: MT_OCI_MANIFEST.into(),
            digest: format!("sha256:{}", format!("{n:02x}").repeat(32)),
            size: 1,
            platform: Some(Platform {
                architecture: arch.into(),
                os: os.into(),
                variant: None,
            }),
            annotations: None,
        };
        let list = vec![
            mk("linux", "arm64", 1),
            mk("unknown", "unknown", 2),
            mk("linux", "amd64", 3),
        ];
        assert_eq!(choose_from_index(&list).unwrap().digest, list[2].digest);
        let e = choose_from_index(&list[..2]).unwrap_err();
        assert!(e.message.contains("linux/arm64"), "{}", e.message);
    }

    #[test]
    fn config_with_nulls_parses() {
        let c: ImageConfigFile = parse_json(
            br#"{"architecture":"amd64","os":"linux","config":{"Env":["A=1"],"Cmd":null,"Entrypoint":["/app"],"WorkingDir":"/w","User":"app"},"rootfs":{"type":"layers","diff_ids":[]}}"#,
            "config",
        )
        .unwrap();
        assert_eq!(c.config.env, vec!["A=1"]);
        assert!(c.config.cmd.is_empty());
        assert_eq!(c.config.entrypoint, vec!["/app"]);
        let c: ImageConfigFile = parse_json(br#"{"config":null}"#, "config").unwrap();
        assert_eq!(c.config, ContainerConfig::default());
    }
}
