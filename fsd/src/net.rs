//! Guest networking on the host side: what a VM's network looks like (`net=none|user|tap`)
//! and the TAP devices and NAT rules behind `net=tap`.
//!
//! - `net=user` (QEMU only): QEMU's built-in user-mode stack (slirp). No root, no host
//!   state. The guest is always `10.0.2.15/24`, gateway `10.0.2.2` (which is the host's
//!   loopback), DNS `10.0.2.3`.
//! - `net=tap` (QEMU and Firecracker, root only): a TAP device `bsx<vm id>` per VM, a /30
//!   per VM out of a pool (default `172.30.0.0/16`, `BANDSOX_TAP_POOL` to change it):
//!   host `.1`, guest `.2`. One nftables table `ip bandsox` masquerades the pool's traffic
//!   to anywhere outside the pool, and drops traffic between two VMs' TAP devices.
//!   IPv4 forwarding is switched on.
//!
//! Invariants:
//! - A VM's slot (its /30) is allocated once at create time, stored in its record, and
//!   never shared: [`SlotAllocator`] hands out the lowest free slot.
//! - [`setup_tap`] is idempotent (a leftover device is reconfigured) and [`remove_tap`]
//!   tolerates a missing device, so restart, adopt and delete can call them blindly.
//! - Every external command has a deadline ([`COMMAND_TIMEOUT`]) and its stderr ends up in
//!   the error message.
use std::collections::BTreeSet;
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bandsox_agent::guestnet::{prefix_mask, GuestNetConfig};
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::vmm::NetMode;

/// Environment variable that overrides the TAP address pool (an IPv4 CIDR, /8 to /28).
pub const TAP_POOL_ENV: &str = "BANDSOX_TAP_POOL";
pub const DEFAULT_TAP_POOL: &str = "172.30.0.0/16";
/// TAP device names: this prefix plus the VM id (12 hex digits: 15 bytes, IFNAMSIZ-1).
pub const TAP_PREFIX: &str = "bsx";
/// The nftables table (family `ip`) that holds the NAT and isolation rules.
pub const NFT_TABLE: &str = "bandsox";
/// Deadline of one `ip`/`nft` invocation.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`setup_tap`] retries while the kernel still holds a just-deleted device.
pub const TAP_BUSY_WAIT: Duration = Duration::from_secs(3);

/// QEMU user networking's fixed addresses.
pub fn user_mode_config() -> GuestNetConfig {
    GuestNetConfig {
        addr: Ipv4Addr::new(10, 0, 2, 15),
        prefix: 24,
        gateway: Ipv4Addr::new(10, 0, 2, 2),
        dns: vec![Ipv4Addr::new(10, 0, 2, 3)],
    }
}

/// An address pool carved into /30 slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapPool {
    base: Ipv4Addr,
    prefix: u8,
}

impl TapPool {
    pub fn parse(s: &str) -> Result<TapPool> {
        let bad = || Error::invalid(format!("{TAP_POOL_ENV}={s}: expected an IPv4 CIDR /8../28"));
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| (8..=28).contains(p))
            .ok_or_else(bad)?;
        let base = Ipv4Addr::from(u32::from(addr) & u32::from(prefix_mask(prefix)));
        Ok(TapPool { base, prefix })
    }

    /// From `BANDSOX_TAP_POOL`, else the default.
    pub fn from_env() -> Result<TapPool> {
        match std::env::var(TAP_POOL_ENV) {
            Ok(v) if !v.is_empty() => TapPool::parse(&v),
            _ => TapPool::parse(DEFAULT_TAP_POOL),
        }
    }

    /// How many /30 slots the pool holds.
    pub fn slots(&self) -> u32 {
        1u32 << (30 - self.prefix)
    }

    /// Host (`.1`) and guest (`.2`) address of `slot`; `None` outside the pool.
    pub fn addresses(&self, slot: u32) -> Option<(Ipv4Addr, Ipv4Addr)> {
        if slot >= self.slots() {
            return None;
        }
        let net = u32::from(self.base) + slot * 4;
        Some((Ipv4Addr::from(net + 1), Ipv4Addr::from(net + 2)))
    }

    pub fn cidr(&self) -> String {
        format!("{}/{}", self.base, self.prefix)
    }
}

/// Hands out TAP slots; knows every slot in use by a VM record.
#[derive(Debug, Default)]
pub struct SlotAllocator {
    used: Mutex<BTreeSet<u32>>,
}

impl SlotAllocator {
    /// Mark a slot (from a record read at startup) as used.
    pub fn claim(&self, slot: u32) {
        self.used.lock().insert(slot);
    }

    /// The lowest free slot of `pool`, now marked used.
    pub fn allocate(&self, pool: &TapPool) -> Result<u32> {
        let mut used = self.used.lock();
        let slot = (0..pool.slots())
            .find(|s| !used.contains(s))
            .ok_or_else(|| {
                Error::new(
                    libc::EADDRNOTAVAIL,
                    format!(
                        "net=tap: all {} addresses of {} are in use (set {TAP_POOL_ENV} to a larger pool)",
                        pool.slots(),
                        pool.cidr()
                    ),
                )
            })?;
        used.insert(slot);
        Ok(slot)
    }

    pub fn release(&self, slot: u32) {
        self.used.lock().remove(&slot);
    }
}

/// Everything a backend needs to attach a VM to its TAP device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapDevice {
    pub ifname: String,
    pub host_addr: Ipv4Addr,
    pub guest_addr: Ipv4Addr,
    pub pool: TapPool,
}

/// A VM's network as its backend sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetPlan {
    /// What the agent configures in the guest (`bandsox.net=`).
    pub guest: GuestNetConfig,
    /// The guest NIC's MAC address (locally administered, derived from the VM id).
    pub mac: String,
    /// `Some` for `net=tap`.
    pub tap: Option<TapDevice>,
}

/// A locally administered unicast MAC derived from the VM id (`02:bd:` + 4 bytes).
pub fn mac_for(vm_id: &str) -> String {
    let h = vm_id
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
        .to_be_bytes();
    format!("02:bd:{:02x}:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2], h[3])
}

/// The network plan of a VM, or `None` for `net=none`.
pub fn plan(mode: NetMode, vm_id: &str, slot: Option<u32>) -> Result<Option<NetPlan>> {
    let mac = mac_for(vm_id);
    match mode {
        NetMode::None => Ok(None),
        NetMode::User => Ok(Some(NetPlan {
            guest: user_mode_config(),
            mac,
            tap: None,
        })),
        NetMode::Tap => {
            let pool = TapPool::from_env()?;
            let slot = slot.ok_or_else(|| Error::invalid("net=tap VM has no address slot"))?;
            let (host_addr, guest_addr) = pool.addresses(slot).ok_or_else(|| {
                Error::invalid(format!(
                    "address slot {slot} is outside {} (was {TAP_POOL_ENV} changed?)",
                    pool.cidr()
                ))
            })?;
            Ok(Some(NetPlan {
                guest: GuestNetConfig {
                    addr: guest_addr,
                    prefix: 30,
                    gateway: host_addr,
                    dns: host_nameservers(),
                },
                mac,
                tap: Some(TapDevice {
                    ifname: tap_name(vm_id),
                    host_addr,
                    guest_addr,
                    pool,
                }),
            }))
        }
    }
}

pub fn tap_name(vm_id: &str) -> String {
    let mut n = format!("{TAP_PREFIX}{vm_id}");
    n.truncate(libc::IFNAMSIZ - 1);
    n
}

/// The host's IPv4 nameservers a guest can reach (loopback resolvers are not).
fn host_nameservers() -> Vec<Ipv4Addr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .filter(|a| !a.is_loopback() && !a.is_unspecified())
        .take(bandsox_agent::guestnet::MAX_DNS)
        .collect()
}

/// Refuse `net=tap` early, with the reason, where it cannot work.
pub fn check_tap_possible() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::new(
            libc::EPERM,
            "net=tap needs root: the daemon creates a TAP device and NAT rules per VM \
             (CAP_NET_ADMIN); run it as root or use net=user (qemu) / net=none",
        ));
    }
    for tool in ["ip", "nft"] {
        if crate::tools::find_tool(tool).is_none() {
            return Err(Error::new(
                libc::ENOSYS,
                format!(
                    "net=tap needs `{tool}` (Debian packages iproute2, nftables; \
                     mount-helpers/setup installs them)"
                ),
            ));
        }
    }
    Ok(())
}

/// Run a command with a deadline; stdin gets `input`. Error text names the command and
/// carries its stderr.
fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<()> {
    let what = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(format!("{what}: {e}")))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| Error::io(format!("{what}: writing stdin: {e}")))?;
    }
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut s) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut s, &mut err);
                }
                return if status.success() {
                    Ok(())
                } else {
                    Err(Error::io(format!("{what}: {}", err.trim())))
                };
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::timed_out(format!(
                    "{what}: no answer within {COMMAND_TIMEOUT:?}"
                )));
            }
            Err(e) => return Err(Error::io(format!("{what}: {e}"))),
        }
    }
}

/// Asks the kernel through a socket of this process's network namespace (sysfs may
/// show another namespace's devices).
fn link_exists(ifname: &str) -> bool {
    nix::net::if_::if_nametoindex(ifname).is_ok()
}

/// The nftables ruleset for `pool`, replacing any earlier version of the table at once.
pub fn nft_ruleset(pool: &TapPool) -> String {
    let cidr = pool.cidr();
    format!(
        "table ip {NFT_TABLE}\n\
         delete table ip {NFT_TABLE}\n\
         table ip {NFT_TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {cidr} ip daddr != {cidr} masquerade\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{TAP_PREFIX}*\" oifname \"{TAP_PREFIX}*\" drop\n\
         \t}}\n\
         }}\n"
    )
}

/// Create (or reconfigure) the TAP device of `tap`, install the NAT table and switch on
/// forwarding. Blocking (runs `ip`/`nft`); call from a blocking context.
pub fn setup_tap(tap: &TapDevice) -> Result<()> {
    check_tap_possible()?;
    let ctx = |e: Error| e.with_context(&format!("net=tap: setting up {}", tap.ifname));
    // Right after a VMM exits, the kernel may still be tearing down the previous device
    // of that name (EBUSY); give it a moment.
    let deadline = Instant::now() + TAP_BUSY_WAIT;
    while !link_exists(&tap.ifname) {
        match run(
            "ip",
            &["tuntap", "add", "dev", &tap.ifname, "mode", "tap"],
            None,
        ) {
            Ok(()) => break,
            Err(e) if e.message.contains("busy") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => return Err(ctx(e)),
        }
    }
    let host_cidr = format!("{}/30", tap.host_addr);
    let result = run(
        "ip",
        &["addr", "replace", &host_cidr, "dev", &tap.ifname],
        None,
    )
    .and_then(|()| run("ip", &["link", "set", "dev", &tap.ifname, "up"], None))
    .and_then(|()| {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|e| Error::io(format!("enabling IPv4 forwarding: {e}")))
    })
    .and_then(|()| run("nft", &["-f", "-"], Some(&nft_ruleset(&tap.pool))));
    if let Err(e) = result {
        remove_tap(&tap.ifname);
        return Err(ctx(e));
    }
    Ok(())
}

/// Let `uid`/`gid` attach to the existing (persistent, unattached) TAP device `ifname`
/// without CAP_NET_ADMIN, as a jailed Firecracker must: attach to it once as root and set
/// its owner and group (TUNSETOWNER/TUNSETGROUP); the device keeps them after we let go.
/// Runs in the calling thread's network namespace.
pub fn set_tap_owner(ifname: &str, uid: u32, gid: u32) -> Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
    const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let ctx = |what: &str, e: std::io::Error| {
        Error::io(format!(
            "net=tap: handing {ifname} to uid {uid} gid {gid}: {what}: {e}"
        ))
    };
    if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ {
        return Err(Error::invalid(format!("bad interface name {ifname:?}")));
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| ctx("open /dev/net/tun", e))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        // The flags `ip tuntap add ... mode tap` created the device with.
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    let fd = tun.as_raw_fd();
    // A VMM that just exited may still hold the device for a moment (EBUSY).
    let deadline = Instant::now() + TAP_BUSY_WAIT;
    loop {
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq` (40 bytes, our `IfReq`
        // has the same layout) that lives across the call; `fd` is open.
        if unsafe { libc::ioctl(fd, TUNSETIFF as _, &mut req as *mut IfReq) } == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) || Instant::now() >= deadline {
            return Err(ctx("TUNSETIFF", e));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: TUNSETOWNER/TUNSETGROUP take the id by value; no memory is passed.
    if unsafe { libc::ioctl(fd, TUNSETOWNER as _, libc::c_ulong::from(uid)) } < 0 {
        return Err(ctx("TUNSETOWNER", std::io::Error::last_os_error()));
    }
    // SAFETY: as above.
    if unsafe { libc::ioctl(fd, TUNSETGROUP as _, libc::c_ulong::from(gid)) } < 0 {
        return Err(ctx("TUNSETGROUP", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Delete a VM's TAP device if it exists (logging failures). Blocking.
pub fn remove_tap(ifname: &str) {
    if !link_exists(ifname) {
        return;
    }
    if let Err(e) = run("ip", &["link", "del", "dev", ifname], None) {
        tracing::warn!("cannot remove TAP device {ifname}: {}", e.message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_slots_and_addresses() {
        let p = TapPool::parse("172.30.0.0/16").unwrap();
        assert_eq!(p.slots(), 16384);
        assert_eq!(
            p.addresses(0),
            Some((Ipv4Addr::new(172, 30, 0, 1), Ipv4Addr::new(172, 30, 0, 2)))
        );
        assert_eq!(
            p.addresses(65),
            Some((Ipv4Addr::new(172, 30, 1, 5), Ipv4Addr::new(172, 30, 1, 6)))
        );
        assert_eq!(p.addresses(16384), None);
        // Host bits are masked off.
        assert_eq!(TapPool::parse("10.9.8.7/24").unwrap().cidr(), "10.9.8.0/24");
        for bad in ["", "10.0.0.0", "10.0.0.0/7", "10.0.0.0/29", "x/16"] {
            assert!(TapPool::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn allocator_lowest_free_and_exhaustion() {
        let p = TapPool::parse("10.0.0.0/28").unwrap();
        let a = SlotAllocator::default();
        a.claim(1);
        assert_eq!(a.allocate(&p).unwrap(), 0);
        assert_eq!(a.allocate(&p).unwrap(), 2);
        assert_eq!(a.allocate(&p).unwrap(), 3);
        let e = a.allocate(&p).unwrap_err();
        assert_eq!(e.errno, libc::EADDRNOTAVAIL);
        a.release(2);
        assert_eq!(a.allocate(&p).unwrap(), 2);
    }

    #[test]
    fn plans() {
        assert_eq!(plan(NetMode::None, "abc", None).unwrap(), None);
        let u = plan(NetMode::User, "abc", None).unwrap().unwrap();
        assert_eq!(u.guest.to_string(), "10.0.2.15/24,10.0.2.2,10.0.2.3");
        assert!(u.tap.is_none());
        let t = plan(NetMode::Tap, "0123456789ab", Some(3))
            .unwrap()
            .unwrap();
        let tap = t.tap.unwrap();
        assert_eq!(tap.ifname, "bsx0123456789ab");
        assert!(tap.ifname.len() < libc::IFNAMSIZ);
        assert_eq!(t.guest.gateway, tap.host_addr);
        assert_eq!(t.guest.addr, tap.guest_addr);
        assert_eq!(t.guest.prefix, 30);
        assert!(plan(NetMode::Tap, "x", None).is_err());
        assert_eq!(mac_for("a"), mac_for("a"));
        assert_ne!(mac_for("a"), mac_for("b"));
        assert!(mac_for("a").starts_with("02:bd:"));
    }

    #[test]
    fn ruleset_names_pool_and_prefix() {
        let r = nft_ruleset(&TapPool::parse("172.30.0.0/16").unwrap());
        assert!(r.contains("ip saddr 172.30.0.0/16 ip daddr != 172.30.0.0/16 masquerade"));
        assert!(r.contains("iifname \"bsx*\" oifname \"bsx*\" drop"));
        assert!(r.starts_with("table ip bandsox\ndelete table ip bandsox\n"));
    }
}
