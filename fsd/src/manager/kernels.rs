//! The guest kernels installed under `<state>/boot/`: `vmlinuz` + `initrd` (the
//! default) and any `vmlinuz-NAME` + `initrd-NAME` pair, which `kernel=NAME` selects.
//!
//! Invariant: a VM names a kernel only after [`Manager::check_kernel`] found both of
//! its files; a name never reaches a path unvalidated (`names::validate`, no `/`).
use super::Manager;
use crate::error::{Error, Result};

impl Manager {
    /// The installed kernels: `default` (when `vmlinuz` and `initrd` exist) and every
    /// NAME with both `vmlinuz-NAME` and `initrd-NAME`, sorted.
    pub fn kernels(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.boot_files.kernel.is_file() && self.boot_files.initrd.is_file() {
            out.push("default".to_string());
        }
        let Some(dir) = self.boot_files.kernel.parent() else {
            return out;
        };
        let mut named: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let f = e.file_name().into_string().ok()?;
                let name = f.strip_prefix("vmlinuz-")?.to_string();
                let files = self.boot_files.for_kernel(Some(&name));
                (crate::names::validate("kernel", &name).is_ok()
                    && files.kernel.is_file()
                    && files.initrd.is_file())
                .then_some(name)
            })
            .collect();
        named.sort();
        out.extend(named);
        out
    }

    /// EINVAL (listing the installed kernels) unless kernel `name` is installed.
    pub fn check_kernel(&self, name: Option<&str>) -> Result<()> {
        let Some(name) = name else { return Ok(()) };
        crate::names::validate("kernel", name)?;
        let files = self.boot_files.for_kernel(Some(name));
        if files.kernel.is_file() && files.initrd.is_file() {
            return Ok(());
        }
        let have = self.kernels();
        Err(Error::invalid(format!(
            "kernel={name}: not installed (no {} and {}); installed: {}",
            files.kernel.display(),
            files.initrd.display(),
            if have.is_empty() {
                "none".to_string()
            } else {
                have.join(", ")
            }
        )))
    }
}
