//! Terminal runs and per-command options (issue 14) through the real mount with the
//! host test backend: the agent runs as a host process, so `tty=` gives a real
//! pseudo-terminal on this machine.
mod common;

use common::Mounted;

/// Start a terminal run from a plain shell; returns its run directory (shell text).
fn start_tty(m: &Mounted, vm: &str, size: &str, cmd: &str) -> String {
    let n = m.ok(&format!(
        "printf '#bandsox tty={size}\\n%s\\n' {} > $M/{vm}/exec && readlink $M/{vm}/runs/last",
        shell_quote(cmd)
    ));
    format!("$M/{vm}/runs/{}", n.trim())
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Poll `script` (stdout) until it contains `want`, for up to 10 s.
fn wait_for(m: &Mounted, script: &str, want: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, out, _) = m.sh(script);
        if out.contains(want) {
            return out;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{script}: no {want:?} in {out:?}\nlog: {}",
            m.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn terminal_runs_from_a_plain_shell() {
    let Some(m) = Mounted::new() else { return };
    m.ok("mkdir $M/a");

    // Starting one returns at once (its close does not wait), with the tty files.
    let t0 = std::time::Instant::now();
    let run = start_tty(
        &m,
        "a",
        "90x30",
        "trap 'stty size' WINCH; tty; stty size; echo TERM=$TERM; while :; do read -r l || continue; \
         [ \"$l\" = quit ] && exit 7; printf '%s' \"$l\" | od -An -c; done",
    );
    assert!(t0.elapsed().as_secs() < 5);
    let ls = m.ok(&format!("ls {run}"));
    for f in ["terminal", "winsize", "screen", "status", "ctl", "output"] {
        assert!(ls.contains(f), "{ls}");
    }
    assert_eq!(m.ok(&format!("cat {run}/winsize")), "90x30\n");
    assert_eq!(m.ok(&format!("cat {run}/status")), "running\n");
    let screen = wait_for(&m, &format!("cat {run}/screen"), "TERM=xterm-256color");
    assert!(screen.contains("/dev/pts/"), "{screen}");
    assert!(screen.contains("30 90"), "{screen}");
    assert_eq!(screen.lines().count(), 30, "{screen:?}");

    // Resizing delivers SIGWINCH; bad sizes are EINVAL and change nothing.
    m.ok(&format!("echo 120x40 > {run}/winsize"));
    assert_eq!(m.ok(&format!("cat {run}/winsize")), "120x40\n");
    wait_for(&m, &format!("cat {run}/screen"), "40 120");
    for bad in ["0x24", "-3x10", "1001x10", "10x1001", "80", "axb"] {
        let (code, _, err) = m.sh(&format!("echo {bad} > {run}/winsize"));
        assert_ne!(code, 0, "{bad}");
        assert!(err.contains("Invalid argument"), "{bad}: {err}");
    }
    assert_eq!(m.ok(&format!("cat {run}/winsize")), "120x40\n");
    assert_eq!(m.ok(&format!("cat {run}/screen")).lines().count(), 40);

    // Keystrokes are binary-safe: an escape sequence and a NUL arrive intact.
    m.ok(&format!("printf 'a\\033[Ab\\000c\\r' > {run}/terminal"));
    // (the terminal echoes ESC as ^[ and NUL as ^@; the shell's `read` drops the NUL)
    wait_for(&m, &format!("cat {run}/screen"), "a^[[Ab^@c");
    wait_for(&m, &format!("cat {run}/screen"), "033   [   A   b   c");

    // A reader of `terminal` first gets the current screen, then live output.
    m.ok(&format!(
        "(timeout 5 cat {run}/terminal > /tmp/bsx-term-$$ &); sleep 0.5; \
         printf 'quit\\r' > {run}/terminal; sleep 1; cat /tmp/bsx-term-$$ | od -c | grep -q 'T   E   R   M'; rm -f /tmp/bsx-term-$$"
    ));
    wait_for(&m, &format!("cat {run}/status"), "7");
    // The run ended: the terminal ends too, and writes fail with EPIPE.
    let (code, _, err) = m.sh(&format!("printf x > {run}/terminal"));
    assert_ne!(code, 0);
    assert!(err.contains("Broken pipe"), "{err}");
    let (code, _, err) = m.sh(&format!("echo 80x24 > {run}/winsize"));
    assert_ne!(code, 0);
    assert!(err.contains("Broken pipe"), "{err}");
    // The screen of the finished run is still there (rebuilt from its output).
    assert!(m.ok(&format!("cat {run}/screen")).contains("TERM=xterm"));
    // Reading the finished run's terminal gives its final screen, then EOF.
    let bytes = m.ok(&format!("timeout 5 cat {run}/terminal | wc -c"));
    assert_ne!(bytes.trim(), "0");

    // A printed cursor address lands on row 5, column 10 of `screen`.
    let run = start_tty(
        &m,
        "a",
        "40x10",
        "printf '\\033[2J\\033[5;10Hmarker'; sleep 30",
    );
    let screen = wait_for(&m, &format!("cat {run}/screen"), "marker");
    let lines: Vec<&str> = screen.lines().collect();
    assert_eq!(lines.len(), 10, "{screen:?}");
    assert_eq!(lines[4], format!("{}marker", " ".repeat(9)), "{screen:?}");
    m.ok(&format!("echo kill > {run}/ctl"));
    wait_for(&m, &format!("cat {run}/status"), "signal 15");

    // Runs without a terminal have no terminal files.
    m.ok("echo true > $M/a/exec");
    let (code, _, _) = m.sh("ls $M/a/runs/last/terminal");
    assert_ne!(code, 0);
}

#[test]
fn per_command_options_and_timeouts() {
    let Some(m) = Mounted::new() else { return };
    m.ok("mkdir $M/b");
    // env (quoted), cwd and user for one command only.
    m.ok("printf '%s\\n' \"#bandsox env=A=1 env='B=two words' cwd=/tmp user=0\" 'echo \"$A|$B|$(pwd)|$(id -u)\"' > $M/b/exec");
    assert_eq!(m.ok("cat $M/b/exec"), "1|two words|/tmp|0\n");
    m.ok("echo 'echo \"[$A]\"' > $M/b/exec");
    assert_eq!(m.ok("cat $M/b/exec"), "[]\n");

    // Bad options: EINVAL, nothing runs, `cat ctl` explains.
    let before = m.ok("ls $M/b/runs | wc -l");
    for bad in [
        "color=red",
        "tty=0x0",
        "timeout=-1",
        "timeout=0",
        "timeout=0.0001",
        "env=NOEQUALS",
        "timeout=1 timeout=2",
    ] {
        let (code, _, err) = m.sh(&format!(
            r#"perl -e 'syswrite STDOUT, "\#bandsox {bad}\ntouch /tmp/bsx-never\n" or die "$!\n"' > $M/b/exec"#
        ));
        assert_ne!(code, 0, "{bad}");
        assert!(err.contains("Invalid argument"), "{bad}: {err}");
        let why = m.ok("cat $M/b/ctl");
        assert!(why.starts_with("error: exec: "), "{bad}: {why}");
    }
    assert_eq!(m.ok("ls $M/b/runs | wc -l"), before);
    // A zero timeout is refused, and the message says how to ask for none.
    let _ = m.sh("printf '#bandsox timeout=0\\ntrue\\n' > $M/b/exec");
    assert!(m.ok("cat $M/b/ctl").contains("write timeout=none"));
    // A user the guest does not know fails the start; every report names the option
    // the user came from.
    m.ok("printf '#bandsox user=nobody-such\\necho hi\\n' > $M/b/exec");
    let why = "user \"nobody-such\" (#bandsox user=) is not in the image's /etc/passwd";
    let status = m.ok("cat $M/b/runs/last/status");
    assert!(
        status.starts_with("lost: ") && status.contains(why),
        "{status}"
    );
    assert!(m.ok("cat $M/b/runs/last/stderr").contains(why));
    let ctl = m.ok("cat $M/b/ctl");
    assert!(
        ctl.starts_with("error: exec: ") && ctl.contains(why),
        "{ctl}"
    );

    // A timeout ends the command with SIGTERM; the status says so.
    let t0 = std::time::Instant::now();
    m.ok("printf '#bandsox timeout=0.5\\nsleep 10\\n' > $M/b/exec");
    assert!(t0.elapsed().as_secs() < 5);
    assert_eq!(m.ok("cat $M/b/runs/last/status"), "timeout signal 15\n");
    // One that ignores SIGTERM gets SIGKILL after the grace period.
    m.ok("printf '#bandsox timeout=0.3\\ntrap \"\" TERM; sleep 30\\n' > $M/b/exec");
    assert_eq!(m.ok("cat $M/b/runs/last/status"), "timeout signal 9\n");
    // The VM-wide default, and a command that opts out of it.
    m.ok("echo exec_timeout=0.5 > $M/b/ctl");
    assert_eq!(m.ok("cat $M/b/ctl"), "ok: exec_timeout=0.5\n");
    m.ok("echo 'sleep 10' > $M/b/exec");
    assert_eq!(m.ok("cat $M/b/runs/last/status"), "timeout signal 15\n");
    m.ok("printf '#bandsox timeout=none\\nsleep 1; echo done\\n' > $M/b/exec");
    assert_eq!(m.ok("cat $M/b/runs/last/status"), "0\n");
    let (code, _, _) = m.sh("echo exec_timeout=-5 > $M/b/ctl");
    assert_ne!(code, 0);
    m.ok("echo exec_timeout=none > $M/b/ctl");
    // As a create option and in defaults.
    m.ok("echo 'create c exec_timeout=0.4' > $M/ctl");
    m.ok("echo 'sleep 5' > $M/c/exec");
    assert_eq!(m.ok("cat $M/c/runs/last/status"), "timeout signal 15\n");
    m.ok("echo exec_timeout=30 > $M/defaults");
    assert!(m.ok("cat $M/defaults").contains("exec_timeout=30\n"));
}

#[test]
fn terminal_run_output_survives_a_daemon_restart() {
    let Some(mut m) = Mounted::new() else { return };
    m.ok("mkdir $M/r");
    let run = start_tty(&m, "r", "50x12", "echo before-restart; sleep 60");
    wait_for(&m, &format!("cat {run}/screen"), "before-restart");
    m.restart();
    let status = m.ok(&format!("cat {run}/status"));
    assert!(status.starts_with("lost: "), "{status}");
    assert!(m
        .ok(&format!("cat {run}/output"))
        .contains("before-restart"));
    let screen = m.ok(&format!("cat {run}/screen"));
    assert!(screen.contains("before-restart"), "{screen}");
    assert_eq!(screen.lines().count(), 12);
    assert_eq!(m.ok(&format!("cat {run}/winsize")), "50x12\n");
    let (code, _, err) = m.sh(&format!("printf x > {run}/terminal"));
    assert_ne!(code, 0);
    assert!(err.contains("Broken pipe"), "{err}");
}

/// `bandsox exec` with `BANDSOX_MOUNT` pointing at the test mount.
fn bx(m: &Mounted, args: &str) -> (i32, String, String) {
    let bin = env!("CARGO_BIN_EXE_bandsox");
    m.sh(&format!("BANDSOX_MOUNT=$M {bin} {args}"))
}

#[test]
fn bandsox_exec_is_a_thin_client() {
    let Some(m) = Mounted::new() else { return };
    m.ok("mkdir $M/e");
    // Exit codes, separate streams.
    let (code, out, err) = bx(&m, "exec e -- sh -c 'echo out; echo err >&2; exit 3'");
    assert_eq!((code, out.as_str(), err.as_str()), (3, "out\n", "err\n"));
    let (code, _, _) = bx(&m, "exec e -- sh -c 'kill -9 $$'");
    assert_eq!(code, 137);
    // Arguments arrive as given (no word splitting or expansion on the way).
    let (code, out, _) = bx(&m, "exec e -- printf '[%s]' 'a b' '$HOME' \"it's\"");
    assert_eq!((code, out.as_str()), (0, "[a b][$HOME][it's]"));
    // Stdin is forwarded and closed at EOF.
    let (code, out, _) = m.sh(&format!(
        "printf 'l1\\nl2\\n' | BANDSOX_MOUNT=$M {} exec e -- wc -l",
        env!("CARGO_BIN_EXE_bandsox")
    ));
    assert_eq!((code, out.trim()), (0, "2"));
    // Options.
    let (code, out, _) = bx(
        &m,
        "exec e --env A=1 --env 'B=x y' --cwd /tmp --user 0 -- sh -c 'echo \"$A|$B|$(pwd)|$(id -u)\"'",
    );
    assert_eq!((code, out.as_str()), (0, "1|x y|/tmp|0\n"));
    // A timeout: exit code 124, status `timeout signal 15`.
    let t0 = std::time::Instant::now();
    let (code, _, err) = bx(&m, "exec e --timeout 1 -- sleep 10");
    assert_eq!(code, 124, "{err}");
    assert!(t0.elapsed().as_secs() < 8);
    assert!(err.contains("timeout signal 15"), "{err}");
    // Bad options: refused with the reason, nothing runs.
    let (code, _, err) = bx(&m, "exec e --timeout=-3 -- touch /tmp/never");
    assert_eq!(code, 255);
    assert!(
        err.contains("Invalid argument") && err.contains("timeout"),
        "{err}"
    );
    // Ctrl-C (SIGINT to the client) reaches the command, whose exit code comes back.
    let (code, out, _) = m.sh(&format!(
        "BANDSOX_MOUNT=$M {} exec e -- sh -c 'trap \"echo got-int; exit 9\" INT; echo ready; sleep 20 & wait' & \
         pid=$!; sleep 1.5; kill -INT $pid; wait $pid",
        env!("CARGO_BIN_EXE_bandsox")
    ));
    assert_eq!(code, 9, "{out}");
    assert!(out.contains("got-int"), "{out}");
    // An unknown VM.
    let (code, _, err) = bx(&m, "exec nosuchvm -- true");
    assert_eq!(code, 255);
    assert!(err.contains("not a VM directory"), "{err}");
}

#[test]
fn other_users_cannot_attach() {
    let Some(m) = Mounted::new() else { return };
    m.ok("mkdir $M/own");
    let run = start_tty(&m, "own", "80x24", "sleep 30");
    let bin = env!("CARGO_BIN_EXE_bandsox");
    let n = run.rsplit('/').next().unwrap_or("1").to_string();
    for script in [
        format!("cat {run}/screen"),
        format!("printf x > {run}/terminal"),
        format!("echo 10x10 > {run}/winsize"),
        format!("BANDSOX_MOUNT=$M {bin} attach own --run {n} < /dev/null"),
    ] {
        let (code, _, err) = m.sh_as(4242, &script);
        assert_ne!(code, 0, "{script}");
        assert!(err.contains("Permission denied"), "{script}: {err}");
    }
    m.ok(&format!("echo kill > {run}/ctl"));
}
