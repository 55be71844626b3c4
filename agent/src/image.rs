//! The image config the agent applies to every command (OCI `Env`, `WorkingDir`, `User`,
//! `Entrypoint`, `Cmd`).
//!
//! The host writes it into the image's root filesystem at [`IMAGE_CONFIG_PATH`] when it
//! builds the image's ext4 (import or pull); the agent reads it once after switching to
//! the disk root. An image without the file (the `base` image, imported ext4 files and
//! directories) runs commands as root in `/` with the agent's default environment. A file
//! that cannot be parsed is logged and ignored, never fatal.
//!
//! Users are resolved at every exec through the guest's own `/etc/passwd` and `/etc/group`
//! (so changes made in the guest apply at once): `name`, `uid`, `name:group`, `uid:gid`;
//! a numeric uid missing from `/etc/passwd` runs with gid 0 and `HOME=/`, as Docker does.
use serde::{Deserialize, Serialize};

/// Where the image config lives inside the guest.
pub const IMAGE_CONFIG_PATH: &str = "/.bandsox/image.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ImageConfig {
    /// `KEY=VALUE` entries, applied over the agent's defaults (later entries win).
    #[serde(default)]
    pub env: Vec<String>,
    /// Default working directory (empty = `/`).
    #[serde(default)]
    pub working_dir: String,
    /// `user[:group]`, names or numbers (empty = root).
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
}

impl ImageConfig {
    /// Read the config from `path`; `None` when absent or invalid (logged).
    pub fn load(path: &std::path::Path) -> Option<ImageConfig> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!("cannot read {}: {e}; ignoring it", path.display());
                return None;
            }
        };
        match serde_json::from_slice(&bytes) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!("invalid {}: {e}; ignoring it", path.display());
                None
            }
        }
    }

    /// The argv of the image's main program (`Entrypoint` + `Cmd`).
    pub fn main_argv(&self) -> Vec<String> {
        self.entrypoint.iter().chain(&self.cmd).cloned().collect()
    }
}

/// A resolved user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (from `/etc/group` membership of the user's name).
    pub groups: Vec<u32>,
    pub name: Option<String>,
    pub home: String,
}

impl Identity {
    pub fn root() -> Identity {
        Identity {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
            name: Some("root".into()),
            home: "/root".into(),
        }
    }
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn passwd_entries(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
        .collect()
}

/// `(name, gid, members)` of each group line.
fn group_entries(text: &str) -> Vec<(String, u32, Vec<String>)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            let members = f[3]
                .split(',')
                .filter(|m| !m.is_empty())
                .map(String::from)
                .collect();
            Some((f[0].to_string(), f[2].parse().ok()?, members))
        })
        .collect()
}

/// Resolve `spec` (`user[:group]`) against the texts of `/etc/passwd` and `/etc/group`.
/// `source` says where `spec` came from (the image's `User`, an `exec` option), for the
/// error messages.
pub fn resolve_user(
    spec: &str,
    source: &str,
    passwd: &str,
    group: &str,
) -> Result<Identity, String> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Ok(Identity::root());
    }
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let users = passwd_entries(passwd);
    let groups = group_entries(group);
    let entry = match user.parse::<u32>() {
        Ok(uid) => users.iter().find(|e| e.uid == uid),
        Err(_) => Some(users.iter().find(|e| e.name == user).ok_or_else(|| {
            format!("user {user:?} ({source}) is not in the image's /etc/passwd")
        })?),
    };
    let uid = match (user.parse::<u32>(), entry) {
        (Ok(uid), _) => uid,
        (Err(_), Some(e)) => e.uid,
        (Err(_), None) => return Err(format!("user {user:?} ({source}) cannot be resolved")),
    };
    let gid = match grp {
        Some(g) if !g.is_empty() => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|(n, _, _)| n == g)
                .map(|(_, gid, _)| *gid)
                .ok_or_else(|| {
                    format!("group {g:?} ({source}) is not in the image's /etc/group")
                })?,
        },
        _ => entry.map(|e| e.gid).unwrap_or(0),
    };
    let name = entry.map(|e| e.name.clone());
    let mut extra: Vec<u32> = match &name {
        Some(n) => groups
            .iter()
            .filter(|(_, _, m)| m.iter().any(|m| m == n))
            .map(|(_, g, _)| *g)
            .collect(),
        None => Vec::new(),
    };
    if grp.is_some() {
        // An explicit group replaces the supplementary groups, as in Docker.
        extra.clear();
    }
    extra.retain(|g| *g != gid);
    extra.insert(0, gid);
    extra.dedup();
    Ok(Identity {
        uid,
        gid,
        groups: extra,
        home: entry
            .map(|e| e.home.clone())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "/".into()),
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:App:/home/app:/bin/sh\nweird line\nsvc:x:999:50::/srv:/bin/false\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:app\napp:x:1000:\naudio:x:29:app,svc\n";

    #[test]
    fn names_numbers_and_groups() {
        let r = resolve_user("", "test", PASSWD, GROUP).unwrap();
        assert_eq!((r.uid, r.gid), (0, 0));
        let a = resolve_user("app", "test", PASSWD, GROUP).unwrap();
        assert_eq!((a.uid, a.gid, a.home.as_str()), (1000, 1000, "/home/app"));
        assert_eq!(a.groups, vec![1000, 50, 29]);
        let n = resolve_user("1000", "test", PASSWD, GROUP).unwrap();
        assert_eq!((n.uid, n.gid), (1000, 1000));
        assert_eq!(n.name.as_deref(), Some("app"));
        let u = resolve_user("4242", "test", PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (4242, 0, "/"));
        let g = resolve_user("app:staff", "test", PASSWD, GROUP).unwrap();
        assert_eq!((g.uid, g.gid), (1000, 50));
        assert_eq!(g.groups, vec![50]);
        let ng = resolve_user("4242:77", "test", PASSWD, GROUP).unwrap();
        assert_eq!((ng.uid, ng.gid), (4242, 77));
        let e = resolve_user("nobody", "#bandsox user=", PASSWD, GROUP).unwrap_err();
        assert_eq!(
            e,
            "user \"nobody\" (#bandsox user=) is not in the image's /etc/passwd"
        );
        let e = resolve_user("nobody", "image config User", PASSWD, GROUP).unwrap_err();
        assert!(e.contains("(image config User)"), "{e}");
        assert!(resolve_user("app:nogroup", "test", PASSWD, GROUP).is_err());
        // No /etc/passwd at all (scratch image): numbers still work.
        assert_eq!(
            resolve_user("65534:65534", "test", "", "").unwrap().uid,
            65534
        );
    }

    #[test]
    fn config_roundtrip_and_argv() {
        let c = ImageConfig {
            env: vec!["A=1".into()],
            working_dir: "/w".into(),
            user: "app".into(),
            entrypoint: vec!["/bin/app".into()],
            cmd: vec!["--serve".into()],
        };
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<ImageConfig>(&j).unwrap(), c);
        assert_eq!(c.main_argv(), vec!["/bin/app", "--serve"]);
        assert_eq!(
            serde_json::from_str::<ImageConfig>("{}").unwrap(),
            ImageConfig::default()
        );
    }
}
