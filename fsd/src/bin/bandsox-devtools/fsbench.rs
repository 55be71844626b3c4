//! `bandsox-devtools fsbench`: the agent's file calls issued directly over an agent
//! connection, with no daemon, no FUSE and no kernel in between. The benchmark script
//! compares `fs/` against these figures, measured in the same run on the same backend,
//! kernel and image.
//!
//! Invariants: every counted node it looks up is forgotten and every handle released before it
//! answers, so it leaves the agent's tables as it found them; paths are split into
//! validated components and resolved from the root node, like the kernel would.
use std::time::{Duration, Instant};

use bandsox_agent::client::AgentClient;
use bandsox_agent::proto::fs::{
    valid_name, Entry, FsRequest, FsResponse, NodeId, NodeRef, Owner, ROOT_NODE,
};

use bandsox_fsd::error::{Error, Result};
use bandsox_fsd::guestfs::FS_DEADLINE;

/// What to measure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsBench {
    /// Read a whole file sequentially in 1 MiB calls.
    Read(String),
    /// Create or truncate a file and write `mib` MiB sequentially in 1 MiB calls.
    Write(String, u32),
    /// `n` attribute calls on one path.
    Stat(String, u32),
    /// `n` reads of 4 KiB at offset 0 of one open file.
    Read4k(String, u32),
    /// `n` create + release + unlink of fresh names in a directory.
    Create(String, u32),
}

impl FsBench {
    /// `read PATH | write PATH MIB | stat PATH N | read4k PATH N | create DIR N`.
    pub fn parse(args: &[&str]) -> Result<FsBench> {
        let count = |s: &str| {
            s.parse::<u32>()
                .ok()
                .filter(|n| (1..=100_000).contains(n))
                .ok_or_else(|| Error::invalid(format!("fsbench: bad count {s:?} (1..100000)")))
        };
        match args {
            ["read", p] => Ok(FsBench::Read(p.to_string())),
            ["write", p, n] => Ok(FsBench::Write(p.to_string(), count(n)?)),
            ["stat", p, n] => Ok(FsBench::Stat(p.to_string(), count(n)?)),
            ["read4k", p, n] => Ok(FsBench::Read4k(p.to_string(), count(n)?)),
            ["create", p, n] => Ok(FsBench::Create(p.to_string(), count(n)?)),
            _ => Err(Error::invalid(
                "fsbench: read PATH | write PATH MIB | stat PATH N | read4k PATH N | create DIR N",
            )),
        }
    }
}

struct Raw<'a> {
    c: &'a AgentClient,
    looked: Vec<NodeId>,
}

fn unexpected(what: &str, r: &FsResponse) -> Error {
    Error::io(format!("fsbench: unexpected answer to {what}: {r:?}"))
}

impl Raw<'_> {
    async fn call(&self, req: FsRequest) -> Result<FsResponse> {
        Ok(self.c.fs(req, FS_DEADLINE).await?)
    }

    /// Remember a counted entry for [`Self::finish`].
    fn keep(&mut self, e: &Entry) {
        if e.counted {
            self.looked.push(e.node.id);
        }
    }

    /// Resolve a guest path from the root, one lookup per component.
    async fn resolve(&mut self, path: &str) -> Result<NodeRef> {
        let mut node = ROOT_NODE;
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            if !valid_name(comp.as_bytes()) {
                return Err(Error::invalid(format!("fsbench: bad path {path:?}")));
            }
            node = match self
                .call(FsRequest::Lookup {
                    parent: node,
                    name: comp.as_bytes().to_vec(),
                })
                .await?
            {
                FsResponse::Entry(e) => {
                    self.keep(&e);
                    e.node
                }
                other => return Err(unexpected("lookup", &other)),
            };
        }
        Ok(node)
    }

    async fn open(&self, node: NodeRef, flags: i32) -> Result<u64> {
        match self.call(FsRequest::Open { node, flags }).await? {
            FsResponse::Opened { handle } => Ok(handle),
            other => Err(unexpected("open", &other)),
        }
    }

    async fn release(&self, handle: u64) -> Result<()> {
        self.call(FsRequest::Release { handle }).await.map(|_| ())
    }

    async fn finish(self) {
        let nodes: Vec<(NodeId, u64)> = self.looked.iter().map(|n| (*n, 1)).collect();
        let _ = self.c.forget(nodes).await;
    }
}

fn median_us(mut v: Vec<Duration>) -> u128 {
    v.sort_unstable();
    v.get(v.len() / 2).map(|d| d.as_micros()).unwrap_or(0)
}

fn split_parent(path: &str) -> Result<(&str, &str)> {
    let path = path.trim_end_matches('/');
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    if !valid_name(name.as_bytes()) {
        return Err(Error::invalid(format!("fsbench: bad path {path:?}")));
    }
    Ok((dir, name))
}

/// Run one measurement; the answer is one `ok: ...` line.
pub async fn run(c: &AgentClient, what: &FsBench) -> Result<String> {
    let mut raw = Raw {
        c,
        looked: Vec::new(),
    };
    let res = run_inner(&mut raw, what).await;
    raw.finish().await;
    res
}

#[expect(
    clippy::cast_precision_loss,
    reason = "throughput statistics: f64 precision is plenty"
)]
async fn run_inner(raw: &mut Raw<'_>, what: &FsBench) -> Result<String> {
    const CHUNK: u32 = 1024 * 1024;
    match what {
        FsBench::Read(path) => {
            let node = raw.resolve(path).await?;
            let t0 = Instant::now();
            let h = raw.open(node, libc::O_RDONLY).await?;
            let mut total = 0u64;
            loop {
                let req = FsRequest::Read {
                    handle: h,
                    offset: total,
                    size: CHUNK,
                };
                match raw.call(req).await? {
                    FsResponse::Data(d) => {
                        total += d.len() as u64;
                        if d.len() < CHUNK as usize {
                            break;
                        }
                    }
                    other => return Err(unexpected("read", &other)),
                }
            }
            raw.release(h).await?;
            let us = t0.elapsed().as_micros().max(1);
            Ok(format!(
                "ok: fsbench read bytes={total} us={us} mb_s={:.1}",
                total as f64 / us as f64
            ))
        }
        FsBench::Write(path, mib) => {
            let (dir, name) = split_parent(path)?;
            let parent = raw.resolve(dir).await?;
            let data = vec![0x5au8; CHUNK as usize];
            let t0 = Instant::now();
            let req = FsRequest::Create {
                parent,
                name: name.as_bytes().to_vec(),
                mode: libc::S_IFREG | 0o644,
                flags: libc::O_WRONLY | libc::O_TRUNC,
                owner: Owner::default(),
            };
            let h = match raw.call(req).await? {
                FsResponse::Created { entry, handle } => {
                    raw.keep(&entry);
                    handle
                }
                other => return Err(unexpected("create", &other)),
            };
            for i in 0..*mib {
                let req = FsRequest::Write {
                    handle: h,
                    offset: u64::from(i) * u64::from(CHUNK),
                    data: data.clone(),
                };
                raw.call(req).await?;
            }
            raw.release(h).await?;
            let us = t0.elapsed().as_micros().max(1);
            let total = u64::from(*mib) * u64::from(CHUNK);
            Ok(format!(
                "ok: fsbench write bytes={total} us={us} mb_s={:.1}",
                total as f64 / us as f64
            ))
        }
        FsBench::Stat(path, n) => {
            let node = raw.resolve(path).await?;
            let mut times = Vec::with_capacity(*n as usize);
            for _ in 0..*n {
                let t0 = Instant::now();
                let node = node.clone();
                raw.call(FsRequest::GetAttr { node, handle: None }).await?;
                times.push(t0.elapsed());
            }
            Ok(format!(
                "ok: fsbench stat n={n} median_us={}",
                median_us(times)
            ))
        }
        FsBench::Read4k(path, n) => {
            let node = raw.resolve(path).await?;
            let h = raw.open(node, libc::O_RDONLY).await?;
            let mut times = Vec::with_capacity(*n as usize);
            for _ in 0..*n {
                let t0 = Instant::now();
                let req = FsRequest::Read {
                    handle: h,
                    offset: 0,
                    size: 4096,
                };
                raw.call(req).await?;
                times.push(t0.elapsed());
            }
            raw.release(h).await?;
            Ok(format!(
                "ok: fsbench read4k n={n} median_us={}",
                median_us(times)
            ))
        }
        FsBench::Create(dir, n) => {
            let parent = raw.resolve(dir).await?;
            let mut times = Vec::with_capacity(*n as usize);
            for i in 0..*n {
                let name = format!(".fsbench-{i}").into_bytes();
                let t0 = Instant::now();
                let req = FsRequest::Create {
                    parent: parent.clone(),
                    name: name.clone(),
                    mode: libc::S_IFREG | 0o644,
                    flags: libc::O_WRONLY,
                    owner: Owner::default(),
                };
                match raw.call(req).await? {
                    FsResponse::Created { entry, handle } => {
                        raw.keep(&entry);
                        raw.release(handle).await?;
                    }
                    other => return Err(unexpected("create", &other)),
                }
                let parent = parent.clone();
                raw.call(FsRequest::Unlink { parent, name }).await?;
                times.push(t0.elapsed());
            }
            Ok(format!(
                "ok: fsbench create+unlink n={n} median_us={}",
                median_us(times)
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert_eq!(
            FsBench::parse(&["read", "/root/x"]).unwrap(),
            FsBench::Read("/root/x".into())
        );
        assert_eq!(
            FsBench::parse(&["write", "/root/x", "64"]).unwrap(),
            FsBench::Write("/root/x".into(), 64)
        );
        assert!(FsBench::parse(&["stat", "/x", "0"]).is_err());
        assert!(FsBench::parse(&["nope"]).is_err());
        assert!(split_parent("/a/..").is_err());
        assert_eq!(split_parent("/a/b").unwrap(), ("/a", "b"));
    }
}
