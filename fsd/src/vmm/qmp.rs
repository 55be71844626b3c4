//! A small async QMP (QEMU Machine Protocol) client over a unix socket.
//!
//! Protocol: the server greets with `{"QMP": {...}}`; the client must send
//! `qmp_capabilities` before anything else; then each `{"execute", "arguments", "id"}`
//! gets exactly one `{"return": ..., "id"}` or `{"error": {"class", "desc"}, "id"}`.
//! Asynchronous `{"event": ...}` messages may arrive at any time in between; they are kept
//! (the last [`MAX_EVENTS`]) for callers that care, e.g. migration or `SHUTDOWN`.
//!
//! Invariants: every call has a deadline. A call that timed out or hit an I/O or framing
//! error leaves the client *poisoned* ([`Qmp::is_poisoned`]): a reply may still be in
//! flight, so the owner must drop it and connect again rather than reuse it. Replies are
//! matched by `id`, so a late reply to an earlier command is never taken for the current one.
use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// How many asynchronous events are remembered.
pub const MAX_EVENTS: usize = 64;
/// Longest accepted message line.
const MAX_LINE: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP {0} timed out after {1:?}")]
    Timeout(String, Duration),
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// QEMU answered with an error; `desc` is QEMU's text verbatim.
    #[error("{desc}")]
    Command { class: String, desc: String },
}

pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
    poisoned: bool,
    greeting: Value,
    events: VecDeque<Value>,
}

impl Qmp {
    /// Connect, read the greeting and negotiate capabilities, all within `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        tokio::time::timeout(timeout, async {
            let stream = UnixStream::connect(path).await?;
            let (r, w) = stream.into_split();
            let mut qmp = Qmp {
                reader: BufReader::new(r),
                writer: w,
                next_id: 1,
                poisoned: false,
                greeting: Value::Null,
                events: VecDeque::new(),
            };
            let greeting = qmp.read_message().await?;
            if greeting.get("QMP").is_none() {
                return Err(QmpError::Protocol(format!(
                    "unexpected greeting {greeting}"
                )));
            }
            qmp.greeting = greeting;
            qmp.call("qmp_capabilities", None).await?;
            Ok(qmp)
        })
        .await
        .map_err(|_| QmpError::Timeout("connect".into(), timeout))?
    }

    /// The server's greeting (`{"QMP": {"version": ..., "capabilities": [...]}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// True once a call failed in a way that may have desynchronised the stream.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Run `command` with optional `arguments`; returns QMP's `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        if self.poisoned {
            return Err(QmpError::Protocol(
                "connection unusable after an earlier failure".into(),
            ));
        }
        match tokio::time::timeout(timeout, self.call(command, arguments)).await {
            Ok(r) => r,
            Err(_) => {
                self.poisoned = true;
                Err(QmpError::Timeout(command.into(), timeout))
            }
        }
    }

    /// Drain the remembered asynchronous events, oldest first.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    async fn call(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let result = async {
            self.writer.write_all(line.as_bytes()).await?;
            loop {
                let m = self.read_message().await?;
                if m.get("event").is_some() {
                    if self.events.len() == MAX_EVENTS {
                        self.events.pop_front();
                    }
                    self.events.push_back(m);
                    continue;
                }
                if m.get("id").and_then(Value::as_u64) != Some(id) {
                    tracing::debug!(message = %m, "QMP: skipping a reply to another command");
                    continue;
                }
                if let Some(r) = m.get("return") {
                    return Ok(r.clone());
                }
                if let Some(e) = m.get("error") {
                    let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                    return Err(QmpError::Command {
                        class: s("class"),
                        desc: s("desc"),
                    });
                }
                return Err(QmpError::Protocol(format!("unexpected message {m}")));
            }
        }
        .await;
        if matches!(result, Err(QmpError::Io(_) | QmpError::Protocol(_))) {
            self.poisoned = true;
        }
        result
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = (&mut self.reader)
                .take(MAX_LINE as u64)
                .read_line(&mut line)
                .await?;
            if n == 0 {
                return Err(QmpError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "QMP connection closed",
                )));
            }
            if !line.ends_with('\n') {
                return Err(QmpError::Protocol("message line too long".into()));
            }
            if line.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(line.trim()).map_err(|e| {
                QmpError::Protocol(format!("bad JSON from QEMU ({e}): {}", line.trim()))
            });
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::net::UnixListener;

    /// A fake QMP server: for each connection (one at a time, like QEMU's monitor) greets,
    /// then answers each command by `reply(command, id)`; `None` means "never answer".
    /// Emits an event before every reply. Records every command it saw.
    pub(crate) fn fake_server(
        path: &Path,
        reply: impl Fn(&str, &Value) -> Option<Value> + Send + Sync + 'static,
    ) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Vec<String>>>) {
        let listener = UnixListener::bind(path).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (r, mut w) = stream.into_split();
                let mut r = BufReader::new(r);
                let greeting = "{\"QMP\": {\"version\": {\"qemu\": {\"major\": 7}}, \"capabilities\": []}}\r\n";
                if w.write_all(greeting.as_bytes()).await.is_err() {
                    continue;
                }
                let mut line = String::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        break;
                    }
                    let m: Value = serde_json::from_str(line.trim()).unwrap();
                    let cmd = m["execute"].as_str().unwrap().to_string();
                    seen2.lock().unwrap().push(cmd.clone());
                    let id = m.get("id").cloned().unwrap_or(Value::Null);
                    let event = "{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\r\n";
                    let _ = w.write_all(event.as_bytes()).await;
                    if let Some(mut resp) = reply(&cmd, &id) {
                        resp["id"] = id;
                        let _ = w.write_all(format!("{resp}\r\n").as_bytes()).await;
                    }
                }
            }
        });
        (task, seen)
    }

    pub(crate) fn standard_reply(cmd: &str, _id: &Value) -> Option<Value> {
        match cmd {
            "qmp_capabilities" | "stop" | "cont" | "system_powerdown" => {
                Some(json!({"return": {}}))
            }
            "query-status" => Some(json!({"return": {"status": "running", "running": true}})),
            "hang" => None,
            other => Some(json!({"error": {"class": "CommandNotFound",
                "desc": format!("The command {other} has not been found")}})),
        }
    }

    #[tokio::test]
    async fn greeting_capabilities_commands_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let (_server, seen) = fake_server(&sock, standard_reply);
        let mut q = Qmp::connect(&sock, Duration::from_secs(2)).await.unwrap();
        assert_eq!(q.greeting()["QMP"]["version"]["qemu"]["major"], 7);
        let r = q
            .execute("query-status", None, Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(r["status"], "running");
        match q.execute("bogus", None, Duration::from_secs(2)).await {
            Err(QmpError::Command { class, desc }) => {
                assert_eq!(class, "CommandNotFound");
                assert_eq!(desc, "The command bogus has not been found");
            }
            other => panic!("expected a command error, got {other:?}"),
        }
        assert!(
            !q.is_poisoned(),
            "a QMP error reply keeps the connection usable"
        );
        q.execute("stop", None, Duration::from_secs(2))
            .await
            .unwrap();
        let events = q.take_events();
        assert!(events.len() >= 3 && events[0]["event"] == "STOP");
        drop(q);
        let mut q2 = Qmp::connect(&sock, Duration::from_secs(2)).await.unwrap();
        q2.execute("cont", None, Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "qmp_capabilities",
                "query-status",
                "bogus",
                "stop",
                "qmp_capabilities",
                "cont"
            ]
        );
    }

    #[tokio::test]
    async fn timeouts_poison_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let _server = fake_server(&sock, standard_reply);
        let mut q = Qmp::connect(&sock, Duration::from_secs(2)).await.unwrap();
        let err = q
            .execute("hang", None, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::Timeout(..)), "{err:?}");
        assert!(q.is_poisoned());
        assert!(q
            .execute("stop", None, Duration::from_secs(1))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn silent_server_times_out_and_bad_greeting_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("silent.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let _keep = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let err = Qmp::connect(&sock, Duration::from_millis(200))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, QmpError::Timeout(..)), "{err:?}");

        let sock2 = dir.path().join("bad.sock");
        let listener = UnixListener::bind(&sock2).unwrap();
        let _bad = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"{\"hello\": 1}\r\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let err = Qmp::connect(&sock2, Duration::from_secs(2))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, QmpError::Protocol(_)), "{err:?}");
        assert!(
            Qmp::connect(&dir.path().join("none.sock"), Duration::from_secs(1))
                .await
                .is_err()
        );
    }
}
