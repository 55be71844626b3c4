//! Control files keep the promises of files (issue 12), through the real mount with the
//! host test backend: whole-line `ctl` writes, all-or-nothing `exec`, positional writes,
//! bounded error messages. Writes are made with perl's `syswrite`, so each is exactly
//! one `write(2)`.
mod common;

use common::Mounted;

/// VM names under the mount (without the fixed entries).
fn vms(m: &Mounted) -> Vec<String> {
    let out = m.ok("ls $M");
    out.lines()
        .filter(|l| {
            !matches!(
                *l,
                "README"
                    | "ctl"
                    | "defaults"
                    | "events"
                    | "images"
                    | "pools"
                    | "snapshots"
                    | "usage"
            )
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn ctl_runs_whole_lines_only() {
    let Some(m) = Mounted::new() else { return };

    // A command split over two writes runs once, whole.
    m.ok(r#"perl -e 'syswrite STDOUT, "create spl"; select undef,undef,undef,0.2; syswrite STDOUT, "it1\n"' > $M/ctl"#);
    assert_eq!(vms(&m), ["split1"]);

    // `cat` of a file whose line crosses cat's 128 KiB write boundary: the line is whole.
    m.ok(r#"perl -e 'print "\n" x 131064, "create zzs1\n"' > /tmp/bsx-ctl-$$; cat /tmp/bsx-ctl-$$ > $M/ctl; rm /tmp/bsx-ctl-$$"#);
    assert_eq!(vms(&m), ["split1", "zzs1"]);

    // A final line without a newline runs at close.
    m.ok("printf 'create fin' > $M/ctl");
    assert!(vms(&m).contains(&"fin".to_string()));

    // A child that inherited the descriptor and never wrote does not end the line by
    // exiting; the writer's own close does.
    m.ok("{ printf 'create ch'; sleep 0.3; printf 'ild\\n'; } > $M/ctl");
    let v = vms(&m);
    assert!(
        v.contains(&"child".to_string()) && !v.contains(&"ch".to_string()),
        "{v:?}"
    );

    // A writer killed in the middle of a line runs nothing.
    m.sh(r#"perl -e 'syswrite STDOUT, "create kil"; kill 9, $$' > $M/ctl"#);
    assert!(!vms(&m).contains(&"kil".to_string()));

    // A line longer than 64 KiB fails with E2BIG and runs nothing.
    let (code, _, err) = m
        .sh(r#"perl -e 'syswrite STDOUT, "create big" . ("g" x 70000) . "\n" or exit 7' > $M/ctl"#);
    assert_eq!(code, 7, "{err}");
    let (code, _, err) = m.sh(
        r#"perl -e 'print "create big", "g" x 70000, "\n"' > /tmp/bsx-g-$$; cat /tmp/bsx-g-$$ > $M/ctl; rc=$?; rm /tmp/bsx-g-$$; exit $rc"#,
    );
    assert_ne!(code, 0);
    assert!(err.contains("Argument list too long"), "{err}");
    assert!(m.ok("cat $M/ctl").contains("longer than 65536 bytes"));
    assert!(!vms(&m).iter().any(|v| v.starts_with("big")));

    // A multi-line write with a malformed line runs nothing.
    let (_, _, err) = m
        .sh(r#"perl -e 'syswrite STDOUT, "create m1\nbogus\ncreate m2\n" or die "$!\n"' > $M/ctl"#);
    assert!(err.contains("Invalid argument"), "{err}");
    let res = m.ok("cat $M/ctl");
    assert!(
        res.contains("line 2 of 3") && res.contains("nothing was run"),
        "{res}"
    );
    assert!(!vms(&m).contains(&"m1".to_string()));
    // One whose second line fails at run time keeps the first and skips the rest.
    let (_, _, err) = m.sh(
        r#"perl -e 'syswrite STDOUT, "create m1\ncreate m1\ncreate m2\n" or die "$!\n"' > $M/ctl"#,
    );
    assert!(err.contains("File exists"), "{err}");
    let res = m.ok("cat $M/ctl");
    assert!(
        res.contains("line 2 of 3") && res.contains("line 1 was applied"),
        "{res}"
    );
    let v = vms(&m);
    assert!(
        v.contains(&"m1".to_string()) && !v.contains(&"m2".to_string()),
        "{v:?}"
    );

    // VM ctl: the same line discipline (pause split in two writes).
    m.ok(r#"perl -e 'syswrite STDOUT, "pau"; syswrite STDOUT, "se\n"' > $M/m1/ctl; test "$(cat $M/m1/state)" = paused"#);
    m.ok("printf resume > $M/m1/ctl; test \"$(cat $M/m1/state)\" = running");
}

#[test]
fn ctl_and_exec_accept_only_appending_positional_writes() {
    let Some(m) = Mounted::new() else { return };
    m.ok("mkdir $M/a");
    // A write that goes back is refused with ESPIPE; the first line stays applied.
    let (code, _, err) = m.sh(
        r#"perl -e 'syswrite STDOUT, "create p1\n" or exit 2; sysseek STDOUT, 0, 0; syswrite STDOUT, "create p2\n" and exit 0; print STDERR "$!\n"; exit 3' > $M/ctl"#,
    );
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("Illegal seek"), "{err}");
    let v = vms(&m);
    assert!(
        v.contains(&"p1".to_string()) && !v.contains(&"p2".to_string()),
        "{v:?}"
    );

    // exec: a positional write at the end of what was written is an append.
    m.ok(r#"perl -e 'syswrite STDOUT, "echo po" or exit 2; sysseek STDOUT, 7, 0 or exit 3; syswrite STDOUT, "s\n" or exit 4' > $M/a/exec"#);
    assert_eq!(m.ok("cat $M/a/exec"), "pos\n");
    let (code, _, err) = m.sh(
        r#"perl -e 'syswrite STDOUT, "echo one\n" or exit 2; sysseek STDOUT, 2, 0; syswrite STDOUT, "x" and exit 0; print STDERR "$!\n"; exit 3' > $M/a/exec"#,
    );
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("Illegal seek"), "{err}");
    // The refused write changed nothing: the script that ran is the first write.
    assert_eq!(m.ok("cat $M/a/exec"), "one\n");
}

#[test]
fn exec_is_all_or_nothing() {
    let Some(m) = Mounted::new() else { return };
    m.ok("mkdir $M/a && echo 'echo first' > $M/a/exec");
    let runs = || m.ok("ls $M/a/runs | grep -c '^[0-9]'");
    assert_eq!(runs(), "1\n");

    // A 1.1 MB script: E2BIG, and nothing runs (not even its first MiB).
    let (code, _, err) = m.sh(
        r#"f=/tmp/bsx-big-$$; { echo 'echo RAN'; perl -e 'print ": ", "x" x 70, "\n" for 1..15500'; } > $f; cat $f > $M/a/exec; rc=$?; rm -f $f; exit $rc"#,
    );
    assert_ne!(code, 0);
    assert!(err.contains("Argument list too long"), "{err}");
    assert_eq!(runs(), "1\n");

    // A script over 128 KiB without #! runs whole (it is not passed as one argument).
    let out = m.ok(
        r#"f=/tmp/bsx-mid-$$; { perl -e 'print ": ", "x" x 70, "\n" for 1..3000'; echo 'echo done $((1+2))'; } > $f; cat $f > $M/a/exec; rm -f $f; cat $M/a/exec; cat $M/a/runs/last/status"#,
    );
    assert_eq!(out, "done 3\n0\n");

    // A writer killed before it closed runs nothing.
    m.sh(r#"perl -e 'syswrite STDOUT, "echo KILLED\n"; kill 9, $$' > $M/a/exec"#);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(runs(), "2\n");
    // A child of the writing shell exiting (it never wrote) does not start the script.
    let out = m.ok("{ echo 'echo a'; sleep 0.2; echo 'echo b'; } > $M/a/exec; cat $M/a/exec");
    assert_eq!(out, "a\nb\n");
}

#[test]
fn bad_ctl_input_is_refused_briefly() {
    let Some(m) = Mounted::new() else { return };
    // A key given twice.
    let (_, _, err) = m.sh("echo 'create x vcpus=1 vcpus=3' > $M/ctl");
    assert!(err.contains("Invalid argument"), "{err}");
    assert_eq!(m.ok("cat $M/ctl"), "error: vcpus given twice\n");
    assert!(vms(&m).is_empty());
    // A huge unknown command is quoted briefly.
    let (_, _, err) = m.sh(
        r#"perl -e 'print "q" x 60000, "\n"' > /tmp/bsx-q-$$; cat /tmp/bsx-q-$$ > $M/ctl; rc=$?; rm /tmp/bsx-q-$$; exit $rc"#,
    );
    assert!(err.contains("Invalid argument"), "{err}");
    let res = m.ok("cat $M/ctl");
    assert!(
        res.len() < 800 && res.contains("60000 bytes"),
        "{}",
        res.len()
    );
    // A defaults write with a key twice changes nothing.
    let before = m.ok("cat $M/defaults");
    let (_, _, err) =
        m.sh(r#"perl -e 'syswrite STDOUT, "vcpus=2\nvcpus=3\n" or die "$!\n"' > $M/defaults"#);
    assert!(err.contains("Invalid argument"), "{err}");
    assert_eq!(m.ok("cat $M/defaults"), before);
}

/// `close` of a write-only exec whose run was lost: the errno says why, and `status`
/// holds a readable reason.
#[test]
fn close_reports_a_lost_run() {
    let Some(m) = Mounted::with(common::MountOpts {
        state_tmpfs_mib: Some(24),
        image_bytes: Some(1 << 20),
        ..Default::default()
    }) else {
        return;
    };
    m.ok("mkdir $M/a");
    // The agent (the host backend's "VMM") dies while the command runs.
    let (code, _, err) = m.sh(
        r#"(sleep 1; kill -9 $(cat $S/vms/*/vmm.pid)) &
           perl -e 'open F, ">", "$ENV{M}/a/exec" or die "open: $!\n"; syswrite F, "sleep 100\n"; close F or die "close: $!\n"'"#
            .replace("$S", &m.state.display().to_string())
            .as_str(),
    );
    assert_ne!(code, 0);
    assert!(err.contains("close: Host is down"), "{err}");
    let status = m.ok("cat $M/a/runs/last/status");
    assert!(status.starts_with("lost: "), "{status}");

    // A full state directory: the output cannot be stored.
    m.ok("for i in $(seq 50); do [ \"$(cat $M/a/state)\" = stopped ] && break; sleep 0.1; done; echo start > $M/a/ctl");
    let (code, _, err) = m.sh(
        r#"perl -e 'open F, ">", "$ENV{M}/a/exec" or die "open: $!\n"; syswrite F, "head -c 100000000 /dev/zero\n"; close F or die "close: $!\n"'"#,
    );
    assert_ne!(code, 0);
    assert!(err.contains("close: No space left on device"), "{err}");
    let status = m.ok("cat $M/a/runs/last/status");
    assert!(status.starts_with("lost: cannot store output"), "{status}");
    // fsync of a read-write exec descriptor whose run was lost says so too (after
    // freeing the space the last run's spool took, so this one can start).
    let (code, _, err) = m.sh(
        &(format!("rm -f {0}/vms/*/runs/*/stdout {0}/vms/*/runs/*/output; ", m.state.display()) + r#"perl -MIO::Handle -e 'open F, "+<", "$ENV{M}/a/exec" or die "open: $!\n"; syswrite F, "head -c 100000000 /dev/zero\n"; 1 while sysread F, $b, 1 << 20; F->sync or die "fsync: $!\n"'"#),
    );
    let status = m.ok("cat $M/a/runs/last/status");
    assert!(status.starts_with("lost: cannot store output"), "{status}");
    assert_ne!(code, 0);
    assert!(err.contains("fsync: No space left on device"), "{err}");
    // The status file on disk says so too (it survives a daemon restart).
    let n = m.ok("readlink $M/a/runs/last");
    let on_disk = m.ok(&format!(
        "cat {}/vms/*/runs/{}/status",
        m.state.display(),
        n.trim()
    ));
    assert_eq!(on_disk, status);
}

/// `mkdir` on a full state-dir disk: ENOSPC, the reason in `ctl`, nothing half-made.
#[test]
fn mkdir_on_a_full_disk() {
    let Some(m) = Mounted::with(common::MountOpts {
        state_tmpfs_mib: Some(8),
        image_bytes: Some(3 << 20),
        ..Default::default()
    }) else {
        return;
    };
    m.ok("mkdir $M/a && rmdir $M/a");
    let s = m.state.display().to_string();
    m.ok(&format!("head -c 3000000 /dev/urandom > {s}/filler"));
    let (code, _, err) = m.sh("mkdir $M/b");
    assert_ne!(code, 0);
    assert!(err.contains("No space left on device"), "{err}");
    let res = m.ok("cat $M/ctl");
    assert!(
        res.contains("mkdir b") && res.contains("No space left"),
        "{res}"
    );
    assert!(vms(&m).is_empty());
    assert_eq!(m.ok(&format!("ls -A {s}/vms")), "");
    std::fs::remove_file(m.state.join("filler")).unwrap();
    m.ok("mkdir $M/b && test \"$(cat $M/b/state)\" = running");
}

/// Ctrl-C works while the guest does not answer (its agent stopped with SIGSTOP): a read
/// under `fs/`, the close of a write-only exec and a ctl command all end with EINTR
/// within a fraction of a second of SIGINT (or SIGKILL).
#[test]
fn signals_end_waits_on_a_silent_guest() {
    let Some(m) = Mounted::new() else { return };
    m.ok("mkdir $M/a && echo hi > $M/a/fs/x && cat $M/a/fs/x >/dev/null");
    let s = m.state.display().to_string();
    // interrupted SIG CMD: start CMD, send SIG after 0.5 s, print its status and the ms
    // it took to go away.
    let script = format!(
        r#"agent=$(cat {s}/vms/*/vmm.pid)
        interrupted() {{
          sig=$1; shift
          perl -e '$SIG{{INT}}="DEFAULT"; exec @ARGV' "$@" >/dev/null 2>/tmp/bsx-int-err.$$ & p=$!
          sleep 0.5
          t=$(date +%s%N); kill -$sig $p; rc=0; wait $p || rc=$?
          echo "$rc $(( ($(date +%s%N) - t) / 1000000 )) $(tr '\n' ' ' < /tmp/bsx-int-err.$$)"
        }}
        kill -STOP $agent
        interrupted INT cat $M/a/fs/x
        interrupted KILL cat $M/a/fs/x
        interrupted INT sh -c 'echo true > $M/a/exec'
        interrupted INT perl -MPOSIX -e '$SIG{{INT}}=sub {{}}; $fd = POSIX::open("$ENV{{M}}/a/exec", O_WRONLY) // die; POSIX::write($fd, "true\n", 5); POSIX::close($fd) // die "close: $!\n"'
        interrupted INT perl -e '$SIG{{INT}}=sub {{}}; open F, "<", "$ENV{{M}}/a/fs/x" or die "open: $!\n"; sysread F, $b, 10; die "read: $!\n"'
        interrupted INT sh -c 'echo ping > $M/a/ctl'
        interrupted TERM sh -c 'echo ping > $M/a/ctl'
        kill -CONT $agent
        rm -f /tmp/bsx-int-err.$$"#
    );
    let out = m.ok(&script);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 7, "{out}");
    for (i, l) in lines.iter().enumerate() {
        let mut w = l.split_whitespace();
        let rc: i32 = w.next().unwrap().parse().unwrap();
        let ms: u64 = w.next().unwrap().parse().unwrap();
        eprintln!("case {i}: status {rc} after {ms} ms: {l}");
        assert!(ms < 1000, "case {i} took {ms} ms: {l}");
        assert_ne!(rc, 0, "case {i}: {l}");
    }
    // A process that handles SIGINT sees the errno: close of the exec, open under fs/.
    assert!(
        lines[3].contains("close: Interrupted system call"),
        "{}",
        lines[3]
    );
    assert!(
        lines[4].contains("open: Interrupted system call"),
        "{}",
        lines[4]
    );
    // The guest answers again afterwards.
    assert_eq!(m.ok("cat $M/a/fs/x"), "hi\n");
    assert_eq!(
        m.ok("echo 'echo back' > $M/a/exec; cat $M/a/exec"),
        "back\n"
    );
}

/// A snapshot (or image) belongs to the user who made it: that user may `rmdir` it,
/// others get EPERM, as in a sticky directory like /tmp.
#[test]
fn owners_remove_their_snapshots_and_images() {
    use bandsox_fsd::snapshots::{FileIdentity, Sizes, SnapshotInfo};
    let Some(m) = Mounted::new() else { return };
    let snap = |name: &str, uid: u32| {
        let id = FileIdentity {
            path: "/dev/null".into(),
            size: 0,
            sha256: String::new(),
        };
        let info = SnapshotInfo {
            name: name.into(),
            source_vm: "a".into(),
            source_id: "0123456789ab".into(),
            created: "2026-12-01T00:00:00Z".into(),
            backend: bandsox_fsd::vmm::BackendKind::Qemu,
            vcpus: 1,
            memory_mib: 256,
            disk_mib: 512,
            image: "base".into(),
            config: Default::default(),
            kernel: id.clone(),
            initrd: id,
            sizes: Sizes::default(),
            disk_copy: "sparse copy".into(),
            create_ms: 1,
            paused_ms: 1,
            owner_uid: uid,
            owner_gid: uid,
            saved: bandsox_fsd::vmm::SavedState {
                state_file: "state".into(),
                memory_file: None,
                restore: serde_json::json!({}),
            },
        };
        let dir = m.state.join("snapshots").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("info.json"), serde_json::to_vec(&info).unwrap()).unwrap();
    };
    let image = |name: &str, uid: u32| {
        let dir = m.state.join("images").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("disk.ext4"), b"").unwrap();
        std::fs::write(dir.join("info.json"), format!("{{\"owner_uid\": {uid}}}")).unwrap();
    };
    snap("mine", 65534);
    snap("theirs", 1234);
    image("myimg", 65534);
    image("theirimg", 1234);
    // Let the unprivileged user reach the mount.
    m.ok("chmod 755 $M/..");
    let out = m.ok("stat -c '%a %U' $M/snapshots $M/images $M/snapshots/mine $M/images/myimg");
    assert_eq!(out, "1777 root\n1777 root\n700 nobody\n755 nobody\n");
    let as_nobody = |cmd: &str| m.sh(&format!("su nobody -s /bin/sh -c \"{cmd}\""));
    let (code, _, err) = as_nobody("rmdir $M/snapshots/theirs");
    assert_ne!(code, 0);
    assert!(err.contains("Operation not permitted"), "{err}");
    let (code, _, err) = as_nobody("rmdir $M/images/theirimg");
    assert_ne!(code, 0);
    assert!(err.contains("Operation not permitted"), "{err}");
    let (code, _, err) = as_nobody("rmdir $M/snapshots/mine && rmdir $M/images/myimg");
    assert_eq!(code, 0, "{err}");
    assert_eq!(m.ok("ls $M/snapshots"), "theirs\n");
    assert!(!m.ok("ls $M/images").contains("myimg"));
    // Nobody can make entries there by hand.
    let (code, _, err) = as_nobody("mkdir $M/snapshots/x");
    assert_ne!(code, 0, "{err}");
}
