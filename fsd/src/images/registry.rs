//! Pulling images from OCI distribution registries (with the `oci-client` crate) into a
//! blob cache shared by all images.
//!
//! - References are Docker-style (`busybox`, `library/debian:12`, `ghcr.io/o/r@sha256:…`,
//!   `localhost:5000/app:1`). An `http://` prefix makes the registry plain HTTP; so does a
//!   loopback registry host (`localhost`, `127.*`, `[::1]`), as in Docker.
//! - Credentials: the `auths` of a docker-style config (`$DOCKER_CONFIG/config.json`, else
//!   `$HOME/.docker/config.json`): `auth` (base64 `user:password`) or `username`/`password`.
//!   The client turns them into bearer tokens where the registry asks for that. Credential
//!   helpers are not run.
//! - Index → the linux/amd64 manifest. Manifests are verified against the digest they were
//!   requested by (when pinned) and identified by their own sha256.
//!
//! Invariants: a blob appears in the cache (`<cache>/blobs/<alg>/<hex>`) only after its
//! full content matched its digest (written to a unique `.partial` name, then renamed), so
//! a cached blob is never downloaded again and never wrong; a blob larger than its
//! descriptor says is cut off and rejected. Every request has connect and read
//! timeouts; the caller bounds the whole pull.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::oci::{self, BlobStore, Digest};
use super::Progress;
use crate::error::{Error, Result};

/// Most bytes of one manifest or index.
const MAX_MANIFEST: usize = 4 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A parsed pull reference.
#[derive(Debug, Clone)]
pub struct PullRef {
    pub reference: Reference,
    pub insecure: bool,
}

impl PullRef {
    pub fn parse(s: &str) -> Result<PullRef> {
        let (rest, forced) = if let Some(r) = s.strip_prefix("http://") {
            (r, Some(true))
        } else if let Some(r) = s.strip_prefix("https://") {
            (r, Some(false))
        } else {
            (s, None)
        };
        if rest.is_empty() || rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::invalid(format!("bad image reference {s:?}")));
        }
        let reference: Reference = rest.parse().map_err(|e| {
            Error::invalid(format!(
                "bad image reference {s:?}: {e}; expected [http://]REGISTRY/REPO[:TAG][@DIGEST] or a Docker Hub name"
            ))
        })?;
        if let Some(d) = reference.digest() {
            Digest::parse(d)?;
        }
        let host = reference
            .registry()
            .rsplit_once(':')
            .map_or(reference.registry(), |(h, p)| {
                if p.bytes().all(|b| b.is_ascii_digit()) {
                    h
                } else {
                    reference.registry()
                }
            });
        let loopback = host == "localhost" || host.starts_with("127.") || host == "[::1]";
        Ok(PullRef {
            insecure: forced.unwrap_or(loopback),
            reference,
        })
    }

    pub fn display(&self) -> String {
        format!(
            "{}{}",
            if self.insecure { "http://" } else { "" },
            self.reference.whole()
        )
    }
}

/// Where the docker-style config is: `$DOCKER_CONFIG/config.json`, else
/// `$HOME/.docker/config.json` (none without either variable).
pub fn docker_config_path() -> Option<PathBuf> {
    match std::env::var_os("DOCKER_CONFIG") {
        Some(d) => Some(PathBuf::from(d).join("config.json")),
        None => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json")),
    }
}

/// Credentials for `registry` from a docker-style config, if any.
pub fn docker_auth(registry: &str) -> RegistryAuth {
    match docker_config_path() {
        Some(path) => auth_from_file(&path, registry),
        None => RegistryAuth::Anonymous,
    }
}

/// Credentials for `registry` from the docker config file at `path` (anonymous when the
/// file cannot be read or has none for it).
pub fn auth_from_file(path: &Path, registry: &str) -> RegistryAuth {
    match std::fs::read(path) {
        Ok(bytes) => auth_from_config(&bytes, registry),
        Err(_) => RegistryAuth::Anonymous,
    }
}

/// Look `registry` up in the `auths` of a docker config file's bytes.
pub fn auth_from_config(bytes: &[u8], registry: &str) -> RegistryAuth {
    use base64::Engine as _;
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        tracing::warn!("ignoring an unreadable docker config");
        return RegistryAuth::Anonymous;
    };
    let Some(auths) = v.get("auths").and_then(|a| a.as_object()) else {
        return RegistryAuth::Anonymous;
    };
    let hub = registry == "docker.io" || registry == "index.docker.io";
    let entry = auths.iter().find(|(k, _)| {
        let k = k
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let host = k.split('/').next().unwrap_or(k);
        host == registry || (hub && (host == "index.docker.io" || host == "docker.io"))
    });
    let Some((_, e)) = entry else {
        return RegistryAuth::Anonymous;
    };
    let field = |k: &str| e.get(k).and_then(|x| x.as_str()).filter(|s| !s.is_empty());
    if let (Some(u), Some(p)) = (field("username"), field("password")) {
        return RegistryAuth::Basic(u.to_string(), p.to_string());
    }
    if let Some(a) = field("auth") {
        if let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(a) {
            if let Some((u, p)) = String::from_utf8_lossy(&raw).split_once(':') {
                return RegistryAuth::Basic(u.to_string(), p.to_string());
            }
        }
    }
    RegistryAuth::Anonymous
}

/// Map a client error to our errno and a readable line.
fn registry_error(e: OciDistributionError, what: &str) -> Error {
    use OciDistributionError as E;
    let msg = format!("{what}: {e}");
    match &e {
        E::ImageManifestNotFoundError(_) => Error::not_found(msg),
        E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => Error::new(libc::EACCES, msg),
        E::RegistryError { envelope, .. } => {
            let text = format!("{envelope:?}");
            if text.contains("Unknown") || text.contains("NotFound") {
                Error::not_found(msg)
            } else if text.contains("Unauthorized") || text.contains("Denied") {
                Error::new(libc::EACCES, msg)
            } else {
                Error::io(msg)
            }
        }
        E::ServerError { code: 404, .. } => Error::not_found(msg),
        E::RequestError(r) if r.is_connect() || r.is_timeout() => Error::new(
            libc::EHOSTUNREACH,
            format!("{what}: the registry cannot be reached: {e}"),
        ),
        E::DigestError(_) => Error::invalid(msg),
        _ => Error::io(msg),
    }
}

pub struct Puller {
    client: Client,
    auth: RegistryAuth,
    pub pref: PullRef,
}

/// What a pull fetched: the manifest (all its blobs are in the cache).
pub struct Pulled {
    pub manifest: oci::Manifest,
    pub downloaded: u64,
    pub cached: usize,
}

impl Puller {
    /// A puller with the credentials of the docker config ([`docker_auth`]).
    pub fn new(pref: PullRef) -> Puller {
        let auth = docker_auth(pref.reference.registry());
        Puller::with_auth(pref, auth)
    }

    /// A puller with explicit credentials (e.g. from [`auth_from_file`]).
    pub fn with_auth(pref: PullRef, auth: RegistryAuth) -> Puller {
        let registry = pref.reference.resolve_registry().to_string();
        let config = ClientConfig {
            protocol: if pref.insecure {
                ClientProtocol::HttpsExcept(vec![registry.clone()])
            } else {
                ClientProtocol::Https
            },
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            platform_resolver: None,
            ..Default::default()
        };
        Puller {
            client: Client::new(config),
            auth,
            pref,
        }
    }

    async fn manifest_bytes(&self, reference: &Reference) -> Result<Vec<u8>> {
        let accepted = [
            oci::MT_OCI_INDEX,
            oci::MT_OCI_MANIFEST,
            oci::MT_DOCKER_LIST,
            oci::MT_DOCKER_MANIFEST,
        ];
        let (bytes, _) = self
            .client
            .pull_manifest_raw(reference, &self.auth, &accepted)
            .await
            .map_err(|e| registry_error(e, &format!("manifest of {}", reference.whole())))?;
        if bytes.len() > MAX_MANIFEST {
            return Err(Error::invalid("the manifest is larger than 4 MiB"));
        }
        Ok(bytes.to_vec())
    }

    /// Resolve the reference to the linux/amd64 manifest and fetch every blob it needs
    /// into `cache` (skipping blobs already there).
    pub async fn pull(&self, cache: &Path, progress: &Progress) -> Result<Pulled> {
        let r = &self.pref.reference;
        let mut bytes = self.manifest_bytes(r).await?;
        let mut digest = Digest::of(&bytes);
        if let Some(pinned) = r.digest() {
            let pinned = Digest::parse(pinned)?;
            if pinned != digest {
                return Err(Error::invalid(format!(
                    "manifest digest mismatch: asked for {pinned}, got {digest}"
                )));
            }
        }
        let mut manifest = None;
        for _ in 0..4 {
            let m: oci::AnyManifest = oci::parse_json(&bytes, "manifest")?;
            if let Some(list) = &m.manifests {
                let d = oci::choose_from_index(list)?;
                let want = d.digest()?;
                let by_digest = Reference::with_digest(
                    r.registry().to_string(),
                    r.repository().to_string(),
                    want.to_string(),
                );
                bytes = self.manifest_bytes(&by_digest).await?;
                digest = Digest::of(&bytes);
                if digest != want {
                    return Err(Error::invalid(format!(
                        "manifest digest mismatch: the index names {want}, the registry sent {digest}"
                    )));
                }
                continue;
            }
            let (Some(config), Some(layers)) = (m.config, m.layers) else {
                return Err(Error::invalid(format!(
                    "manifest {digest} has no config or layers (media type {:?})",
                    m.media_type
                )));
            };
            manifest = Some(oci::Manifest {
                digest: digest.clone(),
                config,
                layers,
            });
            break;
        }
        let manifest = manifest.ok_or_else(|| Error::invalid("image indexes nested too deeply"))?;
        let mut downloaded = 0;
        let mut cached = 0;
        let n = manifest.layers.len();
        let blobs = std::iter::once((String::from("config"), &manifest.config)).chain(
            manifest
                .layers
                .iter()
                .enumerate()
                .map(|(i, d)| (format!("layer={}/{n}", i + 1), d)),
        );
        for (label, d) in blobs {
            match self.fetch_blob(cache, d, &label, progress).await? {
                None => {
                    cached += 1;
                    progress.progress(
                        "pull-progress",
                        &format!("{label} cached {}", d.digest),
                        true,
                    );
                }
                Some(bytes) => {
                    downloaded += bytes;
                    progress.progress(
                        "pull-progress",
                        &format!("{label} done bytes={bytes} {}", d.digest),
                        true,
                    );
                }
            }
        }
        Ok(Pulled {
            manifest,
            downloaded,
            cached,
        })
    }

    /// Download one blob into the cache unless it is there; returns bytes downloaded.
    async fn fetch_blob(
        &self,
        cache: &Path,
        d: &oci::Descriptor,
        label: &str,
        progress: &Progress,
    ) -> Result<Option<u64>> {
        let digest = d.digest()?;
        let final_path = cache.join(digest.blob_path());
        if final_path.is_file() {
            return Ok(None);
        }
        let dir = final_path
            .parent()
            .ok_or_else(|| Error::io("bad cache path"))?
            .to_path_buf();
        crate::layout::mkdir_private(&dir)?;
        let partial = dir.join(format!(
            ".partial-{}-{:08x}",
            digest.hex,
            rand::random::<u32>()
        ));
        let result = self
            .download(&digest, d.size(), &partial, label, progress)
            .await;
        match result {
            Ok(n) => {
                std::fs::rename(&partial, &final_path)?;
                Ok(Some(n))
            }
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                Err(e)
            }
        }
    }

    async fn download(
        &self,
        digest: &Digest,
        size: Option<u64>,
        partial: &Path,
        label: &str,
        progress: &Progress,
    ) -> Result<u64> {
        let what = format!("blob {digest}");
        let mut stream = self
            .client
            .pull_blob_stream(&self.pref.reference, digest.to_string().as_str())
            .await
            .map_err(|e| registry_error(e, &what))?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(partial)?;
        let mut hasher = oci::Hasher::new(&digest.algorithm);
        let limit = size.unwrap_or(super::MAX_UNPACKED_MIB << 20);
        let total = size.map(|s| format!("/{s}")).unwrap_or_default();
        let mut n = 0u64;
        while let Some(chunk) = stream.stream.next().await {
            let chunk = chunk.map_err(|e| {
                let msg = e.to_string();
                if msg.contains("igest") {
                    Error::invalid(format!("{what}: {msg}"))
                } else {
                    Error::new(
                        libc::EHOSTUNREACH,
                        format!("{what}: download failed: {msg}"),
                    )
                }
            })?;
            n += chunk.len() as u64;
            if n > limit {
                return Err(Error::invalid(format!(
                    "{what}: the registry sent more than the {limit} bytes expected"
                )));
            }
            hasher.update(&chunk);
            file.write_all(&chunk)?;
            if progress.due() {
                progress.event("pull-progress", &format!("{label} bytes={n}{total}"));
            }
        }
        let got = hasher.finish();
        if &got != digest {
            return Err(Error::invalid(format!(
                "{what}: digest mismatch (got {got})"
            )));
        }
        if let Some(s) = size {
            if n != s {
                return Err(Error::invalid(format!(
                    "{what}: {n} bytes, the manifest says {s}"
                )));
            }
        }
        file.sync_all()?;
        Ok(n)
    }
}

/// The cache as a blob store.
pub fn cache_store(cache: &Path) -> impl BlobStore {
    oci::DirStore {
        dir: cache.to_path_buf(),
    }
}

/// `image=` values that are registry references: those with a registry, repository path,
/// tag or digest (`alpine:3.20`, `ghcr.io/o/r`, `localhost:5000/app@sha256:…`). A bare
/// word (`alpine`) is always a local image name, so an unknown one is ENOENT at once
/// rather than a pull from Docker Hub (write `alpine:latest` for that).
pub fn image_ref(value: &str) -> Option<PullRef> {
    if !value.contains([':', '/', '@']) {
        return None;
    }
    PullRef::parse(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = PullRef::parse("busybox").unwrap();
        assert_eq!(r.reference.whole(), "docker.io/library/busybox:latest");
        assert!(!r.insecure);
        let r = PullRef::parse("localhost:5000/a/b:1").unwrap();
        assert!(r.insecure, "loopback registries are plain HTTP");
        assert_eq!(r.reference.registry(), "localhost:5000");
        assert_eq!(r.reference.repository(), "a/b");
        let r = PullRef::parse("http://registry.example:5000/x:y").unwrap();
        assert!(r.insecure);
        assert_eq!(r.display(), "http://registry.example:5000/x:y");
        let r = PullRef::parse("https://127.0.0.1:5000/x").unwrap();
        assert!(!r.insecure);
        let d = format!("sha256:{}", "a".repeat(64));
        let r = PullRef::parse(&format!("ghcr.io/o/r@{d}")).unwrap();
        assert_eq!(r.reference.digest(), Some(d.as_str()));
        for bad in ["", "repo/UPPER", "a b", "x@sha256:123", "http://"] {
            assert!(PullRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn docker_config_auth() {
        let cfg = br#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"},
            "localhost:5000":{"username":"u","password":"p"}}}"#;
        match auth_from_config(cfg, "docker.io") {
            RegistryAuth::Basic(u, p) => assert_eq!((u.as_str(), p.as_str()), ("user", "pass")),
            other => panic!("{other:?}"),
        }
        match auth_from_config(cfg, "localhost:5000") {
            RegistryAuth::Basic(u, p) => assert_eq!((u.as_str(), p.as_str()), ("u", "p")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            auth_from_config(cfg, "ghcr.io"),
            RegistryAuth::Anonymous
        ));
        assert!(matches!(
            auth_from_config(b"not json", "x"),
            RegistryAuth::Anonymous
        ));
    }
}
