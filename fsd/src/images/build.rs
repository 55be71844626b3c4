//! `build NAME DIR`: build an image from a Dockerfile with a builder already on the host
//! (`buildah`, else a running Docker daemon) and hand the result to the import path.
//!
//! We do not implement Dockerfile semantics ourselves: a maintained builder does, and
//! writes an archive (`buildah push … oci-archive:`, `docker save`) that the ordinary
//! import code unpacks, verifies and turns into an ext4 disk.
//!
//! Invariants:
//! - The builder runs in its own process group with the image deadline; on timeout the
//!   whole group is killed and the build fails with ETIMEDOUT.
//! - Its output goes to `build.log` in the image's work directory (kept with the image);
//!   `STEP`/`Step` lines become `build-progress` events; a failure quotes the last lines.
//! - The builder's temporary image tag (`localhost/bandsox-build-…`) is removed whether
//!   the build worked or not, so builds leave nothing in the builder's own store.
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::Progress;
use crate::error::{Error, Result};
use crate::logcap::log_tail;
use crate::tools::find_tool;

/// A builder found on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Builder {
    Buildah(PathBuf),
    Docker(PathBuf),
}

/// The lines of a failed build quoted in its error.
const TAIL_LINES: usize = 6;
/// How long `docker info` may take to tell whether a daemon answers.
const DOCKER_PROBE: Duration = Duration::from_secs(10);

impl Builder {
    pub fn name(&self) -> &'static str {
        match self {
            Builder::Buildah(_) => "buildah",
            Builder::Docker(_) => "docker",
        }
    }

    /// `BANDSOX_BUILDER` (`buildah`, `docker`, or a path to either) decides; otherwise
    /// buildah when on PATH, else docker when its daemon answers.
    pub fn detect() -> Result<Builder> {
        match std::env::var("BANDSOX_BUILDER")
            .ok()
            .filter(|s| !s.is_empty())
        {
            Some(choice) => Self::from_choice(&choice),
            None => {
                if let Some(p) = find_tool("buildah") {
                    return Ok(Builder::Buildah(p));
                }
                if let Some(p) = find_tool("docker") {
                    if docker_answers(&p) {
                        return Ok(Builder::Docker(p));
                    }
                }
                Err(Error::new(
                    libc::ENOSYS,
                    "build needs an image builder on the host: install buildah \
                     (apt-get install buildah) or run a Docker daemon; or build elsewhere \
                     and import the archive",
                ))
            }
        }
    }

    fn from_choice(choice: &str) -> Result<Builder> {
        let path = if choice.contains('/') {
            Some(PathBuf::from(choice))
        } else {
            find_tool(choice)
        };
        let Some(path) = path.filter(|p| p.is_file()) else {
            return Err(Error::new(
                libc::ENOSYS,
                format!("BANDSOX_BUILDER={choice}: no such program"),
            ));
        };
        let base = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if base.contains("buildah") {
            Ok(Builder::Buildah(path))
        } else if base.contains("docker") || base.contains("podman") {
            Ok(Builder::Docker(path))
        } else {
            Err(Error::invalid(format!(
                "BANDSOX_BUILDER={choice}: expected buildah or docker"
            )))
        }
    }

    /// The commands that build `context` (with `dockerfile`) into the archive `out`,
    /// and the one that removes the temporary tag afterwards.
    pub fn commands(
        &self,
        context: &Path,
        dockerfile: &Path,
        tag: &str,
        out: &Path,
    ) -> (Vec<Command>, Command) {
        match self {
            Builder::Buildah(b) => {
                let mut bud = Command::new(b);
                // chroot isolation runs RUN steps without an OCI runtime or cgroup setup
                // (crun refuses hosts with hybrid cgroups); the builder runs as root.
                bud.args(["bud", "--isolation", "chroot", "-f"])
                    .arg(dockerfile)
                    .args(["-t", tag])
                    .arg(context);
                let mut push = Command::new(b);
                push.args(["push", tag])
                    .arg(format!("oci-archive:{}", out.display()));
                let mut rmi = Command::new(b);
                rmi.args(["rmi", "-f", tag]);
                (vec![bud, push], rmi)
            }
            Builder::Docker(d) => {
                let mut build = Command::new(d);
                build
                    .args(["build", "-f"])
                    .arg(dockerfile)
                    .args(["-t", tag])
                    .arg(context);
                let mut save = Command::new(d);
                save.args(["save", "-o"]).arg(out).arg(tag);
                let mut rmi = Command::new(d);
                rmi.args(["rmi", "-f", tag]);
                (vec![build, save], rmi)
            }
        }
    }
}

fn docker_answers(docker: &Path) -> bool {
    let Ok(mut child) = Command::new(docker)
        .arg("info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let end = Instant::now() + DOCKER_PROBE;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Check `build`'s arguments: the context must be an absolute directory; the
/// Dockerfile (`file=`, relative to the context unless absolute) must exist.
pub fn resolve(context: &str, file: Option<&str>) -> Result<(PathBuf, PathBuf)> {
    let ctx = PathBuf::from(context);
    if !ctx.is_absolute() {
        return Err(Error::invalid(format!(
            "build: DIR must be an absolute path, got {context:?}"
        )));
    }
    if !ctx.is_dir() {
        return Err(Error::not_found(format!(
            "build: {context} is not a directory"
        )));
    }
    let file = match file {
        Some(f) if Path::new(f).is_absolute() => PathBuf::from(f),
        Some(f) => ctx.join(f),
        None => {
            let docker = ctx.join("Dockerfile");
            let container = ctx.join("Containerfile");
            if !docker.exists() && container.exists() {
                container
            } else {
                docker
            }
        }
    };
    if !file.is_file() {
        return Err(Error::not_found(format!(
            "build: no Dockerfile at {}",
            file.display()
        )));
    }
    Ok((ctx, file))
}

/// Run `builder` on `context` into the archive `out`; its output goes to `log`.
pub fn run(
    builder: &Builder,
    context: &Path,
    dockerfile: &Path,
    tag: &str,
    out: &Path,
    log: &Path,
    progress: &Progress,
) -> Result<()> {
    let (steps, mut rmi) = builder.commands(context, dockerfile, tag, out);
    let result = steps
        .into_iter()
        .try_for_each(|cmd| run_logged(builder, cmd, log, progress));
    // Best effort: the tag may not exist when the build failed early.
    let _ = rmi.stdout(Stdio::null()).stderr(Stdio::null()).status();
    result
}

fn run_logged(builder: &Builder, mut cmd: Command, log: &Path, progress: &Progress) -> Result<()> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let err = out.try_clone()?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| Error::io(format!("cannot run {}: {e}", builder.name())))?;
    let mut reader = LogFollower::new(log);
    let status = loop {
        reader.poll(|line| {
            let l = line.trim_start();
            if l.starts_with("STEP ") || l.starts_with("Step ") {
                progress.event("build-progress", l);
            }
        });
        match child.try_wait()? {
            Some(status) => break status,
            None if Instant::now() > progress.deadline => {
                if let Ok(pgid) = libc::pid_t::try_from(child.id()) {
                    // The builder's own process group (it was spawned with
                    // process_group(0), so its pgid is its pid).
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pgid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = child.wait();
                return Err(Error::timed_out(
                    "the build took longer than its deadline (BANDSOX_IMAGE_TIMEOUT)",
                ));
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    reader.poll(|_| {});
    if status.success() {
        return Ok(());
    }
    // The builder's own words go into ctl: no terminal control sequences.
    let tail: String = log_tail(log, 0, TAIL_LINES)
        .to_string()
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    Err(Error::invalid(format!(
        "{} failed ({status}): {tail}",
        builder.name()
    )))
}

/// Reads whole lines appended to a file since the last poll.
struct LogFollower {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl LogFollower {
    fn new(path: &Path) -> LogFollower {
        let offset = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        LogFollower {
            path: path.to_path_buf(),
            offset,
            partial: String::new(),
        }
    }

    fn poll(&mut self, mut each: impl FnMut(&str)) {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if let Ok(n) = f.read_to_end(&mut buf) {
            self.offset += n as u64;
            self.partial.push_str(&String::from_utf8_lossy(&buf));
            while let Some(i) = self.partial.find('\n') {
                let line: String = self.partial.drain(..=i).collect();
                each(line.trim_end());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_checks_context_and_dockerfile() {
        let d = tempfile::tempdir().unwrap();
        let ctx = d.path().to_str().unwrap();
        assert_eq!(resolve("rel/dir", None).unwrap_err().errno, libc::EINVAL);
        assert_eq!(
            resolve(&format!("{ctx}/nope"), None).unwrap_err().errno,
            libc::ENOENT
        );
        let e = resolve(ctx, None).unwrap_err();
        assert_eq!(e.errno, libc::ENOENT);
        assert!(e.message.contains("no Dockerfile"), "{}", e.message);
        std::fs::write(d.path().join("Containerfile"), "FROM scratch\n").unwrap();
        assert_eq!(
            resolve(ctx, None).unwrap().1,
            d.path().join("Containerfile")
        );
        std::fs::write(d.path().join("Dockerfile"), "FROM scratch\n").unwrap();
        assert_eq!(resolve(ctx, None).unwrap().1, d.path().join("Dockerfile"));
        std::fs::write(d.path().join("alt.df"), "FROM scratch\n").unwrap();
        assert_eq!(
            resolve(ctx, Some("alt.df")).unwrap().1,
            d.path().join("alt.df")
        );
    }

    #[test]
    fn builder_commands() {
        let b = Builder::Buildah("/usr/bin/buildah".into());
        let (steps, rmi) = b.commands(
            Path::new("/ctx"),
            Path::new("/ctx/Dockerfile"),
            "localhost/t",
            Path::new("/w/out.tar"),
        );
        let argv = |c: &Command| {
            c.get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            argv(&steps[0]),
            "bud --isolation chroot -f /ctx/Dockerfile -t localhost/t /ctx"
        );
        assert_eq!(argv(&steps[1]), "push localhost/t oci-archive:/w/out.tar");
        assert_eq!(argv(&rmi), "rmi -f localhost/t");
        let d = Builder::Docker("/usr/bin/docker".into());
        let (steps, _) = d.commands(
            Path::new("/ctx"),
            Path::new("/ctx/Dockerfile"),
            "localhost/t",
            Path::new("/w/out.tar"),
        );
        assert_eq!(
            argv(&steps[0]),
            "build -f /ctx/Dockerfile -t localhost/t /ctx"
        );
        assert_eq!(argv(&steps[1]), "save -o /w/out.tar localhost/t");
    }

    #[test]
    fn follower_reads_whole_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        std::fs::write(&p, "old\n").unwrap();
        let mut f = LogFollower::new(&p);
        std::fs::write(&p, "old\nSTEP 1/2: FROM x\nSTEP 2").unwrap();
        let mut seen = vec![];
        f.poll(|l| seen.push(l.to_string()));
        assert_eq!(seen, ["STEP 1/2: FROM x"]);
        std::fs::write(&p, "old\nSTEP 1/2: FROM x\nSTEP 2/2: COPY\n").unwrap();
        f.poll(|l| seen.push(l.to_string()));
        assert_eq!(seen, ["STEP 1/2: FROM x", "STEP 2/2: COPY"]);
        assert_eq!(
            log_tail(&p, 0, 1).into_text().as_deref(),
            Some("STEP 2/2: COPY")
        );
    }
}
