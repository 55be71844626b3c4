//! Integration tests of the file service: the real `bandsox-agent` binary in host mode,
//! driven over its unix socket with the raw protocol (frames in, frames out).
//!
//! These tests run as root in CI (chown, trusted xattrs, 04755 on a root-owned file,
//! mounting proc); a test that needs root is skipped otherwise.
mod common;

use common::Agent;

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use bandsox_agent::proto::codec::{encode_frame, FrameReader};
use bandsox_agent::proto::fs::*;
use bandsox_agent::proto::*;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(10);

/// This process's soft `RLIMIT_NOFILE`.
fn nofile_soft_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit the kernel fills.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim.rlim_cur
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

impl Agent {
    fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    async fn connect(&self) -> Conn {
        let s = tokio::net::UnixStream::connect(&self.sock).await.unwrap();
        let (r, mut w) = s.into_split();
        let mut reader = FrameReader::new(r);
        let mut hello = SYNC_MAGIC.to_vec();
        hello.extend(
            encode_frame(&Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                nonce: 42,
            }))
            .unwrap(),
        );
        w.write_all(&hello).await.unwrap();
        tokio::time::timeout(T, reader.scan_sync())
            .await
            .unwrap()
            .unwrap();
        match reader.next_message().await.unwrap() {
            Message::HelloAck(a) => assert!(a.result.is_ok()),
            other => panic!("expected ack, got {other:?}"),
        }
        // A reader task, so waiting with a timeout never cancels a half-read frame.
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(m) = reader.next_message().await {
                if tx.send(m).is_err() {
                    break;
                }
            }
        });
        Conn {
            w,
            rx,
            next_id: 1,
            events: Vec::new(),
            log: Vec::new(),
        }
    }
}

type FsResult = Result<FsResponse, (i32, String)>;

/// A raw host end.
struct Conn {
    w: OwnedWriteHalf,
    rx: mpsc::UnboundedReceiver<Message>,
    next_id: u64,
    /// Every `FsEvent` received so far (in order).
    events: Vec<FsEvent>,
    /// Everything received that was not a response to `fs` (in order).
    log: Vec<Message>,
}

impl Conn {
    async fn send(&mut self, m: &Message) {
        self.w.write_all(&encode_frame(m).unwrap()).await.unwrap();
    }

    async fn recv(&mut self, timeout: Duration) -> Option<Message> {
        let m = tokio::time::timeout(timeout, self.rx.recv()).await.ok()??;
        if let Message::FsEvents(ev) = &m {
            self.events.extend(ev.iter().cloned());
        }
        Some(m)
    }

    async fn fs(&mut self, req: FsRequest) -> FsResult {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&Message::Request {
            id,
            req: Request::Fs(req),
        })
        .await;
        loop {
            let m = self.recv(T).await.expect("no answer");
            match m {
                Message::Response { id: rid, resp } if rid == id => {
                    return match resp {
                        Response::Fs(r) => Ok(r),
                        Response::Error { errno, message } => Err((errno, message)),
                        other => panic!("unexpected response {other:?}"),
                    }
                }
                other => self.log.push(other),
            }
        }
    }

    async fn forget(&mut self, nodes: Vec<(NodeId, u64)>) {
        self.send(&Message::Forget { nodes }).await;
    }

    // ---- helpers: each panics on an unexpected answer ----

    async fn lookup(&mut self, parent: NodeId, name: &[u8]) -> Result<Entry, i32> {
        match self
            .fs(FsRequest::Lookup {
                parent,
                name: name.to_vec(),
            })
            .await
        {
            Ok(FsResponse::Entry(e)) => Ok(e),
            Ok(other) => panic!("unexpected {other:?}"),
            Err((errno, _)) => Err(errno),
        }
    }

    async fn getattr(&mut self, node: NodeId) -> Result<Attr, i32> {
        match self.fs(FsRequest::GetAttr { node, handle: None }).await {
            Ok(FsResponse::Attr(a)) => Ok(a),
            Ok(other) => panic!("unexpected {other:?}"),
            Err((errno, _)) => Err(errno),
        }
    }

    async fn setattr(&mut self, node: NodeId, set: SetAttrs) -> Result<Attr, i32> {
        match self
            .fs(FsRequest::SetAttr {
                node,
                handle: None,
                set,
            })
            .await
        {
            Ok(FsResponse::Attr(a)) => Ok(a),
            Ok(other) => panic!("unexpected {other:?}"),
            Err((errno, _)) => Err(errno),
        }
    }

    async fn create(&mut self, parent: NodeId, name: &[u8], mode: u32) -> (Entry, HandleId) {
        match self
            .fs(FsRequest::Create {
                parent,
                name: name.to_vec(),
                mode,
                flags: libc::O_RDWR,
                owner: Owner { uid: 0, gid: 0 },
            })
            .await
        {
            Ok(FsResponse::Created { entry, handle }) => (entry, handle),
            other => panic!("create failed: {other:?}"),
        }
    }

    async fn mkdir(&mut self, parent: NodeId, name: &[u8], mode: u32) -> Result<Entry, i32> {
        let owner = Owner {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        };
        match self
            .fs(FsRequest::Mkdir {
                parent,
                name: name.to_vec(),
                mode,
                owner,
            })
            .await
        {
            Ok(FsResponse::Entry(e)) => Ok(e),
            Ok(other) => panic!("unexpected {other:?}"),
            Err((errno, _)) => Err(errno),
        }
    }

    async fn open(&mut self, node: NodeId, flags: i32) -> Result<HandleId, i32> {
        match self.fs(FsRequest::Open { node, flags }).await {
            Ok(FsResponse::Opened { handle }) => Ok(handle),
            Ok(other) => panic!("unexpected {other:?}"),
            Err((errno, _)) => Err(errno),
        }
    }

    async fn write(&mut self, handle: HandleId, offset: u64, data: &[u8]) -> u32 {
        match self
            .fs(FsRequest::Write {
                handle,
                offset,
                data: data.to_vec(),
            })
            .await
        {
            Ok(FsResponse::Written(n)) => n,
            other => panic!("write failed: {other:?}"),
        }
    }

    async fn read(&mut self, handle: HandleId, offset: u64, size: u32) -> Vec<u8> {
        match self
            .fs(FsRequest::Read {
                handle,
                offset,
                size,
            })
            .await
        {
            Ok(FsResponse::Data(d)) => d,
            other => panic!("read failed: {other:?}"),
        }
    }

    async fn ok(&mut self, req: FsRequest) -> Result<(), i32> {
        match self.fs(req).await {
            Ok(FsResponse::Ok) => Ok(()),
            Ok(other) => panic!("unexpected {other:?}"),
            Err((errno, _)) => Err(errno),
        }
    }

    async fn opendir(&mut self, node: NodeId) -> HandleId {
        match self.fs(FsRequest::OpenDir { node }).await {
            Ok(FsResponse::Opened { handle }) => handle,
            other => panic!("opendir failed: {other:?}"),
        }
    }

    async fn readdir(
        &mut self,
        handle: HandleId,
        offset: u64,
        plus: bool,
        max_bytes: u32,
    ) -> Result<Vec<DirEntry>, i32> {
        match self
            .fs(FsRequest::ReadDir {
                handle,
                offset,
                plus,
                max_bytes,
            })
            .await
        {
            Ok(FsResponse::DirEntries(v)) => Ok(v),
            Ok(other) => panic!("unexpected {other:?}"),
            Err((errno, _)) => Err(errno),
        }
    }

    /// All names of a directory, paging with `max_bytes`; checks every page's size.
    async fn list_all(&mut self, node: NodeId, plus: bool, max_bytes: u32) -> Vec<DirEntry> {
        let h = self.opendir(node).await;
        let mut all = Vec::new();
        let mut off = 0;
        loop {
            let page = self.readdir(h, off, plus, max_bytes).await.unwrap();
            if page.is_empty() {
                break;
            }
            let size: usize = page
                .iter()
                .map(|e| fuse_dirent_size(e.name.len(), plus))
                .sum();
            assert!(size <= max_bytes as usize, "page of {size} > {max_bytes}");
            off = page.last().unwrap().next_offset;
            all.extend(page);
        }
        self.ok(FsRequest::ReleaseDir { handle: h }).await.unwrap();
        all
    }

    /// Wait until `pred` holds for the events received so far.
    async fn wait_events(&mut self, within: Duration, pred: impl Fn(&[FsEvent]) -> bool) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if pred(&self.events) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if let Some(m) = self.recv(left).await {
                if !matches!(m, Message::FsEvents(_)) {
                    self.log.push(m);
                }
            }
        }
    }
}

fn entry_event(parent: NodeId, name: &[u8]) -> FsEvent {
    FsEvent::Entry {
        parent,
        name: name.to_vec(),
    }
}

fn ts(sec: i64, nsec: u32) -> Timespec {
    Timespec { sec, nsec }
}

#[tokio::test]
async fn lookup_getattr_links_forget() {
    let a = Agent::start();
    std::fs::write(a.path("file"), b"hello").unwrap();
    std::fs::create_dir(a.path("dir")).unwrap();
    std::os::unix::fs::symlink("file", a.path("sym")).unwrap();
    std::fs::hard_link(a.path("file"), a.path("hard")).unwrap();
    let mut c = a.connect().await;

    let root = c.getattr(ROOT_NODE).await.unwrap();
    assert_eq!(root.mode & libc::S_IFMT, libc::S_IFDIR);
    assert_eq!(root.ino, std::fs::metadata(a.root.path()).unwrap().ino());

    let f = c.lookup(ROOT_NODE, b"file").await.unwrap();
    assert!(f.node >= 2);
    assert!(f.coherent, "root is watched");
    assert_eq!(f.attr.mode & libc::S_IFMT, libc::S_IFREG);
    assert_eq!(f.attr.size, 5);
    assert_eq!(f.attr.nlink, 2);
    let md = std::fs::metadata(a.path("file")).unwrap();
    assert_eq!(f.attr.ino, md.ino());
    assert_eq!(f.attr.mtime, ts(md.mtime(), md.mtime_nsec() as u32));
    assert_eq!(c.getattr(f.node).await.unwrap(), f.attr);

    let d = c.lookup(ROOT_NODE, b"dir").await.unwrap();
    assert_eq!(d.attr.mode & libc::S_IFMT, libc::S_IFDIR);
    let s = c.lookup(ROOT_NODE, b"sym").await.unwrap();
    assert_eq!(s.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(s.attr.size, 4);
    match c.fs(FsRequest::ReadLink { node: s.node }).await {
        Ok(FsResponse::Data(t)) => assert_eq!(t, b"file"),
        other => panic!("{other:?}"),
    }
    // readlink of a non-symlink
    let e = c
        .fs(FsRequest::ReadLink { node: f.node })
        .await
        .unwrap_err();
    assert_eq!(e.0, libc::EINVAL);

    // Hard links share one node; the same name twice too.
    let h = c.lookup(ROOT_NODE, b"hard").await.unwrap();
    assert_eq!(h.node, f.node);
    let f2 = c.lookup(ROOT_NODE, b"file").await.unwrap();
    assert_eq!(f2.node, f.node);

    // Errors: missing name, bad names, lookup in a non-directory.
    assert_eq!(c.lookup(ROOT_NODE, b"missing").await, Err(libc::ENOENT));
    for bad in [&b"a/b"[..], b"..", b".", b"", b"x\0y"] {
        assert_eq!(c.lookup(ROOT_NODE, bad).await, Err(libc::EINVAL), "{bad:?}");
    }
    // A name longer than NAME_MAX is what the kernel calls it.
    assert_eq!(
        c.lookup(ROOT_NODE, &[b'a'; 256]).await,
        Err(libc::ENAMETOOLONG)
    );
    assert_eq!(
        c.mkdir(ROOT_NODE, &[b'a'; 256], 0o755).await.map(|_| ()),
        Err(libc::ENAMETOOLONG)
    );
    assert_eq!(c.lookup(f.node, b"x").await, Err(libc::ENOTDIR));
    let e = c
        .fs(FsRequest::Lookup {
            parent: ROOT_NODE,
            name: b"missing".to_vec(),
        })
        .await
        .unwrap_err();
    assert!(e.1.contains("lookup") && e.1.contains("missing"), "{}", e.1);

    // Forget: three references to the file node (file, hard, file).
    c.forget(vec![(f.node, 2)]).await;
    assert!(c.getattr(f.node).await.is_ok());
    c.forget(vec![(f.node, 1), (d.node, 1), (s.node, 1)]).await;
    assert_eq!(c.getattr(f.node).await, Err(libc::ESTALE));
    assert_eq!(c.getattr(d.node).await, Err(libc::ESTALE));
    assert_eq!(c.lookup(d.node, b"x").await, Err(libc::ESTALE));
    // A new lookup gets a new id (never reused).
    let f3 = c.lookup(ROOT_NODE, b"file").await.unwrap();
    assert!(f3.node > s.node);
    // Root is never forgotten.
    c.forget(vec![(ROOT_NODE, 100)]).await;
    assert!(c.getattr(ROOT_NODE).await.is_ok());
    // Unknown handles.
    let e = c.fs(FsRequest::Read {
        handle: 999,
        offset: 0,
        size: 1,
    });
    assert_eq!(e.await.unwrap_err().0, libc::EBADF);
    assert_eq!(
        c.ok(FsRequest::Release { handle: 999 }).await,
        Err(libc::EBADF)
    );
}

#[tokio::test]
async fn symlink_escape_is_never_followed() {
    let a = Agent::start();
    std::os::unix::fs::symlink("/etc", a.path("etc")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", a.path("pw")).unwrap();
    let mut c = a.connect().await;
    let e = c.lookup(ROOT_NODE, b"etc").await.unwrap();
    assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(c.lookup(e.node, b"passwd").await, Err(libc::ENOTDIR));
    assert_eq!(
        c.fs(FsRequest::OpenDir { node: e.node })
            .await
            .unwrap_err()
            .0,
        libc::ENOTDIR
    );
    let pw = c.lookup(ROOT_NODE, b"pw").await.unwrap();
    assert_eq!(c.open(pw.node, libc::O_RDONLY).await, Err(libc::ELOOP));
    // Creating through a dangling or escaping symlink never follows it.
    std::os::unix::fs::symlink("/tmp/bandsox-should-not-exist", a.path("dangle")).unwrap();
    let r = c
        .fs(FsRequest::Create {
            parent: ROOT_NODE,
            name: b"dangle".to_vec(),
            mode: 0o644,
            flags: libc::O_RDWR,
            owner: Owner::default(),
        })
        .await;
    assert_eq!(r.unwrap_err().0, libc::ELOOP);
    assert!(!Path::new("/tmp/bandsox-should-not-exist").exists());
}

/// One file operation for the property test.
#[derive(Debug, Clone)]
enum FileOp {
    Write(u64, Vec<u8>),
    Read(u64, u32),
    Truncate(u64),
}

fn file_op() -> impl proptest::strategy::Strategy<Value = FileOp> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0u64..70_000, proptest::collection::vec(any::<u8>(), 0..9000))
            .prop_map(|(o, d)| FileOp::Write(o, d)),
        4 => (0u64..80_000, 0u32..20_000).prop_map(|(o, s)| FileOp::Read(o, s)),
        1 => (0u64..80_000).prop_map(FileOp::Truncate),
    ]
}

#[test]
fn random_io_matches_a_reference() {
    use proptest::test_runner::{Config, TestRunner};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let a = Agent::start();
    let c = tokio::sync::Mutex::new(rt.block_on(a.connect()));
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = proptest::collection::vec(file_op(), 1..40);
    let case = std::cell::Cell::new(0u32);
    runner
        .run(&strategy, |ops| {
            case.set(case.get() + 1);
            let name = format!("f{}", case.get());
            rt.block_on(async {
                let mut c = c.lock().await;
                let (e, h) = c.create(ROOT_NODE, name.as_bytes(), 0o644).await;
                let mut reference: Vec<u8> = Vec::new();
                for op in &ops {
                    match op {
                        FileOp::Write(off, data) => {
                            assert_eq!(c.write(h, *off, data).await as usize, data.len());
                            if !data.is_empty() {
                                let end = *off as usize + data.len();
                                if reference.len() < end {
                                    reference.resize(end, 0);
                                }
                                reference[*off as usize..end].copy_from_slice(data);
                            }
                        }
                        FileOp::Read(off, size) => {
                            let got = c.read(h, *off, *size).await;
                            let start = (*off as usize).min(reference.len());
                            let end = (*off as usize + *size as usize).min(reference.len());
                            assert_eq!(got, &reference[start..end], "read {off}+{size}");
                        }
                        FileOp::Truncate(size) => {
                            let set = SetAttrs {
                                size: Some(*size),
                                ..Default::default()
                            };
                            let attr = match c
                                .fs(FsRequest::SetAttr {
                                    node: e.node,
                                    handle: Some(h),
                                    set,
                                })
                                .await
                            {
                                Ok(FsResponse::Attr(a)) => a,
                                other => panic!("{other:?}"),
                            };
                            assert_eq!(attr.size, *size);
                            reference.resize(*size as usize, 0);
                        }
                    }
                }
                assert_eq!(
                    c.getattr(e.node).await.unwrap().size,
                    reference.len() as u64
                );
                c.ok(FsRequest::Release { handle: h }).await.unwrap();
                c.forget(vec![(e.node, 1)]).await;
                let on_disk = std::fs::read(a.path(&name)).unwrap();
                assert_eq!(on_disk, reference);
            });
            Ok(())
        })
        .unwrap();
}

#[tokio::test]
async fn read_write_truncate_append_and_limits() {
    let a = Agent::start();
    let mut c = a.connect().await;
    let (e, h) = c.create(ROOT_NODE, b"data", 0o600).await;
    assert_eq!(e.attr.mode, libc::S_IFREG | 0o600, "mode applied exactly");
    assert_eq!(c.write(h, 0, b"0123456789").await, 10);
    // Past EOF: empty; across EOF: short.
    assert_eq!(c.read(h, 100, 10).await, b"");
    assert_eq!(c.read(h, 8, 10).await, b"89");
    // A huge size is capped at MAX_CHUNK.
    let big = vec![7u8; MAX_CHUNK + 10];
    assert_eq!(c.write(h, 0, &big[..MAX_CHUNK]).await as usize, MAX_CHUNK);
    assert_eq!(c.write(h, MAX_CHUNK as u64, &big[..10]).await, 10);
    assert_eq!(c.read(h, 0, u32::MAX).await.len(), MAX_CHUNK);
    // Truncate down and up without a handle.
    let a1 = c
        .setattr(
            e.node,
            SetAttrs {
                size: Some(3),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(a1.size, 3);
    let a2 = c
        .setattr(
            e.node,
            SetAttrs {
                size: Some(5000),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(a2.size, 5000);
    let d = c.read(h, 0, 6000).await;
    assert_eq!(d.len(), 5000);
    assert_eq!(&d[..3], &[7, 7, 7]);
    assert!(d[3..].iter().all(|&b| b == 0));
    // GetAttr through the handle works after unlink.
    c.ok(FsRequest::Unlink {
        parent: ROOT_NODE,
        name: b"data".to_vec(),
    })
    .await
    .unwrap();
    match c
        .fs(FsRequest::GetAttr {
            node: e.node,
            handle: Some(h),
        })
        .await
    {
        Ok(FsResponse::Attr(at)) => {
            assert_eq!(at.size, 5000);
            assert_eq!(at.nlink, 0);
        }
        other => panic!("{other:?}"),
    }
    c.ok(FsRequest::Fsync {
        handle: h,
        datasync: true,
    })
    .await
    .unwrap();
    c.ok(FsRequest::Release { handle: h }).await.unwrap();
    assert_eq!(
        c.ok(FsRequest::Release { handle: h }).await,
        Err(libc::EBADF)
    );

    // O_APPEND is honoured; O_CREAT/O_EXCL in Open are ignored.
    std::fs::write(a.path("log"), b"abc").unwrap();
    let l = c.lookup(ROOT_NODE, b"log").await.unwrap();
    let h = c
        .open(
            l.node,
            libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_EXCL,
        )
        .await
        .unwrap();
    c.write(h, 0, b"def").await;
    c.ok(FsRequest::Release { handle: h }).await.unwrap();
    assert_eq!(std::fs::read(a.path("log")).unwrap(), b"abcdef");
    // O_TRUNC works.
    let h = c
        .open(l.node, libc::O_WRONLY | libc::O_TRUNC)
        .await
        .unwrap();
    c.ok(FsRequest::Release { handle: h }).await.unwrap();
    assert_eq!(std::fs::read(a.path("log")).unwrap(), b"");
    // Create with O_EXCL on an existing name; without O_EXCL it opens the file.
    let r = c
        .fs(FsRequest::Create {
            parent: ROOT_NODE,
            name: b"log".to_vec(),
            mode: 0o600,
            flags: libc::O_RDWR | libc::O_EXCL,
            owner: Owner::default(),
        })
        .await;
    assert_eq!(r.unwrap_err().0, libc::EEXIST);
    let (e2, h2) = c.create(ROOT_NODE, b"log", 0o600).await;
    assert_eq!(e2.node, l.node);
    assert_eq!(e2.attr.mode & 0o777, 0o644, "existing file keeps its mode");
    c.ok(FsRequest::Release { handle: h2 }).await.unwrap();
    // Reading a directory handle / a read on a write-only handle.
    let hd = c.opendir(ROOT_NODE).await;
    let r = c
        .fs(FsRequest::Read {
            handle: hd,
            offset: 0,
            size: 1,
        })
        .await;
    assert_eq!(r.unwrap_err().0, libc::EISDIR);
}

#[tokio::test]
async fn namespace_operations() {
    let a = Agent::start();
    let mut c = a.connect().await;
    let me = Owner {
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
    };

    // mkdir with an exact mode (umask 0), rmdir.
    let d = c.mkdir(ROOT_NODE, b"d", 0o750).await.unwrap();
    assert_eq!(d.attr.mode, libc::S_IFDIR | 0o750);
    assert!(d.coherent);
    assert_eq!(
        std::fs::metadata(a.path("d")).unwrap().permissions().mode() & 0o7777,
        0o750
    );
    assert_eq!(c.mkdir(ROOT_NODE, b"d", 0o755).await, Err(libc::EEXIST));
    let sub = c.mkdir(d.node, b"sub", 0o700).await.unwrap();
    assert!(sub.coherent, "d is watched");
    assert_eq!(
        c.ok(FsRequest::Rmdir {
            parent: ROOT_NODE,
            name: b"d".to_vec()
        })
        .await,
        Err(libc::ENOTEMPTY)
    );
    c.ok(FsRequest::Rmdir {
        parent: d.node,
        name: b"sub".to_vec(),
    })
    .await
    .unwrap();
    assert!(!a.path("d/sub").exists());

    // Non-UTF-8 names.
    let name = b"caf\xe9".to_vec();
    let (f, h) = c.create(d.node, &name, 0o640).await;
    c.ok(FsRequest::Release { handle: h }).await.unwrap();
    let p = a.path("d").join(OsStr::from_bytes(&name));
    assert!(p.exists());
    assert_eq!(c.lookup(d.node, &name).await.unwrap().node, f.node);
    let list = c.list_all(d.node, false, 4096).await;
    assert!(list.iter().any(|e| e.name == name));

    // Symlink with a non-UTF-8 target.
    let target = b"/nowhere/\xff\xfe".to_vec();
    let s = match c
        .fs(FsRequest::Symlink {
            parent: d.node,
            name: b"link".to_vec(),
            target: target.clone(),
            owner: me,
        })
        .await
    {
        Ok(FsResponse::Entry(e)) => e,
        other => panic!("{other:?}"),
    };
    assert_eq!(s.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    match c.fs(FsRequest::ReadLink { node: s.node }).await {
        Ok(FsResponse::Data(t)) => assert_eq!(t, target),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        std::fs::read_link(a.path("d/link"))
            .unwrap()
            .as_os_str()
            .as_bytes(),
        &target[..]
    );

    // mknod fifo.
    let fifo = match c
        .fs(FsRequest::Mknod {
            parent: d.node,
            name: b"fifo".to_vec(),
            mode: libc::S_IFIFO | 0o640,
            rdev: 0,
            owner: me,
        })
        .await
    {
        Ok(FsResponse::Entry(e)) => e,
        other => panic!("{other:?}"),
    };
    assert_eq!(fifo.attr.mode, libc::S_IFIFO | 0o640);
    assert_eq!(c.open(fifo.node, libc::O_RDONLY).await, Err(libc::ENXIO));

    // link: same node, nlink 2.
    let l = match c
        .fs(FsRequest::Link {
            node: f.node,
            new_parent: ROOT_NODE,
            new_name: b"hard".to_vec(),
        })
        .await
    {
        Ok(FsResponse::Entry(e)) => e,
        other => panic!("{other:?}"),
    };
    assert_eq!(l.node, f.node);
    assert_eq!(l.attr.nlink, 2);
    // Link of a symlink links the symlink itself.
    match c
        .fs(FsRequest::Link {
            node: s.node,
            new_parent: ROOT_NODE,
            new_name: b"link2".to_vec(),
        })
        .await
    {
        Ok(FsResponse::Entry(e)) => assert_eq!(e.node, s.node),
        other => panic!("{other:?}"),
    }
    assert!(std::fs::symlink_metadata(a.path("link2"))
        .unwrap()
        .file_type()
        .is_symlink());

    // unlink.
    c.ok(FsRequest::Unlink {
        parent: ROOT_NODE,
        name: b"hard".to_vec(),
    })
    .await
    .unwrap();
    assert!(!a.path("hard").exists());
    assert_eq!(
        c.ok(FsRequest::Unlink {
            parent: ROOT_NODE,
            name: b"hard".to_vec()
        })
        .await,
        Err(libc::ENOENT)
    );

    // rename, NOREPLACE, EXCHANGE.
    std::fs::write(a.path("x"), b"x").unwrap();
    std::fs::write(a.path("y"), b"y").unwrap();
    let rename = |name: &[u8], new_name: &[u8], flags: u32| FsRequest::Rename {
        parent: ROOT_NODE,
        name: name.to_vec(),
        new_parent: d.node,
        new_name: new_name.to_vec(),
        flags,
    };
    c.ok(rename(b"x", b"x2", 0)).await.unwrap();
    assert_eq!(std::fs::read(a.path("d/x2")).unwrap(), b"x");
    std::fs::write(a.path("x"), b"new x").unwrap();
    assert_eq!(
        c.ok(rename(b"x", b"x2", libc::RENAME_NOREPLACE)).await,
        Err(libc::EEXIST)
    );
    c.ok(rename(b"y", b"x2", libc::RENAME_EXCHANGE))
        .await
        .unwrap();
    assert_eq!(std::fs::read(a.path("d/x2")).unwrap(), b"y");
    assert_eq!(std::fs::read(a.path("y")).unwrap(), b"x");
    assert_eq!(c.ok(rename(b"y", b"a/b", 0)).await, Err(libc::EINVAL));
    assert_eq!(c.ok(rename(b"..", b"z", 0)).await, Err(libc::EINVAL));

    // statfs.
    match c.fs(FsRequest::StatFs { node: d.node }).await {
        Ok(FsResponse::StatFs(st)) => {
            let v = nix::sys::statvfs::statvfs(a.root.path()).unwrap();
            assert_eq!(st.blocks, v.blocks());
            assert_eq!(st.bsize as u64, v.block_size());
            assert!(st.namelen >= 255);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn attributes_modes_owners_times() {
    let a = Agent::start();
    let mut c = a.connect().await;
    std::fs::write(a.path("f"), b"data").unwrap();
    std::os::unix::fs::symlink("f", a.path("s")).unwrap();
    let f = c.lookup(ROOT_NODE, b"f").await.unwrap();
    let s = c.lookup(ROOT_NODE, b"s").await.unwrap();

    // chmod, including setuid on a root-owned file.
    let at = c
        .setattr(
            f.node,
            SetAttrs {
                mode: Some(0o4755),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(at.mode, libc::S_IFREG | 0o4755);
    assert_eq!(
        std::fs::metadata(a.path("f")).unwrap().permissions().mode() & 0o7777,
        0o4755
    );
    // chmod of a symlink is not supported.
    assert_eq!(
        c.setattr(
            s.node,
            SetAttrs {
                mode: Some(0o600),
                ..Default::default()
            }
        )
        .await,
        Err(libc::EOPNOTSUPP)
    );

    if is_root() {
        // chown numeric (also of the symlink itself).
        let at = c
            .setattr(
                f.node,
                SetAttrs {
                    uid: Some(1234),
                    gid: Some(5678),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!((at.uid, at.gid), (1234, 5678));
        let md = std::fs::metadata(a.path("f")).unwrap();
        assert_eq!((md.uid(), md.gid()), (1234, 5678));
        let at = c
            .setattr(
                s.node,
                SetAttrs {
                    uid: Some(42),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(at.uid, 42);
        assert_eq!(std::fs::symlink_metadata(a.path("s")).unwrap().uid(), 42);
        assert_eq!(std::fs::metadata(a.path("f")).unwrap().uid(), 1234);

        // New nodes are chowned to the owner; set-id bits survive.
        let owner = Owner {
            uid: 1000,
            gid: 1001,
        };
        match c
            .fs(FsRequest::Create {
                parent: ROOT_NODE,
                name: b"owned".to_vec(),
                mode: 0o2755,
                flags: libc::O_WRONLY,
                owner,
            })
            .await
        {
            Ok(FsResponse::Created { entry, handle }) => {
                assert_eq!((entry.attr.uid, entry.attr.gid), (1000, 1001));
                assert_eq!(entry.attr.mode & 0o7777, 0o2755);
                c.ok(FsRequest::Release { handle }).await.unwrap();
            }
            other => panic!("{other:?}"),
        }
        match c
            .fs(FsRequest::Mkdir {
                parent: ROOT_NODE,
                name: b"owned-dir".to_vec(),
                mode: 0o755,
                owner,
            })
            .await
        {
            Ok(FsResponse::Entry(e)) => assert_eq!((e.attr.uid, e.attr.gid), (1000, 1001)),
            other => panic!("{other:?}"),
        }
    }

    // utimens: explicit nanoseconds.
    let at = c
        .setattr(
            f.node,
            SetAttrs {
                atime: Some(SetTime::At(ts(1_000_000_000, 123_456_789))),
                mtime: Some(SetTime::At(ts(1_500_000_000, 987_654_321))),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(at.atime, ts(1_000_000_000, 123_456_789));
    assert_eq!(at.mtime, ts(1_500_000_000, 987_654_321));
    let md = std::fs::metadata(a.path("f")).unwrap();
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_500_000_000, 987_654_321));
    // UTIME_OMIT for atime, UTIME_NOW for mtime.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let at = c
        .setattr(
            f.node,
            SetAttrs {
                mtime: Some(SetTime::Now),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(at.atime, ts(1_000_000_000, 123_456_789), "atime omitted");
    assert!((at.mtime.sec - now).abs() <= 2, "mtime now");
    // Invalid nanoseconds.
    assert_eq!(
        c.setattr(
            f.node,
            SetAttrs {
                atime: Some(SetTime::At(ts(1, 1_000_000_000))),
                ..Default::default()
            }
        )
        .await,
        Err(libc::EINVAL)
    );
    // On a symlink: the link itself changes, not its target.
    let target_before = std::fs::metadata(a.path("f")).unwrap().mtime();
    let at = c
        .setattr(
            s.node,
            SetAttrs {
                atime: Some(SetTime::At(ts(200, 5))),
                mtime: Some(SetTime::At(ts(300, 7))),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(at.mtime, ts(300, 7));
    let lmd = std::fs::symlink_metadata(a.path("s")).unwrap();
    assert_eq!((lmd.mtime(), lmd.mtime_nsec()), (300, 7));
    assert_eq!(
        std::fs::metadata(a.path("f")).unwrap().mtime(),
        target_before
    );
    // Truncate of a directory.
    assert_eq!(
        c.setattr(
            ROOT_NODE,
            SetAttrs {
                size: Some(0),
                ..Default::default()
            }
        )
        .await,
        Err(libc::EISDIR)
    );
}

#[tokio::test]
async fn xattrs_fallocate_and_holes() {
    let a = Agent::start();
    let mut c = a.connect().await;
    std::fs::write(a.path("f"), b"x").unwrap();
    let f = c.lookup(ROOT_NODE, b"f").await.unwrap();

    let set = |name: &[u8], value: &[u8], flags: i32| FsRequest::SetXattr {
        node: f.node,
        name: name.to_vec(),
        value: value.to_vec(),
        flags,
    };
    let r = c.ok(set(b"user.test", b"hello world", 0)).await;
    if r == Err(libc::EOPNOTSUPP) {
        eprintln!("skipping xattr checks: not supported by the test filesystem");
    } else {
        r.unwrap();
        c.ok(set(b"user.other", b"", 0)).await.unwrap();
        assert_eq!(
            c.ok(set(b"user.test", b"v", libc::XATTR_CREATE)).await,
            Err(libc::EEXIST)
        );
        assert_eq!(
            c.ok(set(b"user.none", b"v", libc::XATTR_REPLACE)).await,
            Err(libc::ENODATA)
        );
        let get = |name: &[u8], size: u32| FsRequest::GetXattr {
            node: f.node,
            name: name.to_vec(),
            size,
        };
        assert_eq!(
            c.fs(get(b"user.test", 0)).await.unwrap(),
            FsResponse::XattrSize(11)
        );
        assert_eq!(
            c.fs(get(b"user.test", 11)).await.unwrap(),
            FsResponse::Data(b"hello world".to_vec())
        );
        assert_eq!(
            c.fs(get(b"user.test", 5)).await.unwrap_err().0,
            libc::ERANGE
        );
        assert_eq!(
            c.fs(get(b"user.nope", 5)).await.unwrap_err().0,
            libc::ENODATA
        );
        let list = |size: u32| FsRequest::ListXattr { node: f.node, size };
        let n = match c.fs(list(0)).await.unwrap() {
            FsResponse::XattrSize(n) => n,
            other => panic!("{other:?}"),
        };
        assert!(n >= 21);
        match c.fs(list(n)).await.unwrap() {
            FsResponse::Data(d) => {
                let names: BTreeSet<&[u8]> =
                    d.split(|&b| b == 0).filter(|s| !s.is_empty()).collect();
                assert!(names.contains(&b"user.test"[..]));
                assert!(names.contains(&b"user.other"[..]));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.fs(list(3)).await.unwrap_err().0, libc::ERANGE);
        c.ok(FsRequest::RemoveXattr {
            node: f.node,
            name: b"user.test".to_vec(),
        })
        .await
        .unwrap();
        assert_eq!(
            c.fs(get(b"user.test", 0)).await.unwrap_err().0,
            libc::ENODATA
        );
        assert_eq!(
            c.ok(set(&[b'u'; 300], b"v", 0)).await,
            Err(libc::ERANGE),
            "name too long"
        );
        assert_eq!(
            c.ok(set(b"user.big", &vec![0u8; MAX_XATTR as usize + 1], 0))
                .await,
            Err(libc::E2BIG)
        );

        // Symlinks: xattr calls act on the link itself, never on its target.
        std::os::unix::fs::symlink("f", a.path("s")).unwrap();
        let s = c.lookup(ROOT_NODE, b"s").await.unwrap();
        assert_eq!(
            c.ok(FsRequest::SetXattr {
                node: s.node,
                name: b"user.x".to_vec(),
                value: b"1".to_vec(),
                flags: 0
            })
            .await,
            Err(libc::EPERM),
            "Linux refuses user.* on symlinks"
        );
        if is_root() {
            c.ok(FsRequest::SetXattr {
                node: s.node,
                name: b"trusted.x".to_vec(),
                value: b"on-link".to_vec(),
                flags: 0,
            })
            .await
            .unwrap();
            let on_target = c
                .fs(FsRequest::GetXattr {
                    node: f.node,
                    name: b"trusted.x".to_vec(),
                    size: 100,
                })
                .await;
            assert_eq!(on_target.unwrap_err().0, libc::ENODATA);
            assert_eq!(
                c.fs(FsRequest::GetXattr {
                    node: s.node,
                    name: b"trusted.x".to_vec(),
                    size: 100
                })
                .await
                .unwrap(),
                FsResponse::Data(b"on-link".to_vec())
            );
        }
    }

    // fallocate + SEEK_DATA/SEEK_HOLE on a sparse file.
    let (e, h) = c.create(ROOT_NODE, b"sparse", 0o644).await;
    const MB: u64 = 1 << 20;
    c.write(h, 4 * MB, b"data").await;
    let fa = c
        .ok(FsRequest::Fallocate {
            handle: h,
            offset: 8 * MB,
            length: MB,
            mode: 0,
        })
        .await;
    let seek = |offset: u64, whence: i32| FsRequest::Lseek {
        handle: h,
        offset,
        whence,
    };
    match fa {
        Err(libc::EOPNOTSUPP) => eprintln!("skipping fallocate checks: unsupported"),
        r => {
            r.unwrap();
            assert_eq!(c.getattr(e.node).await.unwrap().size, 9 * MB);
            // KEEP_SIZE beyond the end.
            c.ok(FsRequest::Fallocate {
                handle: h,
                offset: 9 * MB,
                length: MB,
                mode: libc::FALLOC_FL_KEEP_SIZE,
            })
            .await
            .unwrap();
            assert_eq!(c.getattr(e.node).await.unwrap().size, 9 * MB);
            let data = match c.fs(seek(0, libc::SEEK_DATA)).await.unwrap() {
                FsResponse::Offset(o) => o,
                other => panic!("{other:?}"),
            };
            assert!(data > 0 && data <= 4 * MB, "first data at {data}");
            let hole = match c.fs(seek(4 * MB, libc::SEEK_HOLE)).await.unwrap() {
                FsResponse::Offset(o) => o,
                other => panic!("{other:?}"),
            };
            assert!(hole > 4 * MB && hole <= 8 * MB, "hole at {hole}");
            assert_eq!(
                c.fs(seek(20 * MB, libc::SEEK_DATA)).await.unwrap_err().0,
                libc::ENXIO
            );
        }
    }
    assert_eq!(
        c.fs(seek(0, libc::SEEK_SET)).await.unwrap_err().0,
        libc::EINVAL
    );
    c.ok(FsRequest::Release { handle: h }).await.unwrap();
}

#[tokio::test]
async fn readdir_pages_large_directories() {
    let a = Agent::start();
    std::fs::create_dir(a.path("big")).unwrap();
    let mut expect = BTreeSet::new();
    for i in 0..1000 {
        let name = format!("entry-{i:04}-{}", "x".repeat(i % 40));
        std::fs::write(a.path("big").join(&name), b"").unwrap();
        expect.insert(name.into_bytes());
    }
    let mut c = a.connect().await;
    let big = c.lookup(ROOT_NODE, b"big").await.unwrap();

    for (plus, max) in [(false, 4096), (false, 300), (true, 4096), (true, 1000)] {
        let all = c.list_all(big.node, plus, max).await;
        let mut names: Vec<Vec<u8>> = all.iter().map(|e| e.name.clone()).collect();
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n, "duplicates (plus={plus}, max={max})");
        let got: BTreeSet<Vec<u8>> = names
            .into_iter()
            .filter(|n| n != b"." && n != b"..")
            .collect();
        assert_eq!(got, expect, "plus={plus}, max={max}");
        assert!(all.iter().any(|e| e.name == b"." && e.entry.is_none()));
        for e in &all {
            if e.name == b"." || e.name == b".." {
                assert_eq!(e.kind, libc::S_IFDIR);
                continue;
            }
            assert_eq!(e.kind, libc::S_IFREG);
            if plus {
                let en = e.entry.expect("plus entries carry an Entry");
                assert_eq!(en.attr.ino, e.ino);
                assert!(en.coherent);
            } else {
                assert!(e.entry.is_none());
            }
        }
        if plus {
            // Each plus entry added one reference: forget them all; the nodes go away.
            let nodes: HashMap<NodeId, u64> =
                all.iter()
                    .filter_map(|e| e.entry)
                    .fold(HashMap::new(), |mut m, en| {
                        *m.entry(en.node).or_default() += 1;
                        m
                    });
            let some = *nodes.keys().next().unwrap();
            c.forget(nodes.into_iter().collect()).await;
            assert_eq!(c.getattr(some).await, Err(libc::ESTALE));
        }
    }

    // Rewind and seek to a cookie on one handle.
    let h = c.opendir(big.node).await;
    let first = c.readdir(h, 0, false, 2000).await.unwrap();
    let again = c.readdir(h, 0, false, 2000).await.unwrap();
    assert_eq!(first, again);
    let mid = first[5].next_offset;
    let from_mid = c.readdir(h, mid, false, 2000).await.unwrap();
    assert_eq!(from_mid[0], first[6]);
    // A buffer too small for one entry.
    assert_eq!(c.readdir(h, 0, false, 10).await, Err(libc::EINVAL));
    // At the end: empty.
    let last = c.list_all(big.node, false, 65536).await;
    let end = c
        .readdir(h, last.last().unwrap().next_offset, false, 4096)
        .await
        .unwrap();
    assert!(end.is_empty());
}

#[tokio::test]
async fn inotify_events_for_outside_changes() {
    let a = Agent::start();
    std::fs::create_dir(a.path("w")).unwrap();
    std::fs::write(a.path("w/existing"), b"1").unwrap();
    let mut c = a.connect().await;
    let w = c.lookup(ROOT_NODE, b"w").await.unwrap();
    assert!(w.coherent);
    let ex = c.lookup(w.node, b"existing").await.unwrap();
    assert!(ex.coherent, "w is watched");
    let within = Duration::from_secs(1);

    // Create.
    std::fs::write(a.path("w/new"), b"n").unwrap();
    assert!(
        c.wait_events(within, |ev| ev.contains(&entry_event(w.node, b"new")))
            .await,
        "create: {:?}",
        c.events
    );
    // Modify a file the host holds: a data event for its node.
    c.events.clear();
    std::fs::write(a.path("w/existing"), b"changed").unwrap();
    assert!(
        c.wait_events(within, |ev| ev.contains(&FsEvent::Node {
            node: ex.node,
            data: true
        }))
        .await,
        "modify: {:?}",
        c.events
    );
    // chmod: an attribute event.
    c.events.clear();
    std::fs::set_permissions(a.path("w/existing"), std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(
        c.wait_events(within, |ev| ev
            .iter()
            .any(|e| matches!(e, FsEvent::Node { node, .. } if *node == ex.node)))
            .await,
        "attrib: {:?}",
        c.events
    );
    // Rename: both names.
    c.events.clear();
    std::fs::rename(a.path("w/new"), a.path("w/renamed")).unwrap();
    assert!(
        c.wait_events(within, |ev| ev.contains(&entry_event(w.node, b"new"))
            && ev.contains(&entry_event(w.node, b"renamed")))
            .await,
        "rename: {:?}",
        c.events
    );
    // Delete.
    c.events.clear();
    std::fs::remove_file(a.path("w/renamed")).unwrap();
    assert!(
        c.wait_events(within, |ev| ev.contains(&entry_event(w.node, b"renamed")))
            .await,
        "delete: {:?}",
        c.events
    );
    // The root is watched too; a second session also gets events.
    let mut c2 = a.connect().await;
    c.events.clear();
    std::fs::write(a.path("top"), b"").unwrap();
    assert!(
        c.wait_events(within, |ev| ev.contains(&entry_event(ROOT_NODE, b"top")))
            .await
    );
    assert!(
        c2.wait_events(within, |ev| ev.contains(&entry_event(ROOT_NODE, b"top")))
            .await
    );
    // A forgotten directory is no longer watched.
    c.forget(vec![(w.node, 1)]).await;
    assert_eq!(c.getattr(w.node).await, Err(libc::ESTALE));
    c.events.clear();
    std::fs::write(a.path("w/after"), b"").unwrap();
    assert!(
        !c.wait_events(Duration::from_millis(300), |ev| ev
            .iter()
            .any(|e| matches!(e, FsEvent::Entry { name, .. } if name == b"after")))
            .await
    );
}

#[tokio::test]
async fn exec_changes_arrive_before_exited() {
    let a = Agent::start();
    let mut c = a.connect().await;
    // The agent itself raised its descriptor limit.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", a.child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let agent_soft: u64 = line.split_whitespace().nth(3).unwrap().parse().unwrap();
    let soft = nofile_soft_limit();
    assert!(agent_soft >= soft, "{line}");
    for round in 0..5 {
        let name = format!("x{round}");
        c.events.clear();
        c.log.clear();
        let id = 1_000_000 + round;
        c.send(&Message::Request {
            id,
            req: Request::Exec(ExecSpec {
                program: Program::Script(format!("touch {name}; umask; ulimit -n").into_bytes()),
                env: vec![],
                cwd: None,
                stdin: false,
            }),
        })
        .await;
        let mut saw_event_at = None;
        let mut out = Vec::new();
        let mut n = 0;
        loop {
            let m = c.recv(T).await.expect("no exit");
            n += 1;
            match m {
                Message::FsEvents(ev) if ev.contains(&entry_event(ROOT_NODE, name.as_bytes())) => {
                    saw_event_at.get_or_insert(n);
                }
                Message::Output { data, .. } => out.extend(data),
                Message::Exited { id: eid, status } if eid == id => {
                    assert_eq!(status, ExitStatus::Code(0));
                    break;
                }
                _ => {}
            }
        }
        assert!(
            saw_event_at.is_some(),
            "round {round}: no event for {name} before Exited"
        );
        let soft = nofile_soft_limit();
        assert_eq!(
            String::from_utf8_lossy(&out),
            format!("0022\n{soft}\n"),
            "commands run with umask 022 and the original descriptor limit"
        );
    }
}

/// Unmounts on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[tokio::test]
async fn pseudo_filesystems_are_opaque() {
    if !is_root() {
        eprintln!("skipping: needs root to mount");
        return;
    }
    let a = Agent::start();
    std::fs::create_dir(a.path("proc")).unwrap();
    std::fs::create_dir(a.path("run")).unwrap();
    let none: Option<&str> = None;
    nix::mount::mount(
        Some("proc"),
        &a.path("proc"),
        Some("proc"),
        nix::mount::MsFlags::empty(),
        none,
    )
    .unwrap();
    let _m1 = Mounted(a.path("proc"));
    nix::mount::mount(
        Some("tmpfs"),
        &a.path("run"),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
    let _m2 = Mounted(a.path("run"));
    std::fs::write(a.path("run/inside"), b"hi").unwrap();

    let mut c = a.connect().await;
    let p = c.lookup(ROOT_NODE, b"proc").await.unwrap();
    assert_eq!(p.attr.mode & libc::S_IFMT, libc::S_IFDIR);
    assert_eq!(p.attr.ino, 1, "proc's root inode: real attributes");
    assert_eq!(c.lookup(p.node, b"self").await, Err(libc::ENOENT));
    assert_eq!(c.lookup(p.node, b"1").await, Err(libc::ENOENT));
    let names: Vec<Vec<u8>> = c
        .list_all(p.node, false, 4096)
        .await
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec![b".".to_vec(), b"..".to_vec()]);
    let plus = c.list_all(p.node, true, 4096).await;
    assert_eq!(plus.len(), 2);
    assert_eq!(c.mkdir(p.node, b"x", 0o755).await, Err(libc::EACCES));
    let r = c
        .fs(FsRequest::Create {
            parent: p.node,
            name: b"x".to_vec(),
            mode: 0o644,
            flags: libc::O_RDWR,
            owner: Owner::default(),
        })
        .await;
    assert_eq!(r.unwrap_err().0, libc::EACCES);
    assert_eq!(c.open(p.node, libc::O_RDONLY).await, Err(libc::EACCES));
    assert_eq!(
        c.ok(FsRequest::Unlink {
            parent: p.node,
            name: b"self".to_vec()
        })
        .await,
        Err(libc::EACCES)
    );
    assert!(c.getattr(p.node).await.is_ok());

    // An ordinary mount (tmpfs) is served normally.
    let r = c.lookup(ROOT_NODE, b"run").await.unwrap();
    let inside = c.lookup(r.node, b"inside").await.unwrap();
    assert_eq!(inside.attr.size, 2);
    let names: Vec<Vec<u8>> = c
        .list_all(r.node, false, 4096)
        .await
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(names.contains(&b"inside".to_vec()));
    c.mkdir(r.node, b"newdir", 0o700).await.unwrap();
    assert!(a.path("run/newdir").is_dir());
}
