//! HTTP/1.1 client for Firecracker's API socket (hyper over a tokio `UnixStream`).
//!
//! Invariants:
//! - One connection per request: nothing is cached between calls, so a restarted or
//!   adopted Firecracker, or another client in between, never confuses us.
//! - Every call has a deadline covering connect, request and the whole answer; it ends
//!   in [`ApiError::Timeout`], never a hang.
//! - Every non-2xx status is an error ([`ApiError::Fault`]) carrying Firecracker's
//!   `fault_message` verbatim (or, when the body is not the documented error object, the
//!   body text itself).
//! - Answers are read up to [`MAX_ANSWER`] bytes; Firecracker's are tiny.
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::model::{
    ActionType, ApiErrorBody, Balloon, BalloonUpdate, BootSource, Drive, EntropyDevice,
    FirecrackerVersion, InstanceActionInfo, InstanceInfo, Logger, MachineConfiguration, Metrics,
    NetworkInterface, SerialDevice, SnapshotCreateParams, SnapshotLoadParams, Vm, VmStateRequest,
    Vsock,
};

/// Default deadline of one API call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer body read.
pub const MAX_ANSWER: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Firecracker answered with a non-2xx status.
    #[error("{message}")]
    Fault {
        /// `PUT /drives/vda` etc.
        request: String,
        status: u16,
        /// `fault_message` verbatim.
        message: String,
    },
    /// The socket is missing or nobody accepts on it.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{request}: no answer within {timeout:?}")]
    Timeout { request: String, timeout: Duration },
    /// HTTP-level failure: the connection closed mid-request, a malformed answer, ...
    #[error("{request}: {message}")]
    Protocol { request: String, message: String },
    /// A 2xx answer whose body is not what the API documents.
    #[error("{request}: unexpected answer: {message}")]
    BadAnswer { request: String, message: String },
}

impl ApiError {
    /// `METHOD /path` of the failed request, where known.
    pub fn request(&self) -> Option<&str> {
        match self {
            ApiError::Fault { request, .. }
            | ApiError::Timeout { request, .. }
            | ApiError::Protocol { request, .. }
            | ApiError::BadAnswer { request, .. } => Some(request),
            ApiError::Connect { .. } => None,
        }
    }
}

/// One answered API call: `METHOD /path` and the HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    pub request: String,
    pub status: u16,
}

/// Every call's status, kept only while a test asked for it ([`journal_start`]): the
/// contract tests against real binaries report which request got which answer.
static JOURNAL: parking_lot::Mutex<Option<Vec<CallRecord>>> = parking_lot::Mutex::new(None);

/// Start recording every API call of this process (until [`journal_take`]).
pub fn journal_start() {
    JOURNAL.lock().get_or_insert_with(Vec::new);
}

/// The calls recorded since [`journal_start`] (recording goes on).
pub fn journal_take() -> Vec<CallRecord> {
    JOURNAL
        .lock()
        .as_mut()
        .map(std::mem::take)
        .unwrap_or_default()
}

fn journal(request: &str, status: u16) {
    if let Some(j) = JOURNAL.lock().as_mut() {
        j.push(CallRecord {
            request: request.to_string(),
            status,
        });
    }
}

/// A client for one Firecracker API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
}

/// Aborts the connection task when the request is done or abandoned.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl ApiClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        ApiClient {
            socket: socket.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same client with another per-call deadline.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Send one request; returns the body of a 2xx answer.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ApiError> {
        let request = format!("{method} {path}");
        let t0 = std::time::Instant::now();
        let result =
            tokio::time::timeout(self.timeout, self.call_inner(&request, method, path, body))
                .await
                .unwrap_or_else(|_| {
                    Err(ApiError::Timeout {
                        request: request.clone(),
                        timeout: self.timeout,
                    })
                });
        let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
        match &result {
            Ok((status, _)) => {
                journal(&request, status.as_u16());
                tracing::debug!(%request, status = status.as_u16(), us, "firecracker API ok")
            }
            Err(e) => {
                // Only answers are journaled (not "socket not there yet" while waiting).
                let status = match e {
                    ApiError::Fault { status, .. } => *status,
                    _ => 0,
                };
                if status != 0 {
                    journal(&request, status);
                }
                tracing::debug!(%request, status, us, "firecracker API failed: {e}")
            }
        }
        result.map(|(_, body)| body)
    }

    async fn call_inner(
        &self,
        request: &str,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ApiError> {
        let proto = |e: &dyn std::fmt::Display| ApiError::Protocol {
            request: request.to_string(),
            message: e.to_string(),
        };
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ApiError::Connect {
                path: self.socket.display().to_string(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| proto(&e))?;
        let _conn = AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!("firecracker API connection ended: {e}");
            }
        }));
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| proto(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| {
            proto(&format_args!(
                "the connection failed before an answer came ({e})"
            ))
        })?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| proto(&format_args!("reading the answer: {e}")))?
            .to_bytes();
        if status.is_success() {
            return Ok((status, bytes));
        }
        Err(ApiError::Fault {
            request: request.to_string(),
            status: status.as_u16(),
            message: fault_message(status, &bytes),
        })
    }

    async fn send<T: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: &T,
    ) -> Result<(), ApiError> {
        let json = serde_json::to_vec(body).map_err(|e| ApiError::Protocol {
            request: format!("{method} {path}"),
            message: format!("cannot encode the body: {e}"),
        })?;
        self.call(method, path, Some(json)).await.map(drop)
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let bytes = self.call(Method::GET, path, None).await?;
        serde_json::from_slice(&bytes).map_err(|e| ApiError::BadAnswer {
            request: format!("GET {path}"),
            message: format!("{e}: {}", String::from_utf8_lossy(&bytes)),
        })
    }

    pub async fn put_logger(&self, l: &Logger) -> Result<(), ApiError> {
        self.send(Method::PUT, "/logger", l).await
    }
    pub async fn put_metrics(&self, m: &Metrics) -> Result<(), ApiError> {
        self.send(Method::PUT, "/metrics", m).await
    }
    pub async fn put_boot_source(&self, b: &BootSource) -> Result<(), ApiError> {
        self.send(Method::PUT, "/boot-source", b).await
    }
    pub async fn put_machine_config(&self, m: &MachineConfiguration) -> Result<(), ApiError> {
        self.send(Method::PUT, "/machine-config", m).await
    }
    pub async fn put_drive(&self, d: &Drive) -> Result<(), ApiError> {
        let path = format!("/drives/{}", path_id(&d.drive_id)?);
        self.send(Method::PUT, &path, d).await
    }
    pub async fn put_vsock(&self, v: &Vsock) -> Result<(), ApiError> {
        self.send(Method::PUT, "/vsock", v).await
    }
    pub async fn put_network_interface(&self, n: &NetworkInterface) -> Result<(), ApiError> {
        let path = format!("/network-interfaces/{}", path_id(&n.iface_id)?);
        self.send(Method::PUT, &path, n).await
    }
    pub async fn put_entropy(&self, e: &EntropyDevice) -> Result<(), ApiError> {
        self.send(Method::PUT, "/entropy", e).await
    }
    pub async fn put_serial(&self, s: &SerialDevice) -> Result<(), ApiError> {
        self.send(Method::PUT, "/serial", s).await
    }
    pub async fn action(&self, action_type: ActionType) -> Result<(), ApiError> {
        self.send(Method::PUT, "/actions", &InstanceActionInfo { action_type })
            .await
    }
    pub async fn patch_vm(&self, state: VmStateRequest) -> Result<(), ApiError> {
        self.send(Method::PATCH, "/vm", &Vm { state }).await
    }
    pub async fn snapshot_create(&self, p: &SnapshotCreateParams) -> Result<(), ApiError> {
        self.send(Method::PUT, "/snapshot/create", p).await
    }
    pub async fn snapshot_load(&self, p: &SnapshotLoadParams) -> Result<(), ApiError> {
        self.send(Method::PUT, "/snapshot/load", p).await
    }
    pub async fn put_balloon(&self, b: &Balloon) -> Result<(), ApiError> {
        self.send(Method::PUT, "/balloon", b).await
    }
    pub async fn patch_balloon(&self, b: &BalloonUpdate) -> Result<(), ApiError> {
        self.send(Method::PATCH, "/balloon", b).await
    }
    pub async fn instance_info(&self) -> Result<InstanceInfo, ApiError> {
        self.get("/").await
    }
    pub async fn version(&self) -> Result<FirecrackerVersion, ApiError> {
        self.get("/version").await
    }
}

/// A device id used as a path segment: letters, digits, `_` and `-` only (Firecracker's
/// own rule for ids), so it never needs escaping.
fn path_id(id: &str) -> Result<&str, ApiError> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(ApiError::Protocol {
            request: format!("device id {id:?}"),
            message: "ids are 1-64 letters, digits, '_' or '-'".into(),
        });
    }
    Ok(id)
}

/// Firecracker's `fault_message`, or the body itself when it is not the error object.
fn fault_message(status: StatusCode, body: &[u8]) -> String {
    match serde_json::from_slice::<ApiErrorBody>(body) {
        Ok(e) if !e.fault_message.is_empty() => e.fault_message,
        _ => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                format!("HTTP {status}")
            } else {
                let cut: String = text.chars().take(500).collect();
                format!("HTTP {status}: {cut}")
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::vmm::firecracker::model::*;
    use serde_json::{json, Value};
    use std::sync::{Arc, Mutex};

    /// One request as the fake server saw it.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Seen {
        pub method: String,
        pub path: String,
        pub body: Value,
    }

    pub type Responder = dyn Fn(&str, &str, &Value) -> (u16, String) + Send + Sync;

    /// A fake Firecracker API: a hyper server on `sock` that records every request and
    /// answers with `respond(method, path, body)`. Abort the task to stop it.
    pub fn fake_api(
        sock: &Path,
        respond: Arc<Responder>,
    ) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Vec<Seen>>>) {
        let _ = std::fs::remove_file(sock);
        let listener = tokio::net::UnixListener::bind(sock).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen2.clone();
                let respond = respond.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let seen = seen.clone();
                            let respond = respond.clone();
                            async move {
                                let method = req.method().to_string();
                                let path = req.uri().path().to_string();
                                let bytes = req.into_body().collect().await?.to_bytes();
                                let body = if bytes.is_empty() {
                                    Value::Null
                                } else {
                                    serde_json::from_slice(&bytes).unwrap_or(Value::String(
                                        String::from_utf8_lossy(&bytes).into_owned(),
                                    ))
                                };
                                let (status, answer) = respond(&method, &path, &body);
                                seen.lock().unwrap().push(Seen { method, path, body });
                                Ok::<_, hyper::Error>(
                                    hyper::Response::builder()
                                        .status(status)
                                        .body(Full::new(Bytes::from(answer)))
                                        .unwrap(),
                                )
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (task, seen)
    }

    fn ok_204() -> Arc<Responder> {
        Arc::new(|method: &str, path: &str, _: &Value| match (method, path) {
            ("GET", "/") => (
                200,
                r#"{"app_name":"Firecracker","id":"x","state":"Running","vmm_version":"1.10.1"}"#
                    .into(),
            ),
            ("GET", "/version") => (200, r#"{"firecracker_version":"1.10.1"}"#.into()),
            _ => (204, String::new()),
        })
    }

    #[tokio::test]
    async fn every_endpoint_sends_the_documented_request() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let (task, seen) = fake_api(&sock, ok_204());
        let c = ApiClient::new(&sock);
        c.put_logger(&Logger {
            log_path: Some("firecracker.log".into()),
            level: Some(LogLevel::Info),
            show_level: None,
            show_log_origin: None,
        })
        .await
        .unwrap();
        c.put_metrics(&Metrics {
            metrics_path: "m".into(),
        })
        .await
        .unwrap();
        c.put_boot_source(&BootSource {
            kernel_image_path: "/k".into(),
            boot_args: None,
            initrd_path: None,
        })
        .await
        .unwrap();
        c.put_machine_config(&MachineConfiguration {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: None,
            track_dirty_pages: None,
        })
        .await
        .unwrap();
        c.put_drive(&Drive {
            drive_id: "vda".into(),
            path_on_host: "disk.ext4".into(),
            is_root_device: false,
            is_read_only: false,
            cache_type: None,
            io_engine: None,
            partuuid: None,
        })
        .await
        .unwrap();
        c.put_vsock(&Vsock {
            guest_cid: 3,
            uds_path: "v.sock".into(),
        })
        .await
        .unwrap();
        c.put_network_interface(&NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: None,
        })
        .await
        .unwrap();
        c.put_entropy(&EntropyDevice {}).await.unwrap();
        c.put_serial(&SerialDevice {
            serial_out_path: Some("c".into()),
        })
        .await
        .unwrap();
        c.action(ActionType::InstanceStart).await.unwrap();
        c.patch_vm(VmStateRequest::Paused).await.unwrap();
        c.snapshot_create(&SnapshotCreateParams {
            snapshot_path: "s".into(),
            mem_file_path: "m".into(),
            snapshot_type: None,
        })
        .await
        .unwrap();
        c.snapshot_load(&SnapshotLoadParams {
            snapshot_path: "s".into(),
            mem_backend: MemoryBackend {
                backend_type: MemBackendType::File,
                backend_path: "m".into(),
            },
            enable_diff_snapshots: None,
            track_dirty_pages: None,
            resume_vm: Some(true),
            network_overrides: None,
            vsock_override: None,
        })
        .await
        .unwrap();
        c.put_balloon(&Balloon {
            amount_mib: 1,
            deflate_on_oom: true,
            stats_polling_interval_s: None,
        })
        .await
        .unwrap();
        c.patch_balloon(&BalloonUpdate { amount_mib: 2 })
            .await
            .unwrap();
        assert_eq!(c.instance_info().await.unwrap().state, "Running");
        assert_eq!(c.version().await.unwrap().firecracker_version, "1.10.1");
        task.abort();
        let seen = seen.lock().unwrap().clone();
        let got: Vec<(String, String)> = seen
            .iter()
            .map(|s| (s.method.clone(), s.path.clone()))
            .collect();
        let want: Vec<(String, String)> = [
            ("PUT", "/logger"),
            ("PUT", "/metrics"),
            ("PUT", "/boot-source"),
            ("PUT", "/machine-config"),
            ("PUT", "/drives/vda"),
            ("PUT", "/vsock"),
            ("PUT", "/network-interfaces/eth0"),
            ("PUT", "/entropy"),
            ("PUT", "/serial"),
            ("PUT", "/actions"),
            ("PATCH", "/vm"),
            ("PUT", "/snapshot/create"),
            ("PUT", "/snapshot/load"),
            ("PUT", "/balloon"),
            ("PATCH", "/balloon"),
            ("GET", "/"),
            ("GET", "/version"),
        ]
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
        assert_eq!(got, want);
        assert_eq!(
            seen[0].body,
            json!({"log_path": "firecracker.log", "level": "Info"})
        );
        assert_eq!(seen[9].body, json!({"action_type": "InstanceStart"}));
        assert_eq!(seen[10].body, json!({"state": "Paused"}));
        assert_eq!(seen[15].body, Value::Null, "GET has no body");
    }

    /// The bytes on the wire: what `curl --unix-socket` would send (request line, Host,
    /// Accept, Content-Type and Content-Length for bodies), nothing exotic for Firecracker's
    /// small HTTP server to trip over.
    #[tokio::test]
    async fn wire_format_is_plain_http11() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("raw.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for answer in [
                &b"HTTP/1.1 204 No Content\r\n\r\n"[..],
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 32\r\n\r\n{\"firecracker_version\":\"1.10.1\"}",
            ] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                // Read the head, then as many body bytes as Content-Length says.
                loop {
                    let n = s.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text
                            .lines()
                            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse::<usize>().unwrap()))
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len || n == 0 {
                            break;
                        }
                    }
                }
                s.write_all(answer).await.unwrap();
                seen.push(String::from_utf8(buf).unwrap());
            }
            seen
        });
        let c = ApiClient::new(&sock);
        c.action(ActionType::InstanceStart).await.unwrap();
        assert_eq!(c.version().await.unwrap().firecracker_version, "1.10.1");
        let seen = server.await.unwrap();
        let body = r#"{"action_type":"InstanceStart"}"#;
        let put = &seen[0];
        assert!(put.starts_with("PUT /actions HTTP/1.1\r\n"), "{put:?}");
        let lower = put.to_ascii_lowercase();
        assert!(lower.contains("\r\nhost: localhost\r\n"), "{put:?}");
        assert!(
            lower.contains("\r\naccept: application/json\r\n"),
            "{put:?}"
        );
        assert!(
            lower.contains("\r\ncontent-type: application/json\r\n"),
            "{put:?}"
        );
        assert!(
            lower.contains(&format!("\r\ncontent-length: {}\r\n", body.len())),
            "{put:?}"
        );
        assert!(put.ends_with(&format!("\r\n\r\n{body}")), "{put:?}");
        let get = &seen[1];
        assert!(get.starts_with("GET /version HTTP/1.1\r\n"), "{get:?}");
        assert!(
            !get.to_ascii_lowercase().contains("content-type"),
            "{get:?}"
        );
        assert!(get.ends_with("\r\n\r\n"), "no body: {get:?}");
    }

    #[tokio::test]
    async fn faults_carry_fault_message_verbatim() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let (task, _) = fake_api(
            &sock,
            Arc::new(|_: &str, path: &str, _: &Value| {
                match path {
                "/boot-source" => (
                    400,
                    r#"{"fault_message":"Invalid kernel path: No such file or directory (os error 2)"}"#
                        .into(),
                ),
                "/vm" => (500, "plain text oops".into()),
                _ => (404, String::new()),
            }
            }),
        );
        let c = ApiClient::new(&sock);
        let err = c
            .put_boot_source(&BootSource {
                kernel_image_path: "/nope".into(),
                boot_args: None,
                initrd_path: None,
            })
            .await
            .unwrap_err();
        match &err {
            ApiError::Fault {
                request,
                status,
                message,
            } => {
                assert_eq!(request, "PUT /boot-source");
                assert_eq!(*status, 400);
                assert_eq!(
                    message,
                    "Invalid kernel path: No such file or directory (os error 2)"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            err.to_string(),
            "Invalid kernel path: No such file or directory (os error 2)"
        );
        match c.patch_vm(VmStateRequest::Resumed).await.unwrap_err() {
            ApiError::Fault {
                status, message, ..
            } => {
                assert_eq!(status, 500);
                assert!(message.contains("plain text oops"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        match c.action(ActionType::FlushMetrics).await.unwrap_err() {
            ApiError::Fault {
                status, message, ..
            } => {
                assert_eq!(status, 404);
                assert!(message.contains("404"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // A 2xx answer that is not the documented object.
        assert!(matches!(
            c.version().await.unwrap_err(),
            ApiError::Fault { .. }
        ));
        task.abort();
        let (task, _) = fake_api(
            &sock,
            Arc::new(|_: &str, _: &str, _: &Value| (200, "{}".into())),
        );
        assert!(matches!(
            c.version().await.unwrap_err(),
            ApiError::BadAnswer { .. }
        ));
        task.abort();
    }

    #[tokio::test]
    async fn missing_socket_and_bad_ids() {
        let dir = tempfile::tempdir().unwrap();
        let c = ApiClient::new(dir.path().join("none.sock"));
        match c.action(ActionType::InstanceStart).await.unwrap_err() {
            ApiError::Connect { source, .. } => {
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound)
            }
            other => panic!("{other:?}"),
        }
        // A socket file nobody listens on: connection refused.
        let sock = dir.path().join("dead.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        match ApiClient::new(&sock).version().await.unwrap_err() {
            ApiError::Connect { source, .. } => {
                assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused)
            }
            other => panic!("{other:?}"),
        }
        let bad = Drive {
            drive_id: "../x".into(),
            path_on_host: "d".into(),
            is_root_device: false,
            is_read_only: false,
            cache_type: None,
            io_engine: None,
            partuuid: None,
        };
        assert!(matches!(
            c.put_drive(&bad).await.unwrap_err(),
            ApiError::Protocol { .. }
        ));
    }

    #[tokio::test]
    async fn server_closing_or_stalling_mid_request() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        // Closes each connection after reading a few bytes of the request.
        let closer = tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 16];
                let _ = s.read(&mut buf).await;
                drop(s);
            }
        });
        let c = ApiClient::new(&sock);
        match c.patch_vm(VmStateRequest::Paused).await.unwrap_err() {
            ApiError::Protocol { request, message } => {
                assert_eq!(request, "PATCH /vm");
                assert!(message.contains("before an answer"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        closer.abort();

        // Accepts and never answers: the deadline ends the call.
        let sock2 = dir.path().join("stall.sock");
        let listener = tokio::net::UnixListener::bind(&sock2).unwrap();
        let staller = tokio::spawn(async move {
            let mut keep = Vec::new();
            loop {
                let (s, _) = listener.accept().await.unwrap();
                keep.push(s);
            }
        });
        let c = ApiClient::new(&sock2).with_timeout(Duration::from_millis(200));
        let t0 = std::time::Instant::now();
        match c.instance_info().await.unwrap_err() {
            ApiError::Timeout { request, timeout } => {
                assert_eq!(request, "GET /");
                assert_eq!(timeout, Duration::from_millis(200));
            }
            other => panic!("{other:?}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(2));
        staller.abort();
    }
}
