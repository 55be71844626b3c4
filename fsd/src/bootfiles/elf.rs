//! Just enough ELF64 (little-endian) reading for the guest build: is a binary static (no
//! `PT_INTERP`), and what a kernel module's `.modinfo` section says.
//!
//! Invariant: every offset read from the file is bounds-checked; malformed input yields
//! `None`, never a panic.

const PT_INTERP: u32 = 3;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// True for a 64-bit little-endian ELF file.
pub fn is_elf64_le(b: &[u8]) -> bool {
    b.len() >= 64 && &b[..4] == b"\x7fELF" && b[4] == 2 && b[5] == 1
}

/// `Some(true)` if the ELF executable needs no program interpreter (statically linked,
/// including static-pie), `Some(false)` if it is dynamically linked, `None` if not ELF64.
pub fn is_static(b: &[u8]) -> Option<bool> {
    if !is_elf64_le(b) {
        return None;
    }
    let phoff = usize::try_from(u64_at(b, 0x20)?).ok()?;
    let phentsize = usize::from(u16_at(b, 0x36)?);
    let phnum = usize::from(u16_at(b, 0x38)?);
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(b, ph)? == PT_INTERP {
            return Some(false);
        }
    }
    Some(true)
}

/// The raw bytes of the section called `name`.
pub fn section<'a>(b: &'a [u8], name: &str) -> Option<&'a [u8]> {
    if !is_elf64_le(b) {
        return None;
    }
    let shoff = usize::try_from(u64_at(b, 0x28)?).ok()?;
    let shentsize = usize::from(u16_at(b, 0x3a)?);
    let shnum = usize::from(u16_at(b, 0x3c)?);
    let shstrndx = usize::from(u16_at(b, 0x3e)?);
    let header = |i: usize| -> Option<(u32, usize, usize)> {
        let sh = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = u32_at(b, sh)?;
        let off = usize::try_from(u64_at(b, sh + 0x18)?).ok()?;
        let size = usize::try_from(u64_at(b, sh + 0x20)?).ok()?;
        Some((name, off, size))
    };
    let (_, str_off, str_size) = header(shstrndx)?;
    let strtab = b.get(str_off..str_off.checked_add(str_size)?)?;
    for i in 0..shnum {
        let (name_off, off, size) = header(i)?;
        let rest = strtab.get(name_off as usize..)?;
        let end = rest.iter().position(|&c| c == 0)?;
        if &rest[..end] == name.as_bytes() {
            return b.get(off..off.checked_add(size)?);
        }
    }
    None
}

/// The `key=value` strings of a kernel module's `.modinfo` section.
pub fn modinfo(b: &[u8]) -> Option<Vec<(String, String)>> {
    let sec = section(b, ".modinfo")?;
    Some(
        sec.split(|&c| c == 0)
            .filter_map(|s| std::str::from_utf8(s).ok())
            .filter_map(|s| s.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_not_elf() {
        assert_eq!(is_static(b"#!/bin/sh\n"), None);
        assert_eq!(modinfo(&[0x7f, b'E', b'L', b'F', 2, 1]), None);
        let mut b = vec![0u8; 64];
        b[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        b[0x20] = 0xff; // phoff far outside
        b[0x38] = 1;
        assert_eq!(is_static(&b), None);
    }

    #[test]
    fn host_binaries() {
        // /bin/sh on Debian is dynamically linked.
        if let Ok(b) = std::fs::read("/bin/sh") {
            assert_eq!(is_static(&b), Some(false));
            assert!(section(&b, ".text").is_some());
        }
    }
}
