//! Guest networking: the `bandsox.net=` kernel command-line parameter and how the agent
//! (as PID 1) applies it.
//!
//! Format: `bandsox.net=ADDR/PREFIX,GATEWAY[,DNS...]`, e.g.
//! `bandsox.net=10.0.2.15/24,10.0.2.2,10.0.2.3`. The host builds it with
//! [`GuestNetConfig`]'s `Display`, the agent parses it with `FromStr`: one definition for
//! both ends.
//!
//! Invariants:
//! - Parsing is strict (IPv4 only, prefix 1..=30, gateway inside the subnet, at most
//!   [`MAX_DNS`] servers); a bad value configures nothing and is logged.
//! - [`apply`] never panics and never blocks longer than [`IFACE_WAIT`]: it brings `lo`
//!   up always, and the first non-loopback interface up with the address and a default
//!   route when a config is given. Failures are logged, the boot goes on.
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::time::Duration;

/// The kernel command-line key.
pub const CMDLINE_NET_KEY: &str = "bandsox.net=";
/// Most DNS servers written to `/etc/resolv.conf`.
pub const MAX_DNS: usize = 3;
/// How long [`apply`] waits for the network interface to appear.
pub const IFACE_WAIT: Duration = Duration::from_secs(3);

/// One guest interface's static IPv4 configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNetConfig {
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
}

impl GuestNetConfig {
    /// The netmask of `prefix`.
    pub fn netmask(&self) -> Ipv4Addr {
        prefix_mask(self.prefix)
    }
}

/// The IPv4 netmask with `prefix` leading ones (prefix ≤ 32).
pub fn prefix_mask(prefix: u8) -> Ipv4Addr {
    let bits = u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0);
    Ipv4Addr::from(bits)
}

impl fmt::Display for GuestNetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{},{}", self.addr, self.prefix, self.gateway)?;
        for d in &self.dns {
            write!(f, ",{d}")?;
        }
        Ok(())
    }
}

impl FromStr for GuestNetConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let cidr = parts.next().unwrap_or_default();
        let (addr, prefix) = cidr
            .split_once('/')
            .ok_or_else(|| format!("{cidr:?}: expected ADDR/PREFIX"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{addr:?}: not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (1..=30).contains(p))
            .ok_or_else(|| format!("{prefix:?}: prefix must be 1..30"))?;
        let gw = parts.next().ok_or("missing gateway")?;
        let gateway: Ipv4Addr = gw
            .parse()
            .map_err(|_| format!("{gw:?}: not an IPv4 address"))?;
        let mask = u32::from(prefix_mask(prefix));
        if u32::from(addr) & mask != u32::from(gateway) & mask || addr == gateway {
            return Err(format!(
                "gateway {gateway} is not another address in {cidr}"
            ));
        }
        let dns = parts
            .map(|d| d.parse().map_err(|_| format!("{d:?}: not an IPv4 address")))
            .collect::<Result<Vec<Ipv4Addr>, String>>()?;
        if dns.len() > MAX_DNS {
            return Err(format!("at most {MAX_DNS} DNS servers"));
        }
        Ok(GuestNetConfig {
            addr,
            prefix,
            gateway,
            dns,
        })
    }
}

/// The `bandsox.net=` value of a kernel command line: `Ok(None)` when absent.
pub fn from_cmdline(cmdline: &str) -> Result<Option<GuestNetConfig>, String> {
    match cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(CMDLINE_NET_KEY))
    {
        None => Ok(None),
        Some(v) => v.parse().map(Some),
    }
}

/// Bring `lo` up and, with a config, the first other interface (address, netmask, up,
/// default route) and `/etc/resolv.conf`. Call after the root switch so resolv.conf
/// lands on the VM's disk.
pub fn apply(cfg: Option<&GuestNetConfig>) {
    if let Err(e) = sys::set_up("lo") {
        tracing::warn!("cannot bring lo up: {e}");
    }
    let Some(cfg) = cfg else { return };
    let Some(iface) = wait_for_interface() else {
        tracing::error!("bandsox.net given but no network interface appeared");
        return;
    };
    let result = sys::set_addr(&iface, cfg.addr, cfg.netmask())
        .and_then(|()| sys::set_up(&iface))
        .and_then(|()| sys::add_default_route(cfg.gateway));
    match result {
        Ok(()) => tracing::info!(
            "network: {iface} {}/{} via {}",
            cfg.addr,
            cfg.prefix,
            cfg.gateway
        ),
        Err(e) => tracing::error!("cannot configure {iface}: {e}"),
    }
    if !cfg.dns.is_empty() {
        write_resolv_conf(&cfg.dns);
    }
}

/// Give a running guest (a restored clone) a new address: the first non-`lo` interface
/// gets `cfg`'s address and netmask in place of its old ones, the default route points
/// at `cfg`'s gateway, and resolv.conf names `cfg`'s resolvers.
pub fn reapply(cfg: &GuestNetConfig) -> std::io::Result<()> {
    let iface = first_interface()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no network interface"))?;
    // The old default route goes first: its gateway is not on the new subnet.
    sys::del_default_route()?;
    sys::set_addr(&iface, cfg.addr, cfg.netmask())?;
    sys::set_up(&iface)?;
    sys::add_default_route(cfg.gateway)?;
    if !cfg.dns.is_empty() {
        write_resolv_conf(&cfg.dns);
    }
    tracing::info!(
        "network re-addressed: {iface} {}/{} via {}",
        cfg.addr,
        cfg.prefix,
        cfg.gateway
    );
    Ok(())
}

fn first_interface() -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n != "lo")
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.into_iter().next()
}

fn wait_for_interface() -> Option<String> {
    let deadline = std::time::Instant::now() + IFACE_WAIT;
    loop {
        if let Some(n) = first_interface() {
            return Some(n);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn write_resolv_conf(dns: &[Ipv4Addr]) {
    let text: String = dns.iter().map(|d| format!("nameserver {d}\n")).collect();
    let path = std::path::Path::new("/etc/resolv.conf");
    // A dangling symlink (e.g. to a resolver stub that is not running) would make the
    // write fail; the VM's disk is its own, so replace it by a plain file.
    if path
        .symlink_metadata()
        .is_ok_and(|m| m.file_type().is_symlink())
    {
        let _ = std::fs::remove_file(path);
    }
    if let Err(e) = std::fs::write(path, text) {
        tracing::warn!("cannot write /etc/resolv.conf: {e}");
    }
}

/// The ioctls behind [`apply`].
mod sys {
    use std::io;
    use std::net::Ipv4Addr;
    use std::os::fd::{AsRawFd, OwnedFd};

    use nix::sys::socket::{AddressFamily, SockFlag, SockType};

    fn socket() -> io::Result<OwnedFd> {
        let flags = SockFlag::SOCK_CLOEXEC;
        Ok(nix::sys::socket::socket(
            AddressFamily::Inet,
            SockType::Datagram,
            flags,
            None,
        )?)
    }

    /// `a` as the generic `sockaddr` the ioctls take: laid out as a `sockaddr_in`, whose
    /// port (2 bytes, 0 here) and address (4 bytes, network order) fill the start of
    /// `sa_data`.
    #[expect(
        clippy::cast_possible_truncation,
        reason = "address-family and interface-flag constants of the kernel ABI fit their C field types"
    )]
    fn sockaddr(a: Ipv4Addr) -> libc::sockaddr {
        let mut sa_data = [0 as libc::c_char; 14];
        for (d, b) in sa_data[2..6].iter_mut().zip(a.octets()) {
            *d = libc::c_char::from_ne_bytes([b]);
        }
        libc::sockaddr {
            sa_family: libc::AF_INET as libc::sa_family_t,
            sa_data,
        }
    }

    fn ifreq(name: &str) -> io::Result<libc::ifreq> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad interface name",
            ));
        }
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
            *d = libc::c_char::from_ne_bytes([s]);
        }
        Ok(r)
    }

    fn ioctl<T>(fd: &OwnedFd, req: libc::c_ulong, arg: &mut T) -> io::Result<()> {
        // SAFETY: every caller passes the structure type `req` expects, owned by it.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    #[expect(
        clippy::cast_possible_truncation,
        reason = "address-family and interface-flag constants of the kernel ABI fit their C field types"
    )]
    pub fn set_up(name: &str) -> io::Result<()> {
        let s = socket()?;
        let mut r = ifreq(name)?;
        ioctl(&s, libc::SIOCGIFFLAGS, &mut r)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { r.ifr_ifru.ifru_flags };
        r.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        ioctl(&s, libc::SIOCSIFFLAGS, &mut r)
    }

    pub fn set_addr(name: &str, addr: Ipv4Addr, mask: Ipv4Addr) -> io::Result<()> {
        let s = socket()?;
        let mut r = ifreq(name)?;
        r.ifr_ifru.ifru_addr = sockaddr(addr);
        ioctl(&s, libc::SIOCSIFADDR, &mut r)?;
        let mut r = ifreq(name)?;
        r.ifr_ifru.ifru_netmask = sockaddr(mask);
        ioctl(&s, libc::SIOCSIFNETMASK, &mut r)
    }

    /// Remove the IPv4 default route, if there is one.
    pub fn del_default_route() -> io::Result<()> {
        let s = socket()?;
        // SAFETY: rtentry is plain old data; all-zero is a valid value (null rt_dev).
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
        match ioctl(&s, libc::SIOCDELRT, &mut rt) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            r => r,
        }
    }

    pub fn add_default_route(gateway: Ipv4Addr) -> io::Result<()> {
        let s = socket()?;
        // SAFETY: rtentry is plain old data; all-zero is a valid value (null rt_dev).
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr(gateway);
        rt.rt_flags = (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort;
        match ioctl(&s, libc::SIOCADDRT, &mut rt) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            r => r,
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        #[expect(clippy::cast_possible_truncation, reason = "AF_INET fits sa_family_t")]
        fn sockaddr_is_a_sockaddr_in() {
            let a = Ipv4Addr::new(10, 0, 2, 15);
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from(a).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: both are 16-byte plain-old-data structs; every bit pattern is a
            // valid sockaddr.
            let want = unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) };
            let got = sockaddr(a);
            assert_eq!(got.sa_family, want.sa_family);
            assert_eq!(got.sa_data, want.sa_data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_validation() {
        let c: GuestNetConfig = "10.0.2.15/24,10.0.2.2,10.0.2.3".parse().unwrap();
        assert_eq!(c.addr, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(c.to_string(), "10.0.2.15/24,10.0.2.2,10.0.2.3");
        let t: GuestNetConfig = "172.30.0.2/30,172.30.0.1".parse().unwrap();
        assert!(t.dns.is_empty());
        assert_eq!(t.netmask(), Ipv4Addr::new(255, 255, 255, 252));
        for bad in [
            "",
            "10.0.2.15",
            "10.0.2.15/24",
            "10.0.2.15/33,10.0.2.2",
            "10.0.2.15/0,10.0.2.2",
            "10.0.2.15/24,10.0.3.2",
            "10.0.2.15/24,10.0.2.15",
            "x/24,10.0.2.2",
            "10.0.2.15/24,10.0.2.2,nope",
            "10.0.2.15/24,10.0.2.2,1.1.1.1,1.1.1.2,1.1.1.3,1.1.1.4",
        ] {
            assert!(bad.parse::<GuestNetConfig>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cmdline_lookup() {
        assert_eq!(from_cmdline("console=ttyS0 bandsox.name=a"), Ok(None));
        let c = from_cmdline("a bandsox.net=10.0.2.15/24,10.0.2.2 b")
            .unwrap()
            .unwrap();
        assert_eq!(c.gateway, Ipv4Addr::new(10, 0, 2, 2));
        assert!(from_cmdline("bandsox.net=garbage").is_err());
    }
}
