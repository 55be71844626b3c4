//! The mounted-daemon harness shared by the host-backend tests: the real daemon and FUSE
//! mount with the agent in host mode (no VM).
#![allow(
    clippy::cast_possible_truncation,
    reason = "test code: sizes, offsets and ids are small values the test constructs"
)]
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Mounted {
    pub _tmp: tempfile::TempDir,
    pub mnt: PathBuf,
    pub state: PathBuf,
    daemon: Child,
    /// The state directory is a tmpfs of this harness (unmounted on drop).
    state_tmpfs: bool,
    /// Extra environment of the daemon (kept for restarts).
    env: Vec<(String, String)>,
}

/// Options of a [`Mounted`] daemon.
#[derive(Default)]
pub struct MountOpts {
    /// Put the state directory on a tmpfs of this many MiB (to fill it up).
    pub state_tmpfs_mib: Option<u32>,
    /// Size of the `base` image's disk (non-zero data, so copies take space).
    pub image_bytes: Option<usize>,
    /// Extra environment of the daemon.
    pub env: Vec<(String, String)>,
}

/// Set to `1` to let the mounted tests skip (pass without running) where there is no root
/// or no `/dev/fuse`; without it they fail there, so a CI run cannot pass silently.
pub const SKIP_ENV: &str = "BANDSOX_TEST_SKIP_MOUNTED";

pub fn agent_binary() -> PathBuf {
    let bandsox = PathBuf::from(env!("CARGO_BIN_EXE_bandsox"));
    let agent = bandsox.with_file_name("bandsox-agent");
    if !agent.exists() {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "bandsox-agent", "--bin", "bandsox-agent"]);
        if bandsox.parent().and_then(|p| p.file_name()) == Some("release".as_ref()) {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("cargo build agent");
        assert!(st.success());
    }
    agent
}

pub fn is_mounted(p: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&*p.to_string_lossy()))
}

impl Mounted {
    pub fn new() -> Option<Mounted> {
        Self::with(MountOpts::default())
    }

    /// A mount whose daemon gets extra environment variables (e.g. `BANDSOX_LIMITS`).
    pub fn with_env(env: &[(&str, &str)]) -> Option<Mounted> {
        Self::with(MountOpts {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        })
    }

    pub fn with(opts: MountOpts) -> Option<Mounted> {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root || !Path::new("/dev/fuse").exists() {
            let why = if root {
                "there is no /dev/fuse"
            } else {
                "not running as root"
            };
            // A test that cannot run must not pass: it fails unless the caller opted out.
            assert!(
                std::env::var_os(SKIP_ENV).is_some_and(|v| v == "1"),
                "the mounted tests need root and /dev/fuse, and {why}; run them as root, or set \
                 {SKIP_ENV}=1 to skip them knowingly"
            );
            eprintln!("!!!!! SKIPPING mount tests ({SKIP_ENV}=1): {why} !!!!!");
            return None;
        }
        // Under /var/tmp: a disk filesystem, so user xattrs work in the host-mode "guest".
        let tmp = tempfile::Builder::new()
            .prefix("bandsox-test")
            .tempdir_in("/var/tmp")
            .unwrap();
        let mnt = tmp.path().join("mnt");
        let state = tmp.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        if let Some(mib) = opts.state_tmpfs_mib {
            let st = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "bandsox-test"])
                .arg(&state)
                .status()
                .unwrap();
            assert!(st.success(), "mount tmpfs on {}", state.display());
        }
        std::fs::create_dir_all(state.join("images/base")).unwrap();
        let disk = match opts.image_bytes {
            Some(n) => (0..n).map(|i| (i % 251) as u8 | 1).collect(),
            None => vec![0u8; 65536],
        };
        std::fs::write(state.join("images/base/disk.ext4"), disk).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let env = opts.env.clone();
        let daemon = spawn_daemon(&mnt, &state, tmp.path(), &env);
        let m = Mounted {
            _tmp: tmp,
            mnt,
            state,
            daemon,
            state_tmpfs: opts.state_tmpfs_mib.is_some(),
            env,
        };
        m.wait_mounted();
        Some(m)
    }

    fn wait_mounted(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(&self.mnt) {
            assert!(
                Instant::now() < deadline,
                "mount did not appear: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL the daemon and start it again on the same mount point and state.
    pub fn restart(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        self.daemon = spawn_daemon(&self.mnt, &self.state, self._tmp.path(), &self.env);
        // The dead mount is still listed until the new daemon replaced it, and between
        // its removal and the new mount `$M` is the bare directory (whose `ls` succeeds):
        // wait for the tree's own README.
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.sh("test -e $M/README").0 != 0 {
            assert!(
                Instant::now() < deadline,
                "no mount after restart: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's process id.
    pub fn daemon_pid(&self) -> u32 {
        self.daemon.id()
    }

    /// The daemon's resident memory in bytes (`VmRSS`).
    pub fn daemon_rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.daemon_pid())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        kb * 1024
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._tmp.path().join("daemon.log")).unwrap_or_default()
    }

    /// Run a `sh` script with `M` set to the mount point; returns (status, stdout, stderr).
    pub fn sh(&self, script: &str) -> (i32, String, String) {
        let out = Command::new("timeout")
            .args(["60", "bash", "-c", script])
            .env("M", &self.mnt)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Run a `bash` script as `uid` (gid the same, no supplementary groups), with `M` set.
    pub fn sh_as(&self, uid: u32, script: &str) -> (i32, String, String) {
        let id = uid.to_string();
        let out = Command::new("timeout")
            .args([
                "60",
                "setpriv",
                "--reuid",
                &id,
                "--regid",
                &id,
                "--clear-groups",
            ])
            .args(["bash", "-c", script])
            .env("M", &self.mnt)
            .env("HOME", "/")
            .current_dir("/")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// [`Self::sh_as`] that must succeed; returns stdout.
    pub fn ok_as(&self, uid: u32, script: &str) -> String {
        let (code, out, err) = self.sh_as(uid, script);
        assert_eq!(
            code,
            0,
            "script as uid {uid} failed: {script}\nstdout: {out}\nstderr: {err}\nlog: {}",
            self.log()
        );
        out
    }

    pub fn ok(&self, script: &str) -> String {
        let (code, out, err) = self.sh(script);
        assert_eq!(
            code,
            0,
            "script failed: {script}\nstdout: {out}\nstderr: {err}\nlog: {}",
            self.log()
        );
        out
    }
}

fn spawn_daemon(mnt: &Path, state: &Path, dir: &Path, env: &[(String, String)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("daemon.log"))
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_bandsox"))
        .arg("mount")
        .arg(mnt)
        .arg("--state-dir")
        .arg(state)
        .arg("-f")
        .env("BANDSOX_HOST_AGENT", agent_binary())
        .env("BANDSOX_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        if let Ok(entries) = std::fs::read_dir(self.state.join("vms")) {
            for e in entries.flatten() {
                if let Ok(pid) = std::fs::read_to_string(e.path().join("vmm.pid")) {
                    if let Ok(pid) = pid.trim().parse::<i32>() {
                        // SAFETY: plain kill(2) of a process this test started.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
        if self.state_tmpfs {
            std::thread::sleep(Duration::from_millis(100));
            let _ = Command::new("umount").arg("-l").arg(&self.state).status();
        }
    }
}
