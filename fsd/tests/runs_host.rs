//! Runs through a real mount (host test backend: the agent is a host process): what
//! they make the daemon hold (commands, terminal screens, buffers) is bounded per user
//! and given back when they end; an exec on a full state disk leaves no run and says
//! why; a run's files carry the run's times. Non-root users are played with `setpriv`.
mod common;

use std::time::{Duration, Instant, SystemTime};

use common::Mounted;

const CAROL: u32 = 1521;
const MIB: u64 = 1024 * 1024;

/// A mount whose daemon reads the limits file `limits` (returned, to be rewritten),
/// which first holds `text`; `None` where mounted tests are skipped.
struct WithLimits {
    m: Mounted,
    limits: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn with_limits(text: &str) -> Option<WithLimits> {
    let dir = tempfile::tempdir().unwrap();
    let limits = dir.path().join("limits");
    std::fs::write(&limits, text).unwrap();
    let m = Mounted::with_env(&[("BANDSOX_LIMITS", limits.to_str().unwrap())])?;
    Some(WithLimits {
        m,
        limits,
        _dir: dir,
    })
}

/// Start `n` commands that keep running (`sleep 900`, the close not waiting) in `vm`,
/// as CAROL; then one more must be refused with EDQUOT, and `cat vm/ctl` (returned)
/// says why.
fn fill_then_refuse(m: &Mounted, vm: &str, n: usize) -> String {
    for _ in 0..n {
        m.ok_as(
            CAROL,
            &format!("printf '#bandsox wait=0\\nexec sleep 900\\n' > $M/{vm}/exec"),
        );
    }
    let (code, _, err) = m.sh_as(CAROL, &format!("echo 'echo never' > $M/{vm}/exec"));
    assert_ne!(code, 0, "a command over the limit ran");
    assert!(err.contains("Disk quota exceeded"), "{err}");
    m.ok_as(CAROL, &format!("cat $M/{vm}/ctl"))
}

/// Poll `check` for up to 10 s.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn runs_count_against_limits_and_give_their_memory_back() {
    let Some(w) = with_limits("per_user.terminal_cells = 2100000\nper_user.runs = 5\n") else {
        return;
    };
    let m = &w.m;
    m.ok_as(CAROL, "mkdir $M/c");
    let base = m.daemon_rss();

    // The issue's loop, as an ordinary user: two screens are admitted, every later one
    // fails the write that asked for it with EDQUOT, and `cat ctl` says which limit.
    let (_, out, err) = m.sh_as(
        CAROL,
        "for i in $(seq 1 30); do printf '#bandsox tty=1000x1000\\nexec sleep 900\\n' > $M/c/exec \
         && echo started; done",
    );
    assert_eq!(out.matches("started").count(), 2, "{out}{err}");
    assert_eq!(err.matches("Disk quota exceeded").count(), 28, "{err}");
    let why = m.ok_as(CAROL, "cat $M/c/ctl");
    assert!(
        why.starts_with("error: exec: limit per_user.terminal_cells=2100000 reached: uid 1521 has 2000000 terminal cells"),
        "{why}"
    );
    // A refused exec leaves no run behind, and the session's runs/last names none.
    assert_eq!(
        m.ok_as(CAROL, "ls $M/c/runs | grep -c '^[0-9]'").trim(),
        "2"
    );
    let (code, _, _) = m.sh_as(
        CAROL,
        "printf '#bandsox tty=1000x1000\\nsleep 1\\n' > $M/c/exec; readlink $M/c/runs/last",
    );
    assert_ne!(code, 0, "runs/last names a run after a refused exec");
    // Two big screens and their commands: well under the documented bound (64 bytes a
    // cell, 320 KiB a command).
    let grown = m.daemon_rss().saturating_sub(base);
    assert!(grown < 2 * 64 * MIB + 64 * MIB, "daemon grew {grown} bytes");

    // Commands without a terminal count too: three more fit, the sixth is EDQUOT.
    let why = fill_then_refuse(m, "c", 3);
    assert!(why.contains("per_user.runs=5"), "{why}");
    let usage = m.ok_as(CAROL, "cat $M/usage");
    assert!(
        usage.contains(" runs=5/5 ") && usage.contains(" terminal_cells=2000000/2100000 "),
        "{usage}"
    );
    // Widening a screen past the limit is refused too, and changes nothing.
    let (code, _, err) = m.sh_as(CAROL, "echo 1000x1000 > $M/c/runs/1/winsize");
    assert_eq!(code, 0, "same size: {err}");
    std::fs::write(
        &w.limits,
        "per_user.terminal_cells = 1900000\nper_user.runs = 5\n",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1100)); // holds re-read the file once a second
    m.ok_as(CAROL, "echo 500x500 > $M/c/runs/1/winsize");
    let (code, _, err) = m.sh_as(CAROL, "echo 1000x1000 > $M/c/runs/1/winsize");
    assert_ne!(code, 0);
    assert!(err.contains("Disk quota exceeded"), "{err}");
    assert_eq!(m.ok_as(CAROL, "cat $M/c/runs/1/winsize"), "500x500\n");

    // Ending every command gives everything back: the screens' memory to the system,
    // the counts to the user.
    m.ok_as(
        CAROL,
        "for r in $M/c/runs/[0-9]*; do echo kill > $r/ctl || true; done",
    );
    eventually("runs still running", || {
        !m.ok_as(CAROL, "cat $M/c/runs/[0-9]*/status")
            .contains("running")
    });
    let usage = m.ok_as(CAROL, "cat $M/usage");
    assert!(
        usage.contains(" runs=0/5 ") && usage.contains(" terminal_cells=0/1900000 "),
        "{usage}"
    );
    eventually("the screens' memory was not given back", || {
        m.daemon_rss() < base + 48 * MIB
    });
    m.ok_as(
        CAROL,
        "printf '#bandsox tty=1000x1000\\nexit 0\\n' > $M/c/exec",
    );
}

#[test]
fn open_files_count_against_buffer_mib() {
    let Some(w) = with_limits("per_user.buffer_mib = 1\n") else {
        return;
    };
    let m = &w.m;
    m.ok_as(CAROL, "mkdir $M/c");
    // An unstarted script of 700 KiB holds most of the user's MiB; a second one (or an
    // unterminated ctl line) that would pass it is refused and runs nothing.
    let script = |kib: u32| {
        format!(
            r#"perl -e 'open F, ">", "$ENV{{M}}/c/exec" or die "open: $!\n"; syswrite F, "true #" . "x" x ({kib} * 1024) or die "write: $!\n"; sleep 3'"#
        )
    };
    let (code, _, err) = m.sh_as(
        CAROL,
        &format!(
            "{} & sleep 1; {}; rc=$?; wait; exit $rc",
            script(700),
            script(400)
        ),
    );
    assert_ne!(code, 0);
    assert!(err.contains("write: Disk quota exceeded"), "{err}");
    let why = m.ok_as(CAROL, "cat $M/c/ctl");
    assert!(
        why.starts_with("error: exec: limit per_user.buffer_mib=1 reached"),
        "{why}"
    );
    let (code, _, err) = m.sh_as(
        CAROL,
        &format!(
            "{} & sleep 1; perl -e 'open F, \">\", \"$ENV{{M}}/ctl\" or die; syswrite F, \"x\" x 60000 or die \"write: $!\\n\"'; rc=$?; wait; exit $rc",
            script(1000)
        ),
    );
    assert_ne!(code, 0);
    assert!(err.contains("write: Disk quota exceeded"), "{err}");
    // Once those descriptors are closed, everything is back.
    eventually("buffers still held", || {
        m.ok_as(CAROL, "cat $M/usage").contains(" buffer_mib=0/1\n")
    });
    m.ok_as(CAROL, "echo 'echo fine' > $M/c/exec");
    assert_eq!(m.ok_as(CAROL, "cat $M/c/exec"), "fine\n");
}

/// The runs a user keeps (running or finished, in all their VMs) are bounded by
/// `kept_runs`: beyond it a new command deletes the oldest finished ones of its VM, as
/// beyond `keep_runs`; when none has finished, it is refused.
#[test]
fn kept_runs_beyond_the_limit_make_room_or_refuse() {
    let Some(w) = with_limits("per_user.kept_runs = 3\n") else {
        return;
    };
    let m = &w.m;
    m.ok_as(CAROL, "mkdir $M/k");
    for i in 1..=5 {
        m.ok_as(CAROL, &format!("echo 'echo {i}' > $M/k/exec"));
    }
    assert_eq!(
        m.ok_as(CAROL, "ls $M/k/runs | grep '^[0-9]' | sort -n | xargs"),
        "3 4 5\n"
    );
    assert!(m.ok_as(CAROL, "cat $M/usage").contains(" kept_runs=3/3 "));
    let why = fill_then_refuse(m, "k", 3);
    assert!(why.contains("per_user.kept_runs=3"), "{why}");
    m.ok_as(
        CAROL,
        "for r in $M/k/runs/[0-9]*; do echo kill > $r/ctl || true; done",
    );
}

/// An exec on a full state disk leaves no run, fails `close` with ENOSPC, and `cat ctl`
/// and `runs/last` say what happened; once there is room, the next exec runs.
#[test]
fn exec_on_a_full_disk_leaves_no_run_and_says_why() {
    let Some(m) = Mounted::with(common::MountOpts {
        state_tmpfs_mib: Some(8),
        image_bytes: Some(1 << 20),
        ..Default::default()
    }) else {
        return;
    };
    m.ok("mkdir $M/a && echo 'echo first' > $M/a/exec");
    let s = m.state.display().to_string();
    let (_, _, _) = m.sh(&format!("head -c 100000000 /dev/zero > {s}/filler"));
    let runs_before = m.ok("ls $M/a/runs");
    let (code, _, err) = m.sh(
        r#"perl -e 'open F, ">", "$ENV{M}/a/exec" or die "open: $!\n"; syswrite F, "echo second\n" or die "write: $!\n"; close F or die "close: $!\n"'"#,
    );
    assert_ne!(code, 0);
    assert!(err.contains("close: No space left on device"), "{err}");
    let why = m.ok("cat $M/a/ctl");
    assert!(
        why.starts_with("error: exec: cannot create run 2 on the host")
            && why.contains("No space left on device"),
        "{why}"
    );
    let (code, _, _) = m.sh("readlink $M/a/runs/last");
    assert_ne!(code, 0, "runs/last still names the previous run");
    assert_eq!(m.ok("cat $M/a/exec"), "", "cat exec shows an older run");
    assert_eq!(m.ok("ls $M/a/runs"), runs_before);
    assert_eq!(
        m.ok(&format!("ls {s}/vms/*/runs")),
        "1\n",
        "a half-made run"
    );
    std::fs::remove_file(m.state.join("filler")).unwrap();
    m.ok("echo 'echo third' > $M/a/exec");
    assert_eq!(m.ok("cat $M/a/exec"), "third\n");
    assert_eq!(m.ok("readlink $M/a/runs/last"), "3\n");
}

fn mtime(m: &Mounted, path: &str) -> SystemTime {
    let secs: u64 = m.ok(&format!("stat -c %Y {path}")).trim().parse().unwrap();
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

/// A run's files carry its times (not the daemon's start), also after a restart.
#[test]
fn run_files_carry_the_runs_times() {
    let Some(mut m) = Mounted::new() else { return };
    m.ok("mkdir $M/t");
    // Well after the daemon started (times are in whole seconds).
    std::thread::sleep(Duration::from_millis(2100));
    let before = SystemTime::now() - Duration::from_secs(1);
    m.ok("echo 'echo a; sleep 2.2; echo b; sleep 2.2' > $M/t/exec");
    let r = "$M/t/runs/1";
    let start = mtime(&m, r);
    assert!(start >= before, "the run's directory has an older time");
    for f in ["cmd", "pid", "ctl", "stdin"] {
        assert_eq!(mtime(&m, &format!("{r}/{f}")), start, "{f}");
    }
    let output = mtime(&m, &format!("{r}/stdout"));
    assert!(
        output >= start + Duration::from_secs(2),
        "stdout: last output"
    );
    assert_eq!(mtime(&m, &format!("{r}/output")), output);
    let ended = mtime(&m, &format!("{r}/status"));
    assert!(ended >= output + Duration::from_secs(2), "status: the end");
    assert_eq!(mtime(&m, "$M/t/runs"), start);
    let all = |m: &Mounted| {
        m.ok(&format!(
            "stat -c '%n %Y' {r} {r}/cmd {r}/stdout {r}/status"
        ))
    };
    let shown = all(&m);
    m.restart();
    assert_eq!(all(&m), shown, "times changed across a daemon restart");
}
