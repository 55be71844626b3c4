//! Integration tests of the file service: the real `bandsox-agent` binary in host mode,
//! driven over its unix socket with the raw protocol (frames in, frames out).
//!
//! These tests run as root in CI (chown, trusted xattrs, 04755 on a root-owned file,
//! mounting proc); a test that needs root is skipped otherwise.
#![allow(
    clippy::cast_lossless,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "test code: sizes, offsets and ids are small values the test constructs"
)]
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
        let s = self.stream().await;
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

    async fn lookup(&mut self, parent: &NodeRef, name: &[u8]) -> Result<Entry, i32> {
        match self
            .fs(FsRequest::Lookup {
                parent: parent.clone(),
                name: name.to_vec(),
            })
            .await
        {
            Ok(FsResponse::Entry(e)) => Ok(e),
            Ok(other) => panic!("unexpected {other:?}"),
            Err((errno, _)) => Err(errno),
        }
    }

    async fn getattr(&mut self, node: &NodeRef) -> Result<Attr, i32> {
        let node = node.clone();
        match self.fs(FsRequest::GetAttr { node, handle: None }).await {
            Ok(FsResponse::Attr(a)) => Ok(a),
            Ok(other) => panic!("unexpected {other:?}"),
            Err((errno, _)) => Err(errno),
        }
    }

    async fn setattr(&mut self, node: &NodeRef, set: SetAttrs) -> Result<Attr, i32> {
        match self
            .fs(FsRequest::SetAttr {
                node: node.clone(),
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

    async fn create(&mut self, parent: &NodeRef, name: &[u8], mode: u32) -> (Entry, HandleId) {
        match self
            .fs(FsRequest::Create {
                parent: parent.clone(),
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

    async fn mkdir(&mut self, parent: &NodeRef, name: &[u8], mode: u32) -> Result<Entry, i32> {
        let owner = Owner {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        };
        match self
            .fs(FsRequest::Mkdir {
                parent: parent.clone(),
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

    async fn open(&mut self, node: &NodeRef, flags: i32) -> Result<HandleId, i32> {
        let node = node.clone();
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

    async fn rename(&mut self, req: FsRequest) -> Result<NodeId, i32> {
        match self.fs(req).await {
            Ok(FsResponse::Moved { node, .. }) => Ok(node),
            Ok(other) => panic!("unexpected {other:?}"),
            Err((errno, _)) => Err(errno),
        }
    }

    async fn opendir(&mut self, node: &NodeRef) -> HandleId {
        let node = node.clone();
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
    async fn list_all(&mut self, node: &NodeRef, plus: bool, max_bytes: u32) -> Vec<DirEntry> {
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

/// The `now` of the last `Entry` event for `name` in `parent` (`None`: no such event).
fn entry_now(ev: &[FsEvent], parent: NodeId, name: &[u8]) -> Option<Option<NodeId>> {
    ev.iter().rev().find_map(|e| match e {
        FsEvent::Entry {
            parent: p,
            name: n,
            now,
        } if *p == parent && n == name => Some(*now),
        _ => None,
    })
}

/// Is there an `Entry` event for `name` in `parent`?
fn has_entry(ev: &[FsEvent], parent: NodeId, name: &[u8]) -> bool {
    entry_now(ev, parent, name).is_some()
}

/// The identity `lstat` shows for `path`.
fn lstat_id(path: &Path) -> NodeId {
    let md = std::fs::symlink_metadata(path).unwrap();
    NodeId {
        dev: md.dev(),
        ino: md.ino(),
    }
}

/// Descriptors open in process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn ts(sec: i64, nsec: u32) -> Timespec {
    Timespec { sec, nsec }
}

#[tokio::test]
async fn lookup_getattr_links_forget() {
    let a = Agent::start();
    std::fs::write(a.path("file"), b"hello").unwrap();
    std::fs::create_dir(a.path("dir")).unwrap();
    std::fs::write(a.path("dir/inner"), b"").unwrap();
    std::os::unix::fs::symlink("file", a.path("sym")).unwrap();
    std::fs::hard_link(a.path("file"), a.path("hard")).unwrap();
    let mut c = a.connect().await;

    let root = c.getattr(&ROOT_NODE).await.unwrap();
    assert_eq!(root.mode & libc::S_IFMT, libc::S_IFDIR);
    assert_eq!(root.ino, std::fs::metadata(a.root.path()).unwrap().ino());

    // Identities are what lstat shows; files are not counted, the root is watched.
    let f = c.lookup(&ROOT_NODE, b"file").await.unwrap();
    assert_eq!(f.node.id, lstat_id(&a.path("file")));
    assert_ne!(f.node.id, ROOT_ID);
    assert!(!f.node.fh.0.is_empty(), "ext4 has file handles");
    assert!(f.node.fh.0.len() <= MAX_FILE_HANDLE);
    assert!(!f.counted && !f.watched, "{f:?}");
    assert!(f.coherent, "root is watched");
    assert_eq!(f.attr.mode & libc::S_IFMT, libc::S_IFREG);
    assert_eq!(f.attr.size, 5);
    assert_eq!(f.attr.nlink, 2);
    let md = std::fs::metadata(a.path("file")).unwrap();
    assert_eq!(f.attr.ino, md.ino());
    assert_eq!(f.attr.mtime, ts(md.mtime(), md.mtime_nsec() as u32));
    assert_eq!(c.getattr(&f.node).await.unwrap(), f.attr);

    // A directory is counted and watched.
    let d = c.lookup(&ROOT_NODE, b"dir").await.unwrap();
    assert_eq!(d.attr.mode & libc::S_IFMT, libc::S_IFDIR);
    assert_eq!(d.node.id, lstat_id(&a.path("dir")));
    assert!(d.counted && d.watched, "{d:?}");
    assert!(c.lookup(&d.node, b"inner").await.unwrap().coherent);
    let s = c.lookup(&ROOT_NODE, b"sym").await.unwrap();
    assert_eq!(s.node.id, lstat_id(&a.path("sym")));
    assert!(!s.counted);
    assert_eq!(s.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(s.attr.size, 4);
    match c
        .fs(FsRequest::ReadLink {
            node: s.node.clone(),
        })
        .await
    {
        Ok(FsResponse::Data(t)) => assert_eq!(t, b"file"),
        other => panic!("{other:?}"),
    }
    // readlink of a non-symlink
    let e = c
        .fs(FsRequest::ReadLink {
            node: f.node.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.0, libc::EINVAL);

    // Hard links share one identity; the same name twice too.
    let h = c.lookup(&ROOT_NODE, b"hard").await.unwrap();
    assert_eq!(h.node.id, f.node.id);
    let f2 = c.lookup(&ROOT_NODE, b"file").await.unwrap();
    assert_eq!(f2.node.id, f.node.id);

    // Errors: missing name, bad names, lookup in a non-directory.
    assert_eq!(c.lookup(&ROOT_NODE, b"missing").await, Err(libc::ENOENT));
    for bad in [&b"a/b"[..], b"..", b".", b"", b"x\0y"] {
        assert_eq!(
            c.lookup(&ROOT_NODE, bad).await,
            Err(libc::EINVAL),
            "{bad:?}"
        );
    }
    // A name longer than NAME_MAX is what the kernel calls it.
    assert_eq!(
        c.lookup(&ROOT_NODE, &[b'a'; 256]).await,
        Err(libc::ENAMETOOLONG)
    );
    assert_eq!(
        c.mkdir(&ROOT_NODE, &[b'a'; 256], 0o755).await.map(|_| ()),
        Err(libc::ENAMETOOLONG)
    );
    assert_eq!(c.lookup(&f.node, b"x").await, Err(libc::ENOTDIR));
    let e = c
        .fs(FsRequest::Lookup {
            parent: ROOT_NODE,
            name: b"missing".to_vec(),
        })
        .await
        .unwrap_err();
    assert!(e.1.contains("lookup") && e.1.contains("missing"), "{}", e.1);

    // A handle never yields another file; nodes the agent cannot reopen are ESTALE.
    let bogus_id = NodeId {
        dev: f.node.id.dev,
        ino: 999_999_999,
    };
    let other_dev = NodeId {
        dev: f.node.id.dev ^ 0x5a5a_0000,
        ino: f.node.id.ino + 1_000_000,
    };
    let mut bad_type = f.node.fh.0.clone();
    bad_type[..4].copy_from_slice(&0x7fu32.to_le_bytes());
    for bad in [
        NodeRef {
            id: bogus_id,
            fh: f.node.fh.clone(),
        },
        NodeRef {
            id: bogus_id,
            fh: FileHandle::default(),
        },
        NodeRef {
            id: other_dev,
            fh: f.node.fh.clone(),
        },
        NodeRef {
            id: bogus_id,
            fh: FileHandle(vec![1, 2, 3]),
        },
        NodeRef {
            id: bogus_id,
            fh: FileHandle(vec![0; MAX_FILE_HANDLE + 1]),
        },
        NodeRef {
            id: bogus_id,
            fh: FileHandle(bad_type),
        },
    ] {
        assert_eq!(c.getattr(&bad).await, Err(libc::ESTALE), "{bad:?}");
        assert_eq!(c.lookup(&bad, b"x").await, Err(libc::ESTALE), "{bad:?}");
    }

    // Forgetting an uncounted node changes nothing (file, hard, file: any count).
    c.forget(vec![(f.node.id, 3), (s.node.id, 1)]).await;
    assert_eq!(c.getattr(&f.node).await.unwrap().size, 5);
    match c
        .fs(FsRequest::ReadLink {
            node: s.node.clone(),
        })
        .await
    {
        Ok(FsResponse::Data(t)) => assert_eq!(t, b"file"),
        other => panic!("{other:?}"),
    }
    // A new lookup gets the same identity.
    let f3 = c.lookup(&ROOT_NODE, b"file").await.unwrap();
    assert_eq!(f3.node.id, f.node.id);

    // A counted directory: one reference per counted answer; the watch (and so the
    // coherence of entries in it) lasts until the last one is forgotten.
    let d2 = c.lookup(&ROOT_NODE, b"dir").await.unwrap();
    assert_eq!(d2.node.id, d.node.id);
    assert!(d2.counted && d2.watched);
    c.forget(vec![(d.node.id, 1)]).await;
    let inner = c.lookup(&d.node, b"inner").await.unwrap();
    assert!(inner.coherent, "one reference left: still watched");
    c.forget(vec![(d.node.id, 1)]).await;
    // Forgotten, the directory is still usable by its handle, but no longer watched.
    assert!(c.getattr(&d.node).await.is_ok());
    let inner = c.lookup(&d.node, b"inner").await.unwrap();
    assert!(!inner.coherent, "forgotten: no longer watched");
    // Extra forgets of a forgotten node are ignored.
    c.forget(vec![(d.node.id, 5), (bogus_id, 1)]).await;
    // Looking it up again counts and watches it again.
    let d3 = c.lookup(&ROOT_NODE, b"dir").await.unwrap();
    assert_eq!(d3.node.id, d.node.id);
    assert!(d3.counted && d3.watched);
    assert!(c.lookup(&d.node, b"inner").await.unwrap().coherent);

    // Root is never forgotten.
    c.forget(vec![(ROOT_ID, 100)]).await;
    assert!(c.getattr(&ROOT_NODE).await.is_ok());
    assert!(c.lookup(&ROOT_NODE, b"file").await.unwrap().coherent);
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
    let e = c.lookup(&ROOT_NODE, b"etc").await.unwrap();
    assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(c.lookup(&e.node, b"passwd").await, Err(libc::ENOTDIR));
    assert_eq!(
        c.fs(FsRequest::OpenDir {
            node: e.node.clone()
        })
        .await
        .unwrap_err()
        .0,
        libc::ENOTDIR
    );
    let pw = c.lookup(&ROOT_NODE, b"pw").await.unwrap();
    assert_eq!(c.open(&pw.node, libc::O_RDONLY).await, Err(libc::ELOOP));
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
                let (e, h) = c.create(&ROOT_NODE, name.as_bytes(), 0o644).await;
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
                                    node: e.node.clone(),
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
                    c.getattr(&e.node).await.unwrap().size,
                    reference.len() as u64
                );
                c.ok(FsRequest::Release { handle: h }).await.unwrap();
                c.forget(vec![(e.node.id, 1)]).await;
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
    let (e, h) = c.create(&ROOT_NODE, b"data", 0o600).await;
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
            &e.node,
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
            &e.node,
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
            node: e.node.clone(),
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
    let l = c.lookup(&ROOT_NODE, b"log").await.unwrap();
    let h = c
        .open(
            &l.node,
            libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_EXCL,
        )
        .await
        .unwrap();
    c.write(h, 0, b"def").await;
    c.ok(FsRequest::Release { handle: h }).await.unwrap();
    assert_eq!(std::fs::read(a.path("log")).unwrap(), b"abcdef");
    // O_TRUNC works.
    let h = c
        .open(&l.node, libc::O_WRONLY | libc::O_TRUNC)
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
    let (e2, h2) = c.create(&ROOT_NODE, b"log", 0o600).await;
    assert_eq!(e2.node.id, l.node.id);
    assert_eq!(e2.attr.mode & 0o777, 0o644, "existing file keeps its mode");
    c.ok(FsRequest::Release { handle: h2 }).await.unwrap();
    // Reading a directory handle / a read on a write-only handle.
    let hd = c.opendir(&ROOT_NODE).await;
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
    let d = c.mkdir(&ROOT_NODE, b"d", 0o750).await.unwrap();
    assert_eq!(d.attr.mode, libc::S_IFDIR | 0o750);
    assert!(d.coherent);
    assert_eq!(
        std::fs::metadata(a.path("d")).unwrap().permissions().mode() & 0o7777,
        0o750
    );
    assert_eq!(c.mkdir(&ROOT_NODE, b"d", 0o755).await, Err(libc::EEXIST));
    let sub = c.mkdir(&d.node, b"sub", 0o700).await.unwrap();
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
        parent: d.node.clone(),
        name: b"sub".to_vec(),
    })
    .await
    .unwrap();
    assert!(!a.path("d/sub").exists());

    // Non-UTF-8 names.
    let name = b"caf\xe9".to_vec();
    let (f, h) = c.create(&d.node, &name, 0o640).await;
    c.ok(FsRequest::Release { handle: h }).await.unwrap();
    let p = a.path("d").join(OsStr::from_bytes(&name));
    assert!(p.exists());
    assert_eq!(c.lookup(&d.node, &name).await.unwrap().node.id, f.node.id);
    let list = c.list_all(&d.node, false, 4096).await;
    assert!(list.iter().any(|e| e.name == name));

    // Symlink with a non-UTF-8 target.
    let target = b"/nowhere/\xff\xfe".to_vec();
    let s = match c
        .fs(FsRequest::Symlink {
            parent: d.node.clone(),
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
    match c
        .fs(FsRequest::ReadLink {
            node: s.node.clone(),
        })
        .await
    {
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
            parent: d.node.clone(),
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
    assert_eq!(c.open(&fifo.node, libc::O_RDONLY).await, Err(libc::ENXIO));

    // link: same node, nlink 2.
    let l = match c
        .fs(FsRequest::Link {
            node: f.node.clone(),
            new_parent: ROOT_NODE,
            new_name: b"hard".to_vec(),
        })
        .await
    {
        Ok(FsResponse::Entry(e)) => e,
        other => panic!("{other:?}"),
    };
    assert_eq!(l.node.id, f.node.id);
    assert_eq!(l.node.id, lstat_id(&a.path("hard")));
    assert_eq!(l.attr.nlink, 2);
    // Link of a symlink links the symlink itself.
    match c
        .fs(FsRequest::Link {
            node: s.node.clone(),
            new_parent: ROOT_NODE,
            new_name: b"link2".to_vec(),
        })
        .await
    {
        Ok(FsResponse::Entry(e)) => assert_eq!(e.node.id, s.node.id),
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
        new_parent: d.node.clone(),
        new_name: new_name.to_vec(),
        flags,
    };
    // Rename answers the identity now at the new name: the file that moved.
    let x_id = lstat_id(&a.path("x"));
    let y_id = lstat_id(&a.path("y"));
    assert_eq!(c.rename(rename(b"x", b"x2", 0)).await, Ok(x_id));
    assert_eq!(lstat_id(&a.path("d/x2")), x_id);
    assert_eq!(std::fs::read(a.path("d/x2")).unwrap(), b"x");
    std::fs::write(a.path("x"), b"new x").unwrap();
    assert_eq!(
        c.rename(rename(b"x", b"x2", libc::RENAME_NOREPLACE)).await,
        Err(libc::EEXIST)
    );
    // EXCHANGE: y is now at x2 (and x2's file at y).
    assert_eq!(
        c.rename(rename(b"y", b"x2", libc::RENAME_EXCHANGE)).await,
        Ok(y_id)
    );
    assert_eq!(std::fs::read(a.path("d/x2")).unwrap(), b"y");
    assert_eq!(std::fs::read(a.path("y")).unwrap(), b"x");
    assert_eq!(lstat_id(&a.path("y")), x_id);
    // Replacing an existing name: the moved file's identity, not the replaced one's.
    let new_x_id = lstat_id(&a.path("x"));
    assert_eq!(c.rename(rename(b"x", b"x2", 0)).await, Ok(new_x_id));
    assert_eq!(std::fs::read(a.path("d/x2")).unwrap(), b"new x");
    assert_eq!(c.rename(rename(b"y", b"a/b", 0)).await, Err(libc::EINVAL));
    assert_eq!(c.rename(rename(b"..", b"z", 0)).await, Err(libc::EINVAL));
    assert_eq!(c.rename(rename(b"nope", b"z", 0)).await, Err(libc::ENOENT));

    // statfs.
    match c
        .fs(FsRequest::StatFs {
            node: d.node.clone(),
        })
        .await
    {
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
    let f = c.lookup(&ROOT_NODE, b"f").await.unwrap();
    let s = c.lookup(&ROOT_NODE, b"s").await.unwrap();

    // chmod, including setuid on a root-owned file.
    let at = c
        .setattr(
            &f.node,
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
            &s.node,
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
                &f.node,
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
                &s.node,
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
            &f.node,
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
            &f.node,
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
            &f.node,
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
            &s.node,
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
            &ROOT_NODE,
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
    let f = c.lookup(&ROOT_NODE, b"f").await.unwrap();

    let set = |name: &[u8], value: &[u8], flags: i32| FsRequest::SetXattr {
        node: f.node.clone(),
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
            node: f.node.clone(),
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
        let list = |size: u32| FsRequest::ListXattr {
            node: f.node.clone(),
            size,
        };
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
            node: f.node.clone(),
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
        let s = c.lookup(&ROOT_NODE, b"s").await.unwrap();
        assert_eq!(
            c.ok(FsRequest::SetXattr {
                node: s.node.clone(),
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
                node: s.node.clone(),
                name: b"trusted.x".to_vec(),
                value: b"on-link".to_vec(),
                flags: 0,
            })
            .await
            .unwrap();
            let on_target = c
                .fs(FsRequest::GetXattr {
                    node: f.node.clone(),
                    name: b"trusted.x".to_vec(),
                    size: 100,
                })
                .await;
            assert_eq!(on_target.unwrap_err().0, libc::ENODATA);
            assert_eq!(
                c.fs(FsRequest::GetXattr {
                    node: s.node.clone(),
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
    let (e, h) = c.create(&ROOT_NODE, b"sparse", 0o644).await;
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
            assert_eq!(c.getattr(&e.node).await.unwrap().size, 9 * MB);
            // KEEP_SIZE beyond the end.
            c.ok(FsRequest::Fallocate {
                handle: h,
                offset: 9 * MB,
                length: MB,
                mode: libc::FALLOC_FL_KEEP_SIZE,
            })
            .await
            .unwrap();
            assert_eq!(c.getattr(&e.node).await.unwrap().size, 9 * MB);
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

/// Every fallocate mode the agent is asked for reaches fallocate(2) as it is, flags
/// and all (none filtered, none added): each answer (ok or the kernel's own errno) and
/// the file afterwards (size, content) equal the same call made directly on a twin file
/// of the same filesystem. The host's FUSE client forwards only some of these modes
/// (docs/tree.md "fs/"); the agent must not be the one that refuses the others.
#[tokio::test]
async fn every_fallocate_mode_answers_as_the_filesystem_does() {
    use libc::{
        FALLOC_FL_COLLAPSE_RANGE as COLLAPSE, FALLOC_FL_INSERT_RANGE as INSERT,
        FALLOC_FL_KEEP_SIZE as KEEP, FALLOC_FL_PUNCH_HOLE as PUNCH,
        FALLOC_FL_UNSHARE_RANGE as UNSHARE, FALLOC_FL_ZERO_RANGE as ZERO,
    };
    const SIZE: usize = 65536;
    let pattern: Vec<u8> = (0..SIZE).map(|i| (i * 7 + i / 4096 + 1) as u8).collect();
    let cases: &[(&str, i32, u64, u64)] = &[
        ("plain-extend", 0, 61440, 16384),
        ("keep_size", KEEP, 61440, 16384),
        ("punch_hole", PUNCH | KEEP, 4096, 8192),
        ("punch_hole-unaligned", PUNCH | KEEP, 100, 5000),
        ("punch_hole-without-keep_size", PUNCH, 4096, 8192),
        ("zero_range", ZERO, 8192, 8192),
        ("zero_range-extend", ZERO, 61440, 16384),
        ("zero_range-keep_size", ZERO | KEEP, 61440, 16384),
        ("collapse_range", COLLAPSE, 8192, 8192),
        ("collapse_range-unaligned", COLLAPSE, 100, 4096),
        ("insert_range", INSERT, 8192, 8192),
        ("insert_range-past-end", INSERT, 65536, 4096),
        ("unshare_range", UNSHARE, 0, 4096),
        ("unknown-flag", 0x8000, 0, 4096),
        ("sign-bit", i32::MIN, 0, 4096),
        ("zero-length", 0, 0, 0),
    ];
    let a = Agent::start();
    let mut c = a.connect().await;
    let mut refused = Vec::new();
    for (name, mode, offset, length) in cases {
        // Directly: fallocate(2) on a twin file.
        let twin = a.path(&format!("direct-{name}"));
        std::fs::write(&twin, &pattern).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&twin)
            .unwrap();
        // SAFETY: fallocate on a descriptor this test owns; any mode is safe to try.
        let rc = unsafe {
            libc::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                *mode,
                *offset as i64,
                *length as i64,
            )
        };
        let direct = if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap())
        };
        drop(f);
        // Through the agent.
        let file = format!("agent-{name}");
        let (_, h) = c.create(&ROOT_NODE, file.as_bytes(), 0o644).await;
        assert_eq!(c.write(h, 0, &pattern).await as usize, SIZE);
        let through = c
            .ok(FsRequest::Fallocate {
                handle: h,
                offset: *offset,
                length: *length,
                mode: *mode,
            })
            .await;
        c.ok(FsRequest::Release { handle: h }).await.unwrap();
        assert_eq!(through, direct, "{name}: the answer");
        let (got, want) = (
            std::fs::read(a.path(&file)).unwrap(),
            std::fs::read(&twin).unwrap(),
        );
        assert_eq!(got.len(), want.len(), "{name}: the size");
        assert!(got == want, "{name}: the content");
        if let Err(e) = direct {
            refused.push(format!("{name}: {e}"));
        }
    }
    eprintln!("refused by this filesystem (as directly): {refused:?}");
    // Whatever the test filesystem supports, the refusals of bad arguments are the
    // kernel's: they always come back as such.
    assert!(refused.iter().any(|r| r.starts_with("zero-length: ")));
    assert!(refused.iter().any(|r| r.starts_with("unknown-flag: ")));
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
    // A few directories (counted when looked up) and a symlink among them.
    for i in 0..5 {
        let name = format!("sub-{i}");
        std::fs::create_dir(a.path("big").join(&name)).unwrap();
        std::fs::write(a.path("big").join(&name).join("in"), b"").unwrap();
        expect.insert(name.into_bytes());
    }
    std::os::unix::fs::symlink("entry-0000-", a.path("big/link")).unwrap();
    expect.insert(b"link".to_vec());
    let mut c = a.connect().await;
    let big = c.lookup(&ROOT_NODE, b"big").await.unwrap();

    for (plus, max) in [(false, 4096), (false, 300), (true, 4096), (true, 1000)] {
        let all = c.list_all(&big.node, plus, max).await;
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
            let path = a.path("big").join(OsStr::from_bytes(&e.name));
            if e.name == b"." || e.name == b".." {
                assert_eq!(e.kind, libc::S_IFDIR);
                assert!(e.entry.is_none());
                // The numbers getdents gave (the real ones, also for the root).
                assert_eq!(e.node, lstat_id(&path), "{:?}", e.name);
                continue;
            }
            // Every entry carries the identity lstat shows.
            let md = std::fs::symlink_metadata(&path).unwrap();
            assert_eq!(e.node, lstat_id(&path), "{:?}", e.name);
            assert_eq!(e.kind, md.mode() & libc::S_IFMT, "{:?}", e.name);
            if plus {
                let en = e.entry.as_ref().expect("plus entries carry an Entry");
                assert_eq!(en.node.id, e.node);
                assert_eq!(en.attr.ino, e.node.ino);
                assert!(en.coherent);
                let dir = e.kind == libc::S_IFDIR;
                assert_eq!(en.counted, dir, "{:?}", e.name);
                assert_eq!(en.watched, dir, "{:?}", e.name);
            } else {
                assert!(e.entry.is_none());
            }
        }
        if plus {
            // Counted (directory) entries added one reference each: forget them all,
            // and the directories are no longer watched. Forgetting the uncounted ones
            // too changes nothing: they stay usable.
            let nodes: HashMap<NodeId, u64> =
                all.iter()
                    .filter_map(|e| e.entry.as_ref())
                    .fold(HashMap::new(), |mut m, en| {
                        *m.entry(en.node.id).or_default() += 1;
                        m
                    });
            assert_eq!(nodes.len(), expect.len());
            c.forget(nodes.into_iter().collect()).await;
            for e in all.iter().filter_map(|e| e.entry.as_ref()) {
                assert_eq!(c.getattr(&e.node).await.unwrap().ino, e.node.id.ino);
                if e.watched {
                    let inner = c.lookup(&e.node, b"in").await.unwrap();
                    assert!(!inner.coherent, "forgotten directory still watched");
                }
            }
        }
    }

    // Rewind and seek to a cookie on one handle.
    let h = c.opendir(&big.node).await;
    let first = c.readdir(h, 0, false, 2000).await.unwrap();
    let again = c.readdir(h, 0, false, 2000).await.unwrap();
    assert_eq!(first, again);
    let mid = first[5].next_offset;
    let from_mid = c.readdir(h, mid, false, 2000).await.unwrap();
    assert_eq!(from_mid[0], first[6]);
    // A buffer too small for one entry.
    assert_eq!(c.readdir(h, 0, false, 10).await, Err(libc::EINVAL));
    // At the end: empty.
    let last = c.list_all(&big.node, false, 65536).await;
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
    let w = c.lookup(&ROOT_NODE, b"w").await.unwrap();
    assert!(w.coherent);
    assert!(w.counted && w.watched);
    let wid = w.node.id;
    let ex = c.lookup(&w.node, b"existing").await.unwrap();
    assert!(ex.coherent, "w is watched");
    let within = Duration::from_secs(1);

    // Create: `now` is the new file's identity.
    std::fs::write(a.path("w/new"), b"n").unwrap();
    let new_id = lstat_id(&a.path("w/new"));
    assert!(
        c.wait_events(within, |ev| has_entry(ev, wid, b"new")).await,
        "create: {:?}",
        c.events
    );
    assert_eq!(entry_now(&c.events, wid, b"new"), Some(Some(new_id)));
    // Modify a file the host holds: a data event for its node.
    c.events.clear();
    std::fs::write(a.path("w/existing"), b"changed").unwrap();
    assert!(
        c.wait_events(within, |ev| ev.iter().any(|e| matches!(
            e,
            FsEvent::Node { node, data: true, attr: Some(a) } if *node == ex.node.id && a.size == 7
        )))
        .await,
        "modify: {:?}",
        c.events
    );
    // chmod: an attribute event.
    c.events.clear();
    std::fs::set_permissions(a.path("w/existing"), std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(
        c.wait_events(within, |ev| ev.iter().any(
            |e| matches!(e, FsEvent::Node { node, .. } if *node == ex.node.id)
        ))
        .await,
        "attrib: {:?}",
        c.events
    );
    // Rename: both names; the old one names nothing, the new one the same inode.
    c.events.clear();
    std::fs::rename(a.path("w/new"), a.path("w/renamed")).unwrap();
    assert!(
        c.wait_events(within, |ev| has_entry(ev, wid, b"new")
            && has_entry(ev, wid, b"renamed"))
            .await,
        "rename: {:?}",
        c.events
    );
    assert_eq!(entry_now(&c.events, wid, b"new"), Some(None));
    assert_eq!(entry_now(&c.events, wid, b"renamed"), Some(Some(new_id)));
    // Delete.
    c.events.clear();
    std::fs::remove_file(a.path("w/renamed")).unwrap();
    assert!(
        c.wait_events(within, |ev| has_entry(ev, wid, b"renamed"))
            .await,
        "delete: {:?}",
        c.events
    );
    assert_eq!(entry_now(&c.events, wid, b"renamed"), Some(None));
    // The root is watched too (events name it ROOT_ID); a second session also gets events.
    let mut c2 = a.connect().await;
    c.events.clear();
    std::fs::write(a.path("top"), b"").unwrap();
    assert!(
        c.wait_events(within, |ev| has_entry(ev, ROOT_ID, b"top"))
            .await
    );
    assert!(
        c2.wait_events(within, |ev| has_entry(ev, ROOT_ID, b"top"))
            .await
    );

    // A watched directory removed from outside: the agent says it stopped watching it.
    std::fs::create_dir(a.path("w/gone")).unwrap();
    let gone = c.lookup(&w.node, b"gone").await.unwrap();
    assert!(gone.counted && gone.watched);
    c.events.clear();
    std::fs::remove_dir(a.path("w/gone")).unwrap();
    assert!(
        c.wait_events(within, |ev| has_entry(ev, wid, b"gone"))
            .await,
        "rmdir: {:?}",
        c.events
    );
    assert_eq!(entry_now(&c.events, wid, b"gone"), Some(None));
    // (No `Unwatched` is asserted: the kernel drops the watch of a removed directory
    // only once its last reference goes, and the agent holds one until it is forgotten.)
    for e in &c.events {
        if let FsEvent::Unwatched { node } = e {
            assert_eq!(*node, gone.node.id, "{:?}", c.events);
        }
    }
    // Forgetting it afterwards is fine.
    c.forget(vec![(gone.node.id, 1)]).await;
    assert_eq!(c.lookup(&w.node, b"gone").await, Err(libc::ENOENT));

    // A forgotten directory is no longer watched: no more events for it (and no
    // `Unwatched` either: the host asked for it). Its node still works.
    c.forget(vec![(wid, 1)]).await;
    assert!(c.getattr(&w.node).await.is_ok());
    c.events.clear();
    std::fs::write(a.path("w/after"), b"").unwrap();
    std::fs::write(a.path("w/existing"), b"changed again").unwrap();
    assert!(
        !c.wait_events(Duration::from_millis(300), |ev| ev.iter().any(
            |e| match e {
                FsEvent::Entry { parent, .. } => *parent == wid,
                FsEvent::Node { node, .. } => *node == ex.node.id,
                FsEvent::Unwatched { node } => *node == wid,
                FsEvent::Overflow => false,
            }
        ))
        .await,
        "{:?}",
        c.events
    );
    assert!(!c.lookup(&w.node, b"after").await.unwrap().coherent);
    // The root is still watched.
    std::fs::write(a.path("top2"), b"").unwrap();
    assert!(
        c.wait_events(within, |ev| has_entry(ev, ROOT_ID, b"top2"))
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
                Message::FsEvents(ev) if has_entry(&ev, ROOT_ID, name.as_bytes()) => {
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
    let p = c.lookup(&ROOT_NODE, b"proc").await.unwrap();
    assert_eq!(p.attr.mode & libc::S_IFMT, libc::S_IFDIR);
    assert_eq!(p.attr.ino, 1, "proc's root inode: real attributes");
    assert_eq!(c.lookup(&p.node, b"self").await, Err(libc::ENOENT));
    assert_eq!(c.lookup(&p.node, b"1").await, Err(libc::ENOENT));
    let names: Vec<Vec<u8>> = c
        .list_all(&p.node, false, 4096)
        .await
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec![b".".to_vec(), b"..".to_vec()]);
    let plus = c.list_all(&p.node, true, 4096).await;
    assert_eq!(plus.len(), 2);
    assert_eq!(c.mkdir(&p.node, b"x", 0o755).await, Err(libc::EACCES));
    let r = c
        .fs(FsRequest::Create {
            parent: p.node.clone(),
            name: b"x".to_vec(),
            mode: 0o644,
            flags: libc::O_RDWR,
            owner: Owner::default(),
        })
        .await;
    assert_eq!(r.unwrap_err().0, libc::EACCES);
    assert_eq!(c.open(&p.node, libc::O_RDONLY).await, Err(libc::EACCES));
    assert_eq!(
        c.ok(FsRequest::Unlink {
            parent: p.node.clone(),
            name: b"self".to_vec()
        })
        .await,
        Err(libc::EACCES)
    );
    assert!(c.getattr(&p.node).await.is_ok());

    // Mount points are listed with the mounted root's identity (what lstat shows), not
    // the covered directory's (what getdents gives).
    for plus in [false, true] {
        let root_list = c.list_all(&ROOT_NODE, plus, 4096).await;
        for name in [&b"proc"[..], b"run"] {
            let e = root_list.iter().find(|e| e.name == name).unwrap();
            let id = lstat_id(&a.path(std::str::from_utf8(name).unwrap()));
            assert_eq!(e.node, id, "{name:?} plus={plus}");
            if let Some(en) = &e.entry {
                assert_eq!(en.node.id, id);
            }
        }
    }
    assert_eq!(p.node.id, lstat_id(&a.path("proc")));

    // An ordinary mount (tmpfs) is served normally.
    let r = c.lookup(&ROOT_NODE, b"run").await.unwrap();
    assert_eq!(r.node.id, lstat_id(&a.path("run")));
    assert_ne!(r.node.id.dev, lstat_id(a.root.path()).dev);
    let inside = c.lookup(&r.node, b"inside").await.unwrap();
    assert_eq!(inside.attr.size, 2);
    let names: Vec<Vec<u8>> = c
        .list_all(&r.node, false, 4096)
        .await
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(names.contains(&b"inside".to_vec()));
    c.mkdir(&r.node, b"newdir", 0o700).await.unwrap();
    assert!(a.path("run/newdir").is_dir());
}

#[tokio::test]
async fn identities_are_stable_across_rename_and_links() {
    let a = Agent::start();
    std::fs::write(a.path("f"), b"data").unwrap();
    std::fs::create_dir(a.path("d")).unwrap();
    std::fs::create_dir(a.path("e")).unwrap();
    let mut c = a.connect().await;
    let f = c.lookup(&ROOT_NODE, b"f").await.unwrap();
    let id = f.node.id;
    assert_eq!(id, lstat_id(&a.path("f")));
    let d = c.lookup(&ROOT_NODE, b"d").await.unwrap();
    let e = c.lookup(&ROOT_NODE, b"e").await.unwrap();
    let rename =
        |parent: &NodeRef, name: &[u8], new_parent: &NodeRef, new_name: &[u8]| FsRequest::Rename {
            parent: parent.clone(),
            name: name.to_vec(),
            new_parent: new_parent.clone(),
            new_name: new_name.to_vec(),
            flags: 0,
        };

    // Renamed by the agent: Moved names the file, its new name has the same identity
    // and the old NodeRef keeps working.
    assert_eq!(
        c.rename(rename(&ROOT_NODE, b"f", &d.node, b"g")).await,
        Ok(id)
    );
    assert_eq!(c.lookup(&ROOT_NODE, b"f").await, Err(libc::ENOENT));
    let g = c.lookup(&d.node, b"g").await.unwrap();
    assert_eq!(g.node.id, id);
    assert_eq!(c.getattr(&f.node).await.unwrap().ino, id.ino);

    // Renamed from outside: same identity under the new name.
    std::fs::rename(a.path("d/g"), a.path("e/h")).unwrap();
    let h = c.lookup(&e.node, b"h").await.unwrap();
    assert_eq!(h.node.id, id);
    assert_eq!(lstat_id(&a.path("e/h")), id);

    // Hard links, made outside and by the agent, share it.
    std::fs::hard_link(a.path("e/h"), a.path("outside-link")).unwrap();
    let l1 = c.lookup(&ROOT_NODE, b"outside-link").await.unwrap();
    assert_eq!(l1.node.id, id);
    assert_eq!(l1.attr.nlink, 2);
    let l2 = match c
        .fs(FsRequest::Link {
            node: f.node.clone(),
            new_parent: d.node.clone(),
            new_name: b"agent-link".to_vec(),
        })
        .await
    {
        Ok(FsResponse::Entry(e)) => e,
        other => panic!("{other:?}"),
    };
    assert_eq!(l2.node.id, id);
    assert_eq!(l2.attr.nlink, 3);
    assert_eq!(lstat_id(&a.path("d/agent-link")), id);
    // Removing names leaves the identity of the others alone.
    c.ok(FsRequest::Unlink {
        parent: e.node.clone(),
        name: b"h".to_vec(),
    })
    .await
    .unwrap();
    std::fs::remove_file(a.path("outside-link")).unwrap();
    let last = c.lookup(&d.node, b"agent-link").await.unwrap();
    assert_eq!(last.node.id, id);
    assert_eq!(last.attr.nlink, 1);
    // The data is reachable through the very first NodeRef.
    let fh = c.open(&f.node, libc::O_RDONLY).await.unwrap();
    assert_eq!(c.read(fh, 0, 100).await, b"data");
    c.ok(FsRequest::Release { handle: fh }).await.unwrap();

    // A watched directory moves with its watch: events keep naming its identity.
    let eid = e.node.id;
    assert!(e.watched);
    assert_eq!(
        c.rename(rename(&ROOT_NODE, b"e", &d.node, b"e2")).await,
        Ok(eid)
    );
    assert_eq!(lstat_id(&a.path("d/e2")), eid);
    assert_eq!(c.lookup(&d.node, b"e2").await.unwrap().node.id, eid);
    c.events.clear();
    std::fs::write(a.path("d/e2/inside"), b"").unwrap();
    assert!(
        c.wait_events(Duration::from_secs(1), |ev| has_entry(ev, eid, b"inside"))
            .await,
        "{:?}",
        c.events
    );
    assert_eq!(
        entry_now(&c.events, eid, b"inside"),
        Some(Some(lstat_id(&a.path("d/e2/inside"))))
    );
}

/// The agent's cache of open uncounted nodes (`CACHE_SIZE` in agent/src/server/fs/nodes.rs).
const AGENT_CACHE_SIZE: usize = 4096;

#[tokio::test]
async fn nodes_reopen_from_handles_beyond_the_cache() {
    if !is_root() {
        eprintln!("skipping: open_by_handle_at needs CAP_DAC_READ_SEARCH");
        return;
    }
    let a = Agent::start();
    let n = 3 * AGENT_CACHE_SIZE;
    std::fs::create_dir(a.path("many")).unwrap();
    for i in 0..n {
        std::fs::write(a.path(&format!("many/f{i}")), i.to_string()).unwrap();
    }
    std::fs::write(a.path("doomed"), b"soon gone").unwrap();
    let mut c = a.connect().await;
    let pid = a.child.id();
    let many = c.lookup(&ROOT_NODE, b"many").await.unwrap();
    let doomed = c.lookup(&ROOT_NODE, b"doomed").await.unwrap();
    assert!(!doomed.counted);
    // Deleted while the agent still has it open (in its cache); the lookups below
    // evict it.
    std::fs::remove_file(a.path("doomed")).unwrap();
    let base = open_fds(pid);

    let bound = base + AGENT_CACHE_SIZE + 32;
    let mut entries = Vec::with_capacity(n);
    for i in 0..n {
        let e = c
            .lookup(&many.node, format!("f{i}").as_bytes())
            .await
            .unwrap();
        assert!(!e.counted, "{e:?}");
        assert!(!e.node.fh.0.is_empty());
        entries.push(e);
        if i % 1024 == 0 {
            let fds = open_fds(pid);
            assert!(fds <= bound, "{fds} descriptors after {i} lookups");
        }
    }
    let fds = open_fds(pid);
    assert!(
        fds <= bound && fds < n / 2,
        "{fds} descriptors after {n} lookups (base {base})"
    );
    // Forgetting uncounted nodes does nothing; they stay usable.
    c.forget(entries.iter().map(|e| (e.node.id, 1)).collect())
        .await;

    // The first nodes were evicted long ago: reopened from their handles, with their
    // identity and contents.
    for (i, e) in entries.iter().enumerate().take(200) {
        let at = c.getattr(&e.node).await.unwrap();
        assert_eq!(at.ino, e.node.id.ino);
        assert_eq!(at.size, i.to_string().len() as u64);
        assert_eq!(lstat_id(&a.path(&format!("many/f{i}"))), e.node.id);
    }
    let h = c.open(&entries[7].node, libc::O_RDONLY).await.unwrap();
    assert_eq!(c.read(h, 0, 100).await, b"7");
    c.ok(FsRequest::Release { handle: h }).await.unwrap();
    let fds = open_fds(pid);
    assert!(fds <= bound, "{fds} descriptors after reopening");

    // The deleted file was evicted: the agent no longer keeps it open...
    let deleted_open: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .filter(|p| p.as_os_str().as_bytes().ends_with(b" (deleted)"))
        .collect();
    assert!(deleted_open.is_empty(), "{deleted_open:?}");
    // ...and an inode whose last name and descriptor are gone cannot be reopened.
    assert_eq!(c.getattr(&doomed.node).await, Err(libc::ESTALE));
    assert_eq!(
        c.open(&doomed.node, libc::O_RDONLY).await,
        Err(libc::ESTALE)
    );
    // Even once a new file exists (ext4 may reuse the inode number: the handle's
    // generation tells them apart).
    std::fs::write(a.path("reborn"), b"new").unwrap();
    assert_eq!(c.getattr(&doomed.node).await, Err(libc::ESTALE));
    if lstat_id(&a.path("reborn")) == doomed.node.id {
        eprintln!("note: the inode number was reused");
    }
}

#[tokio::test]
async fn plain_readdir_nodes_are_lstat_identities() {
    let a = Agent::start();
    std::fs::create_dir(a.path("d")).unwrap();
    std::fs::write(a.path("d/file"), b"x").unwrap();
    std::fs::hard_link(a.path("d/file"), a.path("d/hard")).unwrap();
    std::fs::create_dir(a.path("d/sub")).unwrap();
    std::os::unix::fs::symlink("file", a.path("d/sym")).unwrap();
    std::os::unix::fs::symlink("/nowhere", a.path("d/dangling")).unwrap();
    nix::unistd::mkfifo(
        &a.path("d/fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    std::fs::write(a.path("top"), b"").unwrap();
    let mut c = a.connect().await;
    let d = c.lookup(&ROOT_NODE, b"d").await.unwrap();

    for (dir, node) in [
        (a.path("d"), &d.node),
        (a.root.path().to_path_buf(), &ROOT_NODE),
    ] {
        let all = c.list_all(node, false, 4096).await;
        let names: BTreeSet<Vec<u8>> = all.iter().map(|e| e.name.clone()).collect();
        let on_disk: BTreeSet<Vec<u8>> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().as_bytes().to_vec())
            .chain([b".".to_vec(), b"..".to_vec()])
            .collect();
        assert_eq!(names, on_disk);
        for e in &all {
            let path = dir.join(OsStr::from_bytes(&e.name));
            let md = std::fs::symlink_metadata(&path).unwrap();
            assert!(e.entry.is_none());
            assert_eq!(e.node, lstat_id(&path), "{:?} in {}", e.name, dir.display());
            assert_eq!(e.kind, md.mode() & libc::S_IFMT, "{:?}", e.name);
        }
        let by_name = |n: &[u8]| all.iter().find(|e| e.name == n).map(|e| e.node);
        if node == &d.node {
            assert_eq!(by_name(b"file"), by_name(b"hard"));
            assert_eq!(by_name(b"."), Some(d.node.id));
        }
    }
    // What a lookup answers agrees with the listing.
    let list = c.list_all(&d.node, false, 4096).await;
    for e in list.iter().filter(|e| e.name != b"." && e.name != b"..") {
        let en = c.lookup(&d.node, &e.name).await.unwrap();
        assert_eq!(en.node.id, e.node, "{:?}", e.name);
    }
}
