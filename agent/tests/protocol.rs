//! In-process protocol tests: handshake, resync, flow control, session ends.
//! The agent runs in this process over an in-memory duplex stream.
use std::time::{Duration, Instant};

use bandsox_agent::client::{AgentClient, ClientError, ExecEvent};
use bandsox_agent::proto::codec::{encode_frame, FrameReader, Incoming};
use bandsox_agent::proto::*;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

mod common;
use common::{in_process_agent, script, serve_duplex};

const T: Duration = Duration::from_secs(10);

/// A hand-driven host end.
struct RawHost<S> {
    r: FrameReader<tokio::io::ReadHalf<S>>,
    w: tokio::io::WriteHalf<S>,
}

impl<S: AsyncRead + AsyncWrite> RawHost<S> {
    fn new(s: S) -> Self {
        let (r, w) = tokio::io::split(s);
        RawHost {
            r: FrameReader::new(r),
            w,
        }
    }
    async fn send(&mut self, m: &Message) {
        self.w.write_all(&encode_frame(m).unwrap()).await.unwrap();
    }
    async fn send_sync(&mut self, m: &Message) {
        self.w.write_all(&SYNC_MAGIC).await.unwrap();
        self.send(m).await;
    }
    async fn recv(&mut self) -> Message {
        tokio::time::timeout(T, self.r.next_message())
            .await
            .unwrap()
            .unwrap()
    }
    /// Scan for the magic and return the ack that follows.
    async fn ack(&mut self) -> HelloAck {
        tokio::time::timeout(T, self.r.scan_sync())
            .await
            .unwrap()
            .unwrap();
        match self.r.next().await.unwrap() {
            Incoming::Frame(Message::HelloAck(a)) => a,
            other => panic!("expected ack, got {other:?}"),
        }
    }
    async fn hello(&mut self, nonce: u64) -> AgentInfo {
        self.send_sync(&Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            nonce,
        }))
        .await;
        let a = self.ack().await;
        assert_eq!(a.nonce, nonce);
        a.result.unwrap()
    }
}

#[tokio::test]
async fn handshake_and_ping() {
    let (c, info) = AgentClient::connect(serve_duplex(), T).await.unwrap();
    assert_eq!(info.version, PROTOCOL_VERSION);
    assert!(!info.kernel.is_empty());
    c.ping(T).await.unwrap();
}

#[tokio::test]
async fn handshake_refuses_incompatible_version() {
    let mut h = RawHost::new(serve_duplex());
    h.send_sync(&Message::Hello(Hello {
        version: PROTOCOL_VERSION + 100,
        nonce: 5,
    }))
    .await;
    let a = h.ack().await;
    assert_eq!(a.nonce, 5);
    let reason = a.result.unwrap_err();
    assert!(reason.contains("version"), "{reason}");
    // The refused session is over: a request is not answered...
    h.send(&Message::Request {
        id: 1,
        req: Request::Ping,
    })
    .await;
    // ...but a compatible hello starts a new session.
    h.hello(6).await;
    h.send(&Message::Request {
        id: 2,
        req: Request::Ping,
    })
    .await;
    assert_eq!(
        h.recv().await,
        Message::Response {
            id: 2,
            resp: Response::Pong
        }
    );
}

#[tokio::test]
async fn client_reports_refusal() {
    // A fake agent that refuses everything.
    let (host, guest) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let mut g = RawHost::new(guest);
        g.r.scan_sync().await.unwrap();
        let Message::Hello(hello) = g.r.next_message().await.unwrap() else {
            panic!()
        };
        let ack = HelloAck {
            nonce: hello.nonce,
            result: Err("go away".into()),
        };
        g.send_sync(&Message::HelloAck(ack)).await;
        std::future::pending::<()>().await;
    });
    match AgentClient::connect(host, T).await {
        Err(ClientError::Refused(r)) => assert_eq!(r, "go away"),
        other => panic!("expected Refused, got {:?}", other.err()),
    }
}

#[tokio::test]
async fn stale_garbage_before_magic_is_skipped() {
    let mut host = serve_duplex();
    // Stale bytes from an "earlier session", including a partial magic and a bogus frame.
    host.write_all(b"old output BSXSY\x00\xff\xff\xff\xff")
        .await
        .unwrap();
    host.write_all(
        &encode_frame(&Message::Request {
            id: 99,
            req: Request::Ping,
        })
        .unwrap(),
    )
    .await
    .unwrap();
    let (c, _) = AgentClient::connect(host, T).await.unwrap();
    c.ping(T).await.unwrap();
}

#[tokio::test]
async fn stale_acks_with_another_nonce_are_ignored() {
    let (host, guest) = tokio::io::duplex(64 * 1024);
    let fake = tokio::spawn(async move {
        let mut g = RawHost::new(guest);
        g.r.scan_sync().await.unwrap();
        let Message::Hello(hello) = g.r.next_message().await.unwrap() else {
            panic!()
        };
        g.w.write_all(b"garbage\x01\x02BSXSYNC").await.unwrap();
        // A stale refusal and a stale success for other nonces: both must be ignored.
        let stale = HelloAck {
            nonce: hello.nonce.wrapping_add(1),
            result: Err("stale".into()),
        };
        g.send_sync(&Message::HelloAck(stale)).await;
        let info = AgentInfo {
            version: PROTOCOL_VERSION,
            agent_version: "stale".into(),
            hostname: "stale".into(),
            kernel: String::new(),
            uptime_ms: 0,
            instance: 7,
        };
        let stale = HelloAck {
            nonce: hello.nonce ^ 0xffff,
            result: Ok(info.clone()),
        };
        g.send_sync(&Message::HelloAck(stale)).await;
        let good = HelloAck {
            nonce: hello.nonce,
            result: Ok(AgentInfo {
                hostname: "good".into(),
                ..info
            }),
        };
        g.send_sync(&Message::HelloAck(good)).await;
        // Answer one ping.
        loop {
            if let Message::Request {
                id,
                req: Request::Ping,
            } = g.r.next_message().await.unwrap()
            {
                g.send(&Message::Response {
                    id,
                    resp: Response::Pong,
                })
                .await;
                break;
            }
        }
        g
    });
    let (c, info) = AgentClient::connect(host, T).await.unwrap();
    assert_eq!(info.hostname, "good");
    c.ping(T).await.unwrap();
    drop(fake.await.unwrap());
}

#[tokio::test]
async fn hello_is_resent_until_the_agent_listens() {
    let (host, guest) = tokio::io::duplex(64 * 1024);
    let start = Instant::now();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        in_process_agent().serve_stream(guest).await
    });
    let (c, _) = AgentClient::connect(host, T).await.unwrap();
    assert!(start.elapsed() >= Duration::from_millis(700));
    c.ping(T).await.unwrap();
}

#[tokio::test]
async fn connect_times_out_and_sees_eof() {
    let (host, _guest) = tokio::io::duplex(64 * 1024);
    let start = Instant::now();
    let r = AgentClient::connect(host, Duration::from_millis(300)).await;
    assert!(matches!(r, Err(ClientError::Timeout)), "{:?}", r.err());
    assert!(start.elapsed() < Duration::from_secs(2));
    let (host, guest) = tokio::io::duplex(64 * 1024);
    drop(guest);
    assert!(AgentClient::connect(host, T).await.is_err());
}

#[tokio::test]
async fn repeated_hello_is_reacked_and_new_nonce_starts_new_session() {
    let mut h = RawHost::new(serve_duplex());
    h.hello(1).await;
    // Same nonce mid-session (a resend): acknowledged again, session continues.
    h.hello(1).await;
    h.send(&Message::Request {
        id: 1,
        req: Request::Exec(script("sleep 0.3; echo done")),
    })
    .await;
    assert!(matches!(
        h.recv().await,
        Message::Response {
            id: 1,
            resp: Response::Started { .. }
        }
    ));
    // New nonce: new session; the old command's output does not leak into it.
    h.hello(2).await;
    h.send(&Message::Request {
        id: 5,
        req: Request::Ping,
    })
    .await;
    assert_eq!(
        h.recv().await,
        Message::Response {
            id: 5,
            resp: Response::Pong
        }
    );
    let deadline = Instant::now() + Duration::from_millis(800);
    while Instant::now() < deadline {
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(100), h.r.next_message()).await {
            panic!("unexpected message in the new session: {:?}", m);
        }
    }
}

#[tokio::test]
async fn decode_error_ends_session_then_resync() {
    let mut h = RawHost::new(serve_duplex());
    h.hello(1).await;
    // A frame with a garbage payload.
    h.w.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    h.send(&Message::Request {
        id: 1,
        req: Request::Ping,
    })
    .await; // ignored: no session
    h.hello(2).await;
    h.send(&Message::Request {
        id: 2,
        req: Request::Ping,
    })
    .await;
    assert_eq!(
        h.recv().await,
        Message::Response {
            id: 2,
            resp: Response::Pong
        }
    );
    // Oversized length.
    h.w.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
    h.hello(3).await;
    h.send(&Message::Request {
        id: 3,
        req: Request::Ping,
    })
    .await;
    assert_eq!(
        h.recv().await,
        Message::Response {
            id: 3,
            resp: Response::Pong
        }
    );
}

/// The agent never sends more than the credit, and other streams keep going.
#[tokio::test]
async fn agent_respects_credit_raw() {
    let mut h = RawHost::new(serve_duplex());
    h.hello(1).await;
    h.send(&Message::Request {
        id: 1,
        req: Request::Exec(script("head -c 67108864 /dev/zero")),
    })
    .await;
    h.send(&Message::Request {
        id: 2,
        req: Request::Exec(script("sleep 0.5; echo other")),
    })
    .await;
    let mut big = 0u64;
    let mut other_done = false;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let Ok(m) = tokio::time::timeout(Duration::from_millis(100), h.r.next_message()).await
        else {
            continue;
        };
        match m.unwrap() {
            Message::Output { id: 1, data, .. } => big += data.len() as u64,
            Message::Exited { id: 1, .. } => panic!("cannot have finished without credit"),
            Message::Exited { id: 2, status } => {
                assert_eq!(status, ExitStatus::Code(0));
                other_done = true;
            }
            _ => {}
        }
    }
    assert!(other_done);
    assert_eq!(big, INITIAL_CREDIT, "agent sent exactly its initial credit");
    // Grant a bit more: exactly that much more arrives.
    h.send(&Message::Credit { id: 1, bytes: 1000 }).await;
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(100), h.r.next_message()).await {
            if let Message::Output { id: 1, data, .. } = m.unwrap() {
                big += data.len() as u64;
            }
        }
    }
    assert_eq!(big, INITIAL_CREDIT + 1000);
    // Unlimited credit: the rest arrives, then Exited.
    h.send(&Message::Credit {
        id: 1,
        bytes: u64::MAX / 2,
    })
    .await;
    loop {
        match h.recv().await {
            Message::Output { id: 1, data, .. } => big += data.len() as u64,
            Message::Exited { id: 1, status } => {
                assert_eq!(status, ExitStatus::Code(0));
                break;
            }
            _ => {}
        }
    }
    assert_eq!(big, 64 << 20);
}

/// Client-level flow control: a consumer that does not read holds at most the window.
#[tokio::test]
async fn slow_consumer_is_bounded_and_does_not_stall_others() {
    let (c, _) = AgentClient::connect(serve_duplex(), T).await.unwrap();
    let mut big = c
        .exec(script("head -c 67108864 /dev/urandom"), T)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        big.queued_bytes() <= INITIAL_CREDIT,
        "{}",
        big.queued_bytes()
    );
    assert!(big.queued_bytes() > 0);
    // Others on the same connection complete meanwhile.
    for i in 0..5 {
        let mut h = c.exec(script(&format!("echo {i}")), T).await.unwrap();
        assert_eq!(
            h.next().await,
            Some(ExecEvent::Output(
                OutStream::Stdout,
                format!("{i}\n").into_bytes()
            ))
        );
        assert_eq!(h.next().await, Some(ExecEvent::Exited(ExitStatus::Code(0))));
        c.ping(T).await.unwrap();
    }
    assert!(big.queued_bytes() <= INITIAL_CREDIT);
    // Now read it all; the window stays bounded throughout.
    let mut n = 0u64;
    loop {
        assert!(big.queued_bytes() <= INITIAL_CREDIT);
        match big.next().await.unwrap() {
            ExecEvent::Output(_, d) => n += d.len() as u64,
            ExecEvent::Exited(st) => {
                assert_eq!(st, ExitStatus::Code(0));
                break;
            }
            ExecEvent::Lost => panic!("lost"),
        }
    }
    assert_eq!(n, 64 << 20);
}

/// Dropping an `ExecHandle` does not block the command (its output is credited back).
#[tokio::test]
async fn dropped_handle_does_not_block_command() {
    let (c, _) = AgentClient::connect(serve_duplex(), T).await.unwrap();
    let h = c
        .exec(script("head -c 8000000 /dev/zero; touch /dev/null"), T)
        .await
        .unwrap();
    drop(h);
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.open_streams() > 0 {
        assert!(Instant::now() < deadline, "command did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stdin is flow controlled: a command that does not read stdin blocks the sender
/// instead of growing the agent's memory; exit releases it with EPIPE.
///
/// The sender writes chunk after chunk until a write fails, rather than offering one large
/// buffer: once the command has exited its stdin pipe is gone, and the agent discards (and
/// credits back) the bytes still arriving for it. A single large write can therefore be
/// discarded to its end, and succeed, before `Exited` reaches the client; under load that
/// race was lost now and then. Writes made after the client has seen the exit fail with
/// EPIPE, and a sender that keeps writing makes one.
#[tokio::test]
async fn stdin_is_flow_controlled() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    const CHUNK: usize = 64 * 1024;
    let (c, _) = AgentClient::connect(serve_duplex(), T).await.unwrap();
    let mut spec = script("sleep 1");
    spec.stdin = true;
    let mut h = c.exec(spec, T).await.unwrap();
    let ctl = h.control();
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    let feeder = tokio::spawn(async move {
        loop {
            if let Err(e) = ctl.stdin(vec![0u8; CHUNK]).await {
                return e;
            }
            counter.fetch_add(CHUNK as u64, Ordering::SeqCst);
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !feeder.is_finished(),
        "stdin failed while the command was running"
    );
    // What a pipe nobody reads takes: the stdin credit, the pipe's buffer (64 KiB by
    // default) and the chunk the agent is writing; 1 MiB leaves room for larger pipes.
    let unread = accepted.load(Ordering::SeqCst);
    assert!(
        unread <= INITIAL_CREDIT + (1 << 20),
        "{unread} bytes accepted for a pipe nobody reads"
    );
    while let Some(ev) = h.next().await {
        if let ExecEvent::Exited(st) = ev {
            assert_eq!(st, ExitStatus::Code(0));
        }
    }
    let r = tokio::time::timeout(Duration::from_secs(2), feeder)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            r,
            ClientError::Remote {
                errno: libc::EPIPE,
                ..
            }
        ),
        "{r:?}"
    );
}

#[tokio::test]
async fn connection_death_fails_everything_promptly() {
    let (host, guest) = tokio::io::duplex(64 * 1024);
    let a = in_process_agent();
    let server = tokio::spawn(async move { a.serve_stream(guest).await });
    let (c, _) = AgentClient::connect(host, T).await.unwrap();
    let mut h = c.exec(script("sleep 5"), T).await.unwrap();
    server.abort(); // drops the agent's end: EOF for the client
    tokio::time::timeout(Duration::from_secs(1), c.closed())
        .await
        .unwrap();
    assert_eq!(h.next().await, Some(ExecEvent::Lost));
    assert_eq!(h.next().await, None);
    assert!(matches!(c.ping(T).await, Err(ClientError::Closed)));
    assert!(matches!(
        h.control().signal(9).await,
        Err(ClientError::Closed)
    ));
}

/// A change made in the guest while no host is connected is announced to the next
/// session: a host that reconnects learns what changed meanwhile.
#[tokio::test]
async fn file_events_wait_for_the_next_session() {
    use bandsox_agent::proto::fs::{FsEvent, FsRequest, FsResponse, ROOT_NODE};
    let agent = in_process_agent();
    let root = agent.config().fs_root.clone();
    std::fs::create_dir(root.join("w")).unwrap();
    let session = |agent: &std::sync::Arc<bandsox_agent::server::Agent>| {
        let (host, guest) = tokio::io::duplex(256 * 1024);
        let a = agent.clone();
        (
            host,
            tokio::spawn(async move { a.serve_stream(guest).await }),
        )
    };
    // The first host looks the directory up (the agent watches it) and goes away.
    let (host, served) = session(&agent);
    let (c, _) = AgentClient::connect(host, T).await.unwrap();
    let lookup = FsRequest::Lookup {
        parent: ROOT_NODE,
        name: b"w".to_vec(),
    };
    let w = match c.fs(lookup, T).await.unwrap() {
        FsResponse::Entry(e) => e,
        other => panic!("lookup answered {other:?}"),
    };
    assert!(w.watched);
    c.close("the host goes away");
    tokio::time::timeout(T, served).await.unwrap().unwrap();
    // The guest changes the directory; the watcher finds nobody to tell.
    std::fs::write(root.join("w/new"), b"x").unwrap();
    agent.deliver_fs_events().await;
    // The next host hears of it.
    let (host, _served) = session(&agent);
    let (c, _) = AgentClient::connect(host, T).await.unwrap();
    let mut events = c.take_fs_events().unwrap();
    let batch = tokio::time::timeout(T, events.next())
        .await
        .expect("the change is announced to the new session")
        .unwrap();
    assert!(
        batch.iter().any(|e| matches!(
            e,
            FsEvent::Entry { parent, name, now: Some(_) } if *parent == w.node.id && name == b"new"
        )),
        "{batch:?}"
    );
}
