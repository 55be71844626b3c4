//! The wire protocol between the host daemon (`fsd`) and `bandsox-agent`.
//!
//! # Framing
//! After the handshake the byte stream is a sequence of frames:
//! `u32 little-endian payload length` followed by `length` bytes of a bincode-encoded
//! [`Message`]. The length is checked against [`MAX_FRAME_LEN`] *before* anything is
//! allocated, and bincode decoding runs with the same byte limit, so a hostile peer can
//! make us allocate at most one frame's worth of memory. A malformed, truncated or
//! oversized frame is a connection error, never a panic.
//!
//! # Handshake and resynchronisation
//! Transports like virtio-serial are plain byte pipes that survive host reconnects, so
//! stale bytes from an earlier session may still be in flight. Each session therefore
//! starts with [`SYNC_MAGIC`] followed by one frame: the host sends
//! `SYNC_MAGIC + Frame(Message::Hello)`, the agent scans its input for the magic, reads the
//! frame and answers `SYNC_MAGIC + Frame(Message::HelloAck)` echoing the host's nonce.
//! The host likewise scans for the magic and ignores any ack whose nonce is not its own.
//! The host re-sends its hello periodically until acknowledged (the agent may still be
//! booting). An agent that does not speak the host's [`PROTOCOL_VERSION`] answers with a
//! `HelloAck` carrying `Err` and ends the session.
//!
//! # Multiplexing and flow control
//! Every request carries a host-chosen `id`; the answer carries the same id, so any number
//! of requests and commands run at once. A command started with [`Request::Exec`] is a
//! *stream* named by the request's id: its output arrives as [`Message::Output`] frames and
//! ends with one [`Message::Exited`]. The agent may only send as many output bytes for a
//! stream as the host has granted with [`Message::Credit`] (plus [`INITIAL_CREDIT`]);
//! when the credit is used up it stops reading the command's pipes, so a command printing
//! gigabytes blocks in `write(2)` instead of growing anyone's memory.
//!
//! Stdin is flow-controlled the same way in the other direction: the host may send at most
//! [`INITIAL_CREDIT`] stdin bytes per stream plus what the agent granted with
//! [`Message::StdinCredit`] (sent as the command's stdin pipe accepts the bytes), so a
//! command that does not read its stdin cannot make the guest buffer unbounded data.
//!
//! A `SYNC_MAGIC` may also appear between frames of an established session (the host
//! re-sends its hello until acknowledged). Its first four bytes, read as a frame length,
//! exceed [`MAX_FRAME_LEN`], so readers recognise it unambiguously (see
//! [`codec::FrameReader`]); a repeated hello with the session's nonce is re-acknowledged,
//! one with a new nonce starts a new session.
//!
//! The encoding (see [`codec`]) is bincode 1.3 with varint integers, little endian,
//! trailing bytes rejected and a byte limit of [`MAX_FRAME_LEN`].
use serde::{Deserialize, Serialize};

pub mod codec;
pub mod fs;
pub use codec::{
    decode_message, encode_frame, encode_message, write_frame, FrameReader, Incoming, ProtoError,
};

/// Bumped on any incompatible change to [`Message`] or framing.
pub const PROTOCOL_VERSION: u32 = 5;

/// Marks the start of a session in both directions (see module docs).
pub const SYNC_MAGIC: [u8; 8] = *b"BSXSYNC\x01";

/// Largest payload of one frame. Data chunks are at most [`MAX_CHUNK`] so every
/// message fits comfortably.
pub const MAX_FRAME_LEN: u32 = 4 * 1024 * 1024;

/// Largest data chunk carried by one `Output`, `Stdin` or file-data message.
pub const MAX_CHUNK: usize = 1024 * 1024;

/// Output bytes the agent may send per stream before the first [`Message::Credit`].
pub const INITIAL_CREDIT: u64 = 256 * 1024;

/// Request/stream identifier chosen by the host; unique per connection.
pub type Id = u64;

/// Everything that crosses the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// host → agent: first frame of a session.
    Hello(Hello),
    /// agent → host: answer to `Hello`.
    HelloAck(HelloAck),
    /// host → agent: a request; answered by exactly one `Response` with the same id
    /// (for `Exec`: `Response::Started`, then `Output`* and one `Exited`).
    Request { id: Id, req: Request },
    /// agent → host.
    Response { id: Id, resp: Response },
    /// agent → host: bytes a command wrote.
    Output {
        id: Id,
        stream: OutStream,
        #[serde(with = "serde_bytes_vec")]
        data: Vec<u8>,
    },
    /// agent → host: a command ended; no more `Output` for this id follows.
    Exited { id: Id, status: ExitStatus },
    /// host → agent: the host consumed `bytes` more output bytes of stream `id`.
    Credit { id: Id, bytes: u64 },
    /// host → agent: bytes for a command's stdin (empty `data` is allowed and ignored).
    Stdin {
        id: Id,
        #[serde(with = "serde_bytes_vec")]
        data: Vec<u8>,
    },
    /// host → agent: close a command's stdin.
    CloseStdin { id: Id },
    /// host → agent: send a signal to a command's process group.
    Signal { id: Id, signal: i32 },
    /// agent → host: `bytes` more stdin bytes of stream `id` were written to the command's
    /// stdin pipe (or discarded because the command is gone); the host may send that many
    /// more (see module docs).
    StdinCredit { id: Id, bytes: u64 },
    /// host → agent: drop references to file-service nodes (`(node, count)`); no answer.
    Forget { nodes: Vec<(fs::NodeId, u64)> },
    /// agent → host: changes in the guest's filesystem (see [`fs`]).
    FsEvents(Vec<fs::FsEvent>),
    /// host → agent: set the window size of a command started with a terminal
    /// ([`ExecOptions::tty`]); the guest kernel sends SIGWINCH to the terminal's
    /// foreground process group. Ignored for other commands. (Appended last so earlier
    /// variants keep their encoding.)
    Resize { id: Id, size: TtySize },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    /// Random per attempt; echoed in the ack so stale acks are ignored.
    pub nonce: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    pub nonce: u64,
    /// `Ok(info)` or `Err(reason)` (e.g. unsupported version).
    pub result: Result<AgentInfo, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub version: u32,
    pub agent_version: String,
    pub hostname: String,
    pub kernel: String,
    /// Milliseconds since the guest booted (from /proc/uptime; host mode: agent start).
    pub uptime_ms: u64,
    /// Random, chosen when the agent process started: the same across sessions (and in
    /// clones of a snapshot), another after a reboot.
    pub instance: u64,
}

/// Which pipe an `Output` chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutStream {
    Stdout,
    Stderr,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "{c}"),
            ExitStatus::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Program {
    /// `argv[0]` is looked up in `PATH` like `execvp`.
    Argv(Vec<Vec<u8>>),
    /// A command line or whole script: a `#!` first line picks the interpreter,
    /// otherwise it runs as `/bin/sh -c <script>`.
    Script(#[serde(with = "serde_bytes_vec")] Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    pub program: Program,
    /// Extra environment (`KEY`, `VALUE`) on top of the agent's default environment.
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// Working directory; `None` = `/` (or the host-mode root).
    pub cwd: Option<Vec<u8>>,
    /// When false the command's stdin is `/dev/null`; when true it is a pipe fed by
    /// `Message::Stdin` until `Message::CloseStdin`.
    pub stdin: bool,
}

/// A terminal's window size in character cells (both 1..=[`MAX_TTY_DIM`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    pub cols: u16,
    pub rows: u16,
}

/// Largest accepted terminal width or height.
pub const MAX_TTY_DIM: u16 = 1000;

impl TtySize {
    /// Whether both dimensions are within 1..=[`MAX_TTY_DIM`].
    pub fn is_valid(&self) -> bool {
        (1..=MAX_TTY_DIM).contains(&self.cols) && (1..=MAX_TTY_DIM).contains(&self.rows)
    }
}

/// [`Request::ExecWith`]: a command with per-command options beyond [`ExecSpec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOptions {
    pub spec: ExecSpec,
    /// Run as this user (`NAME`, `UID`, `NAME:GROUP`, `UID:GID`, resolved through the
    /// guest's `/etc/passwd` and `/etc/group`) instead of the image's `User`.
    pub user: Option<String>,
    /// Give the command a pseudo-terminal of this size as its controlling terminal
    /// (stdin, stdout and stderr; output arrives as `Stdout`). `TERM` defaults to
    /// `xterm-256color` unless `spec.env` sets it.
    pub tty: Option<TtySize>,
}

/// host → agent requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Answered with `Response::Pong`.
    Ping,
    /// Start a command; answered with `Response::Started { pid }` or `Response::Error`.
    Exec(ExecSpec),
    /// Set the guest hostname (init mode only; host mode answers `Ok` without change).
    SetHostname(String),
    /// `sync(2)` all filesystems; answered `Ok`.
    Sync,
    /// Sync, unmount and power the guest off; answered `Ok` just before powering off.
    /// Host mode: answers `Ok` and exits the agent process.
    PowerOff,
    /// A file-service request (see [`fs`]); answered with `Response::Fs` or `Error`.
    Fs(fs::FsRequest),
    /// `sync(2)`, then freeze the guest's root filesystem (`FIFREEZE`) so its disk is
    /// consistent for a snapshot; answered `Ok` once frozen (also when the root cannot be
    /// frozen because it lives in memory: there is no disk to make consistent). The agent
    /// thaws on its own after `timeout_ms` unless a `Thaw` arrives first, so a host that
    /// vanishes never leaves the guest's disk frozen. A second `Freeze` re-arms the timer.
    /// Host mode answers `Error { EOPNOTSUPP }`.
    Freeze { timeout_ms: u32 },
    /// Thaw what `Freeze` froze (`FITHAW`); `Ok` also when nothing is frozen. Any session
    /// may thaw (a restored clone thaws the freeze its snapshot was taken under).
    Thaw,
    /// Give a restored clone its own identity: hostname, fresh entropy mixed into the
    /// kernel's pool (`RNDADDENTROPY`, then a CRNG reseed) and, where the image has an
    /// `/etc/machine-id`, the given machine id. Host mode answers `Ok` without change.
    SetIdentity(Identity),
    /// Set the guest's wall clock (`CLOCK_REALTIME`) to the host's time, in seconds and
    /// nanoseconds since the Unix epoch: a clone restored from a snapshot wakes up with
    /// the snapshot's time. Host mode answers `Ok` without change.
    SetClock { sec: i64, nsec: u32 },
    /// Like `Exec`, with per-command options (user, terminal). Appended last so earlier
    /// variants keep their encoding; the host sends plain `Exec` when no option is set.
    ExecWith(ExecOptions),
}

/// A clone's identity (see [`Request::SetIdentity`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub hostname: String,
    /// Random bytes from the host (at most 512 are used).
    #[serde(with = "serde_bytes_vec")]
    pub entropy: Vec<u8>,
    /// 32 lowercase hex digits; written only where `/etc/machine-id` exists.
    pub machine_id: Option<String>,
    /// The clone's own network (`net=tap`): a `bandsox.net=` value
    /// ([`crate::guestnet::GuestNetConfig`]) that replaces the address, netmask, default
    /// route and resolvers the snapshot's guest had.
    pub net: Option<String>,
}

/// agent → host responses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Ok,
    Pong,
    Started {
        pid: u32,
    },
    /// `errno` is the guest's errno when one applies (0 otherwise).
    Error {
        errno: i32,
        message: String,
    },
    Fs(fs::FsResponse),
}

/// Byte vectors as bincode byte strings (length + raw bytes), not per-element sequences.
pub(crate) mod serde_bytes_vec {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = a.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(V)
    }
}
