//! One line of the `pools` file: `image=base vcpus=1 memory=256 size=3` (any `create`
//! option that shapes the machine, plus `size=N`, the clones kept ready).
//!
//! Invariants:
//! - A pool's options are read over the built-in defaults, never the `defaults` file, so
//!   a pool means the same machine whatever `defaults` says later.
//! - Only options that shape the guest may appear (image, vcpus, memory, disk, net,
//!   backend); per-VM settings (keep_runs, exec_timeout ...) come from the request.
//! - A request takes a pooled clone only when every one of those options is equal.
use crate::config::VmConfig;
use crate::error::{Error, Result};
use crate::vmm::NetMode;

/// Largest `size=`: clones kept ready per pool.
pub const MAX_SIZE: u32 = 16;
/// The options a pool line may set (besides `size`).
const SHAPE_KEYS: &[&str] = &[
    "image",
    "vcpus",
    "memory",
    "memory_mib",
    "disk",
    "disk_mib",
    "net",
    "backend",
];

/// An option value as the `create` options spell it.
fn lower(v: &impl std::fmt::Debug) -> String {
    format!("{v:?}").to_lowercase()
}

/// A parsed pool line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    /// The machine every clone of the pool is.
    pub config: VmConfig,
    /// Clones kept ready.
    pub size: u32,
}

impl PoolSpec {
    /// Parse one line (EINVAL with the reason).
    pub fn parse(line: &str) -> Result<PoolSpec> {
        let mut size = None;
        let mut options = Vec::new();
        for word in line.split_whitespace() {
            let (key, value) = word
                .split_once('=')
                .ok_or_else(|| Error::invalid(format!("pools: {word:?} is not key=value")))?;
            if key == "size" {
                let n: u32 = value
                    .parse()
                    .map_err(|_| Error::invalid(format!("pools: size={value}: not a number")))?;
                if n == 0 || n > MAX_SIZE {
                    return Err(Error::invalid(format!(
                        "pools: size={n}: out of range 1..{MAX_SIZE}"
                    )));
                }
                size = Some(n);
            } else if SHAPE_KEYS.contains(&key) {
                options.push(word);
            } else {
                return Err(Error::invalid(format!(
                    "pools: {key}= cannot be pooled; a pool takes image, vcpus, memory, disk, \
                     net, backend and size"
                )));
            }
        }
        let size = size.ok_or_else(|| Error::invalid("pools: a pool needs size=N"))?;
        let config = VmConfig::default().with_options(options)?;
        if config.net == NetMode::Tap {
            return Err(Error::new(
                libc::EOPNOTSUPP,
                "pools: net=tap cannot be pooled yet (use net=none or net=user)",
            ));
        }
        if crate::manager::images::image_ref(&config.image).is_some() {
            return Err(Error::invalid(
                "pools: image= must name a local image (pull it first)",
            ));
        }
        Ok(PoolSpec { config, size })
    }

    /// Parse a whole `pools` text (blank lines and `#` comments skipped); all or nothing.
    pub fn parse_all<'a>(lines: impl IntoIterator<Item = &'a str>) -> Result<Vec<PoolSpec>> {
        let mut out: Vec<PoolSpec> = Vec::new();
        for (i, line) in lines.into_iter().enumerate() {
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let spec = Self::parse(t)
                .map_err(|e| Error::new(e.errno, format!("line {}: {}", i + 1, e.message)))?;
            if out.iter().any(|o| o.key() == spec.key()) {
                return Err(Error::invalid(format!(
                    "line {}: a second pool of the same machine ({})",
                    i + 1,
                    spec.key()
                )));
            }
            out.push(spec);
        }
        Ok(out)
    }

    /// Whether a request for `config` can take a clone of this pool.
    pub fn matches(&self, config: &VmConfig) -> bool {
        let (a, b) = (&self.config, config);
        a.image == b.image
            && a.vcpus == b.vcpus
            && a.memory_mib == b.memory_mib
            && a.disk_mib == b.disk_mib
            && a.net == b.net
            && a.backend == b.backend
    }

    /// A name for the pool, also its directory under `pools/` in the state directory
    /// (so a template survives daemon restarts): the machine's options in one word.
    pub fn key(&self) -> String {
        let c = &self.config;
        format!(
            "{}-{}cpu-{}m-{}-{}-{}",
            c.image,
            c.vcpus,
            c.memory_mib,
            c.disk_mib
                .map(|d| format!("{d}d"))
                .unwrap_or_else(|| "imgdisk".into()),
            lower(&c.net),
            lower(&c.backend)
        )
    }

    /// The line as `cat pools` shows it (canonical spelling).
    pub fn render(&self) -> String {
        let c = &self.config;
        let mut s = format!(
            "image={} vcpus={} memory={}",
            c.image, c.vcpus, c.memory_mib
        );
        if let Some(d) = c.disk_mib {
            s.push_str(&format!(" disk={d}"));
        }
        if c.net != NetMode::None {
            s.push_str(&format!(" net={}", lower(&c.net)));
        }
        if c.backend != crate::config::BackendChoice::Auto {
            s.push_str(&format!(" backend={}", lower(&c.backend)));
        }
        s.push_str(&format!(" size={}", self.size));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_parses_over_the_builtin_defaults() {
        let p = PoolSpec::parse("image=base vcpus=2 memory=512 size=3").unwrap();
        assert_eq!(p.size, 3);
        assert_eq!((p.config.vcpus, p.config.memory_mib), (2, 512));
        assert_eq!(p.render(), "image=base vcpus=2 memory=512 size=3");
        assert_eq!(p.key(), "base-2cpu-512m-imgdisk-none-auto");
        let q = PoolSpec::parse("size=1 backend=qemu net=user disk=4096").unwrap();
        assert_eq!(
            q.render(),
            "image=base vcpus=1 memory=256 disk=4096 net=user backend=qemu size=1"
        );
    }

    #[test]
    fn bad_lines_are_einval() {
        for bad in [
            "image=base",
            "size=0",
            "size=17",
            "size=x",
            "vcpus=1 size=1 keep_runs=3",
            "vcpus=99 size=1",
            "novalue size=1",
        ] {
            let e = PoolSpec::parse(bad).unwrap_err();
            assert_eq!(e.errno, libc::EINVAL, "{bad}: {}", e.message);
        }
        assert_eq!(
            PoolSpec::parse("net=tap size=1").unwrap_err().errno,
            libc::EOPNOTSUPP
        );
        let e = PoolSpec::parse_all(["size=1", "", "# c", "memory=256 size=2"]).unwrap_err();
        assert!(e.message.starts_with("line 4:"), "{}", e.message);
        assert_eq!(
            PoolSpec::parse_all(["size=1", "# c", "", "memory=512 size=2"])
                .unwrap()
                .len(),
            2
        );
        assert!(PoolSpec::parse_all(["", "  "]).unwrap().is_empty());
    }

    #[test]
    fn requests_match_on_the_machine_only() {
        let p = PoolSpec::parse("image=base vcpus=1 memory=256 size=3").unwrap();
        let mut c = VmConfig::default();
        assert!(p.matches(&c));
        c.keep_runs = 5;
        c.exec_timeout_ms = Some(1000);
        assert!(p.matches(&c), "per-VM settings do not matter");
        c.memory_mib = 512;
        assert!(!p.matches(&c));
        let c = VmConfig::default().with_options(["disk=4096"]).unwrap();
        assert!(!p.matches(&c));
    }
}
