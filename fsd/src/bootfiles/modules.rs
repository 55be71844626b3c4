//! Kernel modules for the initramfs: which ones, and in which order to load them.
//!
//! Dependencies come from `lib/modules/<ver>/modules.dep` (what `depmod` writes). A kernel
//! package extracted with `dpkg-deb -x` has no `modules.dep` (depmod runs in postinst), so
//! without one the dependencies are read from each module's own `.modinfo` (`depends=`),
//! which is what depmod itself reads.
//!
//! Invariants: the resolved list holds every wanted module that is not built in, plus all
//! of their dependencies, each once, dependencies before the modules that need them.
//! Modules listed in `modules.builtin` are never included. A wanted module that is
//! neither built in nor present is an error (unless it is optional).
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::{elf, GuestError};

/// A module the guest wants, by name; `optional` ones are skipped when absent.
#[derive(Debug, Clone, Copy)]
pub struct Wanted {
    pub name: &'static str,
    pub optional: bool,
}

/// What the guest needs: the virtio-mmio transport, the disk, the agent's virtio-serial
/// port, vsock (Firecracker's agent channel), the NIC, and ext4 (with its checksum
/// helper) where they are modules.
pub const GUEST_MODULES: &[Wanted] = &[
    Wanted {
        name: "virtio_mmio",
        optional: false,
    },
    Wanted {
        name: "virtio_blk",
        optional: false,
    },
    Wanted {
        name: "virtio_console",
        optional: false,
    },
    Wanted {
        name: "vmw_vsock_virtio_transport",
        optional: false,
    },
    Wanted {
        name: "virtio_net",
        optional: false,
    },
    Wanted {
        name: "crc32c_generic",
        optional: true,
    },
    Wanted {
        name: "ext4",
        optional: false,
    },
];

/// The module name of a path in modules.dep: basename without `.ko[.xz|.zst|.gz]`,
/// with `-` read as `_` (the kernel treats them alike).
pub fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = base
        .strip_suffix(".ko.xz")
        .or_else(|| base.strip_suffix(".ko.zst"))
        .or_else(|| base.strip_suffix(".ko.gz"))
        .or_else(|| base.strip_suffix(".ko"))
        .unwrap_or(base);
    stem.replace('-', "_")
}

/// The modules of one kernel version: `dir` is `lib/modules/<ver>`.
#[derive(Debug)]
pub struct ModuleTree {
    dir: PathBuf,
    /// Module path (relative to `dir`) → paths of the modules it depends on.
    deps: BTreeMap<String, Vec<String>>,
    /// Module name → path.
    by_name: HashMap<String, String>,
    /// Names of built-in modules.
    builtin: HashSet<String>,
    /// Where the dependencies came from ("modules.dep" or ".modinfo").
    pub source: &'static str,
}

impl ModuleTree {
    pub fn load(dir: &Path) -> Result<Self, GuestError> {
        let builtin = match std::fs::read_to_string(dir.join("modules.builtin")) {
            Ok(text) => text.lines().map(module_name).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => return Err(GuestError::io(dir.join("modules.builtin"), e)),
        };
        let dep_file = dir.join("modules.dep");
        let (deps, source) = match std::fs::read_to_string(&dep_file) {
            Ok(text) => (parse_modules_dep(&text), "modules.dep"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (scan_modinfo(dir)?, ".modinfo"),
            Err(e) => return Err(GuestError::io(dep_file, e)),
        };
        let by_name = deps.keys().map(|p| (module_name(p), p.clone())).collect();
        Ok(ModuleTree {
            dir: dir.to_path_buf(),
            deps,
            by_name,
            builtin,
            source,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&name.replace('-', "_"))
    }

    /// Module paths (relative to [`Self::dir`]) to load, dependencies first.
    pub fn resolve(&self, wanted: &[Wanted]) -> Result<Vec<String>, GuestError> {
        let mut order = Vec::new();
        let mut done = HashSet::new();
        for w in wanted {
            let name = w.name.replace('-', "_");
            if self.builtin.contains(&name) {
                tracing::debug!(module = %name, "built into the kernel");
                continue;
            }
            let Some(path) = self.by_name.get(&name) else {
                if w.optional {
                    continue;
                }
                return Err(GuestError::MissingModule {
                    name,
                    dir: self.dir.clone(),
                });
            };
            self.visit(path, &mut done, &mut Vec::new(), &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        path: &str,
        done: &mut HashSet<String>,
        stack: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<(), GuestError> {
        if done.contains(path) {
            return Ok(());
        }
        if stack.iter().any(|p| p == path) {
            return Err(GuestError::Invalid(format!(
                "module dependency cycle: {} -> {path}",
                stack.join(" -> ")
            )));
        }
        let deps = self
            .deps
            .get(path)
            .ok_or_else(|| GuestError::MissingModule {
                name: path.to_string(),
                dir: self.dir.clone(),
            })?;
        stack.push(path.to_string());
        for d in deps {
            self.visit(d, done, stack, order)?;
        }
        stack.pop();
        done.insert(path.to_string());
        order.push(path.to_string());
        Ok(())
    }
}

/// `path: dep dep ...` lines. Paths are relative to the modules directory.
pub fn parse_modules_dep(text: &str) -> BTreeMap<String, Vec<String>> {
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(m, deps)| {
            (
                m.trim().to_string(),
                deps.split_whitespace().map(str::to_string).collect(),
            )
        })
        .collect()
}

/// Build the dependency map from every module's `.modinfo` `depends=` field.
fn scan_modinfo(dir: &Path) -> Result<BTreeMap<String, Vec<String>>, GuestError> {
    let mut files = Vec::new();
    collect_modules(dir, dir, &mut files)?;
    if files.is_empty() {
        return Err(GuestError::Invalid(format!(
            "{} has neither modules.dep nor any .ko file",
            dir.display()
        )));
    }
    let by_name: HashMap<String, String> =
        files.iter().map(|p| (module_name(p), p.clone())).collect();
    let mut deps = BTreeMap::new();
    for rel in &files {
        // Compressed modules cannot be read here; they have no deps we know of, which is
        // only wrong if one of them is actually wanted (then it fails at resolve time).
        if !rel.ends_with(".ko") {
            deps.insert(rel.clone(), Vec::new());
            continue;
        }
        let path = dir.join(rel);
        let bytes = std::fs::read(&path).map_err(|e| GuestError::io(path.clone(), e))?;
        let info = elf::modinfo(&bytes).ok_or_else(|| {
            GuestError::Invalid(format!("{}: no readable .modinfo section", path.display()))
        })?;
        let mut list = Vec::new();
        for (_, v) in info.iter().filter(|(k, _)| k == "depends") {
            for dep in v.split(',').map(str::trim).filter(|d| !d.is_empty()) {
                let dep = dep.replace('-', "_");
                match by_name.get(&dep) {
                    Some(p) => list.push(p.clone()),
                    // A dependency that is not a file is built in (or missing: then
                    // loading fails loudly in the guest, which is the right place).
                    None => {
                        tracing::debug!(module = %rel, dep = %dep, "dependency is not a module file")
                    }
                }
            }
        }
        deps.insert(rel.clone(), list);
    }
    Ok(deps)
}

fn collect_modules(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), GuestError> {
    let entries = std::fs::read_dir(dir).map_err(|e| GuestError::io(dir.to_path_buf(), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| GuestError::io(dir.to_path_buf(), e))?;
        let path = entry.path();
        let ft = entry
            .file_type()
            .map_err(|e| GuestError::io(path.clone(), e))?;
        if ft.is_dir() {
            collect_modules(root, &path, out)?;
        } else if ft.is_file() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".ko") || name.contains(".ko.") {
                if let Ok(rel) = path.strip_prefix(root) {
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vsock.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/unrelated.ko:
";

    fn fake_tree(dep: &str, builtin: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("modules.dep"), dep).unwrap();
        std::fs::write(dir.path().join("modules.builtin"), builtin).unwrap();
        dir
    }

    fn pos(order: &[String], name: &str) -> usize {
        order
            .iter()
            .position(|p| module_name(p) == name)
            .unwrap_or_else(|| panic!("{name} missing from {order:?}"))
    }

    #[test]
    fn dependencies_first_each_once_builtins_skipped() {
        let dir = fake_tree(DEP, "kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n");
        let tree = ModuleTree::load(dir.path()).unwrap();
        assert_eq!(tree.source, "modules.dep");
        let order = tree.resolve(GUEST_MODULES).unwrap();
        let names: Vec<String> = order.iter().map(|p| module_name(p)).collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "virtio_blk",
                "virtio_console",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport",
                "failover",
                "net_failover",
                "virtio_net",
            ]
        );
        for (m, d) in [
            ("virtio_mmio", "virtio"),
            ("virtio", "virtio_ring"),
            ("vmw_vsock_virtio_transport", "vsock"),
            ("vmw_vsock_virtio_transport_common", "vsock"),
            ("virtio_net", "failover"),
        ] {
            assert!(pos(&order, d) < pos(&order, m), "{d} before {m}");
        }
        assert!(!names.contains(&"unrelated".to_string()));
    }

    #[test]
    fn missing_module_is_an_error_unless_optional_or_builtin() {
        let dir = fake_tree(DEP, "");
        let tree = ModuleTree::load(dir.path()).unwrap();
        // ext4 is neither built in nor present here.
        match tree.resolve(GUEST_MODULES) {
            Err(GuestError::MissingModule { name, .. }) => assert_eq!(name, "ext4"),
            other => panic!("expected MissingModule, got {other:?}"),
        }
        let ok = tree
            .resolve(&[Wanted {
                name: "zram",
                optional: true,
            }])
            .unwrap();
        assert!(ok.is_empty());
    }

    #[test]
    fn cycles_are_reported() {
        let dir = fake_tree("a.ko: b.ko\nb.ko: a.ko\n", "");
        let tree = ModuleTree::load(dir.path()).unwrap();
        assert!(matches!(
            tree.resolve(&[Wanted {
                name: "a",
                optional: false
            }]),
            Err(GuestError::Invalid(_))
        ));
    }

    #[test]
    fn names() {
        assert_eq!(module_name("kernel/a/vmw-vsock.ko.zst"), "vmw_vsock");
        assert_eq!(module_name("ext4.ko"), "ext4");
        assert_eq!(module_name("kernel/fs/ext4/ext4.ko"), "ext4");
    }

    /// The real Debian kernel tree, if setup extracted it: no modules.dep there, so this
    /// exercises the `.modinfo` path against real modules.
    #[test]
    fn real_kernel_tree_if_present() {
        let Some(dir) = std::fs::read_dir("/var/cache/bandsox/kernel/lib/modules")
            .ok()
            .and_then(|mut it| it.next())
            .and_then(|e| e.ok())
            .map(|e| e.path())
        else {
            eprintln!("SKIP real_kernel_tree_if_present: no /var/cache/bandsox/kernel (run mount-helpers/setup --deps-only)");
            return;
        };
        let tree = ModuleTree::load(&dir).unwrap();
        let order = tree.resolve(GUEST_MODULES).unwrap();
        for (m, d) in [
            ("virtio_mmio", "virtio"),
            ("virtio", "virtio_ring"),
            (
                "vmw_vsock_virtio_transport",
                "vmw_vsock_virtio_transport_common",
            ),
            ("vmw_vsock_virtio_transport_common", "vsock"),
        ] {
            assert!(
                pos(&order, d) < pos(&order, m),
                "{d} before {m} in {order:?}"
            );
        }
    }
}
