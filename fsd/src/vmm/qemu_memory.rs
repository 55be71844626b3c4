//! Guest RAM in a file, for clones that share memory (Kata-style VM templating).
//!
//! A pool's template runs with its RAM in `memory-backend-file,share=on` (the file is in
//! its VM directory). Its snapshot saves device state only (`x-ignore-shared`) and keeps
//! a copy of the RAM file as the snapshot's `memory`. A clone maps that copy privately
//! (`share=off,readonly=off`: QEMU 7.2 has no `rom=`; it opens the file O_RDWR but a
//! private mapping never writes it back), so every clone of one snapshot shares the
//! unmodified pages through the page cache and owns only the pages it writes.
//!
//! Invariants:
//! - The RAM object is always `id=mem` and the machine names it (`memory-backend=mem`):
//!   the RAM block is called `mem` whatever backs it, so a migration stream of any of
//!   these command lines loads into any other.
//! - A clone never maps a file shared: [`restore_memory_argv`] rewrites the object to a
//!   private mapping of the snapshot's copy, or to anonymous memory when the snapshot
//!   holds all of RAM in its stream.
use std::path::{Path, PathBuf};

use super::qemu::opt_escape;

/// The RAM object's id.
pub const MEMORY_ID: &str = "mem";
const FILE_PREFIX: &str = "memory-backend-file,id=mem,";
const RAM_PREFIX: &str = "memory-backend-ram,id=mem,";

/// `-object` arguments and the `-machine` suffix for RAM in `file`, shared.
pub fn shared_memory_args(file: &Path, memory_mib: u32) -> Option<(String, String)> {
    let path = file.to_str()?;
    Some((
        format!(
            "{FILE_PREFIX}size={memory_mib}M,mem-path={},share=on",
            opt_escape(path)
        ),
        format!(",memory-backend={MEMORY_ID}"),
    ))
}

/// Index of the RAM object's value in `argv` (the argument after `-object`).
fn memory_object(argv: &[String]) -> Option<usize> {
    argv.windows(2)
        .position(|w| {
            w[0] == "-object" && (w[1].starts_with(FILE_PREFIX) || w[1].starts_with(RAM_PREFIX))
        })
        .map(|i| i + 1)
}

/// The file a command line maps guest RAM from *shared* (a template), if any: only then
/// can a snapshot leave RAM out of its stream.
pub fn shared_memory_file(argv: &[String]) -> Option<PathBuf> {
    let obj = &argv[memory_object(argv)?];
    if !obj.starts_with(FILE_PREFIX) || !obj.ends_with(",share=on") {
        return None;
    }
    let start = obj.find(",mem-path=")? + ",mem-path=".len();
    let end = obj.len() - ",share=on".len();
    // `mem-path` is the last field but one; undo QEMU's comma doubling.
    Some(PathBuf::from(obj.get(start..end)?.replace(",,", ",")))
}

/// The RAM object of a clone's command line: a private mapping of `memory` (the
/// snapshot's RAM file) when the snapshot kept RAM apart, anonymous memory otherwise.
/// Command lines without a RAM object are returned as they are.
pub fn restore_memory_argv(
    mut argv: Vec<String>,
    memory: Option<&Path>,
    memory_mib: u32,
) -> Option<Vec<String>> {
    let Some(i) = memory_object(&argv) else {
        return Some(argv);
    };
    argv[i] = match memory {
        Some(file) => format!(
            "{FILE_PREFIX}size={memory_mib}M,mem-path={},share=off,readonly=off",
            opt_escape(file.to_str()?)
        ),
        None => format!("{RAM_PREFIX}size={memory_mib}M"),
    };
    Some(argv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(obj: &str) -> Vec<String> {
        [
            "qemu",
            "-m",
            "256",
            "-object",
            obj,
            "-pidfile",
            "/v/a/vmm.pid",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn a_template_maps_its_file_shared() {
        let (obj, machine) = shared_memory_args(Path::new("/v/a,b/mem.ram"), 256).unwrap();
        assert_eq!(
            obj,
            "memory-backend-file,id=mem,size=256M,mem-path=/v/a,,b/mem.ram,share=on"
        );
        assert_eq!(machine, ",memory-backend=mem");
        assert_eq!(
            shared_memory_file(&argv(&obj)),
            Some(PathBuf::from("/v/a,b/mem.ram"))
        );
        assert_eq!(shared_memory_file(&argv("something-else")), None);
    }

    #[test]
    fn a_clone_maps_the_snapshot_copy_privately() {
        let (obj, _) = shared_memory_args(Path::new("/v/a/mem.ram"), 256).unwrap();
        let out = restore_memory_argv(argv(&obj), Some(Path::new("/s/t/memory")), 256).unwrap();
        assert_eq!(
            out[4],
            "memory-backend-file,id=mem,size=256M,mem-path=/s/t/memory,share=off,readonly=off"
        );
        // A private mapping is not a template: its snapshots carry RAM in the stream.
        assert_eq!(shared_memory_file(&out), None);
        // A snapshot of a clone holds all of RAM: its clones get anonymous memory.
        let again = restore_memory_argv(out, None, 256).unwrap();
        assert_eq!(again[4], "memory-backend-ram,id=mem,size=256M");
        let plain = argv("x");
        assert_eq!(restore_memory_argv(plain.clone(), None, 256), Some(plain));
    }
}
