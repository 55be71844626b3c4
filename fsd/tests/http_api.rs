//! The HTTP adapter (`bandsox_fsd::http`) in-process, without root, a mount or a VM:
//! requests go through the same router the daemon serves handed-over connections with,
//! tagged as arriving on the Unix socket (a uid, as `SO_PEERCRED` gives it) or on TCP
//! (a client address; a key is needed), over a manager whose VMs are in-process agents
//! (`inproc/mod.rs`, whose "guest" is a directory of this host).
//!
//! What is asserted is what a client sees: statuses, the error body
//! (`{"errno","code","message"}`), another user's VM answered exactly like a missing
//! one, keys (401 without, at once after revocation), the Origin check, the body cap,
//! exec's answer and the files API (Range, streamed PUT, stat, list, mkdir, rename,
//! delete).
mod inproc;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use bandsox_fsd::guestfs::GuestFs;
use bandsox_fsd::http::conn::{Conn, Peer};
use bandsox_fsd::http::Api;
use bandsox_fsd::vfs::Vfs;
use http_body_util::BodyExt;
use tower::ServiceExt;

/// Deadline of any single request in these tests (nothing may hang).
const T: Duration = Duration::from_secs(60);

struct Setup {
    _tmp: tempfile::TempDir,
    api: Arc<Api>,
}

fn setup() -> Setup {
    inproc::limits_from_an_empty_file();
    let tmp = tempfile::tempdir().unwrap();
    let mgr = inproc::manager(&tmp.path().join("state"), inproc::InProcBackend::new());
    let vfs = Arc::new(Vfs::new(mgr.clone()));
    let guest = GuestFs::new(mgr.clone(), tokio::runtime::Handle::current());
    let api = Api::new(mgr, vfs, guest).unwrap();
    Setup { _tmp: tmp, api }
}

fn me() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Another uid than the test's (for the privacy checks).
fn other() -> u32 {
    if me() == 1777 {
        1778
    } else {
        1777
    }
}

fn unix(uid: u32) -> Conn {
    Conn {
        peer: Peer::Unix {
            uid,
            gid: uid,
            pid: 1,
        },
        hosts: Arc::new(Vec::new()),
        tls: false,
    }
}

fn tcp() -> Conn {
    Conn {
        peer: Peer::Tcp {
            addr: "127.0.0.1:40000".parse().unwrap(),
        },
        hosts: Arc::new(vec!["localhost".into(), "127.0.0.1".into()]),
        tls: false,
    }
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn send(api: &Arc<Api>, conn: Conn, req: Request<Body>) -> Answer {
    let mut req = req;
    req.extensions_mut().insert(conn);
    let go = async {
        let resp = api.router().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        Answer {
            status,
            headers,
            body,
        }
    };
    tokio::time::timeout(T, go)
        .await
        .expect("an answer in time")
}

fn req(method: Method, uri: &str) -> axum::http::request::Builder {
    Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "localhost")
}

async fn call(
    api: &Arc<Api>,
    conn: Conn,
    method: Method,
    uri: &str,
    json: Option<serde_json::Value>,
) -> Answer {
    let r = req(method, uri);
    let r = match json {
        Some(j) => r
            .header("content-type", "application/json")
            .body(Body::from(j.to_string())),
        None => r.body(Body::empty()),
    };
    send(api, conn, r.unwrap()).await
}

/// The error body's shape and its errno name.
fn error_code(a: &Answer) -> String {
    let j = a.json();
    assert!(j["errno"].is_i64(), "{j}");
    assert!(j["message"].is_string(), "{j}");
    j["code"].as_str().unwrap().to_string()
}

async fn create_vm(api: &Arc<Api>, uid: u32, name: &str) {
    let a = call(
        api,
        unix(uid),
        Method::POST,
        "/v1/vms",
        Some(serde_json::json!({"name": name})),
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text());
    assert_eq!(a.json()["name"], name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_over_tcp_and_401_without_or_after_revocation() {
    let s = setup();
    let api = &s.api;
    // No key, and a wrong key: 401 with the error body.
    let a = call(api, tcp(), Method::GET, "/v1/vms", None).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&a), "EACCES");
    let a = send(
        api,
        tcp(),
        req(Method::GET, "/v1/vms")
            .header("authorization", "Bearer bsx_wrong")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    // Keys are made over the socket only.
    let a = call(
        api,
        tcp(),
        Method::POST,
        "/v1/keys",
        Some(serde_json::json!({"name": "k"})),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let a = call(
        api,
        unix(me()),
        Method::POST,
        "/v1/keys",
        Some(serde_json::json!({"name": "k1"})),
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text());
    let key = a.json()["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("bsx_") && key.len() >= 4 + 22, "{key}");
    let with_key = |k: &str| {
        req(Method::GET, "/v1/vms")
            .header("authorization", format!("Bearer {k}"))
            .body(Body::empty())
            .unwrap()
    };
    let a = send(api, tcp(), with_key(&key)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    // Listing shows names, never the key; the store holds only a hash.
    let a = call(api, unix(me()), Method::GET, "/v1/keys", None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(!a.text().contains(&key));
    assert_eq!(a.json()[0]["name"], "k1");
    // Another user sees none of them and cannot revoke them.
    let a = call(api, unix(other()), Method::GET, "/v1/keys", None).await;
    assert_eq!(
        a.json().as_array().map(|v| v.len()),
        Some(0),
        "{}",
        a.text()
    );
    // With the key over TCP, keys cannot be managed.
    let a = send(
        api,
        tcp(),
        req(Method::GET, "/v1/keys")
            .header("authorization", format!("Bearer {key}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    // Revocation works at once.
    let a = call(api, unix(me()), Method::DELETE, "/v1/keys/k1", None).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT, "{}", a.text());
    let a = send(api, tcp(), with_key(&key)).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_host_and_body_cap() {
    let s = setup();
    let api = &s.api;
    // A browser on another site: 403 before anything else.
    let a = send(
        api,
        unix(me()),
        req(Method::POST, "/v1/vms")
            .header("origin", "http://evil.example")
            .header("content-type", "application/json")
            .body(Body::from(r#"{"name":"x"}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text());
    error_code(&a);
    // DNS rebinding over TCP: a Host this server does not answer to.
    let a = send(
        api,
        tcp(),
        Request::builder()
            .uri("/v1/vms")
            .header("host", "evil.example:8080")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    // A JSON body over the cap: 413, and no VM was made.
    let big = format!(
        r#"{{"name":"big","options":{{"x":"{}"}}}}"#,
        "a".repeat(bandsox_fsd::http::JSON_CAP + 10)
    );
    let a = send(
        api,
        unix(me()),
        req(Method::POST, "/v1/vms")
            .header("content-type", "application/json")
            .body(Body::from(big))
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", a.text());
    let a = call(api, unix(me()), Method::GET, "/v1/vms/big", None).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    // Unknown paths are the API's 404 body; the document needs no credentials.
    let a = call(api, tcp(), Method::GET, "/v1/nothing", None).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let a = call(api, tcp(), Method::GET, "/v1/openapi.json", None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.json()["paths"]["/v1/vms/{name}/exec"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_exec_and_privacy() {
    let s = setup();
    let api = &s.api;
    create_vm(api, me(), "a").await;
    // Creating it again: the tree's EEXIST, 409.
    let a = call(
        api,
        unix(me()),
        Method::POST,
        "/v1/vms",
        Some(serde_json::json!({"name": "a"})),
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{}", a.text());
    assert_eq!(error_code(&a), "EEXIST");

    let a = call(api, unix(me()), Method::GET, "/v1/vms", None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.text().contains("\"a\""), "{}", a.text());
    let a = call(api, unix(me()), Method::GET, "/v1/vms/a", None).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert!(a.json()["node"].is_string());
    assert!(
        a.json()["state"].as_str().unwrap().starts_with("running"),
        "{}",
        a.text()
    );

    // Synchronous exec: exit code, stdout, stderr, env, cwd.
    let a = call(
        api,
        unix(me()),
        Method::POST,
        "/v1/vms/a/exec",
        Some(serde_json::json!({
            "command": "echo out-$X; echo err >&2; pwd; exit 3",
            "env": {"X": "1"},
            "cwd": "/",
            "timeout": 20
        })),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let j = a.json();
    assert_eq!(j["exit_code"], 3, "{j}");
    assert_eq!(j["stdout"], "out-1\n/\n", "{j}");
    assert_eq!(j["stderr"], "err\n", "{j}");
    assert_eq!(j["encoding"], "utf-8");
    let run = j["run"].as_u64().unwrap();
    // The run is an ordinary runs/<n>/.
    let a = call(
        api,
        unix(me()),
        Method::GET,
        &format!("/v1/vms/a/runs/{run}"),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.json()["exit_code"], 3);
    let a = call(
        api,
        unix(me()),
        Method::GET,
        &format!("/v1/vms/a/runs/{run}/stdout"),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, b"out-1\n/\n");

    // Binary output is base64, and says so.
    let a = call(
        api,
        unix(me()),
        Method::POST,
        "/v1/vms/a/exec",
        Some(serde_json::json!({"command": "printf '\\377\\000\\001'"})),
    )
    .await;
    let j = a.json();
    assert_eq!(j["encoding"], "base64", "{j}");
    use base64::Engine;
    let out = base64::engine::general_purpose::STANDARD
        .decode(j["stdout"].as_str().unwrap())
        .unwrap();
    assert_eq!(out, [0xff, 0, 1]);

    // Another user: the VM does not exist for them, exactly like a missing one.
    let missing = call(api, unix(other()), Method::GET, "/v1/vms/nope", None).await;
    for (m, path) in [
        (Method::GET, "/v1/vms/a"),
        (Method::DELETE, "/v1/vms/a"),
        (Method::GET, "/v1/vms/a/fs/etc"),
        (Method::GET, &format!("/v1/vms/a/runs/{run}") as &str),
    ] {
        let a = call(api, unix(other()), m, path, None).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}: {}", a.text());
        assert_eq!(error_code(&a), error_code(&missing));
    }
    let a = call(
        api,
        unix(other()),
        Method::POST,
        "/v1/vms/a/exec",
        Some(serde_json::json!({"command": "true"})),
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let a = call(api, unix(other()), Method::GET, "/v1/vms", None).await;
    assert!(!a.text().contains("\"a\""), "{}", a.text());

    // ctl lines: pause and resume.
    for cmd in ["pause", "resume"] {
        let a = call(
            api,
            unix(me()),
            Method::POST,
            "/v1/vms/a/ctl",
            Some(serde_json::json!({"command": cmd})),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{cmd}: {}", a.text());
    }
    let a = call(
        api,
        unix(me()),
        Method::POST,
        "/v1/vms/a/ctl",
        Some(serde_json::json!({"command": "frobnicate"})),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.text());
    assert_eq!(error_code(&a), "EINVAL");

    // Delete; then it is gone.
    let a = call(api, unix(me()), Method::DELETE, "/v1/vms/a", None).await;
    assert!(a.status.is_success(), "{}", a.text());
    let a = call(api, unix(me()), Method::GET, "/v1/vms/a", None).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_put_get_range_stat_list_mkdir_rename_delete() {
    let s = setup();
    let api = &s.api;
    create_vm(api, me(), "f").await;
    let all: Vec<u8> = (0..=255u8).cycle().take(256 * 1024 + 17).collect();
    // mkdir, then a streamed PUT of every byte value.
    let a = call(
        api,
        unix(me()),
        Method::POST,
        "/v1/vms/f/fs/d",
        Some(serde_json::json!({"op": "mkdir"})),
    )
    .await;
    assert!(a.status.is_success(), "{}", a.text());
    let a = send(
        api,
        unix(me()),
        req(Method::PUT, "/v1/vms/f/fs/d/bytes")
            .body(Body::from(all.clone()))
            .unwrap(),
    )
    .await;
    assert!(a.status.is_success(), "{}", a.text());
    let a = call(api, unix(me()), Method::GET, "/v1/vms/f/fs/d/bytes", None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.body == all, "the download differs from the upload");
    // Range.
    let a = send(
        api,
        unix(me()),
        req(Method::GET, "/v1/vms/f/fs/d/bytes")
            .header("range", "bytes=250-261")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::PARTIAL_CONTENT, "{}", a.text());
    assert_eq!(a.body, &all[250..262]);
    assert!(a.headers.get("content-range").is_some());
    // stat and list.
    let a = call(
        api,
        unix(me()),
        Method::GET,
        "/v1/vms/f/fs/d/bytes?stat=true",
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.json()["size"], all.len() as u64, "{}", a.text());
    assert_eq!(a.json()["type"], "file");
    let a = call(api, unix(me()), Method::GET, "/v1/vms/f/fs/d", None).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert!(a.text().contains("\"bytes\""), "{}", a.text());
    // rename, then the old name is 404 and the new one has the bytes.
    let a = call(
        api,
        unix(me()),
        Method::POST,
        "/v1/vms/f/fs/d/bytes",
        Some(serde_json::json!({"op": "rename", "to": "/d/moved"})),
    )
    .await;
    assert!(a.status.is_success(), "{}", a.text());
    let a = call(api, unix(me()), Method::GET, "/v1/vms/f/fs/d/bytes", None).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&a), "ENOENT");
    let a = call(
        api,
        unix(me()),
        Method::GET,
        "/v1/vms/f/fs/d/moved?stat=1",
        None,
    )
    .await;
    assert_eq!(a.json()["size"], all.len() as u64);
    // A non-empty directory cannot be removed (the tree's ENOTEMPTY); then delete both.
    let a = call(api, unix(me()), Method::DELETE, "/v1/vms/f/fs/d", None).await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{}", a.text());
    assert_eq!(error_code(&a), "ENOTEMPTY");
    let a = call(
        api,
        unix(me()),
        Method::DELETE,
        "/v1/vms/f/fs/d/moved",
        None,
    )
    .await;
    assert!(a.status.is_success(), "{}", a.text());
    let a = call(api, unix(me()), Method::DELETE, "/v1/vms/f/fs/d", None).await;
    assert!(a.status.is_success(), "{}", a.text());
}

/// The checked-in docs/openapi.json must be what the code serves at /v1/openapi.json.
#[test]
fn openapi_document_matches_docs() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let generated = bandsox_fsd::http::openapi::json();
    if std::env::var_os("BANDSOX_WRITE_OPENAPI").is_some() {
        std::fs::write(path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "docs/openapi.json differs from the API the code serves; refresh it with \
         BANDSOX_WRITE_OPENAPI=1 cargo test -p bandsox-fsd --test http_api openapi_document_matches_docs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_exec_events_usage_and_lists() {
    let s = setup();
    let api = &s.api;
    create_vm(api, me(), "e").await;
    // Streaming exec: server-sent events `started`, output chunks, then `exit`.
    let a = call(
        api,
        unix(me()),
        Method::POST,
        "/v1/vms/e/exec",
        Some(serde_json::json!({"command": "echo one; echo two >&2; exit 4", "stream": true})),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let t = a.text();
    assert!(t.contains("event: started"), "{t}");
    assert!(t.contains("event: stdout") && t.contains("one\\n"), "{t}");
    assert!(t.contains("event: stderr") && t.contains("two\\n"), "{t}");
    assert!(
        t.contains("event: exit") && t.contains("\"exit_code\":4"),
        "{t}"
    );
    // The event log as this caller sees it (plain text, like `cat events`).
    let a = call(api, unix(me()), Method::GET, "/v1/events", None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.text().contains(" e "), "{}", a.text());
    // Another user's view leaves this user's VM out (the tree's event privacy).
    let a = call(api, unix(other()), Method::GET, "/v1/events", None).await;
    assert!(!a.text().contains(" e "), "{}", a.text());
    let a = call(api, unix(me()), Method::GET, "/v1/usage", None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.json()["text"].is_string());
    let a = call(api, unix(me()), Method::GET, "/v1/images", None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.text().contains("\"base\""), "{}", a.text());
    let a = call(api, unix(me()), Method::GET, "/v1/snapshots", None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.json().is_array());
    let a = call(api, unix(me()), Method::GET, "/v1/vms/e/runs", None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.json().as_array().map(|r| r.len()),
        Some(1),
        "{}",
        a.text()
    );
}
