//! Integration tests: the real `bandsox-agent` binary in host mode, driven by the client.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "test code: sizes, offsets and ids are small values the test constructs"
)]
mod common;

use common::{script, Agent};

use std::time::{Duration, Instant};

use bandsox_agent::client::{AgentClient, ClientError, ExecEvent, ExecHandle};
use bandsox_agent::proto::{ExecSpec, ExitStatus, OutStream, Program, Request, Response};

const T: Duration = Duration::from_secs(10);

impl Agent {
    async fn connect(&self) -> AgentClient {
        let s = self.stream().await;
        let (c, info) = AgentClient::connect(s, T).await.unwrap();
        assert_eq!(info.version, bandsox_agent::proto::PROTOCOL_VERSION);
        c
    }
}

fn argv(a: &[&str]) -> ExecSpec {
    ExecSpec {
        program: Program::Argv(a.iter().map(|s| s.as_bytes().to_vec()).collect()),
        env: vec![],
        cwd: None,
        stdin: false,
    }
}

/// Collect everything: (stdout, stderr, interleaved events, status).
async fn collect(mut h: ExecHandle) -> (Vec<u8>, Vec<u8>, Vec<(OutStream, Vec<u8>)>, ExitStatus) {
    let (mut out, mut err, mut all) = (Vec::new(), Vec::new(), Vec::new());
    while let Some(ev) = h.next().await {
        match ev {
            ExecEvent::Output(OutStream::Stdout, d) => {
                out.extend_from_slice(&d);
                all.push((OutStream::Stdout, d));
            }
            ExecEvent::Output(OutStream::Stderr, d) => {
                err.extend_from_slice(&d);
                all.push((OutStream::Stderr, d));
            }
            ExecEvent::Exited(st) => return (out, err, all, st),
            ExecEvent::Lost => panic!("connection lost"),
        }
    }
    panic!("stream ended without Exited");
}

async fn run(c: &AgentClient, spec: ExecSpec) -> (Vec<u8>, Vec<u8>, ExitStatus) {
    let h = c.exec(spec, T).await.unwrap();
    let (o, e, _, st) = tokio::time::timeout(Duration::from_secs(30), collect(h))
        .await
        .unwrap();
    (o, e, st)
}

#[tokio::test]
async fn basics_stdout_stderr_exit_codes_cwd_env() {
    let a = Agent::start();
    let c = a.connect().await;
    assert!(c.ping(T).await.unwrap() < T);

    let (o, e, st) = run(
        &c,
        script("echo out1; echo err1 >&2; sleep 0.05; echo out2; echo err2 >&2; exit 7"),
    )
    .await;
    assert_eq!(o, b"out1\nout2\n");
    assert_eq!(e, b"err1\nerr2\n");
    assert_eq!(st, ExitStatus::Code(7));

    // Order across streams is kept when the writes are spaced out.
    let h = c
        .exec(
            script("echo a; sleep 0.05; echo b >&2; sleep 0.05; echo c"),
            T,
        )
        .await
        .unwrap();
    let (_, _, all, _) = collect(h).await;
    let seq: Vec<_> = all.iter().map(|(s, d)| (*s, d.clone())).collect();
    assert_eq!(
        seq,
        vec![
            (OutStream::Stdout, b"a\n".to_vec()),
            (OutStream::Stderr, b"b\n".to_vec()),
            (OutStream::Stdout, b"c\n".to_vec())
        ]
    );

    let (o, _, st) = run(&c, argv(&["pwd"])).await;
    assert_eq!(
        String::from_utf8(o).unwrap().trim(),
        a.root.path().canonicalize().unwrap().to_str().unwrap()
    );
    assert_eq!(st, ExitStatus::Code(0));

    std::fs::create_dir(a.root.path().join("sub")).unwrap();
    let mut spec = script("pwd; echo \"$FOO\"; echo $PATH");
    spec.cwd = Some(b"sub".to_vec());
    spec.env = vec![(b"FOO".to_vec(), b"bar baz".to_vec())];
    let (o, _, _) = run(&c, spec).await;
    let o = String::from_utf8(o).unwrap();
    assert!(o.contains("/sub\nbar baz\n/usr/local/sbin:"), "{o}");

    let (_, _, st) = run(&c, argv(&["false"])).await;
    assert_eq!(st, ExitStatus::Code(1));

    // Binary-safe: every byte value.
    let (o, _, _) = run(&c, script("printf '\\000\\001\\377abc'")).await;
    assert_eq!(o, b"\x00\x01\xffabc");

    assert_eq!(c.request(Request::Sync, T).await.unwrap(), Response::Ok);
    assert_eq!(
        c.request(Request::SetHostname("x".into()), T)
            .await
            .unwrap(),
        Response::Ok
    );
}

#[tokio::test]
async fn errors_come_back_as_remote() {
    let a = Agent::start();
    let c = a.connect().await;
    match c.exec(argv(&["/no/such/program"]), T).await {
        Err(ClientError::Remote { errno, message }) => {
            assert_eq!(errno, libc::ENOENT);
            assert!(message.contains("/no/such/program"), "{message}");
        }
        other => panic!("expected Remote, got {:?}", other.map(|h| h.pid)),
    }
    match c.exec(argv(&["no-such-program-in-path"]), T).await {
        Err(ClientError::Remote { errno, .. }) => assert_eq!(errno, libc::ENOENT),
        other => panic!("expected Remote, got {:?}", other.map(|h| h.pid)),
    }
    let mut spec = argv(&["true"]);
    spec.cwd = Some(b"/no/such/dir".to_vec());
    match c.exec(spec, T).await {
        Err(ClientError::Remote { errno, message }) => {
            assert_eq!(errno, libc::ENOENT);
            assert!(message.contains("working directory"), "{message}");
        }
        other => panic!("expected Remote, got {:?}", other.map(|h| h.pid)),
    }
    match c.exec(script("#!/no/interp\nexit 0\n"), T).await {
        Err(ClientError::Remote { errno, message }) => {
            assert_eq!(errno, libc::ENOENT);
            assert!(message.contains("/no/interp"), "{message}");
        }
        other => panic!("expected Remote, got {:?}", other.map(|h| h.pid)),
    }
    // The connection is still fine.
    c.ping(T).await.unwrap();
}

#[tokio::test]
async fn shebang_scripts() {
    let a = Agent::start();
    let c = a.connect().await;
    let (_, _, st) = run(&c, script("#!/bin/sh\nexit 3\n")).await;
    assert_eq!(st, ExitStatus::Code(3));
    let (o, _, st) = run(&c, script("#!/bin/sh -e\necho one\nfalse\necho never\n")).await;
    assert_eq!(o, b"one\n");
    assert_eq!(st, ExitStatus::Code(1));
    // Not a shebang: plain sh -c.
    let (o, _, _) = run(&c, script("echo $0")).await;
    assert_eq!(o, b"/bin/sh\n");
}

#[tokio::test]
async fn stdin_feeds_cat() {
    let a = Agent::start();
    let c = a.connect().await;
    let mut spec = argv(&["cat"]);
    spec.stdin = true;
    let h = c.exec(spec, T).await.unwrap();
    let ctl = h.control();
    // More than the initial stdin credit, so credit must flow back.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let expect = data.clone();
    let feeder = tokio::spawn(async move {
        ctl.stdin(data).await.unwrap();
        ctl.stdin(b"tail".to_vec()).await.unwrap();
        ctl.close_stdin().await.unwrap();
        ctl
    });
    let (o, _, _, st) = collect(h).await;
    let ctl = feeder.await.unwrap();
    assert_eq!(st, ExitStatus::Code(0));
    assert_eq!(o.len(), expect.len() + 4);
    assert!(o[..expect.len()] == expect[..] && o.ends_with(b"tail"));
    // After exit, stdin fails with EPIPE.
    assert!(matches!(
        ctl.stdin(b"x".to_vec()).await,
        Err(ClientError::Remote {
            errno: libc::EPIPE,
            ..
        })
    ));
}

#[tokio::test]
async fn signal_kills_process_group() {
    let a = Agent::start();
    let c = a.connect().await;
    let h = c.exec(argv(&["sleep", "1000"]), T).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.control().signal(15).await.unwrap();
    let (_, _, _, st) = tokio::time::timeout(Duration::from_secs(5), collect(h))
        .await
        .unwrap();
    assert_eq!(st, ExitStatus::Signal(15));

    // The whole group: a shell with a child.
    let h = c
        .exec(script("sleep 1000 & sleep 1000; echo unreachable"), T)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.control().signal(9).await.unwrap();
    let (o, _, _, st) = tokio::time::timeout(Duration::from_secs(5), collect(h))
        .await
        .unwrap();
    assert_eq!(st, ExitStatus::Signal(9));
    assert!(o.is_empty());
}

#[tokio::test]
async fn big_binary_output_hash_identical() {
    let a = Agent::start();
    let c = a.connect().await;
    let spec = script(
        "head -c 67108864 /dev/urandom > rand.bin && cat rand.bin && sha256sum rand.bin >&2 && rm rand.bin",
    );
    let mut h = c.exec(spec, T).await.unwrap();
    let mut hasher = Sha256::new();
    let mut n = 0usize;
    let mut err = Vec::new();
    let st = loop {
        match h.next().await.unwrap() {
            ExecEvent::Output(OutStream::Stdout, d) => {
                n += d.len();
                hasher.update(&d);
            }
            ExecEvent::Output(OutStream::Stderr, d) => err.extend(d),
            ExecEvent::Exited(st) => break st,
            ExecEvent::Lost => panic!("lost"),
        }
    };
    assert_eq!(st, ExitStatus::Code(0));
    assert_eq!(n, 64 << 20);
    let err = String::from_utf8(err).unwrap();
    assert_eq!(err.split_whitespace().next().unwrap(), hasher.hex());
}

#[tokio::test]
async fn twenty_concurrent_execs() {
    let a = Agent::start();
    let c = a.connect().await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let (o, _, st) = run(
                &c,
                script(&format!("sleep 0.2; seq 1 {}; exit {}", 1000 + i, i)),
            )
            .await;
            let lines = String::from_utf8(o).unwrap().lines().count();
            (i, lines, st)
        }));
    }
    for t in tasks {
        let (i, lines, st) = t.await.unwrap();
        assert_eq!(lines, 1000 + i);
        assert_eq!(st, ExitStatus::Code(i as i32));
    }
    assert_eq!(c.open_streams(), 0);
}

#[tokio::test]
async fn background_child_does_not_hold_exec() {
    let a = Agent::start();
    let c = a.connect().await;
    let start = Instant::now();
    let (o, _, st) = run(&c, script("sleep 1000 & echo started")).await;
    assert_eq!(o, b"started\n");
    assert_eq!(st, ExitStatus::Code(0));
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn chatty_background_child_does_not_hold_exec() {
    let a = Agent::start();
    let c = a.connect().await;
    let start = Instant::now();
    let (o, _, st) = run(
        &c,
        script("(while true; do echo bg; sleep 0.02; done) & echo started"),
    )
    .await;
    assert!(String::from_utf8_lossy(&o).contains("started\n"));
    assert_eq!(st, ExitStatus::Code(0));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn killed_agent_fails_pending_requests_quickly() {
    let mut a = Agent::start();
    let c = a.connect().await;
    let mut h = c.exec(argv(&["sleep", "1000"]), T).await.unwrap();
    // Freeze the agent so the next requests stay pending, then kill it.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(a.child.id() as i32, libc::SIGSTOP) };
    let task_dir = format!("/proc/{}/task", a.child.id());
    let all_stopped = || {
        std::fs::read_dir(&task_dir).unwrap().flatten().all(|t| {
            std::fs::read_to_string(t.path().join("stat"))
                .unwrap_or_default()
                .contains(") T ")
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !all_stopped() {
        assert!(Instant::now() < deadline, "agent did not stop");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pending: Vec<_> = (0..3)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.ping(Duration::from_secs(30)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    a.child.kill().unwrap();
    let _ = a.child.wait();
    for p in pending {
        let r = tokio::time::timeout(Duration::from_secs(2), p)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(r, Err(ClientError::Closed)), "{r:?}");
    }
    tokio::time::timeout(Duration::from_secs(2), c.closed())
        .await
        .unwrap();
    assert!(c.is_closed());
    assert!(matches!(
        c.request(Request::Ping, T).await,
        Err(ClientError::Closed)
    ));
    assert!(matches!(
        c.exec(argv(&["true"]), T).await,
        Err(ClientError::Closed)
    ));
    assert_eq!(h.next().await, Some(ExecEvent::Lost));
    assert_eq!(h.next().await, None);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn power_off_exits_host_agent() {
    let mut a = Agent::start();
    let c = a.connect().await;
    let bg = c.exec(argv(&["sleep", "1000"]), T).await.unwrap();
    let bg_pid = bg.pid;
    assert_eq!(c.request(Request::PowerOff, T).await.unwrap(), Response::Ok);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(st) = a.child.try_wait().unwrap() {
            assert!(st.success());
            break;
        }
        assert!(Instant::now() < deadline, "agent did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its command was killed with it.
    std::thread::sleep(Duration::from_millis(100));
    let stat = std::fs::read_to_string(format!("/proc/{bg_pid}/stat")).unwrap_or_default();
    assert!(stat.is_empty() || stat.contains(") Z"), "{stat}");
}

#[tokio::test]
async fn reconnect_after_session_ends() {
    let a = Agent::start();
    let c = a.connect().await;
    let h = c
        .exec(
            script("i=0; while [ $i -lt 200 ]; do echo line $i; i=$((i+1)); sleep 0.01; done"),
            T,
        )
        .await
        .unwrap();
    drop(h);
    drop(c);
    // A new connection works while the old command keeps running (its output discarded).
    let c = a.connect().await;
    let (o, _, st) = run(&c, argv(&["echo", "hi"])).await;
    assert_eq!(o, b"hi\n");
    assert_eq!(st, ExitStatus::Code(0));
}

/// Minimal SHA-256 for the hash check (avoids a dependency).
struct Sha256 {
    h: [u32; 8],
    buf: Vec<u8>,
    len: u64,
}

impl Sha256 {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];

    fn new() -> Self {
        Sha256 {
            h: [
                0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
                0x5be0cd19,
            ],
            buf: Vec::new(),
            len: 0,
        }
    }

    fn update(&mut self, data: &[u8]) {
        self.len += data.len() as u64;
        self.buf.extend_from_slice(data);
        let full = self.buf.len() / 64 * 64;
        let blocks: Vec<u8> = self.buf.drain(..full).collect();
        for b in blocks.chunks(64) {
            self.block(b);
        }
    }

    #[allow(clippy::needless_range_loop)]
    fn block(&mut self, b: &[u8]) {
        let mut w = [0u32; 64];
        for i in 0..16 {
            w[i] = u32::from_be_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let mut v = self.h;
        for i in 0..64 {
            let s1 = v[4].rotate_right(6) ^ v[4].rotate_right(11) ^ v[4].rotate_right(25);
            let ch = (v[4] & v[5]) ^ (!v[4] & v[6]);
            let t1 = v[7]
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(Self::K[i])
                .wrapping_add(w[i]);
            let s0 = v[0].rotate_right(2) ^ v[0].rotate_right(13) ^ v[0].rotate_right(22);
            let maj = (v[0] & v[1]) ^ (v[0] & v[2]) ^ (v[1] & v[2]);
            let t2 = s0.wrapping_add(maj);
            v = [
                t1.wrapping_add(t2),
                v[0],
                v[1],
                v[2],
                v[3].wrapping_add(t1),
                v[4],
                v[5],
                v[6],
            ];
        }
        for i in 0..8 {
            self.h[i] = self.h[i].wrapping_add(v[i]);
        }
    }

    fn hex(mut self) -> String {
        let bits = self.len * 8;
        let mut pad = vec![0x80u8];
        while (self.buf.len() + pad.len()) % 64 != 56 {
            pad.push(0);
        }
        pad.extend_from_slice(&bits.to_be_bytes());
        let len = self.len;
        self.update(&pad);
        self.len = len;
        self.h.iter().map(|x| format!("{x:08x}")).collect()
    }
}

#[test]
fn sha256_self_check() {
    let mut h = Sha256::new();
    h.update(b"abc");
    assert_eq!(
        h.hex(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

/// Read a terminal command's output until `pred` holds (or panic after 10 s).
async fn read_until(h: &mut ExecHandle, acc: &mut Vec<u8>, pred: impl Fn(&[u8]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pred(acc) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, h.next()).await {
            Ok(Some(ExecEvent::Output(OutStream::Stdout, d))) => acc.extend_from_slice(&d),
            Ok(Some(other)) => panic!(
                "unexpected {other:?}; so far {:?}",
                String::from_utf8_lossy(acc)
            ),
            Ok(None) => panic!("stream ended; so far {:?}", String::from_utf8_lossy(acc)),
            Err(_) => panic!("timed out; so far {:?}", String::from_utf8_lossy(acc)),
        }
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn tty_commands_get_a_terminal_signals_and_resize() {
    use bandsox_agent::proto::{ExecOptions, TtySize};
    let a = Agent::start();
    let c = a.connect().await;
    let opts = ExecOptions {
        spec: script(
            "trap 'echo WINCH; stty size' WINCH; tty; stty size; echo TERM=$TERM; \
             while :; do read -r l || continue; printf '%s' \"$l\" | od -c | head -1; \
             [ \"$l\" = quit ] && exit 5; done",
        ),
        user: None,
        tty: Some(TtySize { cols: 91, rows: 37 }),
    };
    let mut h = c.exec_with(opts, T).await.unwrap();
    let ctl = h.control();
    let mut acc = Vec::new();
    read_until(&mut h, &mut acc, |a| contains(a, "TERM=xterm-256color")).await;
    assert!(
        contains(&acc, "/dev/pts/"),
        "{:?}",
        String::from_utf8_lossy(&acc)
    );
    assert!(
        contains(&acc, "37 91"),
        "{:?}",
        String::from_utf8_lossy(&acc)
    );
    // A resize reaches the command as SIGWINCH with the new size.
    ctl.resize(TtySize {
        cols: 120,
        rows: 40,
    })
    .await
    .unwrap();
    read_until(&mut h, &mut acc, |a| contains(a, "40 120")).await;
    // Escape sequences and control bytes arrive intact.
    ctl.stdin(b"a\x1b[Ab\r".to_vec()).await.unwrap();
    read_until(&mut h, &mut acc, |a| contains(a, "033   [   A")).await;
    ctl.stdin(b"quit\r".to_vec()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, h.next()).await.unwrap() {
            Some(ExecEvent::Output(..)) => {}
            Some(ExecEvent::Exited(st)) => {
                assert_eq!(st, ExitStatus::Code(5));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn tty_ctrl_c_interrupts_the_foreground_job_only() {
    use bandsox_agent::proto::{ExecOptions, TtySize};
    let a = Agent::start();
    let c = a.connect().await;
    let opts = ExecOptions {
        spec: script("exec sh -i"),
        user: None,
        tty: Some(TtySize { cols: 80, rows: 24 }),
    };
    let mut h = c.exec_with(opts, T).await.unwrap();
    let ctl = h.control();
    let mut acc = Vec::new();
    ctl.stdin(b"sleep 100; echo after-$((6*7))\r".to_vec())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    ctl.stdin(b"\x03".to_vec()).await.unwrap();
    ctl.stdin(b"echo alive-$((2*3))\r".to_vec()).await.unwrap();
    read_until(&mut h, &mut acc, |a| contains(a, "alive-6")).await;
    ctl.stdin(b"exit 7\r".to_vec()).await.unwrap();
    loop {
        match tokio::time::timeout(T, h.next()).await.unwrap() {
            Some(ExecEvent::Output(..)) => {}
            Some(ExecEvent::Exited(st)) => {
                assert_eq!(st, ExitStatus::Code(7));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(!contains(&acc, "after-42"));
    // Bad sizes are refused before anything runs.
    let bad = ExecOptions {
        spec: script("echo never"),
        user: None,
        tty: Some(TtySize { cols: 0, rows: 24 }),
    };
    match c.exec_with(bad, T).await {
        Err(ClientError::Remote { errno, .. }) => assert_eq!(errno, libc::EINVAL),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a 0-column terminal was accepted"),
    }
}
