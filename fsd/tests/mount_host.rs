//! Fast end-to-end tests of the mounted tree with the `host` test backend: the real daemon,
//! the real FUSE mount and the real agent (in host mode), but no VM. They run every
//! exec/ctl/runs semantic through plain `sh` in seconds; the same stories run against real
//! VMs in tests/e2e.
mod common;

use std::time::{Duration, Instant};

use common::Mounted;

#[test]
fn exec_runs_and_ctl_through_the_mount() {
    let Some(m) = Mounted::new() else { return };

    // mkdir boots; exec runs; cat exec prints; status of a #! script.
    m.ok("mkdir $M/a && test \"$(cat $M/a/state)\" = running");
    assert_eq!(
        m.ok("echo 'echo hello' > $M/a/exec; cat $M/a/exec"),
        "hello\n"
    );
    assert_eq!(
        m.ok("printf '#!/bin/sh\\nexit 3\\n' > $M/a/exec; cat $M/a/runs/last/status"),
        "3\n"
    );
    // Separate and interleaved streams.
    let out = m.ok("echo 'echo out; echo err >&2' > $M/a/exec; cat $M/a/runs/last/stdout; cat $M/a/runs/last/stderr; cat $M/a/runs/last/output");
    assert_eq!(out, "out\nerr\nout\nerr\n");
    // Streaming through one read-write descriptor.
    assert_eq!(
        m.ok("exec 3<>$M/a/exec; echo 'for i in 1 2 3; do echo $i; done' >&3; cat <&3"),
        "1\n2\n3\n"
    );
    // Binary output passes unchanged.
    let sum = m.ok(
        "echo 'head -c 3000000 /dev/urandom > blob; cat blob' > $M/a/exec; cat $M/a/exec | md5sum",
    );
    let guest = m.ok(&format!(
        "cat {}/vms/*/host/root/blob | md5sum",
        m.state.display()
    ));
    assert_eq!(sum, guest);

    // stdin feeding and close-stdin.
    let out = m.ok(
        "n=$(ls $M/a/runs | grep -v last | sort -n | tail -1); (echo cat > $M/a/exec) & \
         while [ \"$(ls $M/a/runs | grep -v last | sort -n | tail -1)\" = \"$n\" ]; do sleep 0.05; done; \
         n=$(ls $M/a/runs | grep -v last | sort -n | tail -1); \
         printf 'x\\n' > $M/a/runs/$n/stdin; printf 'y\\n' > $M/a/runs/$n/stdin; \
         echo close-stdin > $M/a/runs/$n/ctl; wait; cat $M/a/runs/$n/stdout",
    );
    assert_eq!(out, "x\ny\n");

    // kill TERM -> signal 15.
    let out = m.ok(
        "exec 3<>$M/a/exec; echo 'sleep 1000' >&3; n=$(readlink $M/a/runs/last); \
         echo 'kill TERM' > $M/a/runs/$n/ctl; cat <&3; cat $M/a/runs/$n/status",
    );
    assert_eq!(out, "signal 15\n");

    // Bad input: errno and message, nothing changed.
    let (code, _, err) = m.sh("echo bogus > $M/a/ctl");
    assert_ne!(code, 0);
    assert!(err.contains("Invalid argument"), "{err}");
    assert!(m
        .ok("cat $M/a/ctl")
        .starts_with("error: unknown command \"bogus\""));
    let (_, _, err) = m.sh("echo resume > $M/a/ctl");
    assert!(err.contains("Device or resource busy"), "{err}");
    let (_, _, err) = m.sh("echo x > $M/a/state");
    assert!(err.contains("Permission denied"), "{err}");
    let (_, _, err) = m.sh("mkdir $M/ctl; mkdir '$M/bad name'");
    assert!(
        err.contains("Invalid argument") || err.contains("File exists"),
        "{err}"
    );
    let (_, _, err) = m.sh("mkdir $M/a");
    assert!(err.contains("File exists"), "{err}");
    assert_eq!(m.ok("cat $M/a/state"), "running\n");

    // Snapshots: the host backend cannot take them; bad names and unknown snapshots are
    // refused; nothing is left in snapshots/.
    let (_, _, err) = m.sh("echo 'snapshot s1' > $M/a/ctl");
    assert!(err.contains("Operation not supported"), "{err}");
    assert!(m.ok("cat $M/a/ctl").contains("cannot take snapshots"));
    // Bad input is still checked first.
    let (_, _, err) = m.sh("echo 'snapshot ../s1' > $M/a/ctl");
    assert!(err.contains("Invalid argument"), "{err}");
    let (_, _, err) = m.sh("echo 'clone nosuch b' > $M/ctl");
    assert!(err.contains("No such file or directory"), "{err}");
    assert_eq!(m.ok("ls -A $M/snapshots"), "");
    assert_eq!(
        std::fs::read_dir(m.state.join("snapshots"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(m.ok("cat $M/a/state"), "running\n");

    // pause/resume; exec on a paused VM fails promptly.
    // (autoresume=0: with the default a paused VM resumes for the exec; see t-38.)
    m.ok(
        "echo autoresume=0 > $M/a/ctl; echo pause > $M/a/ctl; test \"$(cat $M/a/state)\" = paused",
    );
    let t = Instant::now();
    let (code, _, err) = m.sh("echo true > $M/a/exec");
    assert_ne!(code, 0);
    assert!(err.contains("Host is down"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(3));
    m.ok("echo resume > $M/a/ctl; echo 'echo back' > $M/a/exec; test \"$(cat $M/a/exec)\" = back");

    // Ctrl-C: SIGINT to a blocked reader returns it quickly and kills the command.
    let out = m.ok(
        "exec 3<>$M/a/exec; echo 'sleep 1000' >&3; exec 3<&-; n=$(readlink $M/a/runs/last); \
         perl -e '$SIG{INT}=\"DEFAULT\"; exec @ARGV' cat $M/a/runs/$n/output & p=$!; sleep 0.5; \
         kill -INT $p; wait $p; echo \"cat=$?\"; sleep 0.5; cat $M/a/runs/$n/status",
    );
    assert_eq!(out, "cat=130\nsignal 2\n");

    // events and info.
    let ev = m.ok("cat $M/events");
    assert!(
        ev.contains(" a created ") && ev.contains(" a running ") && ev.contains(" a paused"),
        "{ev}"
    );
    assert!(m.ok("cat $M/a/info").contains("\"name\": \"a\""));

    // rmdir leaves nothing behind.
    m.ok("rmdir $M/a; test ! -e $M/a");
    assert_eq!(std::fs::read_dir(m.state.join("vms")).unwrap().count(), 0);
}
