//! The guest kernel in the form Firecracker boots: an uncompressed ELF `vmlinux`.
//!
//! Released Firecracker (up to 1.16) loads only ELF (or PVH) kernels on x86-64, while
//! Debian ships a bzImage whose payload is the ELF `vmlinux` compressed with LZ4 in the
//! *legacy* frame format. This module extracts that ELF once and caches it next to the
//! bzImage (`boot/vmlinuz` → `boot/vmlinux` plus `boot/vmlinux.stamp`).
//!
//! How the payload is found (Linux x86 boot protocol, `Documentation/arch/x86/boot.rst`):
//! the real-mode header at 0x1f1 holds `setup_sects` (0 means 4); the header signature
//! `HdrS` is at 0x202 and the protocol version at 0x206; from protocol 2.08 on,
//! `payload_offset` (u32 at 0x248) and `payload_length` (u32 at 0x24c) locate the
//! compressed kernel relative to the protected-mode code, which starts at
//! `(setup_sects + 1) * 512` in the file.
//!
//! LZ4 legacy format: the magic `0x184C2102` (little endian), then blocks, each a u32 LE
//! compressed size and that many bytes decompressing to at most 8 MiB. The kernel build
//! appends the uncompressed size as a final u32 LE; a repeated magic starts a new stream.
//!
//! Invariants:
//! - Malformed input never panics: every offset and size is checked and becomes a
//!   [`KernelError`] naming what is wrong.
//! - The cache is only ever replaced atomically (write to a temporary file, fsync,
//!   rename); the stamp (source size and mtime) is written after the ELF, so a crash in
//!   between only causes one more extraction.
//! - Extraction within one process is serialised, so concurrent launches extract once.
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// LZ4 legacy-frame magic number.
pub const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// Largest uncompressed size of one legacy LZ4 block.
pub const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// Refuse to produce more than this (a real vmlinux is tens of MiB).
pub const MAX_VMLINUX: usize = 512 << 20;
/// The cached ELF's file name, next to the bzImage.
pub const VMLINUX: &str = "vmlinux";
/// Records which bzImage (size, mtime) the cached ELF came from.
pub const STAMP: &str = "vmlinux.stamp";

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("{path} is not a bzImage usable by Firecracker: {why}")]
    Format { path: String, why: String },
}

fn fmt_err(path: &Path, why: impl Into<String>) -> KernelError {
    KernelError::Format {
        path: path.display().to_string(),
        why: why.into(),
    }
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let bytes: [u8; 4] = b.get(off..off.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(bytes))
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    let bytes: [u8; 2] = b.get(off..off.checked_add(2)?)?.try_into().ok()?;
    Some(u16::from_le_bytes(bytes))
}

/// The compressed payload of a bzImage, per the boot protocol's setup header.
pub fn bzimage_payload(image: &[u8]) -> Result<&[u8], String> {
    if image.starts_with(ELF_MAGIC) {
        return Err("it is already an ELF file".into());
    }
    if image.get(0x202..0x206) != Some(b"HdrS") {
        return Err("no \"HdrS\" setup header signature at 0x202".into());
    }
    let version = u16_at(image, 0x206).ok_or("truncated setup header")?;
    if version < 0x0208 {
        return Err(format!(
            "boot protocol {}.{:02} has no payload fields (need 2.08+)",
            version >> 8,
            version & 0xff
        ));
    }
    let setup_sects = match *image.get(0x1f1).ok_or("truncated setup header")? {
        0 => 4,
        n => usize::from(n),
    };
    let offset = u32_at(image, 0x248).ok_or("truncated setup header")? as usize;
    let length = u32_at(image, 0x24c).ok_or("truncated setup header")? as usize;
    let start = (setup_sects + 1) * 512 + offset;
    let end = start
        .checked_add(length)
        .ok_or("payload_length overflows")?;
    image.get(start..end).ok_or_else(|| {
        format!(
            "payload {start}..{end} lies outside the {}-byte file",
            image.len()
        )
    })
}

/// Decompress an LZ4 legacy-format stream (as the kernel build writes it, optionally
/// followed by the u32 LE uncompressed size) into memory.
pub fn lz4_legacy_decompress(data: &[u8]) -> Result<Vec<u8>, String> {
    match u32_at(data, 0) {
        Some(LZ4_LEGACY_MAGIC) => {}
        Some(m) if (0x184D_2A50..=0x184D_2A5F).contains(&m) || m == 0x184D_2204 => {
            return Err(format!(
                "LZ4 frame magic {m:#010x} is not the legacy format the kernel uses"
            ))
        }
        _ => {
            let what = match data.get(..4) {
                Some([0x1f, 0x8b, ..]) => " (gzip: rebuild the kernel with LZ4 or pass a vmlinux)",
                Some([0xfd, b'7', b'z', b'X']) => " (xz)",
                Some([0x28, 0xb5, 0x2f, 0xfd]) => " (zstd)",
                _ => "",
            };
            return Err(format!("payload is not LZ4-compressed{what}"));
        }
    }
    let mut out: Vec<u8> = Vec::new();
    let mut pos = 4;
    loop {
        let rest = data.len() - pos;
        if rest == 0 {
            break;
        }
        if rest == 4 {
            // The size trailer the kernel build appends.
            let size = u32_at(data, pos).ok_or("truncated trailer")? as usize;
            if size != out.len() {
                tracing::warn!(
                    trailer = size,
                    got = out.len(),
                    "LZ4 size trailer does not match the decompressed size"
                );
            }
            break;
        }
        let n = u32_at(data, pos).ok_or_else(|| format!("truncated block header at {pos}"))?;
        pos += 4;
        if n == LZ4_LEGACY_MAGIC {
            continue; // a concatenated stream
        }
        if n == 0 {
            break;
        }
        let n = n as usize;
        let block = data.get(pos..pos.saturating_add(n)).ok_or_else(|| {
            format!(
                "block at {} claims {n} bytes but only {} remain",
                pos - 4,
                data.len() - pos
            )
        })?;
        pos += n;
        let start = out.len();
        if start + LZ4_LEGACY_BLOCK > MAX_VMLINUX {
            return Err(format!(
                "decompressed kernel exceeds {} MiB",
                MAX_VMLINUX >> 20
            ));
        }
        out.resize(start + LZ4_LEGACY_BLOCK, 0);
        let got = lz4_flex::block::decompress_into(block, &mut out[start..])
            .map_err(|e| format!("corrupt LZ4 block at {}: {e}", pos - n - 4))?;
        out.truncate(start + got);
    }
    if out.is_empty() {
        return Err("the LZ4 stream holds no data".into());
    }
    Ok(out)
}

/// Extract the ELF vmlinux from bzImage bytes.
pub fn extract_vmlinux(image: &[u8]) -> Result<Vec<u8>, String> {
    let payload = bzimage_payload(image)?;
    let elf = lz4_legacy_decompress(payload)?;
    if !elf.starts_with(ELF_MAGIC) {
        return Err("the decompressed payload is not an ELF file".into());
    }
    // EI_CLASS 2 = 64-bit, e_machine 62 = x86-64.
    if elf.get(4) != Some(&2) || u16_at(&elf, 18) != Some(62) {
        return Err("the decompressed ELF is not an x86-64 kernel".into());
    }
    Ok(elf)
}

/// What the stamp records about the bzImage the cache was made from.
fn source_stamp(meta: &std::fs::Metadata) -> String {
    format!(
        "size={} mtime={}.{:09}\n",
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    )
}

static EXTRACT_LOCK: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// The ELF kernel for `kernel`: `kernel` itself when it already is an ELF, else the
/// cached `vmlinux` next to it, (re)extracted when missing or made from another bzImage.
/// Blocking (tens of MiB of decompression on a cache miss): call from a blocking thread.
pub fn ensure_vmlinux(kernel: &Path) -> Result<PathBuf, KernelError> {
    let io = |what: &Path, e| KernelError::Io(what.display().to_string(), e);
    let mut head = [0u8; 4];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(kernel).map_err(|e| io(kernel, e))?;
        f.read_exact(&mut head).map_err(|e| io(kernel, e))?;
    }
    if &head == ELF_MAGIC {
        return Ok(kernel.to_path_buf());
    }
    let dir = kernel.parent().unwrap_or(Path::new("."));
    let out = dir.join(VMLINUX);
    let stamp_path = dir.join(STAMP);
    let _serial = EXTRACT_LOCK.lock();
    let meta = std::fs::metadata(kernel).map_err(|e| io(kernel, e))?;
    let want = source_stamp(&meta);
    if out.is_file() && std::fs::read_to_string(&stamp_path).ok().as_deref() == Some(&want) {
        return Ok(out);
    }
    let t0 = std::time::Instant::now();
    let image = std::fs::read(kernel).map_err(|e| io(kernel, e))?;
    let elf = extract_vmlinux(&image).map_err(|why| fmt_err(kernel, why))?;
    write_atomic(&out, &elf).map_err(|e| io(&out, e))?;
    write_atomic(&stamp_path, want.as_bytes()).map_err(|e| io(&stamp_path, e))?;
    tracing::info!(
        from = %kernel.display(),
        to = %out.display(),
        bytes = elf.len(),
        ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
        "extracted the ELF kernel for Firecracker"
    );
    Ok(out)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        // Readable, like the guest build's boot files (a jailed Firecracker reads it
        // through a hard link; `boot/` itself is owner-only).
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(
            crate::bootfiles::BOOT_MODE,
        ))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[allow(
    clippy::cast_possible_truncation,
    reason = "test code: sizes, offsets and ids are small values the test constructs"
)]
#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal bzImage: setup header fields only, with `payload` after 5 sectors.
    fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 5 * 512];
        img[0x1f1] = 4;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&0u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(payload);
        img
    }

    fn legacy_stream(blocks: &[&[u8]], trailer: Option<u32>) -> Vec<u8> {
        let mut s = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for b in blocks {
            let c = lz4_flex::block::compress(b);
            s.extend_from_slice(&(c.len() as u32).to_le_bytes());
            s.extend_from_slice(&c);
        }
        if let Some(t) = trailer {
            s.extend_from_slice(&t.to_le_bytes());
        }
        s
    }

    fn fake_elf(len: usize) -> Vec<u8> {
        let mut e = vec![0x5au8; len];
        e[..4].copy_from_slice(ELF_MAGIC);
        e[4] = 2;
        e[18..20].copy_from_slice(&62u16.to_le_bytes());
        e
    }

    #[test]
    fn extracts_a_synthetic_kernel_in_several_blocks() {
        let elf = fake_elf(3 * 1024 * 1024 + 17);
        let (a, b) = elf.split_at(2 * 1024 * 1024);
        let img = fake_bzimage(&legacy_stream(&[a, b], Some(elf.len() as u32)));
        assert_eq!(extract_vmlinux(&img).unwrap(), elf);
        // Without the trailer, and with a concatenated second stream.
        let mut two = legacy_stream(&[a], None);
        two.extend(legacy_stream(&[b], None));
        assert_eq!(extract_vmlinux(&fake_bzimage(&two)).unwrap(), elf);
    }

    #[test]
    fn malformed_input_is_a_clear_error() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "HdrS"),
            (vec![0u8; 100], "HdrS"),
            (fake_elf(64), "already an ELF"),
            (fake_bzimage(b"\x1f\x8b\x08\x00garbage"), "gzip"),
            (fake_bzimage(b"\x04\x22\x4d\x18frame"), "not the legacy"),
            (fake_bzimage(&LZ4_LEGACY_MAGIC.to_le_bytes()), "no data"),
            (
                fake_bzimage(
                    &[&LZ4_LEGACY_MAGIC.to_le_bytes()[..], &[0xff, 0xff, 0, 0, 1]].concat(),
                ),
                "claims",
            ),
            (
                fake_bzimage(
                    &[
                        &LZ4_LEGACY_MAGIC.to_le_bytes()[..],
                        &5u32.to_le_bytes(),
                        &[0xff; 5],
                    ]
                    .concat(),
                ),
                "corrupt LZ4 block",
            ),
            (
                fake_bzimage(&legacy_stream(&[b"not an elf at all"], None)),
                "not an ELF",
            ),
        ];
        for (img, want) in cases {
            let err = extract_vmlinux(&img).unwrap_err();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
        // Payload fields pointing outside the file.
        let mut img = fake_bzimage(b"abcd");
        img[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(extract_vmlinux(&img).unwrap_err().contains("outside"));
        // An old boot protocol.
        let mut img = fake_bzimage(b"abcd");
        img[0x206..0x208].copy_from_slice(&0x0204u16.to_le_bytes());
        assert!(extract_vmlinux(&img).unwrap_err().contains("2.08"));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in [0usize, 3, 5, 600, 4096] {
            for _ in 0..50 {
                let mut img: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                let _ = extract_vmlinux(&img);
                let _ = lz4_legacy_decompress(&img);
                if len > 8 {
                    img[..4].copy_from_slice(&LZ4_LEGACY_MAGIC.to_le_bytes());
                    let _ = lz4_legacy_decompress(&img);
                }
            }
        }
    }

    #[test]
    fn cache_is_reused_and_redone_when_the_bzimage_changes() {
        let dir = tempfile::tempdir().unwrap();
        let z = dir.path().join("vmlinuz");
        let elf1 = fake_elf(100_000);
        std::fs::write(&z, fake_bzimage(&legacy_stream(&[&elf1], None))).unwrap();
        let out = ensure_vmlinux(&z).unwrap();
        assert_eq!(out, dir.path().join(VMLINUX));
        assert_eq!(std::fs::read(&out).unwrap(), elf1);
        let m1 = std::fs::metadata(&out).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        ensure_vmlinux(&z).unwrap();
        assert_eq!(
            std::fs::metadata(&out).unwrap().modified().unwrap(),
            m1,
            "an up-to-date cache is not rewritten"
        );
        let mut elf2 = fake_elf(120_000);
        elf2[1000] = 1;
        std::fs::write(&z, fake_bzimage(&legacy_stream(&[&elf2], None))).unwrap();
        ensure_vmlinux(&z).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), elf2);
        // An ELF kernel is used as it is.
        let e = dir.path().join("plain-elf");
        std::fs::write(&e, &elf1).unwrap();
        assert_eq!(ensure_vmlinux(&e).unwrap(), e);
        // A broken bzImage is an error naming the file, and leaves no temporary files.
        std::fs::write(&z, b"garbage garbage").unwrap();
        match ensure_vmlinux(&z) {
            Err(KernelError::Format { path, .. }) => assert!(path.ends_with("vmlinuz")),
            other => panic!("{other:?}"),
        }
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(!names.iter().any(|n| n.contains(".tmp")), "{names:?}");
    }

    /// The real Debian kernel, when this machine has one.
    #[test]
    fn real_debian_kernel() {
        let candidates = ["/var/lib/bandsox/boot/vmlinuz"];
        let found = candidates
            .iter()
            .map(Path::new)
            .find(|p| p.is_file())
            .or(None);
        let Some(kernel) = found else {
            eprintln!(
                "\n!!! SKIPPED real_debian_kernel: no bzImage at {candidates:?} \
                 (run mount-helpers/setup)\n"
            );
            return;
        };
        let image = match std::fs::read(kernel) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("\n!!! SKIPPED real_debian_kernel: cannot read {kernel:?}: {e}\n");
                return;
            }
        };
        let t0 = std::time::Instant::now();
        let elf = extract_vmlinux(&image).expect("extract the real kernel");
        eprintln!(
            "real_debian_kernel: {} byte bzImage → {} byte ELF in {:?}",
            image.len(),
            elf.len(),
            t0.elapsed()
        );
        assert!(
            elf.len() > image.len(),
            "the ELF is larger than the bzImage"
        );
        // ELF64 little-endian executable for x86-64 with program headers.
        assert_eq!(elf[5], 1, "little endian");
        assert_eq!(u16_at(&elf, 16), Some(2), "ET_EXEC");
        // Every PT_LOAD segment lies inside the file and loads above 1 MiB (what an ELF
        // loader such as Firecracker's needs).
        let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
        let phentsize = usize::from(u16_at(&elf, 54).unwrap());
        let phnum = usize::from(u16_at(&elf, 56).unwrap());
        let mut loads = 0;
        for i in 0..phnum {
            let ph = &elf[phoff + i * phentsize..][..phentsize];
            if u32_at(ph, 0) != Some(1) {
                continue;
            }
            loads += 1;
            let off = u64::from_le_bytes(ph[8..16].try_into().unwrap()) as usize;
            let paddr = u64::from_le_bytes(ph[24..32].try_into().unwrap());
            let filesz = u64::from_le_bytes(ph[32..40].try_into().unwrap()) as usize;
            assert!(off + filesz <= elf.len(), "segment {i} outside the file");
            assert!(paddr >= 1 << 20, "segment {i} loads at {paddr:#x}");
        }
        assert!(loads >= 1, "no PT_LOAD segment");
        // A test's output path, not a daemon setting.
        let out = std::env::var_os("BANDSOX_TEST_VMLINUX_OUT"); // lint:allow-env
        if let Some(out) = out {
            std::fs::write(out, &elf).unwrap();
        }
        // The payload's size trailer matches.
        let payload = bzimage_payload(&image).unwrap();
        let trailer = u32_at(payload, payload.len() - 4).unwrap() as usize;
        assert_eq!(trailer, elf.len());
    }
}
