//! Registry credentials from a docker-style config file, end to end through `oci-client`.
//!
//! A fake registry on 127.0.0.1 (hyper, HTTP/1) serves one real image (OCI manifest, config
//! blob, gzip layer) only to the right credentials, either as HTTP Basic on every request
//! or as a bearer token issued by its own `/token` endpoint for the right Basic
//! credentials. The credentials reach the `Puller` from a `config.json` the test writes
//! (`auths` → `auth` = base64 `user:password`), parsed by `auth_from_file` /
//! `auth_from_config` — the same parsing the daemon does for `$DOCKER_CONFIG`, without
//! touching the process environment (tests run in parallel threads).
use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use oci_client::secrets::RegistryAuth;
use sha2::{Digest as _, Sha256};

use bandsox_fsd::error::Error;
use bandsox_fsd::events::EventLog;
use bandsox_fsd::images::registry::{self, PullRef, Puller};
use bandsox_fsd::images::{self, Progress};

const USER: &str = "alice";
/// A colon in the password: only the first one separates the user.
const PASS: &str = "s3cret:pw";
const TOKEN: &str = "T";
const REPO: &str = "t/app";
const GREETING: &str = "hello from the fake registry\n";
const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scheme {
    Basic,
    Bearer,
}

/// One request as the fake registry saw it.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    query: String,
    authorization: Option<String>,
}

/// A real minimal image: its manifest and the blobs it names, by digest.
struct Image {
    manifest: Vec<u8>,
    manifest_digest: String,
    config_digest: String,
    layer_digest: String,
    blobs: HashMap<String, Vec<u8>>,
}

struct Fake {
    scheme: Scheme,
    port: u16,
    image: Image,
    seen: Mutex<Vec<Seen>>,
}

fn sha256(data: &[u8]) -> String {
    let hex: String = Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

fn basic(user: &str, pass: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
}

fn image() -> Image {
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(0);
    h.set_mode(0o755);
    h.set_cksum();
    tar.append_data(&mut h, "etc/", std::io::empty()).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(GREETING.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, "etc/greeting", GREETING.as_bytes())
        .unwrap();
    let tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let layer = gz.finish().unwrap();

    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(&tar)]},
    }))
    .unwrap();
    let (config_digest, layer_digest) = (sha256(&config), sha256(&layer));
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))
    .unwrap();
    Image {
        manifest_digest: sha256(&manifest),
        manifest,
        blobs: HashMap::from([
            (config_digest.clone(), config),
            (layer_digest.clone(), layer),
        ]),
        config_digest,
        layer_digest,
    }
}

fn respond(
    status: StatusCode,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::builder().status(status);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.body(Full::new(body.into())).unwrap()
}

fn unauthorized(challenge: Option<&str>) -> Response<Full<Bytes>> {
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(c) = challenge {
        headers.push(("WWW-Authenticate", c));
    }
    respond(
        StatusCode::UNAUTHORIZED,
        &headers,
        r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
    )
}

impl Fake {
    fn handle(&self, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let authorization = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap().to_string());
        self.seen.lock().unwrap().push(Seen {
            path: path.clone(),
            query: req.uri().query().unwrap_or("").to_string(),
            authorization: authorization.clone(),
        });
        let basic_ok = authorization == Some(format!("Basic {}", basic(USER, PASS)));
        if path == "/token" {
            return if self.scheme == Scheme::Bearer && basic_ok {
                respond(
                    StatusCode::OK,
                    &[("Content-Type", "application/json")],
                    format!(r#"{{"token":"{TOKEN}"}}"#),
                )
            } else {
                unauthorized(None)
            };
        }
        let (authorized, challenge) = match self.scheme {
            Scheme::Basic => (basic_ok, r#"Basic realm="x""#.to_string()),
            Scheme::Bearer => (
                authorization.as_deref() == Some(&format!("Bearer {TOKEN}")),
                format!(
                    r#"Bearer realm="http://127.0.0.1:{}/token",service="fake",scope="repository:{REPO}:pull""#,
                    self.port
                ),
            ),
        };
        if !authorized {
            return unauthorized(Some(&challenge));
        }
        let img = &self.image;
        if path == "/v2/" {
            return respond(
                StatusCode::OK,
                &[("Content-Type", "application/json")],
                "{}",
            );
        }
        if let Some(r) = path.strip_prefix(&format!("/v2/{REPO}/manifests/")) {
            if r == "latest" || r == img.manifest_digest {
                return respond(
                    StatusCode::OK,
                    &[
                        ("Content-Type", MT_MANIFEST),
                        ("Docker-Content-Digest", &img.manifest_digest),
                    ],
                    img.manifest.clone(),
                );
            }
        }
        if let Some(d) = path.strip_prefix(&format!("/v2/{REPO}/blobs/")) {
            if let Some(data) = img.blobs.get(d) {
                return respond(
                    StatusCode::OK,
                    &[
                        ("Content-Type", "application/octet-stream"),
                        ("Docker-Content-Digest", d),
                    ],
                    data.clone(),
                );
            }
        }
        respond(
            StatusCode::NOT_FOUND,
            &[("Content-Type", "application/json")],
            r#"{"errors":[{"code":"NOT_FOUND","message":"unknown"}]}"#,
        )
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Start a fake registry on an ephemeral loopback port (it lives as long as the runtime).
async fn start(scheme: Scheme) -> Arc<Fake> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake = Arc::new(Fake {
        scheme,
        port: listener.local_addr().unwrap().port(),
        image: image(),
        seen: Mutex::new(Vec::new()),
    });
    let f = fake.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let f = f.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let resp = f.handle(&req);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    fake
}

/// Write `<dir>/docker/config.json` with credentials for the fake (as `docker login`
/// would); returns the file's path.
fn docker_config(dir: &Path, port: u16, pass: &str) -> PathBuf {
    let d = dir.join("docker");
    std::fs::create_dir_all(&d).unwrap();
    let path = d.join("config.json");
    let cfg = serde_json::json!({
        "auths": {
            format!("127.0.0.1:{port}"): {"auth": basic(USER, pass)},
            "other.example": {"auth": basic("mallory", "nope")},
        }
    });
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    path
}

/// A puller for the fake's image whose credentials come from a docker config file.
fn puller(dir: &Path, port: u16, pass: &str) -> Puller {
    let pref = PullRef::parse(&format!("127.0.0.1:{port}/{REPO}:latest")).unwrap();
    assert!(pref.insecure, "loopback registries are plain HTTP");
    let cfg = docker_config(dir, port, pass);
    let auth = registry::auth_from_file(&cfg, pref.reference.registry());
    match &auth {
        RegistryAuth::Basic(u, p) => assert_eq!((u.as_str(), p.as_str()), (USER, pass)),
        other => panic!("no credentials from {cfg:?}: {other:?}"),
    }
    Puller::with_auth(pref, auth)
}

fn progress(dir: &Path) -> Progress {
    let log = Arc::new(EventLog::open(&dir.join("events.log")).unwrap());
    Progress::new(log, "t", Instant::now() + Duration::from_secs(60))
}

/// Every file under `dir` (including `.partial` leftovers), sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn blob_path(cache: &Path, digest: &str) -> PathBuf {
    let (alg, hex) = digest.split_once(':').unwrap();
    cache.join("blobs").join(alg).join(hex)
}

async fn pull(puller: &Puller, cache: &Path, p: &Progress) -> Result<registry::Pulled, Error> {
    tokio::time::timeout(Duration::from_secs(30), puller.pull(cache, p))
        .await
        .expect("the pull hung")
}

/// Pull the fake's image with the right credentials; check the cache holds exactly its
/// blobs under their digests and that they unpack; returns what the fake saw.
async fn pull_succeeds(scheme: Scheme) -> (Arc<Fake>, Vec<Seen>) {
    let fake = start(scheme).await;
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let p = progress(d.path());
    let puller = puller(d.path(), fake.port, PASS);

    let pulled = pull(&puller, &cache, &p).await.unwrap();
    let img = &fake.image;
    assert_eq!(pulled.manifest.digest.to_string(), img.manifest_digest);
    assert_eq!(pulled.manifest.config.digest, img.config_digest);
    let layers: Vec<_> = pulled.manifest.layers.iter().map(|l| &l.digest).collect();
    assert_eq!(layers, [&img.layer_digest]);
    let total: usize = img.blobs.values().map(Vec::len).sum();
    assert_eq!(pulled.downloaded, total as u64);
    assert_eq!(pulled.cached, 0);

    let mut want: Vec<_> = img.blobs.keys().map(|d| blob_path(&cache, d)).collect();
    want.sort();
    assert_eq!(
        files(&cache),
        want,
        "the cache holds exactly the image's blobs"
    );
    for (digest, data) in &img.blobs {
        let got = std::fs::read(blob_path(&cache, digest)).unwrap();
        assert_eq!(&got, data);
        assert_eq!(&sha256(&got), digest);
    }

    // The blobs form a usable image.
    let work = images::Work {
        dir: d.path().to_path_buf(),
        max_unpacked_mib: images::MAX_UNPACKED_MIB,
    };
    let rootfs = work.rootfs();
    std::fs::create_dir_all(&rootfs).unwrap();
    let config =
        images::apply_manifest(&registry::cache_store(&cache), &pulled.manifest, &work, &p)
            .unwrap();
    assert_eq!(config.config.cmd, ["/bin/sh"]);
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/greeting")).unwrap(),
        GREETING
    );

    // Pulling again (same client, same credentials) fetches only the manifest.
    let before = fake.seen().len();
    let again = pull(&puller, &cache, &p).await.unwrap();
    assert_eq!((again.downloaded, again.cached), (0, 2));
    assert!(fake.seen()[before..]
        .iter()
        .all(|s| !s.path.contains("/blobs/")));
    assert_eq!(files(&cache), want);

    let seen = fake.seen();
    for digest in img.blobs.keys() {
        let path = format!("/v2/{REPO}/blobs/{digest}");
        let n = seen.iter().filter(|s| s.path == path).count();
        assert_eq!(n, 1, "{digest} downloaded once: {seen:#?}");
    }
    (fake, seen)
}

/// Requests for the repository's manifests and blobs.
fn repo_requests(seen: &[Seen]) -> Vec<&Seen> {
    let prefix = format!("/v2/{REPO}/");
    let r: Vec<_> = seen
        .iter()
        .filter(|s| s.path.starts_with(&prefix))
        .collect();
    assert!(
        r.iter().any(|s| s.path.contains("/manifests/")),
        "{seen:#?}"
    );
    r
}

/// A query value, percent-decoded.
fn query_value(query: &str, key: &str) -> Option<String> {
    let raw = query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))?;
    let mut out = Vec::new();
    let b = raw.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&raw[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    Some(String::from_utf8(out).unwrap())
}

#[tokio::test]
async fn basic_credentials_from_docker_config() {
    let (_fake, seen) = pull_succeeds(Scheme::Basic).await;
    let want = format!("Basic {}", basic(USER, PASS));
    // The client probed /v2/ without credentials, was challenged, then sent them.
    assert!(
        seen.iter()
            .any(|s| s.path == "/v2/" && s.authorization.is_none()),
        "{seen:#?}"
    );
    for s in repo_requests(&seen) {
        assert_eq!(s.authorization.as_deref(), Some(want.as_str()), "{s:?}");
    }
    assert!(seen.iter().all(|s| s.path != "/token"), "{seen:#?}");
}

#[tokio::test]
async fn bearer_token_from_docker_config_credentials() {
    let (_fake, seen) = pull_succeeds(Scheme::Bearer).await;
    let want_basic = format!("Basic {}", basic(USER, PASS));
    let tokens: Vec<_> = seen.iter().filter(|s| s.path == "/token").collect();
    assert!(!tokens.is_empty(), "no token request: {seen:#?}");
    for t in &tokens {
        assert_eq!(t.authorization.as_deref(), Some(want_basic.as_str()));
        assert_eq!(query_value(&t.query, "service").as_deref(), Some("fake"));
        assert_eq!(
            query_value(&t.query, "scope"),
            Some(format!("repository:{REPO}:pull"))
        );
    }
    let bearer = format!("Bearer {TOKEN}");
    for s in repo_requests(&seen) {
        assert_eq!(s.authorization.as_deref(), Some(bearer.as_str()), "{s:?}");
    }
}

#[tokio::test]
async fn wrong_password_is_eacces_and_caches_nothing() {
    for scheme in [Scheme::Basic, Scheme::Bearer] {
        let fake = start(scheme).await;
        let d = tempfile::tempdir().unwrap();
        let cache = d.path().join("cache");
        std::fs::create_dir_all(&cache).unwrap();
        let puller = puller(d.path(), fake.port, "wrong");
        let Err(e) = pull(&puller, &cache, &progress(d.path())).await else {
            panic!("{scheme:?}: the pull succeeded with a wrong password");
        };
        assert_eq!(e.errno, libc::EACCES, "{scheme:?}: {e:?}");
        let reference = format!("127.0.0.1:{}/{REPO}:latest", fake.port);
        assert!(
            e.message.starts_with(&format!("manifest of {reference}: ")),
            "{scheme:?}: {}",
            e.message
        );
        assert!(
            e.message.to_lowercase().contains("not authorized"),
            "{scheme:?}: {}",
            e.message
        );
        assert!(!e.message.contains('\n'), "one line: {:?}", e.message);
        assert_eq!(files(&cache), Vec::<PathBuf>::new(), "{scheme:?}");

        let seen = fake.seen();
        assert!(
            seen.iter().all(|s| !s.path.contains("/blobs/")),
            "{scheme:?}: {seen:#?}"
        );
        let wrong = format!("Basic {}", basic(USER, "wrong"));
        match scheme {
            Scheme::Basic => {
                for s in repo_requests(&seen) {
                    assert_eq!(s.authorization.as_deref(), Some(wrong.as_str()), "{s:?}");
                }
            }
            Scheme::Bearer => {
                let tokens: Vec<_> = seen.iter().filter(|s| s.path == "/token").collect();
                assert!(!tokens.is_empty(), "{seen:#?}");
                assert!(tokens
                    .iter()
                    .all(|t| t.authorization.as_deref() == Some(wrong.as_str())));
                assert!(
                    seen.iter()
                        .all(|s| s.authorization.as_deref() != Some("Bearer T")),
                    "{seen:#?}"
                );
            }
        }
    }
}
