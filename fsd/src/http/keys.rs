//! API keys: random tokens that act as one Unix user over TCP.
//!
//! Invariants:
//! - A key is 32 random bytes (256 bits) from the OS generator, shown once at creation
//!   (`bsx_` + base64url); only its SHA-256 is stored, in `<state>/api-keys.json`
//!   (mode 0600, written to a temporary name and renamed, so a crash leaves the old or
//!   the new file, never half of one).
//! - Verification hashes the presented token and compares it with *every* stored hash
//!   in constant time (`subtle`), so neither the position of a match nor a common prefix
//!   shows in the time taken.
//! - A key belongs to one uid; names are unique per uid. Revocation changes the
//!   in-memory table before it answers, so a revoked key fails the very next request.
use std::path::PathBuf;
use std::time::SystemTime;

use base64::Engine;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};

/// The file under the state directory.
pub const FILE: &str = "api-keys.json";
/// Prefix of every key (recognisable in logs and secret scanners).
pub const PREFIX: &str = "bsx_";
/// Most keys one user may hold (each is checked on every TCP request).
pub const MAX_PER_USER: usize = 64;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    name: String,
    uid: u32,
    /// Hex SHA-256 of the whole key, prefix included.
    sha256: String,
    /// Seconds since the epoch.
    created: u64,
}

/// What listing a key shows (never the key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct KeyInfo {
    pub name: String,
    pub uid: u32,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

pub struct KeyStore {
    path: PathBuf,
    keys: RwLock<Vec<(Stored, [u8; 32])>>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn valid_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "key name {name:?}: 1-64 characters of A-Z a-z 0-9 - _ ."
        )))
    }
}

impl KeyStore {
    /// Load the keys under `state_dir` (none yet is an empty store; an unreadable file
    /// is an error: starting without the keys would lock every client out silently).
    pub fn open(state_dir: &std::path::Path) -> Result<KeyStore> {
        let path = state_dir.join(FILE);
        let stored: Vec<Stored> = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| Error::io(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::io(format!("{}: {e}", path.display()))),
        };
        let keys = stored
            .into_iter()
            .filter_map(|s| unhex(&s.sha256).map(|d| (s, d)))
            .collect();
        Ok(KeyStore {
            path,
            keys: RwLock::new(keys),
        })
    }

    fn save(&self, keys: &[(Stored, [u8; 32])]) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let list: Vec<&Stored> = keys.iter().map(|(s, _)| s).collect();
        let text = serde_json::to_vec_pretty(&list).map_err(|e| Error::io(e.to_string()))?;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        Ok(())
    }

    /// Make a key `name` for `uid`; returns the key (the only time it is seen).
    pub fn add(&self, uid: u32, name: &str) -> Result<String> {
        valid_name(name)?;
        let mut raw = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut raw);
        let token = format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
        );
        let d = digest(&token);
        let mut keys = self.keys.write();
        if keys.iter().any(|(s, _)| s.uid == uid && s.name == name) {
            return Err(Error::exists(format!(
                "you already have a key named {name:?}"
            )));
        }
        if keys.iter().filter(|(s, _)| s.uid == uid).count() >= MAX_PER_USER {
            return Err(Error::new(
                libc::EDQUOT,
                format!("at most {MAX_PER_USER} keys per user; revoke one first"),
            ));
        }
        let created = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut next = keys.clone();
        next.push((
            Stored {
                name: name.to_string(),
                uid,
                sha256: hex(&d),
                created,
            },
            d,
        ));
        self.save(&next)?;
        *keys = next;
        Ok(token)
    }

    /// The keys `viewer` may see: their own; root sees everyone's.
    pub fn list(&self, viewer: u32) -> Vec<KeyInfo> {
        self.keys
            .read()
            .iter()
            .filter(|(s, _)| viewer == 0 || s.uid == viewer)
            .map(|(s, _)| KeyInfo {
                name: s.name.clone(),
                uid: s.uid,
                created: s.created,
            })
            .collect()
    }

    /// Revoke `owner`'s key `name`, as `caller` (the owner, or root). Another user's key
    /// is ENOENT, exactly like a missing one.
    pub fn revoke(&self, caller: u32, owner: u32, name: &str) -> Result<()> {
        let missing = || Error::not_found(format!("no key {name:?}"));
        if caller != 0 && caller != owner {
            return Err(missing());
        }
        let mut keys = self.keys.write();
        let next: Vec<_> = keys
            .iter()
            .filter(|(s, _)| !(s.uid == owner && s.name == name))
            .cloned()
            .collect();
        if next.len() == keys.len() {
            return Err(missing());
        }
        self.save(&next)?;
        *keys = next;
        Ok(())
    }

    /// The uid and name of the key `token`, if it is a live key.
    pub fn verify(&self, token: &str) -> Option<(u32, String)> {
        let d = digest(token);
        let keys = self.keys.read();
        let mut found = None;
        for (s, stored) in keys.iter() {
            // Every entry is compared, whatever matched before.
            if bool::from(stored.ct_eq(&d)) {
                found = Some((s.uid, s.name.clone()));
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_verify_list_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::open(dir.path()).unwrap();
        let k = store.add(1000, "laptop").unwrap();
        assert!(k.starts_with(PREFIX) && k.len() > 40);
        assert_eq!(store.verify(&k), Some((1000, "laptop".into())));
        assert_eq!(store.verify("bsx_wrong"), None);
        assert_eq!(store.add(1000, "laptop").unwrap_err().errno, libc::EEXIST);
        store.add(1001, "laptop").unwrap();
        assert_eq!(store.list(1000).len(), 1);
        assert_eq!(store.list(0).len(), 2);
        // The file keeps hashes only, owner-only.
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert!(!text.contains(&k[PREFIX.len()..]));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Another user's key looks missing; revocation is immediate and persistent.
        assert_eq!(
            store.revoke(1001, 1000, "laptop").unwrap_err().errno,
            libc::ENOENT
        );
        store.revoke(1000, 1000, "laptop").unwrap();
        assert_eq!(store.verify(&k), None);
        let again = KeyStore::open(dir.path()).unwrap();
        assert_eq!(again.verify(&k), None);
        assert_eq!(again.list(0).len(), 1);
        assert_eq!(store.add(1, "bad name").unwrap_err().errno, libc::EINVAL);
    }
}
