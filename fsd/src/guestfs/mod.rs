//! `fs/`: each VM's guest filesystem, proxied to the agent's file service.
//!
//! This is the filesystem logic; `fuse::guest` only translates kernel requests into these
//! calls. Invariants:
//! - Operations complete through a callback (`done`), called exactly once: on the agent
//!   connection's reader when the answer arrives, or at once on error. A request costs
//!   no task and no thread hand-off: it is written from the calling thread, and the
//!   answer is turned into the kernel's reply where it is read. Only a VM whose agent
//!   connection must first be re-established, and a retry, run in a task.
//! - Every call that talks to a guest has a deadline ([`FS_DEADLINE`], longer for
//!   `fsync`) and fails with an errno; a VM that is not running fails at once with
//!   EHOSTDOWN, a VM whose agent connection dies fails pending calls with EHOSTDOWN.
//! - Host inode numbers are derived from guest identities (see [`inodes`]): stable
//!   across renames, hard links, forgetting, pause/resume, reconnects and daemon
//!   restarts. Handles and lookups of an earlier boot answer ESTALE; the VM's `fs/`
//!   directory gets a new control-tree inode per boot, so the kernel drops the old
//!   boot's cached subtree.
//! - Nothing the guest answers is trusted: data longer than requested, counts larger
//!   than sent, invalid names, handles or file types, identities claiming the root, and
//!   out-of-range errnos become EIO (or are skipped, for directory entries), never a host
//!   allocation or a path.
//! - Cache policy: entries in directories the agent watches are cached for
//!   [`TTL_COHERENT`] (missing names too: negative entries), attributes likewise, and
//!   file pages are kept across opens, because change events invalidate them
//!   ([`events`]); the host's own changes are remembered so that their events do not
//!   throw away what the kernel already knows. Other entries live [`TTL_UNWATCHED`] and
//!   their pages are dropped at every open.
pub mod calls;
pub mod events;
pub mod inodes;
pub mod interrupt;
pub mod listings;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bandsox_agent::client::{AgentClient, ClientError};
use bandsox_agent::proto::fs::{
    valid_name, DirEntry, Entry, FsRequest, FsResponse, HandleId, NodeId, NodeRef, StatFs,
    XattrNames, MAX_CHUNK, MAX_FILE_HANDLE, MAX_XATTR, ROOT_ID, ROOT_NODE,
};
use parking_lot::Mutex;

use crate::diskfs::{self, DiskFs};
use crate::error::{Error, Result};
use crate::manager::vm::Vm;
use crate::manager::Manager;
/// The attribute and attribute-change types of `fs/` calls. They are the protocol's own
/// structs, re-exported so that callers depend on this module, not on the wire: every
/// value is validated here before it is handed out (`valid_attr`), and a field-for-field
/// copy into a twin struct would cost a conversion per request on the hot path.
pub use bandsox_agent::proto::fs::{fuse_dirent_size, Attr, Owner, SetAttrs, SetTime, Timespec};
pub use events::Invalidate;
use events::Recent;
pub use inodes::FS_INO_BASE;
use inodes::{EntryFacts, Handles, Incarnation, Inodes, OpenHandle, VmNumbers, MAX_SLOTS};
use listings::Listings;

/// Deadline of one file request to the guest.
pub const FS_DEADLINE: Duration = Duration::from_secs(20);
/// Deadline of `fsync` (may flush a lot of guest page cache).
pub const FSYNC_DEADLINE: Duration = Duration::from_secs(120);
/// Entry and attribute lifetime when the agent announces changes. Events keep the cache
/// true; the lifetime only bounds how long a name can stay stale after events were lost
/// (an inotify queue overflow in the guest, which also drops every cached attribute).
pub const TTL_COHERENT: Duration = Duration::from_secs(60);
/// Entry and attribute lifetime when it does not (watch limit reached).
pub const TTL_UNWATCHED: Duration = Duration::from_millis(200);
/// The kernel's readdir buffer as assumed until a full reply shows its real size (one
/// page on older kernels; newer ones take more, see [`GuestFs::readdir_filled`]).
pub const READDIR_BYTES: u32 = 65536;
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

impl Target {
    /// The number the kernel knows the target by.
    pub fn ino(&self) -> u64 {
        match self {
            Target::Root { ino, .. } => *ino,
            Target::Node(ino) => *ino,
        }
    }
}

/// A looked-up entry as the kernel needs it; `ino` 0 is a negative entry (the name does
/// not exist, and the kernel may remember that for `ttl`).
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
    /// Host inode number: what `lstat` of the entry shows.
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

/// An xattr answer for the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
}

/// A resolved target: the VM incarnation, its live agent and the agent node.
struct Resolved {
    inc: Incarnation,
    vm: Arc<Vm>,
    client: AgentClient,
    /// The agent instance (guest boot) the connection belongs to.
    boot: u64,
    node: NodeRef,
    /// The target's own entry is coherent (its pages may be kept).
    coherent: bool,
    /// The target is a directory the agent watches (names in it may be cached).
    watched: bool,
    /// The number the kernel knows the target by.
    ino: u64,
}

pub struct GuestFs {
    mgr: Arc<Manager>,
    /// Lock order: `vms` before `inodes`.
    vms: Arc<Mutex<HashMap<Arc<str>, VmNumbers>>>,
    inodes: Arc<Mutex<Inodes>>,
    handles: Mutex<Handles>,
    recent: Arc<Recent>,
    listings: Arc<Listings>,
    events: events::Pumps,
    rt: tokio::runtime::Handle,
    /// Bytes of entries asked of the agent per readdir: the kernel's buffer size.
    readdir_bytes: std::sync::atomic::AtomicU32,
    /// Callers of waiting requests, for Ctrl-C ([`interrupt`]).
    watcher: Arc<interrupt::Watcher>,
    /// `fs/` of stopped and failed VMs: their disks, read on the host.
    disk: DiskFs,
}

/// Check a guest errno and keep it only when it is one a host program can understand.
fn guest_error(e: ClientError) -> Error {
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
        FsResponse::Moved { .. } => "Moved",
        FsResponse::DirEntries(_) => "DirEntries",
        FsResponse::StatFs(_) => "StatFs",
        FsResponse::XattrSize(_) => "XattrSize",
        FsResponse::Offset(_) => "Offset",
    }
}

/// Where the time of one guest request goes, logged at debug level (target
/// `bandsox::fs_timing`): from the call to the answer's arrival on the connection's
/// reader (`wait_us`: writing the request, the agent's work, both transfers and the
/// reader's wake-up) and from there to the kernel's reply being written (`reply_us`).
/// Costs nothing but a level check when debug logging is off.
struct Timing(Option<(&'static str, std::time::Instant)>);

impl Timing {
    fn start(op: &'static str) -> Timing {
        Timing(
            tracing::enabled!(target: "bandsox::fs_timing", tracing::Level::DEBUG)
                .then(|| (op, std::time::Instant::now())),
        )
    }

    fn answered(&self) -> Option<std::time::Instant> {
        self.0.map(|_| std::time::Instant::now())
    }

    fn replied(&self, answered: Option<std::time::Instant>) {
        if let (Some((op, t0)), Some(t1)) = (self.0, answered) {
            tracing::debug!(
                target: "bandsox::fs_timing",
                op,
                wait_us = u64::try_from(t1.duration_since(t0).as_micros()).unwrap_or(u64::MAX),
                reply_us = u64::try_from(t1.elapsed().as_micros()).unwrap_or(u64::MAX),
                "guest fs request"
            );
        }
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

fn xattr_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name.len() > 255 || name.contains(&0) {
        return Err(Error::new(libc::ERANGE, "invalid xattr name"));
    }
    Ok(())
}

fn xattr_reply(resp: FsResponse, size: u32, what: &str) -> Result<XattrReply> {
    match resp {
        FsResponse::XattrSize(n) if size == 0 => Ok(XattrReply::Size(n)),
        FsResponse::Data(d) if size > 0 && d.len() <= size as usize => Ok(XattrReply::Data(d)),
        FsResponse::Data(_) if size > 0 => Err(Error::new(libc::ERANGE, "xattr too large")),
        other => Err(protocol(what, &other)),
    }
}

fn expect_ok(resp: FsResponse, what: &str) -> Result<()> {
    match resp {
        FsResponse::Ok => Ok(()),
        other => Err(protocol(what, &other)),
    }
}

fn attr_from(resp: FsResponse, what: &str) -> Result<Attr> {
    match resp {
        FsResponse::Attr(a) if valid_attr(&a) => Ok(a),
        FsResponse::Attr(_) => Err(Error::io("the guest agent sent an invalid file type")),
        other => Err(protocol(what, &other)),
    }
}

impl GuestFs {
    pub fn new(mgr: Arc<Manager>, rt: tokio::runtime::Handle) -> Arc<Self> {
        let inodes = Arc::new(Mutex::new(Inodes::new()));
        let vms = Arc::new(Mutex::new(HashMap::new()));
        let recent = Arc::new(Recent::default());
        let listings = Arc::new(Listings::default());
        Arc::new(GuestFs {
            watcher: interrupt::Watcher::start(&rt),
            mgr: mgr.clone(),
            events: events::Pumps::new(
                vms.clone(),
                inodes.clone(),
                recent.clone(),
                listings.clone(),
            ),
            listings,
            vms,
            inodes,
            recent,
            handles: Mutex::new(Handles::default()),
            rt,
            readdir_bytes: std::sync::atomic::AtomicU32::new(READDIR_BYTES),
            disk: DiskFs::new(mgr),
        })
    }

    /// Where change events turn into kernel cache invalidations (set once mounted).
    pub fn set_invalidator(&self, inv: Arc<dyn Invalidate>) {
        self.events.set_invalidator(inv);
    }

    /// Resolves once every change event received so far, from any agent connection, has
    /// been applied: its cache invalidations made (tests, diagnostics). To wait for the
    /// events of changes made so far in the guest, let the agent flush first: it sends
    /// pending events before a command's `Exited`.
    pub async fn events_applied(&self) {
        self.events.applied().await;
    }

    /// Number of guest inodes the kernel holds (diagnostics, tests).
    pub fn inode_count(&self) -> usize {
        self.inodes.lock().len()
    }

    /// Where `t` is answered when it is under the `fs/` of a stopped or failed VM (its
    /// disk, read on the host: [`crate::diskfs`]); `None` for the agent.
    fn offline(&self, t: &Target) -> Option<diskfs::Routed> {
        self.disk.route(t, |vm| {
            let mut vms = self.vms.lock();
            Ok(self.numbers(&mut vms, vm)?.slot)
        })
    }

    /// Either target of a two-target change under a stopped VM's `fs/`.
    fn offline_pair(&self, a: &Target, b: &Target) -> Option<diskfs::Routed> {
        self.offline(a).or_else(|| self.offline(b))
    }

    // ---- numbers ---------------------------------------------------------------------

    /// The numbering state of `vm`, made on first use (giving the VM its slot).
    fn numbers<'a>(
        &self,
        vms: &'a mut HashMap<Arc<str>, VmNumbers>,
        vm: &Vm,
    ) -> Result<&'a mut VmNumbers> {
        let key: Arc<str> = Arc::from(vm.id.as_str());
        if !vms.contains_key(&key) {
            let slot = match vm.fs_slot() {
                Some(s) => s,
                None => {
                    let slot = self.free_slot(vms)?;
                    vm.set_fs_slot(slot)?;
                    slot
                }
            };
            vms.insert(key.clone(), VmNumbers::new(slot, vm.dir.clone()));
        }
        vms.get_mut(&key)
            .ok_or_else(|| Error::io("fs/ numbering state vanished"))
    }

    /// A slot no VM has and the kernel holds no numbers of.
    fn free_slot(&self, vms: &HashMap<Arc<str>, VmNumbers>) -> Result<u16> {
        let mut used: std::collections::HashSet<u16> =
            self.mgr.list().iter().filter_map(|v| v.fs_slot()).collect();
        used.extend(vms.values().map(|v| v.slot));
        let inodes = self.inodes.lock();
        (0..MAX_SLOTS)
            .find(|s| !used.contains(s) && !inodes.slot_in_use(*s))
            .ok_or_else(|| Error::new(libc::ENFILE, "no free fs/ inode slot (16384 VMs)"))
    }

    /// Turn an agent `Entry` into a kernel entry, counting the kernel's new reference.
    fn entry(&self, r: &Resolved, e: &Entry) -> Result<Looked> {
        if !valid_attr(&e.attr) || e.node.fh.0.len() > MAX_FILE_HANDLE || e.node.id == ROOT_ID {
            return Err(Error::io("the guest agent sent an invalid entry"));
        }
        let mut vms = self.vms.lock();
        let v = self.numbers(&mut vms, &r.vm)?;
        let mut inodes = self.inodes.lock();
        let ino = inodes
            .number(v, r.boot, e.node.id)
            .ok_or_else(|| Error::io("no number for a guest inode"))?;
        inodes.intern(
            ino,
            &r.inc,
            &e.node,
            &EntryFacts {
                attr: e.attr,
                kind: e.attr.mode & libc::S_IFMT,
                coherent: e.coherent,
                counted: e.counted,
                watched: e.watched,
                xattrs: e.xattrs.clone(),
            },
        );
        Ok(Looked {
            ino,
            attr: e.attr,
            ttl: ttl(e.coherent),
            generation: r.inc.generation,
        })
    }

    /// An entry the kernel will never see: give back the agent's reference.
    fn unused_entry(&self, r: &Resolved, e: &Entry) {
        if e.counted {
            let client = r.client.clone();
            let id = e.node.id;
            self.rt.spawn(async move {
                let _ = client.forget(vec![(id, 1)]).await;
            });
        }
    }

    /// The number `id` has (assigning a device index if needed), for listings.
    fn number_of(&self, r: &Resolved, id: NodeId) -> Option<u64> {
        let mut vms = self.vms.lock();
        let v = self.numbers(&mut vms, &r.vm).ok()?;
        let inodes = self.inodes.lock();
        inodes.number(v, r.boot, id)
    }

    fn looked_from(&self, r: &Resolved, resp: FsResponse, what: &str) -> Result<Looked> {
        match resp {
            FsResponse::Entry(e) => self.entry(r, &e).inspect_err(|_| self.unused_entry(r, &e)),
            other => Err(protocol(what, &other)),
        }
    }

    // ---- resolution ------------------------------------------------------------------

    /// The incarnation, node and VM a target names.
    fn locate(&self, t: &Target) -> Result<(Incarnation, NodeRef, bool, bool, Arc<Vm>)> {
        match t {
            Target::Root {
                vm_id,
                generation,
                ino,
            } => {
                let vm = self
                    .mgr
                    .get_by_id(vm_id)
                    .ok_or_else(|| Error::new(libc::ESTALE, "the VM was deleted"))?;
                {
                    let mut vms = self.vms.lock();
                    self.numbers(&mut vms, &vm)?.root = Some((*generation, *ino));
                }
                let inc = Incarnation {
                    vm_id: Arc::from(vm_id.as_str()),
                    generation: *generation,
                };
                Ok((inc, ROOT_NODE, true, true, vm))
            }
            Target::Node(ino) => {
                let (inc, node, coherent, watched) = {
                    let i = self.inodes.lock();
                    let info = i.get(*ino).ok_or_else(|| {
                        Error::new(libc::ESTALE, "this guest file is no longer known")
                    })?;
                    (
                        info.inc.clone(),
                        info.node.clone(),
                        info.coherent,
                        info.watched,
                    )
                };
                let vm = self
                    .mgr
                    .get_by_id(&inc.vm_id)
                    .ok_or_else(|| Error::new(libc::ESTALE, "the VM was deleted"))?;
                Ok((inc, node, coherent, watched, vm))
            }
        }
    }

    fn resolved(
        &self,
        t: &Target,
        loc: (Incarnation, NodeRef, bool, bool, Arc<Vm>),
        client: AgentClient,
    ) -> Resolved {
        let (inc, node, coherent, watched, vm) = loc;
        self.events.ensure(&inc, &vm, &client, &self.rt);
        Resolved {
            boot: client.info().instance,
            inc,
            vm,
            client,
            node,
            coherent,
            watched,
            ino: t.ino(),
        }
    }

    /// Resolve without waiting (EHOSTDOWN when the connection must be made first).
    fn resolve_now(&self, t: &Target) -> Result<Resolved> {
        let loc = self.locate(t)?;
        // Every `fs/` request is activity (see `idle_pause`).
        loc.4.touch();
        let (client, generation) = loc.4.fs_agent()?;
        if generation != loc.0.generation {
            return Err(Error::new(
                libc::ESTALE,
                format!("VM {} restarted since this file was looked up", loc.4.name),
            ));
        }
        Ok(self.resolved(t, loc, client))
    }

    /// The live connection of `vm` for incarnation `inc`; a running VM whose connection
    /// died is reconnected first, and a paused one with `autoresume=1` resumed first
    /// (the request is slower, not failed).
    async fn client_for(&self, vm: &Arc<Vm>, inc: &Incarnation) -> Result<AgentClient> {
        let (client, generation) = match vm.fs_agent() {
            Err(e) if e.errno == libc::EHOSTDOWN => {
                vm.wake(crate::manager::vm::Wake::Fs).await?;
                vm.live_agent().await?;
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
        Ok(client)
    }

    async fn resolve(&self, t: &Target) -> Result<Resolved> {
        let loc = self.locate(t)?;
        let client = self.client_for(&loc.4, &loc.0).await?;
        Ok(self.resolved(t, loc, client))
    }

    /// Run `go` with `t` resolved: at once when the VM's connection is live, else in a
    /// task after reconnecting (or with the error).
    fn with<F>(self: &Arc<Self>, t: Target, go: F)
    where
        F: FnOnce(&Arc<Self>, Result<Resolved>) + Send + 'static,
    {
        match self.resolve_now(&t) {
            Err(e) if e.errno == libc::EHOSTDOWN => {
                let g = self.clone();
                // The reconnect and the request after it wait for the same caller.
                let pid = interrupt::caller();
                self.rt.spawn(interrupt::CALLER.scope(pid, async move {
                    let r = crate::interrupt::interruptible(pid, g.resolve(&t)).await;
                    go(&g, r)
                }));
            }
            r => go(self, r),
        }
    }

    /// Send `req` for `r`. `finish` turns the answer into the result (on the connection's
    /// reader); `done` gets it. A retry-safe request is sent once more over a fresh
    /// connection when the connection died under it.
    fn send<T, F, D>(self: &Arc<Self>, r: Resolved, req: FsRequest, finish: F, done: D)
    where
        T: Send + 'static,
        F: FnOnce(&GuestFs, &Resolved, FsResponse) -> Result<T> + Send + 'static,
        D: FnOnce(Result<T>) + Send + 'static,
    {
        let deadline = match req {
            FsRequest::Fsync { .. } => FSYNC_DEADLINE,
            _ => FS_DEADLINE,
        };
        let retry = req.retry_safe().then(|| req.clone());
        let dir = matches!(req, FsRequest::OpenDir { .. });
        let client = r.client.clone();
        let g = self.clone();
        // The answer and an interrupt of the caller race for `done` (see `interrupt`).
        let pending = interrupt::Pending::new(&self.watcher, done);
        let timing = Timing::start(req.name());
        client.fs_then(
            req,
            deadline,
            Box::new(move |res| match (res, retry) {
                (Ok(resp), _) => match pending.take() {
                    Some(done) => {
                        let answered = timing.answered();
                        done(finish(&g, &r, resp));
                        timing.replied(answered);
                    }
                    None => g.give_back(&r, resp, dir),
                },
                (Err(ClientError::Closed), Some(req)) => {
                    let rt = g.rt.clone();
                    rt.spawn(async move {
                        let res = g.resend(&r, req, deadline).await;
                        match (res, pending.take()) {
                            (res, Some(done)) => done(res.and_then(|resp| finish(&g, &r, resp))),
                            (Ok(resp), None) => g.give_back(&r, resp, dir),
                            (Err(_), None) => {}
                        }
                    });
                }
                (Err(e), _) => {
                    if let Some(done) = pending.take() {
                        done(Err(guest_error(e)))
                    }
                }
            }),
        );
    }

    async fn resend(&self, r: &Resolved, req: FsRequest, deadline: Duration) -> Result<FsResponse> {
        let client = self.client_for(&r.vm, &r.inc).await?;
        client.fs(req, deadline).await.map_err(guest_error)
    }

    /// The common shape: resolve `t`, build the request, send it, finish the answer.
    fn op<T, B, F, D>(self: &Arc<Self>, t: Target, build: B, finish: F, done: D)
    where
        T: Send + 'static,
        B: FnOnce(&GuestFs, &Resolved) -> Result<FsRequest> + Send + 'static,
        F: FnOnce(&GuestFs, &Resolved, FsResponse) -> Result<T> + Send + 'static,
        D: FnOnce(Result<T>) + Send + 'static,
    {
        self.with(t, move |g, r| {
            let r = match r {
                Ok(r) => r,
                Err(e) => return done(Err(e)),
            };
            match build(g, &r) {
                Ok(req) => g.send(r, req, finish, done),
                Err(e) => done(Err(e)),
            }
        })
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

    fn register(&self, r: &Resolved, handle: HandleId) -> u64 {
        self.handles.lock().insert(OpenHandle {
            inc: r.inc.clone(),
            handle,
        })
    }

    /// Close an agent handle we could not hand to the kernel.
    fn release_unused(&self, r: &Resolved, handle: HandleId) {
        let client = r.client.clone();
        self.rt.spawn(async move {
            let _ = client.fs(FsRequest::Release { handle }, FS_DEADLINE).await;
        });
    }

    /// A rename's moved node has these attributes now (its ctime changed). The kernel
    /// refreshes them itself; remembering them lets the rename's own event go unheeded.
    fn renamed(&self, r: &Resolved, id: NodeId, attr: Attr) {
        let vms = self.vms.lock();
        let Some(v) = vms.get(&r.inc.vm_id) else {
            return;
        };
        let mut inodes = self.inodes.lock();
        if let Some(ino) = Inodes::known_number(v, r.boot, id) {
            if inodes.get(ino).is_some_and(|i| i.inc == r.inc) {
                inodes.told(ino, attr);
            }
        }
    }

    /// Remember that the host itself made `name` in `parent` name `now`.
    fn made(&self, parent: u64, name: &[u8], now: Option<NodeId>) {
        self.recent.note(parent, name, now);
        self.listings.changed(parent, name, now.is_some());
    }

    // ---- names -----------------------------------------------------------------------

    /// Look `name` up in `parent`. In a watched directory a missing name is a negative
    /// entry (`ino` 0) the kernel may remember: an event drops it when the name appears.
    pub fn lookup<D>(self: &Arc<Self>, parent: Target, name: Vec<u8>, done: D)
    where
        D: FnOnce(Result<Looked>) + Send + 'static,
    {
        if let Err(e) = check_name(&name) {
            return done(Err(e));
        }
        if let Some(at) = self.offline(&parent) {
            return diskfs::ops::lookup(at, name, done);
        }
        self.with(parent, move |g, r| {
            let r = match r {
                Ok(r) => r,
                Err(e) => return done(Err(e)),
            };
            let negative = r.watched.then_some(r.inc.generation);
            if r.watched && g.listings.absent(r.ino, &r.inc, &name) {
                return done(Ok(Looked {
                    ino: 0,
                    attr: Attr::default(),
                    ttl: TTL_COHERENT,
                    generation: r.inc.generation,
                }));
            }
            let req = FsRequest::Lookup {
                parent: r.node.clone(),
                name,
            };
            g.send(
                r,
                req,
                |g, r, resp| g.looked_from(r, resp, "lookup"),
                move |res| match (res, negative) {
                    (Err(e), Some(generation)) if e.errno == libc::ENOENT => done(Ok(Looked {
                        ino: 0,
                        attr: Attr::default(),
                        ttl: TTL_COHERENT,
                        generation,
                    })),
                    (res, _) => done(res),
                },
            )
        })
    }

    /// The kernel dropped `n` references to `ino` (called on a FUSE thread; never waits).
    pub fn forget(&self, ino: u64, n: u64) {
        self.forget_many(&[(ino, n)]);
    }

    pub fn forget_many(&self, items: &[(u64, u64)]) {
        let (disk, items): (Vec<_>, Vec<_>) = items.iter().partition(|(i, _)| DiskFs::owns(*i));
        for (ino, n) in disk {
            self.disk.forget(ino, n);
        }
        let mut per_vm: HashMap<Incarnation, Vec<(NodeId, u64)>> = HashMap::new();
        {
            let mut i = self.inodes.lock();
            for (ino, n) in items {
                if let Some(rel) = i.forget(ino, n) {
                    if i.get(ino).is_none() {
                        self.listings.forget(ino);
                    }
                    if rel.count > 0 {
                        per_vm
                            .entry(rel.inc)
                            .or_default()
                            .push((rel.node, rel.count));
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

    pub fn getattr<D>(self: &Arc<Self>, t: Target, fh: Option<u64>, done: D)
    where
        D: FnOnce(Result<(Attr, Duration)>) + Send + 'static,
    {
        if let Some(at) = self.offline(&t) {
            return diskfs::ops::getattr(at, done);
        }
        if let Target::Root { vm_id, .. } = &t {
            // A stat of `fs/` itself (`ls -l` of the VM's directory) is no reason to
            // resume a paused VM: it shows as an empty directory until it is entered.
            if self
                .mgr
                .get_by_id(vm_id)
                .is_some_and(|vm| vm.state() == crate::manager::vm::VmState::Paused)
            {
                return done(Err(Error::host_down("the VM is paused")));
            }
        }
        self.op(
            t,
            move |g, r| {
                Ok(FsRequest::GetAttr {
                    node: r.node.clone(),
                    handle: fh.and_then(|fh| g.handle(r, fh).ok()),
                })
            },
            |g, r, resp| {
                let a = attr_from(resp, "getattr")?;
                g.inodes.lock().told(r.ino, a);
                Ok((a, ttl(r.coherent)))
            },
            done,
        )
    }

    pub fn setattr<D>(self: &Arc<Self>, t: Target, fh: Option<u64>, set: SetAttrs, done: D)
    where
        D: FnOnce(Result<(Attr, Duration)>) + Send + 'static,
    {
        if let Some(at) = self.offline(&t) {
            return done(DiskFs::refuse(at));
        }
        self.op(
            t,
            move |g, r| {
                Ok(FsRequest::SetAttr {
                    node: r.node.clone(),
                    handle: fh.and_then(|fh| g.handle(r, fh).ok()),
                    set,
                })
            },
            |g, r, resp| {
                let a = attr_from(resp, "setattr")?;
                g.inodes.lock().told(r.ino, a);
                Ok((a, ttl(r.coherent)))
            },
            done,
        )
    }

    pub fn readlink<D>(self: &Arc<Self>, t: Target, done: D)
    where
        D: FnOnce(Result<Vec<u8>>) + Send + 'static,
    {
        if let Some(at) = self.offline(&t) {
            return diskfs::ops::readlink(at, done);
        }
        self.op(
            t,
            |_, r| {
                Ok(FsRequest::ReadLink {
                    node: r.node.clone(),
                })
            },
            |_, _, resp| match resp {
                FsResponse::Data(d) if d.len() <= MAX_LINK && !d.is_empty() => Ok(d),
                FsResponse::Data(_) => Err(Error::io("the guest sent an invalid symlink target")),
                other => Err(protocol("readlink", &other)),
            },
            done,
        )
    }

    /// Create something named `name` in `parent` (`make` builds the request from the
    /// parent node and the name): the shape of mknod, mkdir and symlink.
    fn new_entry<M, D>(
        self: &Arc<Self>,
        parent: Target,
        name: Vec<u8>,
        what: &'static str,
        make: M,
        done: D,
    ) where
        M: FnOnce(NodeRef, Vec<u8>) -> FsRequest + Send + 'static,
        D: FnOnce(Result<Looked>) + Send + 'static,
    {
        if let Err(e) = check_name(&name) {
            return done(Err(e));
        }
        if let Some(at) = self.offline(&parent) {
            return done(DiskFs::refuse(at));
        }
        let kept = name.clone();
        self.op(
            parent,
            move |_, r| Ok(make(r.node.clone(), name)),
            move |g, r, resp| {
                let made = match &resp {
                    FsResponse::Entry(e) => {
                        g.made(r.ino, &kept, Some(e.node.id));
                        (what == "mkdir" && e.watched).then_some(())
                    }
                    _ => None,
                };
                let looked = g.looked_from(r, resp, what)?;
                if made.is_some() {
                    // A directory just made is empty: its names are known from now on.
                    g.listings.made_dir(looked.ino, &r.inc);
                }
                Ok(looked)
            },
            done,
        )
    }

    pub fn mknod<D>(
        self: &Arc<Self>,
        parent: Target,
        name: Vec<u8>,
        mode: u32,
        rdev: u64,
        owner: Owner,
        done: D,
    ) where
        D: FnOnce(Result<Looked>) + Send + 'static,
    {
        self.new_entry(
            parent,
            name,
            "mknod",
            move |parent, name| FsRequest::Mknod {
                parent,
                name,
                mode,
                rdev,
                owner,
            },
            done,
        )
    }

    pub fn mkdir<D>(
        self: &Arc<Self>,
        parent: Target,
        name: Vec<u8>,
        mode: u32,
        owner: Owner,
        done: D,
    ) where
        D: FnOnce(Result<Looked>) + Send + 'static,
    {
        self.new_entry(
            parent,
            name,
            "mkdir",
            move |parent, name| FsRequest::Mkdir {
                parent,
                name,
                mode,
                owner,
            },
            done,
        )
    }

    pub fn symlink<D>(
        self: &Arc<Self>,
        parent: Target,
        name: Vec<u8>,
        target: Vec<u8>,
        owner: Owner,
        done: D,
    ) where
        D: FnOnce(Result<Looked>) + Send + 'static,
    {
        if target.is_empty() || target.len() > MAX_LINK || target.contains(&0) {
            return done(Err(Error::invalid("invalid symlink target")));
        }
        self.new_entry(
            parent,
            name,
            "symlink",
            move |parent, name| FsRequest::Symlink {
                parent,
                name,
                target,
                owner,
            },
            done,
        )
    }

    /// The second target of a two-target operation, in the same VM incarnation as `r`.
    fn same_vm(&self, r: &Resolved, t: &Target, what: &str) -> Result<(NodeRef, u64)> {
        let other = self.resolve_now(t)?;
        if other.inc != r.inc {
            return Err(Error::new(libc::EXDEV, format!("{what} cannot cross VMs")));
        }
        Ok((other.node, other.ino))
    }

    pub fn link<D>(self: &Arc<Self>, t: Target, new_parent: Target, new_name: Vec<u8>, done: D)
    where
        D: FnOnce(Result<Looked>) + Send + 'static,
    {
        if let Err(e) = check_name(&new_name) {
            return done(Err(e));
        }
        if let Some(at) = self.offline_pair(&t, &new_parent) {
            return done(DiskFs::refuse(at));
        }
        let kept = new_name.clone();
        let np_ino = new_parent.ino();
        self.op(
            t,
            move |g, r| {
                let (np, _) = g.same_vm(r, &new_parent, "hard links")?;
                Ok(FsRequest::Link {
                    node: r.node.clone(),
                    new_parent: np,
                    new_name,
                })
            },
            move |g, r, resp| {
                if let FsResponse::Entry(e) = &resp {
                    g.made(np_ino, &kept, Some(e.node.id));
                }
                g.looked_from(r, resp, "link")
            },
            done,
        )
    }

    pub fn unlink<D>(self: &Arc<Self>, parent: Target, name: Vec<u8>, dir: bool, done: D)
    where
        D: FnOnce(Result<()>) + Send + 'static,
    {
        if let Err(e) = check_name(&name) {
            return done(Err(e));
        }
        if let Some(at) = self.offline(&parent) {
            return done(DiskFs::refuse(at));
        }
        let kept = name.clone();
        self.op(
            parent,
            move |_, r| {
                let parent = r.node.clone();
                Ok(if dir {
                    FsRequest::Rmdir { parent, name }
                } else {
                    FsRequest::Unlink { parent, name }
                })
            },
            move |g, r, resp| {
                expect_ok(resp, if dir { "rmdir" } else { "unlink" })?;
                g.made(r.ino, &kept, None);
                Ok(())
            },
            done,
        )
    }

    pub fn rename<D>(
        self: &Arc<Self>,
        parent: Target,
        name: Vec<u8>,
        new_parent: Target,
        new_name: Vec<u8>,
        flags: u32,
        done: D,
    ) where
        D: FnOnce(Result<()>) + Send + 'static,
    {
        if let Err(e) = check_name(&name).and_then(|()| check_name(&new_name)) {
            return done(Err(e));
        }
        if let Some(at) = self.offline_pair(&parent, &new_parent) {
            return done(DiskFs::refuse(at));
        }
        let (kept, kept_new) = (name.clone(), new_name.clone());
        let np_ino = new_parent.ino();
        self.op(
            parent,
            move |g, r| {
                let (np, _) = g.same_vm(r, &new_parent, "rename")?;
                Ok(FsRequest::Rename {
                    parent: r.node.clone(),
                    name,
                    new_parent: np,
                    new_name,
                    flags,
                })
            },
            move |g, r, resp| match resp {
                FsResponse::Moved { node: id, attr } => {
                    g.made(np_ino, &kept_new, Some(id));
                    g.renamed(r, id, attr);
                    // After an exchange the old name names the other file; let its event
                    // refresh it.
                    if flags & libc::RENAME_EXCHANGE == 0 {
                        g.made(r.ino, &kept, None);
                    }
                    Ok(())
                }
                other => Err(protocol("rename", &other)),
            },
            done,
        )
    }

    // ---- files -----------------------------------------------------------------------

    pub fn open<D>(self: &Arc<Self>, t: Target, flags: i32, done: D)
    where
        D: FnOnce(Result<Opened>) + Send + 'static,
    {
        if let Some(at) = self.offline(&t) {
            return diskfs::ops::open(at, flags, done);
        }
        self.op(
            t,
            move |_, r| {
                Ok(FsRequest::Open {
                    node: r.node.clone(),
                    flags,
                })
            },
            |g, r, resp| match resp {
                FsResponse::Opened { handle } => Ok(Opened {
                    fh: g.register(r, handle),
                    keep_cache: r.coherent,
                }),
                other => Err(protocol("open", &other)),
            },
            done,
        )
    }

    pub fn create<D>(
        self: &Arc<Self>,
        parent: Target,
        name: Vec<u8>,
        mode: u32,
        flags: i32,
        owner: Owner,
        done: D,
    ) where
        D: FnOnce(Result<(Looked, Opened)>) + Send + 'static,
    {
        if let Err(e) = check_name(&name) {
            return done(Err(e));
        }
        if let Some(at) = self.offline(&parent) {
            return done(DiskFs::refuse(at));
        }
        let kept = name.clone();
        self.op(
            parent,
            move |_, r| {
                Ok(FsRequest::Create {
                    parent: r.node.clone(),
                    name,
                    mode,
                    flags,
                    owner,
                })
            },
            move |g, r, resp| match resp {
                FsResponse::Created { entry, handle } => {
                    let looked = match g.entry(r, &entry) {
                        Ok(l) => l,
                        Err(e) => {
                            g.unused_entry(r, &entry);
                            g.release_unused(r, handle);
                            return Err(e);
                        }
                    };
                    g.made(r.ino, &kept, Some(entry.node.id));
                    let opened = Opened {
                        fh: g.register(r, handle),
                        keep_cache: entry.coherent,
                    };
                    Ok((looked, opened))
                }
                other => Err(protocol("create", &other)),
            },
            done,
        )
    }

    /// Read up to `size` bytes (at most one agent chunk: the kernel asks for less).
    pub fn read<D>(self: &Arc<Self>, t: Target, fh: u64, offset: u64, size: u32, done: D)
    where
        D: FnOnce(Result<Vec<u8>>) + Send + 'static,
    {
        let size = size.min(u32::try_from(MAX_CHUNK).unwrap_or(u32::MAX));
        if let Some(at) = self.offline(&t) {
            return diskfs::ops::read(at, fh, offset, size, done);
        }
        self.op(
            t,
            move |g, r| {
                Ok(FsRequest::Read {
                    handle: g.handle(r, fh)?,
                    offset,
                    size,
                })
            },
            move |_, _, resp| match resp {
                FsResponse::Data(d) if d.len() <= size as usize => Ok(d),
                FsResponse::Data(_) => {
                    Err(Error::io("the guest agent sent more data than asked for"))
                }
                other => Err(protocol("read", &other)),
            },
            done,
        )
    }

    /// Write `data` (at most one agent chunk: the kernel's writes are smaller).
    pub fn write<D>(self: &Arc<Self>, t: Target, fh: u64, offset: u64, data: Vec<u8>, done: D)
    where
        D: FnOnce(Result<u32>) + Send + 'static,
    {
        if data.len() > MAX_CHUNK {
            return done(Err(Error::invalid("write larger than the agent's chunk")));
        }
        if let Some(at) = self.offline(&t) {
            return done(DiskFs::refuse(at));
        }
        let len = data.len();
        self.op(
            t,
            move |g, r| {
                Ok(FsRequest::Write {
                    handle: g.handle(r, fh)?,
                    offset,
                    data,
                })
            },
            move |_, _, resp| match resp {
                FsResponse::Written(n) if (n as usize) <= len => Ok(n),
                FsResponse::Written(_) => {
                    Err(Error::io("the guest agent claims to have written too much"))
                }
                other => Err(protocol("write", &other)),
            },
            done,
        )
    }

    /// Close a file or directory handle. Never waits for the guest (the agent closes
    /// in the background); an unreachable guest has dropped it anyway.
    pub fn release(&self, t: &Target, fh: u64, dir: bool) {
        if let Some(at) = self.offline(t) {
            return diskfs::ops::release(at, fh);
        }
        let Some(h) = self.handles.lock().remove(fh) else {
            return;
        };
        let Ok(r) = self.resolve_now(t) else { return };
        if r.inc != h.inc {
            return;
        }
        let req = if dir {
            FsRequest::ReleaseDir { handle: h.handle }
        } else {
            FsRequest::Release { handle: h.handle }
        };
        r.client.fs_then(req, FS_DEADLINE, Box::new(|_| {}));
    }

    pub fn fsync<D>(self: &Arc<Self>, t: Target, fh: u64, datasync: bool, done: D)
    where
        D: FnOnce(Result<()>) + Send + 'static,
    {
        // Nothing of a stopped VM's disk is written: nothing to flush.
        if let Some(at) = self.offline(&t) {
            return done(at.map(drop));
        }
        self.op(
            t,
            move |g, r| {
                Ok(FsRequest::Fsync {
                    handle: g.handle(r, fh)?,
                    datasync,
                })
            },
            |_, _, resp| expect_ok(resp, "fsync"),
            done,
        )
    }

    pub fn fallocate<D>(
        self: &Arc<Self>,
        t: Target,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
        done: D,
    ) where
        D: FnOnce(Result<()>) + Send + 'static,
    {
        if let Some(at) = self.offline(&t) {
            return done(DiskFs::refuse(at));
        }
        self.op(
            t,
            move |g, r| {
                Ok(FsRequest::Fallocate {
                    handle: g.handle(r, fh)?,
                    offset,
                    length,
                    mode,
                })
            },
            |_, _, resp| expect_ok(resp, "fallocate"),
            done,
        )
    }

    pub fn lseek<D>(self: &Arc<Self>, t: Target, fh: u64, offset: u64, whence: i32, done: D)
    where
        D: FnOnce(Result<u64>) + Send + 'static,
    {
        if let Some(at) = self.offline(&t) {
            return diskfs::ops::lseek(at, fh, offset, whence, done);
        }
        self.op(
            t,
            move |g, r| {
                Ok(FsRequest::Lseek {
                    handle: g.handle(r, fh)?,
                    offset,
                    whence,
                })
            },
            |_, _, resp| match resp {
                FsResponse::Offset(o) => Ok(o),
                other => Err(protocol("lseek", &other)),
            },
            done,
        )
    }

    // ---- directories -----------------------------------------------------------------

    /// Open a directory; `keep_cache` when the agent watches it (its listing may be
    /// cached: events invalidate it).
    pub fn opendir<D>(self: &Arc<Self>, t: Target, done: D)
    where
        D: FnOnce(Result<Opened>) + Send + 'static,
    {
        if let Some(at) = self.offline(&t) {
            return diskfs::ops::opendir(at, done);
        }
        self.op(
            t,
            |_, r| {
                Ok(FsRequest::OpenDir {
                    node: r.node.clone(),
                })
            },
            |g, r, resp| match resp {
                FsResponse::Opened { handle } => Ok(Opened {
                    fh: g.register(r, handle),
                    keep_cache: r.watched,
                }),
                other => Err(protocol("opendir", &other)),
            },
            done,
        )
    }

    /// One page of entries from `offset`; `.` is reported with the target's own number.
    pub fn readdir<D>(self: &Arc<Self>, t: Target, fh: u64, offset: u64, plus: bool, done: D)
    where
        D: FnOnce(Result<Vec<DirItem>>) + Send + 'static,
    {
        if let Some(at) = self.offline(&t) {
            let max = self
                .readdir_bytes
                .load(std::sync::atomic::Ordering::Relaxed);
            return diskfs::ops::readdir(at, fh, offset, plus, max, done);
        }
        self.op(
            t,
            move |g, r| {
                Ok(FsRequest::ReadDir {
                    handle: g.handle(r, fh)?,
                    offset,
                    plus,
                    max_bytes: g.readdir_bytes.load(std::sync::atomic::Ordering::Relaxed),
                })
            },
            |g, r, resp| match resp {
                FsResponse::DirEntries(e) => Ok(g.dir_items(r, e)),
                other => Err(protocol("readdir", &other)),
            },
            done,
        )
    }

    /// A readdir reply filled the kernel's buffer after `used` bytes, the next entry
    /// needing `next` more: the buffer is that size, rounded up to pages.
    pub fn readdir_filled(&self, used: usize, next: usize) {
        let size = (used + next).div_ceil(4096) * 4096;
        let size = u32::try_from(size.clamp(4096, READDIR_BYTES as usize)).unwrap_or(4096);
        self.readdir_bytes
            .store(size, std::sync::atomic::Ordering::Relaxed);
    }

    fn dir_items(&self, r: &Resolved, entries: Vec<DirEntry>) -> Vec<DirItem> {
        // A hostile agent could send more than was asked for; nothing beyond fits anyway.
        let max = (READDIR_BYTES as usize / 24).max(1);
        let mut out = Vec::with_capacity(entries.len().min(max));
        for (i, e) in entries.into_iter().enumerate() {
            let dot = e.name == b"." || e.name == b"..";
            if i >= max || !(dot || valid_name(&e.name)) {
                if let Some(en) = &e.entry {
                    self.unused_entry(r, en);
                }
                continue;
            }
            let looked = match (&e.entry, dot) {
                (Some(en), false) => match self.entry(r, en) {
                    Ok(l) => Some(l),
                    Err(_) => {
                        self.unused_entry(r, en);
                        continue;
                    }
                },
                (Some(en), true) => {
                    self.unused_entry(r, en);
                    None
                }
                (None, _) => None,
            };
            let ino = match &looked {
                Some(l) => l.ino,
                None if e.name == b"." => r.ino,
                // What `lstat` of the entry would show (0 only if no number can be made;
                // the kernel then looks the entry up itself).
                None => self.number_of(r, e.node).unwrap_or(0),
            };
            out.push(DirItem {
                name: e.name,
                next_offset: e.next_offset,
                kind: e.kind & libc::S_IFMT,
                ino,
                looked,
            });
        }
        out
    }

    /// Give back the kernel references of plus entries that did not fit in its buffer.
    pub fn unused_entries(&self, items: &[DirItem]) {
        let v: Vec<(u64, u64)> = items
            .iter()
            .filter_map(|i| i.looked.as_ref().map(|l| (l.ino, 1)))
            .collect();
        self.forget_many(&v);
    }

    pub fn statfs<D>(self: &Arc<Self>, t: Target, done: D)
    where
        D: FnOnce(Result<StatFs>) + Send + 'static,
    {
        if let Some(at) = self.offline(&t) {
            return diskfs::ops::statfs(at, done);
        }
        self.op(
            t,
            |_, r| {
                Ok(FsRequest::StatFs {
                    node: r.node.clone(),
                })
            },
            |_, _, resp| match resp {
                FsResponse::StatFs(s) => Ok(s),
                other => Err(protocol("statfs", &other)),
            },
            done,
        )
    }

    // ---- xattrs ----------------------------------------------------------------------

    pub fn setxattr<D>(
        self: &Arc<Self>,
        t: Target,
        name: Vec<u8>,
        value: Vec<u8>,
        flags: i32,
        done: D,
    ) where
        D: FnOnce(Result<()>) + Send + 'static,
    {
        if let Err(e) = xattr_name(&name) {
            return done(Err(e));
        }
        if value.len() > MAX_XATTR as usize {
            return done(Err(Error::new(libc::E2BIG, "xattr value too large")));
        }
        if let Some(at) = self.offline(&t) {
            return done(DiskFs::refuse(at));
        }
        self.op(
            t,
            move |_, r| {
                Ok(FsRequest::SetXattr {
                    node: r.node.clone(),
                    name,
                    value,
                    flags,
                })
            },
            |g, r, resp| {
                g.xattrs_changed(&Target::Node(r.ino));
                expect_ok(resp, "setxattr")
            },
            done,
        )
    }

    /// The xattr names of `t` when they are known to be current and its VM is live.
    fn cached_xattrs(&self, t: &Target) -> Option<XattrNames> {
        let Target::Node(ino) = t else { return None };
        let names = self.inodes.lock().get(*ino)?.xattrs.clone()?;
        self.resolve_now(t).ok().map(|_| names)
    }

    /// After a change of `t`'s xattrs, its cached names are stale.
    fn xattrs_changed(&self, t: &Target) {
        if let Target::Node(ino) = t {
            self.inodes.lock().forget_xattrs(*ino);
        }
    }

    /// `size` 0: the value's size; else the value (ERANGE when longer than `size`).
    pub fn getxattr<D>(self: &Arc<Self>, t: Target, name: Vec<u8>, size: u32, done: D)
    where
        D: FnOnce(Result<XattrReply>) + Send + 'static,
    {
        if let Err(e) = xattr_name(&name) {
            return done(Err(e));
        }
        if let Some(at) = self.offline(&t) {
            return diskfs::ops::getxattr(at, done);
        }
        if self.cached_xattrs(&t).is_some_and(|n| !n.contains(&name)) {
            return done(Err(Error::new(libc::ENODATA, "no such attribute")));
        }
        self.op(
            t,
            move |_, r| {
                Ok(FsRequest::GetXattr {
                    node: r.node.clone(),
                    name,
                    size: size.min(MAX_XATTR),
                })
            },
            move |_, _, resp| xattr_reply(resp, size, "getxattr"),
            done,
        )
    }

    pub fn listxattr<D>(self: &Arc<Self>, t: Target, size: u32, done: D)
    where
        D: FnOnce(Result<XattrReply>) + Send + 'static,
    {
        if let Some(at) = self.offline(&t) {
            return diskfs::ops::listxattr(at, size, done);
        }
        if let Some(names) = self.cached_xattrs(&t) {
            // Cached names were checked against MAX_XATTR when they arrived.
            let len = u32::try_from(names.0.len()).unwrap_or(u32::MAX);
            return done(match size {
                0 => Ok(XattrReply::Size(len)),
                s if s < len => Err(Error::new(libc::ERANGE, "xattr list too large")),
                _ => Ok(XattrReply::Data(names.0)),
            });
        }
        self.op(
            t,
            move |_, r| {
                Ok(FsRequest::ListXattr {
                    node: r.node.clone(),
                    size: size.min(MAX_XATTR),
                })
            },
            move |_, _, resp| xattr_reply(resp, size, "listxattr"),
            done,
        )
    }

    pub fn removexattr<D>(self: &Arc<Self>, t: Target, name: Vec<u8>, done: D)
    where
        D: FnOnce(Result<()>) + Send + 'static,
    {
        if let Some(at) = self.offline(&t) {
            return done(DiskFs::refuse(at));
        }
        self.op(
            t,
            move |_, r| {
                Ok(FsRequest::RemoveXattr {
                    node: r.node.clone(),
                    name,
                })
            },
            |g, r, resp| {
                g.xattrs_changed(&Target::Node(r.ino));
                expect_ok(resp, "removexattr")
            },
            done,
        )
    }
}
