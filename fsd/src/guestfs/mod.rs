//! `fs/`: each VM's guest filesystem, proxied to the agent's file service.
//!
//! This is the filesystem logic; `fuse::guest` only translates kernel requests into these
//! calls. Invariants:
//! - Every call that talks to a guest has a deadline ([`FS_DEADLINE`], longer for
//!   `fsync`) and fails with an errno; a VM that is not running fails at once with
//!   EHOSTDOWN, a VM whose agent connection dies fails pending calls with EHOSTDOWN.
//! - Numbers are per VM incarnation (see [`inodes`]): after the VM reboots, inodes and
//!   handles of the earlier boot answer ESTALE. The VM's `fs/` directory itself gets a
//!   new control-tree inode per boot, so the kernel drops the old boot's cached subtree.
//! - Nothing the guest answers is trusted: data longer than requested, counts larger
//!   than sent, invalid names or file types, and out-of-range errnos become EIO (or are
//!   skipped, for directory entries), never a host allocation or a path.
//! - Cache policy: an entry whose parent the agent watches is cached for
//!   [`TTL_COHERENT`] and its pages are kept across opens, because change events
//!   invalidate them ([`events`]); other entries live [`TTL_UNWATCHED`] and their pages
//!   are dropped at every open.
pub mod bench;
pub mod events;
pub mod inodes;
pub mod interrupt;

use std::sync::Arc;
use std::time::Duration;

use bandsox_agent::client::{AgentClient, ClientError};
use bandsox_agent::proto::fs::{
    valid_name, Attr, DirEntry, Entry, FsRequest, FsResponse, HandleId, NodeId, Owner, SetAttrs,
    StatFs, MAX_CHUNK, MAX_XATTR, ROOT_NODE,
};
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::manager::vm::Vm;
use crate::manager::Manager;
pub use events::Invalidate;
pub use inodes::FS_INO_BASE;
use inodes::{Handles, Incarnation, Inodes, OpenHandle};

/// Deadline of one file request to the guest.
pub const FS_DEADLINE: Duration = Duration::from_secs(20);
/// Deadline of `fsync` (may flush a lot of guest page cache).
pub const FSYNC_DEADLINE: Duration = Duration::from_secs(120);
/// Entry and attribute lifetime when the agent announces changes.
pub const TTL_COHERENT: Duration = Duration::from_secs(10);
/// Entry and attribute lifetime when it does not (watch limit reached).
pub const TTL_UNWATCHED: Duration = Duration::from_millis(200);
/// Size of the kernel's readdir buffer we fill (one page).
pub const READDIR_BYTES: u32 = 4096;
/// `d_ino` of entries in plain (not plus) listings, which are not looked up.
const PLAIN_DIRENT_INO: u64 = FS_INO_BASE - 1;
/// Longest symlink target we accept from a guest.
const MAX_LINK: usize = 4096;

/// What a kernel request addresses inside `fs/`.
#[derive(Debug, Clone)]
pub enum Target {
    /// A VM's `fs/` directory: control-tree inode `ino`, of boot `generation`.
    Root {
        vm_id: String,
        generation: u64,
        ino: u64,
    },
    /// A guest inode by host number (≥ [`FS_INO_BASE`]).
    Node(u64),
}

/// A looked-up entry as the kernel needs it.
#[derive(Debug, Clone)]
pub struct Looked {
    pub ino: u64,
    pub attr: Attr,
    pub ttl: Duration,
    pub generation: u64,
}

/// One directory entry for a readdir reply.
#[derive(Debug, Clone)]
pub struct DirItem {
    pub name: Vec<u8>,
    pub next_offset: u64,
    /// `S_IFMT` bits (0 = unknown).
    pub kind: u32,
    /// Host inode number to report (for plain listings a best effort).
    pub ino: u64,
    /// `plus` listings: the looked-up entry (`None` for `.` and `..`).
    pub looked: Option<Looked>,
}

/// An open file as the kernel needs it.
#[derive(Debug, Clone, Copy)]
pub struct Opened {
    pub fh: u64,
    /// The pages cached for this file stay valid (`FOPEN_KEEP_CACHE`).
    pub keep_cache: bool,
}

/// A resolved target: the VM incarnation, its live agent and the agent node.
struct Resolved {
    inc: Incarnation,
    client: AgentClient,
    node: NodeId,
    coherent: bool,
}

pub struct GuestFs {
    mgr: Arc<Manager>,
    inodes: Arc<Mutex<Inodes>>,
    handles: Mutex<Handles>,
    events: events::Pumps,
    rt: tokio::runtime::Handle,
}

/// Check a guest errno and keep it only when it is one a host program can understand.
fn guest_error(e: bandsox_agent::client::ClientError) -> Error {
    let err = Error::from(e);
    if err.errno <= 0 || err.errno > 4095 {
        return Error::io(format!("guest: {}", err.message));
    }
    err
}

fn protocol(what: &str, got: &FsResponse) -> Error {
    Error::io(format!(
        "the guest agent answered {what} with {}",
        response_name(got)
    ))
}

fn response_name(r: &FsResponse) -> &'static str {
    match r {
        FsResponse::Ok => "Ok",
        FsResponse::Entry(_) => "Entry",
        FsResponse::Attr(_) => "Attr",
        FsResponse::Data(_) => "Data",
        FsResponse::Written(_) => "Written",
        FsResponse::Opened { .. } => "Opened",
        FsResponse::Created { .. } => "Created",
        FsResponse::DirEntries(_) => "DirEntries",
        FsResponse::StatFs(_) => "StatFs",
        FsResponse::XattrSize(_) => "XattrSize",
        FsResponse::Offset(_) => "Offset",
    }
}

/// File types the kernel can represent.
fn valid_attr(a: &Attr) -> bool {
    matches!(
        a.mode & libc::S_IFMT,
        libc::S_IFREG
            | libc::S_IFDIR
            | libc::S_IFLNK
            | libc::S_IFIFO
            | libc::S_IFSOCK
            | libc::S_IFCHR
            | libc::S_IFBLK
    )
}

fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > bandsox_agent::proto::fs::MAX_NAME {
        // What the kernel answers for a component longer than NAME_MAX.
        Err(Error::new(
            libc::ENAMETOOLONG,
            format!("name of {} bytes (at most 255)", name.len()),
        ))
    } else if valid_name(name) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid name {:?}",
            String::from_utf8_lossy(name)
        )))
    }
}

fn ttl(coherent: bool) -> Duration {
    if coherent {
        TTL_COHERENT
    } else {
        TTL_UNWATCHED
    }
}

impl GuestFs {
    pub fn new(mgr: Arc<Manager>, rt: tokio::runtime::Handle) -> Arc<Self> {
        let inodes = Arc::new(Mutex::new(Inodes::new()));
        Arc::new(GuestFs {
            mgr,
            events: events::Pumps::new(inodes.clone()),
            inodes,
            handles: Mutex::new(Handles::default()),
            rt,
        })
    }

    /// Where change events turn into kernel cache invalidations (set once mounted).
    pub fn set_invalidator(&self, inv: Arc<dyn Invalidate>) {
        self.events.set_invalidator(inv);
    }

    /// Number of guest inodes the kernel holds (diagnostics, tests).
    pub fn inode_count(&self) -> usize {
        self.inodes.lock().len()
    }

    /// The incarnation, node and VM a target names.
    fn locate(&self, t: &Target) -> Result<(Incarnation, NodeId, bool, Arc<Vm>)> {
        let (inc, node, coherent) = match t {
            Target::Root {
                vm_id,
                generation,
                ino,
            } => {
                let inc = Incarnation {
                    vm_id: Arc::from(vm_id.as_str()),
                    generation: *generation,
                };
                self.inodes.lock().set_root(&inc, ROOT_NODE, *ino);
                (inc, ROOT_NODE, true)
            }
            Target::Node(ino) => {
                let i = self.inodes.lock();
                let info = i.get(*ino).ok_or_else(|| {
                    Error::new(libc::ESTALE, "this guest file is no longer known")
                })?;
                (info.inc.clone(), info.node, info.coherent)
            }
        };
        let vm = self
            .mgr
            .get_by_id(&inc.vm_id)
            .ok_or_else(|| Error::new(libc::ESTALE, "the VM was deleted"))?;
        Ok((inc, node, coherent, vm))
    }

    /// The live connection of `vm` for incarnation `inc`; with `reconnect`, a running VM
    /// whose connection died is reconnected first (the request is slower, not failed).
    async fn client_for(&self, vm: &Vm, inc: &Incarnation, reconnect: bool) -> Result<AgentClient> {
        let (client, generation) = match vm.fs_agent() {
            Err(e) if reconnect && e.errno == libc::EHOSTDOWN => {
                crate::interrupt::interruptible(interrupt::caller(), vm.live_agent()).await?;
                vm.fs_agent()?
            }
            r => r?,
        };
        if generation != inc.generation {
            return Err(Error::new(
                libc::ESTALE,
                format!("VM {} restarted since this file was looked up", vm.name),
            ));
        }
        self.events.ensure(inc, &client, &self.rt);
        Ok(client)
    }

    /// Resolve without waiting for anything (for paths that must not block).
    fn resolve_now(&self, t: &Target) -> Result<Resolved> {
        let (inc, node, coherent, vm) = self.locate(t)?;
        let (client, generation) = vm.fs_agent()?;
        if generation != inc.generation {
            return Err(Error::new(libc::ESTALE, "the VM restarted"));
        }
        Ok(Resolved {
            inc,
            client,
            node,
            coherent,
        })
    }

    async fn resolve(&self, t: &Target) -> Result<Resolved> {
        let (inc, node, coherent, vm) = self.locate(t)?;
        let client = self.client_for(&vm, &inc, true).await?;
        Ok(Resolved {
            inc,
            client,
            node,
            coherent,
        })
    }

    /// One request with its deadline. A retry-safe request is sent once more over a
    /// fresh connection when the connection died under it.
    async fn call(&self, r: &Resolved, req: FsRequest) -> Result<FsResponse> {
        let deadline = match req {
            FsRequest::Fsync { .. } => FSYNC_DEADLINE,
            _ => FS_DEADLINE,
        };
        let retry = req.retry_safe().then(|| req.clone());
        match (interrupt::fs(&r.client, req, deadline).await?, retry) {
            (Err(ClientError::Closed), Some(req)) => {
                let vm = self
                    .mgr
                    .get_by_id(&r.inc.vm_id)
                    .ok_or_else(|| Error::new(libc::ESTALE, "the VM was deleted"))?;
                let client = self.client_for(&vm, &r.inc, true).await?;
                interrupt::fs(&client, req, deadline)
                    .await?
                    .map_err(guest_error)
            }
            (other, _) => other.map_err(guest_error),
        }
    }

    fn entry(&self, inc: &Incarnation, e: &Entry) -> Result<Looked> {
        if !valid_attr(&e.attr) {
            return Err(Error::io("the guest agent sent an invalid file type"));
        }
        let ino = self.inodes.lock().intern(inc, e.node, e.coherent);
        Ok(Looked {
            ino,
            attr: e.attr,
            ttl: ttl(e.coherent),
            generation: inc.generation,
        })
    }

    /// Answer the agent's reference for an entry the kernel will never see.
    fn forget_unused(&self, r: &Resolved, node: NodeId) {
        let client = r.client.clone();
        self.rt.spawn(async move {
            let _ = client.forget(vec![(node, 1)]).await;
        });
    }

    fn looked_from(&self, r: &Resolved, resp: FsResponse, what: &str) -> Result<Looked> {
        match resp {
            FsResponse::Entry(e) => self.entry(&r.inc, &e).inspect_err(|_| {
                self.forget_unused(r, e.node);
            }),
            other => Err(protocol(what, &other)),
        }
    }

    /// Resolve `parent`, send the request `make(parent node, name)` builds and turn its
    /// `Entry` answer into a kernel entry: the shape of lookup, mknod, mkdir and symlink.
    async fn new_entry(
        &self,
        parent: &Target,
        name: &[u8],
        what: &str,
        make: impl FnOnce(NodeId, Vec<u8>) -> FsRequest,
    ) -> Result<Looked> {
        check_name(name)?;
        let r = self.resolve(parent).await?;
        let resp = self.call(&r, make(r.node, name.to_vec())).await?;
        self.looked_from(&r, resp, what)
    }

    /// Resolve `parent` and send a name operation answered by `Ok` (unlink, rmdir).
    async fn name_op(
        &self,
        parent: &Target,
        name: &[u8],
        what: &str,
        make: impl FnOnce(NodeId, Vec<u8>) -> FsRequest,
    ) -> Result<()> {
        check_name(name)?;
        let r = self.resolve(parent).await?;
        self.expect_ok(&r, make(r.node, name.to_vec()), what).await
    }

    pub async fn lookup(&self, parent: &Target, name: &[u8]) -> Result<Looked> {
        self.new_entry(parent, name, "lookup", |parent, name| FsRequest::Lookup {
            parent,
            name,
        })
        .await
    }

    /// The kernel dropped `n` references to `ino` (called on a FUSE thread; never waits).
    pub fn forget(&self, ino: u64, n: u64) {
        self.forget_many(&[(ino, n)]);
    }

    pub fn forget_many(&self, items: &[(u64, u64)]) {
        let mut per_vm: std::collections::HashMap<Incarnation, Vec<(NodeId, u64)>> =
            Default::default();
        {
            let mut i = self.inodes.lock();
            for &(ino, n) in items {
                if let Some((inc, node, count)) = i.forget(ino, n) {
                    if count > 0 {
                        per_vm.entry(inc).or_default().push((node, count));
                    }
                }
            }
        }
        for (inc, nodes) in per_vm {
            let Some(vm) = self.mgr.get_by_id(&inc.vm_id) else {
                continue;
            };
            let Ok((client, generation)) = vm.fs_agent() else {
                continue;
            };
            if generation != inc.generation {
                continue;
            }
            self.rt.spawn(async move {
                let _ = client.forget(nodes).await;
            });
        }
    }

    fn attr_from(resp: FsResponse, what: &str) -> Result<Attr> {
        match resp {
            FsResponse::Attr(a) if valid_attr(&a) => Ok(a),
            FsResponse::Attr(_) => Err(Error::io("the guest agent sent an invalid file type")),
            other => Err(protocol(what, &other)),
        }
    }

    /// The agent handle behind `fh`, checked against the target's incarnation.
    fn handle(&self, r: &Resolved, fh: u64) -> Result<HandleId> {
        let h = self.handles.lock();
        let h = h
            .get(fh)
            .ok_or_else(|| Error::new(libc::EBADF, "unknown file handle"))?;
        if h.inc != r.inc {
            return Err(Error::new(
                libc::ESTALE,
                "the file handle is from another boot",
            ));
        }
        Ok(h.handle)
    }

    pub async fn getattr(&self, t: &Target, fh: Option<u64>) -> Result<(Attr, Duration)> {
        let r = self.resolve(t).await?;
        let handle = match fh {
            Some(fh) => self.handle(&r, fh).ok(),
            None => None,
        };
        let resp = self
            .call(
                &r,
                FsRequest::GetAttr {
                    node: r.node,
                    handle,
                },
            )
            .await?;
        Ok((Self::attr_from(resp, "getattr")?, ttl(r.coherent)))
    }

    pub async fn setattr(
        &self,
        t: &Target,
        fh: Option<u64>,
        set: SetAttrs,
    ) -> Result<(Attr, Duration)> {
        let r = self.resolve(t).await?;
        let handle = match fh {
            Some(fh) => self.handle(&r, fh).ok(),
            None => None,
        };
        let resp = self
            .call(
                &r,
                FsRequest::SetAttr {
                    node: r.node,
                    handle,
                    set,
                },
            )
            .await?;
        Ok((Self::attr_from(resp, "setattr")?, ttl(r.coherent)))
    }

    pub async fn readlink(&self, t: &Target) -> Result<Vec<u8>> {
        let r = self.resolve(t).await?;
        match self.call(&r, FsRequest::ReadLink { node: r.node }).await? {
            FsResponse::Data(d) if d.len() <= MAX_LINK && !d.is_empty() => Ok(d),
            FsResponse::Data(_) => Err(Error::io("the guest sent an invalid symlink target")),
            other => Err(protocol("readlink", &other)),
        }
    }

    pub async fn mknod(
        &self,
        parent: &Target,
        name: &[u8],
        mode: u32,
        rdev: u64,
        owner: Owner,
    ) -> Result<Looked> {
        self.new_entry(parent, name, "mknod", |parent, name| FsRequest::Mknod {
            parent,
            name,
            mode,
            rdev,
            owner,
        })
        .await
    }

    pub async fn mkdir(
        &self,
        parent: &Target,
        name: &[u8],
        mode: u32,
        owner: Owner,
    ) -> Result<Looked> {
        self.new_entry(parent, name, "mkdir", |parent, name| FsRequest::Mkdir {
            parent,
            name,
            mode,
            owner,
        })
        .await
    }

    pub async fn symlink(
        &self,
        parent: &Target,
        name: &[u8],
        target: &[u8],
        owner: Owner,
    ) -> Result<Looked> {
        if target.is_empty() || target.len() > MAX_LINK || target.contains(&0) {
            return Err(Error::invalid("invalid symlink target"));
        }
        let target = target.to_vec();
        self.new_entry(parent, name, "symlink", |parent, name| FsRequest::Symlink {
            parent,
            name,
            target,
            owner,
        })
        .await
    }

    pub async fn link(&self, t: &Target, new_parent: &Target, new_name: &[u8]) -> Result<Looked> {
        check_name(new_name)?;
        let r = self.resolve(t).await?;
        let p = self.resolve(new_parent).await?;
        if p.inc != r.inc {
            return Err(Error::new(libc::EXDEV, "hard links cannot cross VMs"));
        }
        let resp = self
            .call(
                &r,
                FsRequest::Link {
                    node: r.node,
                    new_parent: p.node,
                    new_name: new_name.to_vec(),
                },
            )
            .await?;
        self.looked_from(&r, resp, "link")
    }

    async fn expect_ok(&self, r: &Resolved, req: FsRequest, what: &str) -> Result<()> {
        match self.call(r, req).await? {
            FsResponse::Ok => Ok(()),
            other => Err(protocol(what, &other)),
        }
    }

    pub async fn unlink(&self, parent: &Target, name: &[u8]) -> Result<()> {
        self.name_op(parent, name, "unlink", |parent, name| FsRequest::Unlink {
            parent,
            name,
        })
        .await
    }

    pub async fn rmdir(&self, parent: &Target, name: &[u8]) -> Result<()> {
        self.name_op(parent, name, "rmdir", |parent, name| FsRequest::Rmdir {
            parent,
            name,
        })
        .await
    }

    pub async fn rename(
        &self,
        parent: &Target,
        name: &[u8],
        new_parent: &Target,
        new_name: &[u8],
        flags: u32,
    ) -> Result<()> {
        check_name(name)?;
        check_name(new_name)?;
        let r = self.resolve(parent).await?;
        let p = self.resolve(new_parent).await?;
        if p.inc != r.inc {
            return Err(Error::new(libc::EXDEV, "cannot rename across VMs"));
        }
        let req = FsRequest::Rename {
            parent: r.node,
            name: name.to_vec(),
            new_parent: p.node,
            new_name: new_name.to_vec(),
            flags,
        };
        self.expect_ok(&r, req, "rename").await
    }

    fn register(&self, r: &Resolved, handle: HandleId) -> u64 {
        self.handles.lock().insert(OpenHandle {
            inc: r.inc.clone(),
            handle,
            node: r.node,
        })
    }

    /// Close an agent handle we could not hand to the kernel.
    fn release_unused(&self, r: &Resolved, handle: HandleId) {
        let client = r.client.clone();
        self.rt.spawn(async move {
            let _ = client.fs(FsRequest::Release { handle }, FS_DEADLINE).await;
        });
    }

    pub async fn open(&self, t: &Target, flags: i32) -> Result<Opened> {
        let r = self.resolve(t).await?;
        match self
            .call(
                &r,
                FsRequest::Open {
                    node: r.node,
                    flags,
                },
            )
            .await?
        {
            FsResponse::Opened { handle } => Ok(Opened {
                fh: self.register(&r, handle),
                keep_cache: r.coherent,
            }),
            other => Err(protocol("open", &other)),
        }
    }

    pub async fn create(
        &self,
        parent: &Target,
        name: &[u8],
        mode: u32,
        flags: i32,
        owner: Owner,
    ) -> Result<(Looked, Opened)> {
        check_name(name)?;
        let r = self.resolve(parent).await?;
        let req = FsRequest::Create {
            parent: r.node,
            name: name.to_vec(),
            mode,
            flags,
            owner,
        };
        match self.call(&r, req).await? {
            FsResponse::Created { entry, handle } => {
                let looked = match self.entry(&r.inc, &entry) {
                    Ok(l) => l,
                    Err(e) => {
                        self.forget_unused(&r, entry.node);
                        self.release_unused(&r, handle);
                        return Err(e);
                    }
                };
                let opened = Opened {
                    fh: self.register(&r, handle),
                    keep_cache: entry.coherent,
                };
                Ok((looked, opened))
            }
            other => Err(protocol("create", &other)),
        }
    }

    /// Read up to `size` bytes; split into agent-sized requests.
    pub async fn read(&self, t: &Target, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let r = self.resolve(t).await?;
        let handle = self.handle(&r, fh)?;
        let mut out = Vec::new();
        let mut pos = offset;
        let want = size as usize;
        while out.len() < want {
            let chunk = (want - out.len()).min(MAX_CHUNK) as u32;
            let req = FsRequest::Read {
                handle,
                offset: pos,
                size: chunk,
            };
            match self.call(&r, req).await? {
                FsResponse::Data(d) if d.len() <= chunk as usize => {
                    let short = d.len() < chunk as usize;
                    pos += d.len() as u64;
                    if out.is_empty() {
                        out = d;
                    } else {
                        out.extend_from_slice(&d);
                    }
                    if short {
                        break;
                    }
                }
                FsResponse::Data(_) => {
                    return Err(Error::io("the guest agent sent more data than asked for"))
                }
                other => return Err(protocol("read", &other)),
            }
        }
        Ok(out)
    }

    pub async fn write(&self, t: &Target, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let r = self.resolve(t).await?;
        let handle = self.handle(&r, fh)?;
        let mut done = 0usize;
        while done < data.len() {
            let chunk = &data[done..(done + MAX_CHUNK).min(data.len())];
            let req = FsRequest::Write {
                handle,
                offset: offset + done as u64,
                data: chunk.to_vec(),
            };
            match self.call(&r, req).await? {
                FsResponse::Written(n) if (n as usize) <= chunk.len() => {
                    done += n as usize;
                    if (n as usize) < chunk.len() {
                        break;
                    }
                }
                FsResponse::Written(_) => {
                    return Err(Error::io("the guest agent claims to have written too much"))
                }
                other => return Err(protocol("write", &other)),
            }
        }
        Ok(done as u32)
    }

    /// Close a file or directory handle. Never waits for the guest (the agent closes
    /// in the background); an unreachable guest has dropped it anyway.
    pub fn release(&self, t: &Target, fh: u64, dir: bool) {
        let Some(h) = self.handles.lock().remove(fh) else {
            return;
        };
        let Ok(r) = self.resolve_now(t) else { return };
        if r.inc != h.inc {
            return;
        }
        let client = r.client;
        let req = if dir {
            FsRequest::ReleaseDir { handle: h.handle }
        } else {
            FsRequest::Release { handle: h.handle }
        };
        self.rt.spawn(async move {
            let _ = client.fs(req, FS_DEADLINE).await;
        });
    }

    pub async fn fsync(&self, t: &Target, fh: u64, datasync: bool) -> Result<()> {
        let r = self.resolve(t).await?;
        let handle = self.handle(&r, fh)?;
        self.expect_ok(&r, FsRequest::Fsync { handle, datasync }, "fsync")
            .await
    }

    pub async fn opendir(&self, t: &Target) -> Result<u64> {
        let r = self.resolve(t).await?;
        match self.call(&r, FsRequest::OpenDir { node: r.node }).await? {
            FsResponse::Opened { handle } => Ok(self.register(&r, handle)),
            other => Err(protocol("opendir", &other)),
        }
    }

    /// One page of entries from `offset`. `self_ino` is reported for `.`.
    pub async fn readdir(
        &self,
        t: &Target,
        fh: u64,
        offset: u64,
        plus: bool,
        self_ino: u64,
    ) -> Result<Vec<DirItem>> {
        let r = self.resolve(t).await?;
        let handle = self.handle(&r, fh)?;
        let req = FsRequest::ReadDir {
            handle,
            offset,
            plus,
            max_bytes: READDIR_BYTES,
        };
        let entries: Vec<DirEntry> = match self.call(&r, req).await? {
            FsResponse::DirEntries(e) => e,
            other => return Err(protocol("readdir", &other)),
        };
        // A hostile agent could send more than a page holds; nothing beyond fits anyway.
        let max = (READDIR_BYTES as usize / 24).max(1);
        let mut out = Vec::with_capacity(entries.len().min(max));
        for (i, e) in entries.into_iter().enumerate() {
            let dot = e.name == b"." || e.name == b"..";
            if i >= max || !(dot || valid_name(&e.name)) {
                if let Some(en) = e.entry {
                    self.forget_unused(&r, en.node);
                }
                continue;
            }
            let looked = match (e.entry, dot) {
                (Some(en), false) => match self.entry(&r.inc, &en) {
                    Ok(l) => Some(l),
                    Err(_) => {
                        self.forget_unused(&r, en.node);
                        continue;
                    }
                },
                (Some(en), true) => {
                    self.forget_unused(&r, en.node);
                    None
                }
                (None, _) => None,
            };
            let ino = match &looked {
                Some(l) => l.ino,
                None if e.name == b"." => self_ino,
                // Plain listings do not look entries up: report a number the kernel
                // only passes on as d_ino (any nonzero one; lookup brings the real one).
                None => PLAIN_DIRENT_INO,
            };
            out.push(DirItem {
                name: e.name,
                next_offset: e.next_offset,
                kind: e.kind & libc::S_IFMT,
                ino,
                looked,
            });
        }
        Ok(out)
    }

    /// Give back the kernel references of plus entries that did not fit in its buffer.
    pub fn unused_entries(&self, items: &[DirItem]) {
        let v: Vec<(u64, u64)> = items
            .iter()
            .filter_map(|i| i.looked.as_ref().map(|l| (l.ino, 1)))
            .collect();
        self.forget_many(&v);
    }

    pub async fn statfs(&self, t: &Target) -> Result<StatFs> {
        let r = self.resolve(t).await?;
        match self.call(&r, FsRequest::StatFs { node: r.node }).await? {
            FsResponse::StatFs(s) => Ok(s),
            other => Err(protocol("statfs", &other)),
        }
    }

    pub async fn setxattr(&self, t: &Target, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        if name.is_empty() || name.len() > 255 || name.contains(&0) {
            return Err(Error::new(libc::ERANGE, "invalid xattr name"));
        }
        if value.len() > MAX_XATTR as usize {
            return Err(Error::new(libc::E2BIG, "xattr value too large"));
        }
        let r = self.resolve(t).await?;
        let req = FsRequest::SetXattr {
            node: r.node,
            name: name.to_vec(),
            value: value.to_vec(),
            flags,
        };
        self.expect_ok(&r, req, "setxattr").await
    }

    /// `size` 0: the value's size; else the value (ERANGE when longer than `size`).
    pub async fn getxattr(&self, t: &Target, name: &[u8], size: u32) -> Result<XattrReply> {
        if name.is_empty() || name.len() > 255 || name.contains(&0) {
            return Err(Error::new(libc::ERANGE, "invalid xattr name"));
        }
        let r = self.resolve(t).await?;
        let req = FsRequest::GetXattr {
            node: r.node,
            name: name.to_vec(),
            size: size.min(MAX_XATTR),
        };
        let resp = self.call(&r, req).await?;
        xattr_reply(resp, size, "getxattr")
    }

    pub async fn listxattr(&self, t: &Target, size: u32) -> Result<XattrReply> {
        let r = self.resolve(t).await?;
        let req = FsRequest::ListXattr {
            node: r.node,
            size: size.min(MAX_XATTR),
        };
        let resp = self.call(&r, req).await?;
        xattr_reply(resp, size, "listxattr")
    }

    pub async fn removexattr(&self, t: &Target, name: &[u8]) -> Result<()> {
        let r = self.resolve(t).await?;
        let req = FsRequest::RemoveXattr {
            node: r.node,
            name: name.to_vec(),
        };
        self.expect_ok(&r, req, "removexattr").await
    }

    pub async fn fallocate(
        &self,
        t: &Target,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<()> {
        let r = self.resolve(t).await?;
        let handle = self.handle(&r, fh)?;
        let req = FsRequest::Fallocate {
            handle,
            offset,
            length,
            mode,
        };
        self.expect_ok(&r, req, "fallocate").await
    }

    pub async fn lseek(&self, t: &Target, fh: u64, offset: u64, whence: i32) -> Result<u64> {
        let r = self.resolve(t).await?;
        let handle = self.handle(&r, fh)?;
        let req = FsRequest::Lseek {
            handle,
            offset,
            whence,
        };
        match self.call(&r, req).await? {
            FsResponse::Offset(o) => Ok(o),
            other => Err(protocol("lseek", &other)),
        }
    }
}

/// An xattr answer for the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
}

fn xattr_reply(resp: FsResponse, size: u32, what: &str) -> Result<XattrReply> {
    match resp {
        FsResponse::XattrSize(n) if size == 0 => Ok(XattrReply::Size(n)),
        FsResponse::Data(d) if size > 0 && d.len() <= size as usize => Ok(XattrReply::Data(d)),
        FsResponse::Data(_) if size > 0 => Err(Error::new(libc::ERANGE, "xattr too large")),
        other => Err(protocol(what, &other)),
    }
}
