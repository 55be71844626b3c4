//! Parsing of the commands written to the root `ctl` and to `<vm>/ctl`.
//!
//! One command per line; parsing never has side effects, so a bad line is rejected
//! (EINVAL, with a message listing what is accepted) before anything is changed.
use crate::error::{Error, Result};
use crate::lines::quote;
use crate::sessions::PerSession;

/// The last `ctl` result per caller session (what reading a `ctl` file returns), for
/// the most recent sessions (see `sessions`).
#[derive(Default)]
pub struct CtlResults(PerSession<String>);

impl CtlResults {
    pub fn get(&self, session: u32) -> String {
        self.0.get(session).unwrap_or_default()
    }

    /// Remember the outcome of one operation for `session` (only `vfs::journal` calls
    /// this: it is the one recording path). The text kept is one line of at most
    /// [`MAX_RESULT`] bytes, whatever the message.
    pub fn record(&self, session: u32, outcome: Result<String>) {
        let text = match &outcome {
            Ok(msg) => format!("{}\n", one_line(msg)),
            Err(e) => format!("error: {}\n", one_line(&e.message)),
        };
        self.0.set(session, text);
    }
}

/// Longest result line kept for `cat ctl`.
pub const MAX_RESULT: usize = 4096;

fn one_line(msg: &str) -> String {
    let mut s: String = msg.replace('\n', " ");
    if s.len() > MAX_RESULT {
        let mut end = MAX_RESULT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

pub const GLOBAL_HELP: &str = "accepted: create NAME [key=value...] | clone SNAPSHOT NAME [count=N] [net=MODE] [kernel=NAME] | destroy-all [all-users] | import IMAGE SOURCE [size=MiB] [headroom=MiB] [tag=NAME] | pull IMAGE REFERENCE [size=MiB] [headroom=MiB] | build IMAGE DIR [file=DOCKERFILE] [size=MiB] [headroom=MiB]";
pub const VM_HELP: &str = "accepted: start | stop | kill | pause | resume | restart | snapshot NAME | reconnect | ping [N] | exec_timeout=SECONDS|none | ttl=SECONDS|none | ttl_action=destroy|snapshot | idle_pause=SECONDS|none | autoresume=0|1";
pub const RUN_HELP: &str = "accepted: kill [SIGNAL] | close-stdin";

pub const MAX_CLONES: u32 = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GlobalCmd {
    Create {
        name: String,
        options: Vec<String>,
    },
    Clone {
        snapshot: String,
        name: String,
        count: Option<u32>,
        /// `net=` and `kernel=` for the clones (validated `key=value` words).
        options: Vec<String>,
    },
    /// Remove all of the caller's VMs (`all-users`: everyone's; root only).
    DestroyAll {
        all_users: bool,
    },
    Import {
        image: String,
        source: String,
        options: crate::images::ImageOptions,
    },
    Build {
        image: String,
        context: String,
        /// `file=`: the Dockerfile, relative to the context unless absolute.
        file: Option<String>,
        options: crate::images::ImageOptions,
    },
    Pull {
        image: String,
        reference: String,
        options: crate::images::ImageOptions,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmOp {
    Start,
    Stop,
    Kill,
    Pause,
    Resume,
    Restart,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmCmd {
    Op(VmOp),
    Snapshot(String),
    /// Replace the agent connection by a fresh one (what the daemon does by itself when
    /// a connection dies; for a wedged channel, and to test that path).
    Reconnect,
    /// Diagnostic: N protocol pings over the VM's agent connection (for benchmarks).
    Ping(u32),
    /// `exec_timeout=SECONDS|none`: the VM's default command timeout (`None`: none).
    ExecTimeout(Option<std::time::Duration>),
    /// A lifecycle option (`crate::config::lifecycle::KEYS`), value validated.
    Lifecycle {
        key: String,
        value: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunCmd {
    Kill(i32),
    CloseStdin,
}

fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

pub fn parse_global(line: &str) -> Result<GlobalCmd> {
    let w = words(line);
    match w.as_slice() {
        ["create", name, rest @ ..] => Ok(GlobalCmd::Create {
            name: name.to_string(),
            options: rest.iter().map(|s| s.to_string()).collect(),
        }),
        ["clone", snap, name, rest @ ..] => {
            let mut count = None;
            let mut options = Vec::new();
            for opt in rest {
                match opt.split_once('=') {
                    Some((k @ ("net" | "kernel"), _)) => {
                        if options
                            .iter()
                            .any(|o: &String| o.starts_with(&format!("{k}=")))
                        {
                            return Err(Error::invalid(format!("clone: {k} given twice")));
                        }
                        crate::config::VmConfig::default()
                            .with_options([*opt])
                            .map_err(|e| e.with_context("clone"))?;
                        options.push(opt.to_string());
                    }
                    Some(("count", v)) => {
                        let n: u32 = v
                            .parse()
                            .ok()
                            .filter(|n| (1..=MAX_CLONES).contains(n))
                            .ok_or_else(|| {
                                Error::invalid(format!(
                                    "count={}: expected 1..{MAX_CLONES}",
                                    quote(v)
                                ))
                            })?;
                        count = Some(n);
                    }
                    _ => {
                        return Err(Error::invalid(format!(
                        "clone: unknown option {}; accepted: count=N net=none|user|tap kernel=NAME",
                        quote(opt)
                    )))
                    }
                }
            }
            Ok(GlobalCmd::Clone {
                snapshot: snap.to_string(),
                name: name.to_string(),
                count,
                options,
            })
        }
        ["import", image, source, rest @ ..] => Ok(GlobalCmd::Import {
            image: image.to_string(),
            source: source.to_string(),
            options: image_options(rest)?,
        }),
        ["build", image, context, rest @ ..] => {
            let file = rest
                .iter()
                .find_map(|w| w.strip_prefix("file="))
                .filter(|f| !f.is_empty())
                .map(str::to_string);
            let others: Vec<&str> = rest
                .iter()
                .copied()
                .filter(|w| !w.starts_with("file="))
                .collect();
            let options = image_options(&others)?;
            if options.tag.is_some() {
                return Err(Error::invalid(
                    "build: tag= selects an image of an OCI layout; build makes exactly one",
                ));
            }
            Ok(GlobalCmd::Build {
                image: image.to_string(),
                context: context.to_string(),
                file,
                options,
            })
        }
        ["pull", image, reference, rest @ ..] => Ok(GlobalCmd::Pull {
            image: image.to_string(),
            reference: reference.to_string(),
            options: image_options(rest)?,
        }),
        ["destroy-all"] => Ok(GlobalCmd::DestroyAll { all_users: false }),
        ["destroy-all", "all-users"] => Ok(GlobalCmd::DestroyAll { all_users: true }),
        ["destroy-all", other, ..] => Err(Error::invalid(format!(
            "destroy-all: unknown argument {}; accepted: destroy-all [all-users]",
            quote(other)
        ))),
        [] => Err(Error::invalid(format!("empty command; {GLOBAL_HELP}"))),
        [cmd @ ("create" | "clone" | "import" | "pull" | "build"), ..] => Err(Error::invalid(
            format!("{cmd}: wrong number of arguments; {GLOBAL_HELP}"),
        )),
        [cmd, ..] => Err(Error::invalid(format!(
            "unknown command {}; {GLOBAL_HELP}",
            quote(cmd)
        ))),
    }
}

fn image_options(words: &[&str]) -> Result<crate::images::ImageOptions> {
    let words: Vec<String> = words.iter().map(|s| s.to_string()).collect();
    crate::images::ImageOptions::parse(&words)
}

pub fn parse_vm(line: &str) -> Result<VmCmd> {
    let w = words(line);
    let op = |op| Ok(VmCmd::Op(op));
    match w.as_slice() {
        ["start"] => op(VmOp::Start),
        ["stop"] => op(VmOp::Stop),
        ["kill"] => op(VmOp::Kill),
        ["pause"] => op(VmOp::Pause),
        ["resume"] => op(VmOp::Resume),
        ["restart"] => op(VmOp::Restart),
        ["snapshot", name] => Ok(VmCmd::Snapshot(name.to_string())),
        ["reconnect"] => Ok(VmCmd::Reconnect),
        ["snapshot", _, "diff=1"] => Err(Error::new(
            libc::EOPNOTSUPP,
            "snapshot diff=1: diff snapshots are not supported (a diff holds only the pages \
             dirtied since the previous snapshot and cannot be restored without merging it \
             onto that full snapshot's memory); take a full snapshot: snapshot NAME",
        )),
        ["snapshot", _, opt, ..] => Err(Error::invalid(format!(
            "snapshot: unknown option {}; accepted: snapshot NAME",
            quote(opt)
        ))),
        ["ping"] => Ok(VmCmd::Ping(1)),
        ["ping", n] => n
            .parse()
            .ok()
            .filter(|n| (1..=10_000).contains(n))
            .map(VmCmd::Ping)
            .ok_or_else(|| Error::invalid(format!("ping {}: expected a count 1..10000", quote(n)))),
        [kv] if kv.starts_with("exec_timeout=") => {
            let v = &kv["exec_timeout=".len()..];
            Ok(VmCmd::ExecTimeout(
                match crate::execopts::parse_timeout("exec_timeout", v)? {
                    crate::execopts::TimeoutOpt::Off => None,
                    crate::execopts::TimeoutOpt::After(d) => Some(d),
                },
            ))
        }
        [kv] if kv
            .split_once('=')
            .is_some_and(|(k, _)| crate::config::lifecycle::KEYS.contains(&k)) =>
        {
            let (key, value) = kv.split_once('=').unwrap_or_default();
            crate::config::LifecycleOpts::default().set(key, value)?;
            Ok(VmCmd::Lifecycle {
                key: key.to_string(),
                value: value.to_string(),
            })
        }
        [] => Err(Error::invalid(format!("empty command; {VM_HELP}"))),
        [cmd @ ("start" | "stop" | "kill" | "pause" | "resume" | "restart" | "snapshot" | "ping"
        | "reconnect"), ..] => Err(Error::invalid(format!(
            "{cmd}: wrong number of arguments; {VM_HELP}"
        ))),
        [cmd, ..] => Err(Error::invalid(format!(
            "unknown command {}; {VM_HELP}",
            quote(cmd)
        ))),
    }
}

/// Parse a signal given as a number (`9`), a name (`KILL`) or a prefixed name (`SIGKILL`).
pub fn parse_signal(s: &str) -> Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
        return Err(Error::invalid(format!("signal {n} out of range 1..64")));
    }
    let name = s.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    let n = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "ALRM" => libc::SIGALRM,
        "PIPE" => libc::SIGPIPE,
        "WINCH" => libc::SIGWINCH,
        "ABRT" => libc::SIGABRT,
        _ => return Err(Error::invalid(format!("unknown signal {}", quote(s)))),
    };
    Ok(n)
}

pub fn parse_run(line: &str) -> Result<RunCmd> {
    match words(line).as_slice() {
        ["kill"] => Ok(RunCmd::Kill(libc::SIGTERM)),
        ["kill", sig] => Ok(RunCmd::Kill(parse_signal(sig)?)),
        ["close-stdin"] => Ok(RunCmd::CloseStdin),
        [] => Err(Error::invalid(format!("empty command; {RUN_HELP}"))),
        [cmd, ..] => Err(Error::invalid(format!(
            "unknown command {}; {RUN_HELP}",
            quote(cmd)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_global() {
        assert_eq!(
            parse_global("create a vcpus=2").unwrap(),
            GlobalCmd::Create {
                name: "a".into(),
                options: vec!["vcpus=2".into()]
            }
        );
        assert_eq!(
            parse_global("clone s b count=3").unwrap(),
            GlobalCmd::Clone {
                snapshot: "s".into(),
                name: "b".into(),
                count: Some(3),
                options: vec![],
            }
        );
        assert_eq!(
            parse_global("clone s b net=tap kernel=k6").unwrap(),
            GlobalCmd::Clone {
                snapshot: "s".into(),
                name: "b".into(),
                count: None,
                options: vec!["net=tap".into(), "kernel=k6".into()],
            }
        );
        assert_eq!(
            parse_global("destroy-all").unwrap(),
            GlobalCmd::DestroyAll { all_users: false }
        );
        assert_eq!(
            parse_global("destroy-all all-users").unwrap(),
            GlobalCmd::DestroyAll { all_users: true }
        );
        assert_eq!(
            parse_global("pull app localhost:5000/app:1 headroom=64").unwrap(),
            GlobalCmd::Pull {
                image: "app".into(),
                reference: "localhost:5000/app:1".into(),
                options: crate::images::ImageOptions {
                    size_mib: None,
                    headroom_mib: Some(64),
                    tag: None,
                }
            }
        );
        assert!(matches!(
            parse_global("import x /tmp/a.tar").unwrap(),
            GlobalCmd::Import { .. }
        ));
        match parse_global("build app /src file=alt.df headroom=8").unwrap() {
            GlobalCmd::Build {
                image,
                context,
                file,
                options,
            } => {
                assert_eq!((image.as_str(), context.as_str()), ("app", "/src"));
                assert_eq!(file.as_deref(), Some("alt.df"));
                assert_eq!(options.headroom_mib, Some(8));
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            "",
            "bogus",
            "create",
            "import x",
            "import x /a bogus=1",
            "build x",
            "build x /src bogus=1",
            "build x /src tag=v1",
            "pull x ref size=abc",
            "clone s",
            "clone s b count=0",
            "clone s b x=1",
            "clone s b net=wifi",
            "clone s b net=tap net=user",
            "clone s b kernel=../k",
            "destroy-all everyone",
            "destroy-all all-users now",
        ] {
            assert_eq!(parse_global(bad).unwrap_err().errno, libc::EINVAL, "{bad}");
        }
    }

    #[test]
    fn parses_vm_and_run() {
        assert_eq!(parse_vm("pause\n").unwrap(), VmCmd::Op(VmOp::Pause));
        assert_eq!(
            parse_vm("snapshot s1").unwrap(),
            VmCmd::Snapshot("s1".into())
        );
        assert_eq!(
            parse_vm("snapshot s1 diff=1").unwrap_err().errno,
            libc::EOPNOTSUPP
        );
        assert_eq!(parse_vm("snapshot s1 x=1").unwrap_err().errno, libc::EINVAL);
        assert_eq!(parse_vm("snapshot").unwrap_err().errno, libc::EINVAL);
        assert_eq!(parse_vm("ping 30").unwrap(), VmCmd::Ping(30));
        assert!(parse_vm("ping 0").is_err());
        assert!(parse_vm("bogus").unwrap_err().message.contains("accepted"));
        assert!(parse_vm("pause now").is_err());
        assert_eq!(
            parse_vm("ttl=30").unwrap(),
            VmCmd::Lifecycle {
                key: "ttl".into(),
                value: "30".into()
            }
        );
        for bad in [
            "ttl=0",
            "ttl=abc",
            "idle_pause=-1",
            "autoresume=2",
            "ttl_action=x",
        ] {
            let e = parse_vm(bad).unwrap_err();
            assert_eq!(e.errno, libc::EINVAL, "{bad}");
            assert!(
                e.message.contains(bad.split('=').next().unwrap()),
                "{}",
                e.message
            );
        }
        assert_eq!(parse_run("kill").unwrap(), RunCmd::Kill(15));
        assert_eq!(parse_run("kill TERM").unwrap(), RunCmd::Kill(15));
        assert_eq!(parse_run("kill SIGKILL").unwrap(), RunCmd::Kill(9));
        assert_eq!(parse_run("kill 2").unwrap(), RunCmd::Kill(2));
        assert!(parse_run("kill 99").is_err());
        assert_eq!(parse_run("close-stdin").unwrap(), RunCmd::CloseStdin);
    }
}
