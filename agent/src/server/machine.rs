//! Whole-machine requests used around snapshots: freezing the root filesystem and giving
//! a restored clone its own identity (hostname, entropy, machine id, network address).
//!
//! Invariants:
//! - At most one freeze is outstanding; it is tracked by an *epoch* that every freeze and
//!   thaw bumps. The auto-thaw timer armed by a freeze only acts if the epoch is still the
//!   one it was armed for, so a late timer never thaws a newer freeze.
//! - A freeze is never left behind: if the host does not send `Thaw` within the freeze's
//!   timeout, the agent thaws by itself (and logs it).
//! - `Thaw` is idempotent and needs no prior `Freeze` in the same session or even the same
//!   machine incarnation: a clone restored from a snapshot resumes with the filesystem
//!   frozen and a different host connection thaws it.
//! - Only PID 1 of a VM (`AgentConfig::machine`) touches the machine; host mode refuses
//!   `Freeze` and ignores `SetIdentity` and `SetClock`.
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::proto::{Identity, Response};

use super::Agent;

/// `FIFREEZE` = `_IOWR('X', 119, int)`.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
/// `FITHAW` = `_IOWR('X', 120, int)`.
const FITHAW: libc::c_ulong = 0xC004_5878;
/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` = `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// Longest freeze a host may ask for.
pub const MAX_FREEZE: Duration = Duration::from_secs(120);
/// Most entropy bytes used from one `SetIdentity`.
const MAX_ENTROPY: usize = 512;

/// The filesystem a snapshot must make consistent: the guest's root (its disk).
const FREEZE_PATH: &str = "/";

#[derive(Default)]
pub(crate) struct Freezer {
    state: Mutex<FreezeState>,
}

#[derive(Default)]
struct FreezeState {
    frozen: bool,
    epoch: u64,
}

/// A failure: the errno and one line for the host.
type Failed = (i32, String);

fn errno_response(errno: i32, message: String) -> Failed {
    (errno, message)
}

fn respond(r: Result<(), Failed>) -> Response {
    match r {
        Ok(()) => Response::Ok,
        Err((errno, message)) => Response::Error { errno, message },
    }
}

fn ioctl_path(path: &Path, request: libc::c_ulong) -> std::io::Result<()> {
    let dir = std::fs::File::open(path)?;
    // SAFETY: FIFREEZE/FITHAW take an (ignored) int argument and no memory; the fd is
    // open for the duration of the call.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), request as _, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Freezer {
    fn lock(&self) -> std::sync::MutexGuard<'_, FreezeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sync and freeze; arm the auto-thaw. Blocking (run on a blocking thread).
    fn freeze_blocking(&self, path: &Path) -> Result<u64, Failed> {
        nix::unistd::sync();
        let mut st = self.lock();
        if !st.frozen {
            match ioctl_path(path, FIFREEZE) {
                Ok(()) => st.frozen = true,
                // Already frozen by someone else (or by a snapshot this clone came from).
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => st.frozen = true,
                // A root in memory (no disk) has nothing to make consistent.
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    tracing::info!(
                        "freeze: {} cannot be frozen ({e}); nothing to do",
                        path.display()
                    );
                }
                Err(e) => {
                    return Err(errno_response(
                        e.raw_os_error().unwrap_or(libc::EIO),
                        format!("cannot freeze {}: {e}", path.display()),
                    ))
                }
            }
        }
        st.epoch += 1;
        Ok(st.epoch)
    }

    /// Thaw if frozen (also a freeze this process does not know about). Blocking.
    fn thaw_blocking(&self, path: &Path) -> Result<(), Failed> {
        let mut st = self.lock();
        st.epoch += 1;
        st.frozen = false;
        match ioctl_path(path, FITHAW) {
            Ok(()) => Ok(()),
            // EINVAL: not frozen. EOPNOTSUPP: cannot be frozen at all.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => Ok(()),
            Err(e) => Err(errno_response(
                e.raw_os_error().unwrap_or(libc::EIO),
                format!("cannot thaw {}: {e}", path.display()),
            )),
        }
    }

    /// Thaw only if `epoch` is still the current freeze (the auto-thaw timer).
    fn expire(&self, path: &Path, epoch: u64) {
        let current = {
            let st = self.lock();
            st.frozen && st.epoch == epoch
        };
        if current {
            tracing::warn!(
                "freeze of {} timed out without a thaw: thawing",
                path.display()
            );
            let _ = self.thaw_blocking(path);
        }
    }
}

/// `Request::Freeze`.
pub(crate) async fn freeze(agent: &Arc<Agent>, timeout_ms: u32) -> Response {
    if !agent.cfg.machine {
        return respond(Err(errno_response(
            libc::EOPNOTSUPP,
            "freeze: the agent runs in host mode (no VM to freeze)".into(),
        )));
    }
    let timeout = Duration::from_millis(timeout_ms.into()).min(MAX_FREEZE);
    let a = agent.clone();
    let res =
        tokio::task::spawn_blocking(move || a.freezer.freeze_blocking(Path::new(FREEZE_PATH)))
            .await;
    match res {
        Ok(Ok(epoch)) => {
            let a = agent.clone();
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                let _ = tokio::task::spawn_blocking(move || {
                    a.freezer.expire(Path::new(FREEZE_PATH), epoch)
                })
                .await;
            });
            Response::Ok
        }
        Ok(Err(f)) => respond(Err(f)),
        Err(e) => respond(Err(errno_response(
            libc::EIO,
            format!("freeze failed: {e}"),
        ))),
    }
}

/// `Request::Thaw`.
pub(crate) async fn thaw(agent: &Arc<Agent>) -> Response {
    if !agent.cfg.machine {
        return Response::Ok;
    }
    let a = agent.clone();
    match tokio::task::spawn_blocking(move || a.freezer.thaw_blocking(Path::new(FREEZE_PATH))).await
    {
        Ok(r) => respond(r),
        Err(e) => respond(Err(errno_response(libc::EIO, format!("thaw failed: {e}")))),
    }
}

/// `Request::SetClock`: set `CLOCK_REALTIME` (init mode only; host mode leaves the
/// host's clock alone).
pub(crate) fn set_clock(agent: &Arc<Agent>, sec: i64, nsec: u32) -> Response {
    if !agent.cfg.machine {
        return Response::Ok;
    }
    if nsec >= 1_000_000_000 || sec < 0 {
        return respond(Err(errno_response(
            libc::EINVAL,
            format!("invalid time {sec}.{nsec:09}"),
        )));
    }
    let ts = nix::sys::time::TimeSpec::new(sec as libc::time_t, libc::c_long::from(nsec));
    if let Err(e) = nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts) {
        let e = std::io::Error::from(e);
        return respond(Err(errno_response(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!("clock_settime: {e}"),
        )));
    }
    Response::Ok
}

/// `Request::SetIdentity`.
pub(crate) async fn set_identity(agent: &Arc<Agent>, id: Identity) -> Response {
    if !agent.cfg.machine {
        return Response::Ok;
    }
    match tokio::task::spawn_blocking(move || apply_identity(&id, Path::new("/etc/machine-id")))
        .await
    {
        Ok(r) => respond(r),
        Err(e) => respond(Err(errno_response(
            libc::EIO,
            format!("set identity failed: {e}"),
        ))),
    }
}

fn apply_identity(id: &Identity, machine_id_path: &Path) -> Result<(), Failed> {
    if let Err(e) = nix::unistd::sethostname(&id.hostname) {
        return Err(errno_response(
            e as i32,
            format!("cannot set hostname to {:?}: {}", id.hostname, e.desc()),
        ));
    }
    if !id.entropy.is_empty() {
        add_entropy(&id.entropy[..id.entropy.len().min(MAX_ENTROPY)]).map_err(|e| {
            errno_response(
                e.raw_os_error().unwrap_or(libc::EIO),
                format!("cannot add entropy: {e}"),
            )
        })?;
    }
    if let Some(net) = &id.net {
        let cfg: crate::guestnet::GuestNetConfig = net.parse().map_err(|e| {
            errno_response(libc::EINVAL, format!("bad network config {net:?}: {e}"))
        })?;
        crate::guestnet::reapply(&cfg).map_err(|e| {
            errno_response(
                e.raw_os_error().unwrap_or(libc::EIO),
                format!("cannot re-address the network: {e}"),
            )
        })?;
    }
    if let Some(mid) = &id.machine_id {
        if !valid_machine_id(mid) {
            return Err(errno_response(
                libc::EINVAL,
                format!("machine id {mid:?} is not 32 lowercase hex digits"),
            ));
        }
        if machine_id_path.exists() {
            std::fs::write(machine_id_path, format!("{mid}\n")).map_err(|e| {
                errno_response(
                    e.raw_os_error().unwrap_or(libc::EIO),
                    format!("cannot write {}: {e}", machine_id_path.display()),
                )
            })?;
        }
    }
    Ok(())
}

fn valid_machine_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Mix `bytes` into the kernel's pool, credit them, and reseed the CRNG so the very next
/// read of `/dev/urandom` differs from every other clone's.
fn add_entropy(bytes: &[u8]) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let too_big = || std::io::Error::from_raw_os_error(libc::EINVAL);
    let buf_size = i32::try_from(bytes.len()).map_err(|_| too_big())?;
    let entropy_bits = buf_size.checked_mul(8).ok_or_else(too_big)?;
    let mut info: Vec<u8> = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&entropy_bits.to_ne_bytes());
    info.extend_from_slice(&buf_size.to_ne_bytes());
    info.extend_from_slice(bytes);
    // Keep the buffer 4-byte aligned in length (buf is __u32[]).
    while !info.len().is_multiple_of(4) {
        info.push(0);
    }
    // SAFETY: RNDADDENTROPY reads a rand_pool_info header followed by `buf_size` bytes;
    // `info` holds exactly that and outlives the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _, 0) };
    if rc != 0 {
        // Older kernels lack it; the pool was still credited.
        tracing::debug!("RNDRESEEDCRNG failed: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // _IOWR('X', 119, int): dir=3 (<<30), size=4 (<<16), type='X' (<<8), nr.
        assert_eq!(
            FIFREEZE,
            (3 << 30) | (4 << 16) | (u64::from(b'X') << 8) | 119
        );
        assert_eq!(FITHAW, (3 << 30) | (4 << 16) | (u64::from(b'X') << 8) | 120);
        // _IOW('R', 3, int[2]): dir=1, size=8.
        assert_eq!(
            RNDADDENTROPY,
            (1 << 30) | (8 << 16) | (u64::from(b'R') << 8) | 3
        );
        assert_eq!(RNDRESEEDCRNG, (u64::from(b'R') << 8) | 7);
    }

    #[test]
    fn machine_ids_are_checked() {
        assert!(valid_machine_id("0123456789abcdef0123456789abcdef"));
        assert!(!valid_machine_id("0123456789ABCDEF0123456789abcdef"));
        assert!(!valid_machine_id("../../etc/passwd"));
        assert!(!valid_machine_id(""));
    }

    #[test]
    fn thaw_of_an_unfrozen_fs_is_ok_and_epochs_advance() {
        let f = Freezer::default();
        let dir = tempfile::tempdir().unwrap();
        // Unprivileged or not, thawing something not frozen is not an error.
        match f.thaw_blocking(dir.path()) {
            Ok(()) => {}
            Err((errno, _)) => {
                assert!(errno == libc::EPERM || errno == libc::EACCES, "{errno}")
            }
        }
        let e1 = f.lock().epoch;
        // A stale timer does nothing.
        f.expire(dir.path(), e1.wrapping_sub(1));
        assert!(!f.lock().frozen);
    }
}
