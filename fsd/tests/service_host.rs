//! Running as a shared service, through a real mount (host test backend: the agent as a
//! host process, no VM): limits, usage, output and console caps, events privacy and the
//! host backend's safety. Non-root users are played with `setpriv`.
//!
//! For each limit a user hits it, gets the documented errno and a message naming the
//! limit, its value and the use, and nothing changes; root then raises the limit in the
//! file (no restart) and the same request passes. Snapshots cannot be taken on the host
//! backend, so for them "passes" means the request gets past the limit (to EOPNOTSUPP);
//! tests/e2e/t-50-limits.sh takes a real snapshot.
mod common;

use std::path::Path;

use common::Mounted;

const ALICE: u32 = 1501;
const BOB: u32 = 1502;

fn write_limits(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// The VM directories in the state dir (to show a refusal left nothing behind).
fn vm_dirs(m: &Mounted) -> usize {
    std::fs::read_dir(m.state.join("vms"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn every_limit_refuses_then_a_raise_passes() {
    let dir = tempfile::tempdir().unwrap();
    let limits = dir.path().join("limits");
    write_limits(&limits, "per_user.vms = 1\n");
    let Some(m) = Mounted::with_env(&[("BANDSOX_LIMITS", limits.to_str().unwrap())]) else {
        return;
    };

    // One VM is allowed; the second is EDQUOT, with the limit, value and use named.
    m.ok_as(
        ALICE,
        "mkdir $M/a1 && echo 'id -u' > $M/a1/exec && cat $M/a1/exec",
    );
    assert_eq!(
        m.ok_as(ALICE, "cat $M/a1/exec").trim(),
        ALICE.to_string(),
        "the host backend runs a user's commands as that user"
    );
    let before = vm_dirs(&m);
    let (code, _, err) = m.sh_as(ALICE, "mkdir $M/a2");
    assert_ne!(code, 0);
    assert!(err.contains("Disk quota exceeded"), "{err}");
    let why = m.ok_as(ALICE, "cat $M/ctl");
    assert!(
        why.contains("per_user.vms=1") && why.contains("uid 1501 has 1 VMs"),
        "{why}"
    );
    let (code, _, err) = m.sh_as(ALICE, "echo 'create a2' > $M/ctl");
    assert_ne!(code, 0);
    assert!(err.contains("Disk quota exceeded"), "{err}");
    assert_eq!(vm_dirs(&m), before, "a refused create left a directory");
    assert!(!m.mnt.join("a2").exists());

    // Every other per-user resource, one at a time, with the VM count out of the way.
    for (key, limit, request) in [
        ("vcpus", "2", "create a2 vcpus=2"),
        ("memory_mib", "300", "create a2 memory=128"),
        ("disk_mib", "1", "create a2"),
    ] {
        write_limits(
            &limits,
            &format!("per_user.vms = 10\nper_user.{key} = {limit}\n"),
        );
        let (code, _, err) = m.sh_as(ALICE, &format!("echo '{request}' > $M/ctl"));
        assert_ne!(code, 0, "{request} passed over per_user.{key}={limit}");
        assert!(err.contains("Disk quota exceeded"), "{key}: {err}");
        let why = m.ok_as(ALICE, "cat $M/ctl");
        assert!(
            why.contains(&format!("per_user.{key}={limit}")),
            "{key}: {why}"
        );
        assert_eq!(vm_dirs(&m), before);
        // Root raises it (no restart); the same request passes.
        write_limits(&limits, "per_user.vms = 10\n");
        m.ok_as(ALICE, &format!("echo '{request}' > $M/ctl"));
        m.ok_as(ALICE, "rmdir $M/a2");
    }

    // Snapshots: refused at the limit before anything happens; past it, the host
    // backend's own answer (it cannot snapshot).
    for key in ["snapshots", "snapshot_mib"] {
        write_limits(&limits, &format!("per_user.{key} = 0\n"));
        let (code, _, err) = m.sh_as(ALICE, "echo 'snapshot s1' > $M/a1/ctl");
        assert_ne!(code, 0);
        assert!(err.contains("Disk quota exceeded"), "{key}: {err}");
        let why = m.ok_as(ALICE, "cat $M/a1/ctl");
        assert!(why.contains(&format!("per_user.{key}=0")), "{why}");
        write_limits(&limits, "");
        let (_, _, err) = m.sh_as(ALICE, "echo 'snapshot s1' > $M/a1/ctl");
        assert!(err.contains("Operation not supported"), "{key}: {err}");
    }

    // Host-wide limits: EAGAIN for VMs/vCPUs/memory, ENOSPC for disk; root included.
    write_limits(&limits, "host.vms = 1\n");
    let (_, _, err) = m.sh_as(BOB, "mkdir $M/b1");
    assert!(err.contains("Resource temporarily unavailable"), "{err}");
    let why = m.ok_as(BOB, "cat $M/ctl");
    assert!(
        why.contains("host.vms=1") && why.contains("all users have 1 VMs"),
        "{why}"
    );
    let (_, _, err) = m.sh("mkdir $M/r1");
    assert!(err.contains("Resource temporarily unavailable"), "{err}");
    write_limits(&limits, "host.disk_mib = 1\n");
    let (_, _, err) = m.sh_as(BOB, "mkdir $M/b1");
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(vm_dirs(&m), before);

    // A user-specific override beats per_user.
    write_limits(&limits, "per_user.vms = 1\nuser.1502.vms = 2\n");
    m.ok_as(BOB, "mkdir $M/b1 && mkdir $M/b2");
    let (_, _, err) = m.sh_as(BOB, "mkdir $M/b3");
    assert!(err.contains("Disk quota exceeded"), "{err}");
    assert!(m.ok_as(BOB, "cat $M/ctl").contains("user.1502.vms=2"));

    // usage: own line plus the host line for users; everyone's for root.
    let mine = m.ok_as(ALICE, "cat $M/usage");
    assert!(mine.contains("user uid=1501 name="), "{mine}");
    assert!(mine.contains(" vms=1/1 "), "{mine}");
    assert!(!mine.contains("uid=1502"), "{mine}");
    assert!(mine.contains("\nhost vms=3/"), "{mine}");
    let all = m.ok("cat $M/usage");
    assert!(
        all.contains("uid=1501") && all.contains("uid=1502 name=- vms=2/2 "),
        "{all}"
    );

    // A broken file is ignored whole; usage says so; the previous limits stay.
    write_limits(&limits, "per_user.vms = lots\n");
    let all = m.ok("cat $M/usage");
    assert!(all.contains("error ") && all.contains("line 1"), "{all}");
    let (_, _, err) = m.sh_as(ALICE, "mkdir $M/a2");
    assert!(err.contains("Disk quota exceeded"), "{err}");
    m.ok("rmdir $M/a1 $M/b1 $M/b2");
}

#[test]
fn host_backend_refuses_allow_other_without_root() {
    let Some(m) = Mounted::new() else { return };
    // The daemon as a non-root user, asked for a shared mount: refused before mounting.
    let mnt = m.state.parent().unwrap().join("mnt-nobody");
    std::fs::create_dir_all(&mnt).unwrap();
    std::os::unix::fs::chown(&mnt, Some(ALICE), Some(ALICE)).unwrap();
    let state = m.state.parent().unwrap().join("state-nobody");
    std::fs::create_dir_all(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(ALICE), Some(ALICE)).unwrap();
    let script = format!(
        "BANDSOX_HOST_AGENT={} {} mount {} --state-dir {} -f",
        common::agent_binary().display(),
        env!("CARGO_BIN_EXE_bandsox"),
        mnt.display(),
        state.display()
    );
    let (code, _, err) = m.sh_as(ALICE, &script);
    assert_ne!(code, 0);
    assert!(
        err.contains("refuses a mount other users can use (allow_other)"),
        "{err}"
    );
    assert!(err.contains("TEST BACKEND"), "the start warning: {err}");
    assert!(!common::is_mounted(&mnt));
    // info says what runs the VM.
    m.ok("mkdir $M/h");
    let info = m.ok("cat $M/h/info");
    assert!(info.contains("\"backend\": \"host\""), "{info}");
    m.ok("rmdir $M/h");
}

#[test]
fn run_output_is_stored_once_pruned_and_capped() {
    let dir = tempfile::tempdir().unwrap();
    let limits = dir.path().join("limits");
    write_limits(&limits, "");
    let Some(m) = Mounted::with_env(&[("BANDSOX_LIMITS", limits.to_str().unwrap())]) else {
        return;
    };
    let runs_du = |vm: &str| -> u64 {
        let info = m.ok(&format!("cat $M/{vm}/info"));
        let id = info
            .split("\"id\": \"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap()
            .to_string();
        m.ok(&format!(
            "du -sk --apparent-size {}/vms/{id}/runs | cut -f1",
            m.state.display()
        ))
        .trim()
        .parse::<u64>()
        .unwrap()
            * 1024
    };

    // 20 MB of output costs 20 MB on disk, not twice that; stdout and output agree.
    m.ok("echo 'create o keep_runs=3 output_mib=64' > $M/ctl");
    m.ok("echo 'head -c 20000000 /dev/zero; echo done >&2' > $M/o/exec");
    let used = runs_du("o");
    assert!(
        (20_000_000..21_000_000).contains(&used),
        "20 MB of output uses {used} bytes"
    );
    assert_eq!(m.ok("cat $M/o/runs/last/output | wc -c").trim(), "20000005");
    assert_eq!(m.ok("cat $M/o/runs/last/output | tail -c 5"), "done\n");
    assert_eq!(m.ok("cat $M/o/runs/last/stdout | wc -c").trim(), "20000000");

    // keep_runs=3: only the last three runs stay.
    for i in 0..4 {
        m.ok(&format!("echo 'echo run{i}' > $M/o/exec"));
    }
    let listed = m.ok("ls $M/o/runs | grep -v last | sort -n | tr '\\n' ' '");
    assert_eq!(listed, "3 4 5 ", "keep_runs=3");

    // The byte budget: older finished runs go first, and a run that alone does not fit
    // stops with `output limit reached`; nothing grows past the cap.
    write_limits(&limits, "vm.run_output_mib = 1\n");
    m.ok("echo 'create c' > $M/ctl");
    for _ in 0..3 {
        m.ok("echo 'head -c 400000 /dev/zero' > $M/c/exec");
    }
    let listed = m.ok("ls $M/c/runs | grep -v last | sort -n | tr '\\n' ' '");
    assert_eq!(listed, "2 3 ", "the oldest run was pruned for room");
    m.ok("echo 'yes | head -c 50000000; echo never' > $M/c/exec");
    assert_eq!(m.ok("cat $M/c/runs/last/status"), "output limit reached\n");
    let kept: u64 = m
        .ok("cat $M/c/runs/last/output | wc -c")
        .trim()
        .parse()
        .unwrap();
    assert!(kept > 900_000 && kept <= 1024 * 1024, "kept {kept} bytes");
    assert!(
        runs_du("c") <= 1024 * 1024 + 64 * 1024,
        "spool above the cap"
    );
    // Root raises the cap: the same command completes.
    write_limits(&limits, "vm.run_output_mib = 100\n");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    m.ok("echo 'yes | head -c 50000000 >/dev/null; echo fine' > $M/c/exec");
    assert_eq!(m.ok("cat $M/c/runs/last/status"), "0\n");
    m.ok("rmdir $M/o $M/c");
}

#[test]
fn console_flood_is_capped_and_tail_follows_across_the_wrap() {
    let dir = tempfile::tempdir().unwrap();
    let limits = dir.path().join("limits");
    write_limits(&limits, "vm.console_mib = 1\n");
    let Some(m) = Mounted::with_env(&[("BANDSOX_LIMITS", limits.to_str().unwrap())]) else {
        return;
    };
    m.ok("mkdir $M/f");
    let info = m.ok("cat $M/f/info");
    let id = info
        .split("\"id\": \"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_string();
    let log = m.state.join(format!("vms/{id}/console.log"));
    // tail -f follows while the "guest" (the host agent: its stdout is the console)
    // floods 30 MB, then writes a last line.
    let out = m.state.parent().unwrap().join("tail.out");
    let script = format!(
        "tail -s 0.1 -f $M/f/console > {out} 2>&1 & t=$!; sleep 0.3; \
         echo 'yes flooding-the-console | head -c 30000000 >> /proc/$PPID/fd/1; \
               sleep 1.2; echo THE-END >> /proc/$PPID/fd/1' > $M/f/exec; \
         for i in $(seq 1 50); do grep -q THE-END {out} && break; sleep 0.1; done; kill $t",
        out = out.display()
    );
    m.ok(&script);
    let followed = std::fs::read(&out).unwrap();
    assert!(
        followed.ends_with(b"THE-END\n"),
        "tail -f did not follow across the wrap: ...{:?}",
        String::from_utf8_lossy(&followed[followed.len().saturating_sub(200)..])
    );
    assert!(!followed.contains(&0u8), "tail -f saw the punched zeros");
    assert!(!String::from_utf8_lossy(&followed).contains("truncated"));
    // The host keeps about 1 MiB, while the file's size says what was written.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&log).unwrap();
    assert!(meta.len() > 30_000_000, "size {}", meta.len());
    assert!(
        meta.blocks() * 512 <= 1024 * 1024 + 320 * 1024,
        "console.log holds {} bytes",
        meta.blocks() * 512
    );
    // cat reads what is kept, saying first what was dropped.
    let text = m.ok("cat $M/f/console");
    assert!(
        text.starts_with("[bandsox: "),
        "{}",
        &text[..100.min(text.len())]
    );
    assert!(text.contains("earlier bytes were dropped"));
    assert!(text.ends_with("THE-END\n"));
    assert!(!text.contains('\0'));
    assert!(text.len() < 2 * 1024 * 1024);
    m.ok("rmdir $M/f");
}

#[test]
fn events_show_each_user_only_their_own() {
    let Some(m) = Mounted::new() else { return };
    m.ok_as(ALICE, "mkdir $M/alice-vm");
    m.ok_as(BOB, "mkdir $M/bob-vm");
    // Follow as alice while both users act.
    let out = m.state.parent().unwrap().join("alice-tail.out");
    let out_s = out.display().to_string();
    std::fs::write(&out, "").unwrap();
    std::os::unix::fs::chown(&out, Some(ALICE), None).unwrap();
    m.ok_as(
        ALICE,
        &format!(
            "tail -s 0.1 -n 0 -f $M/events > {out_s} & t=$!; sleep 0.3; \
             echo pause > $M/alice-vm/ctl; echo resume > $M/alice-vm/ctl; sleep 0.5; kill $t"
        ),
    );
    m.ok_as(
        BOB,
        "echo pause > $M/bob-vm/ctl; echo resume > $M/bob-vm/ctl",
    );
    let followed = std::fs::read_to_string(&out).unwrap();
    assert!(followed.contains(" alice-vm paused"), "{followed}");

    let alice = m.ok_as(ALICE, "cat $M/events");
    let bob = m.ok_as(BOB, "cat $M/events");
    let root = m.ok("cat $M/events");
    assert!(alice.contains(" alice-vm created") && alice.contains(" alice-vm resumed"));
    assert!(!alice.contains("bob-vm"), "alice sees bob's VM: {alice}");
    assert!(bob.contains(" bob-vm created") && bob.contains(" bob-vm paused"));
    assert!(!bob.contains("alice-vm"), "{bob}");
    assert!(root.contains("alice-vm") && root.contains("bob-vm"));
    // Daemon-wide lines are everyone's.
    assert!(alice.contains(" - daemon-start") && bob.contains(" - daemon-start"));
    // stat shows each reader the size of their own view (tail -f follows by it).
    let size: usize = m
        .ok_as(ALICE, "stat -c %s $M/events")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(size, alice.len());

    // Per-VM events: the owner's, that VM's lines only; others cannot open it.
    let own = m.ok_as(ALICE, "cat $M/alice-vm/events");
    assert!(own.lines().all(|l| l.contains(" alice-vm ")), "{own}");
    assert!(own.contains(" alice-vm paused"));
    let (code, _, _) = m.sh_as(BOB, "cat $M/alice-vm/events");
    assert_ne!(code, 0);
    // A deleted VM's lines stay its owner's, even when another user reuses the name.
    m.ok_as(ALICE, "rmdir $M/alice-vm");
    m.ok_as(BOB, "mkdir $M/alice-vm && rmdir $M/alice-vm");
    let alice = m.ok_as(ALICE, "cat $M/events");
    assert_eq!(alice.matches(" alice-vm deleted").count(), 1, "{alice}");
    let bob = m.ok_as(BOB, "cat $M/events");
    assert_eq!(bob.matches(" alice-vm deleted").count(), 1, "{bob}");
    assert!(!bob.contains(" alice-vm paused"));
    m.ok("rmdir $M/bob-vm");
}

#[test]
fn mount_helper_options() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/fuse").exists() {
        return;
    }
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("../mount-helpers/mount.fuse.bandsox");
    let tmp = tempfile::Builder::new()
        .prefix("bandsox-helper")
        .tempdir_in("/var/tmp")
        .unwrap();
    let (mnt, state) = (tmp.path().join("mnt"), tmp.path().join("state"));
    std::fs::create_dir_all(state.join("images/base")).unwrap();
    std::fs::write(state.join("images/base/disk.ext4"), vec![0u8; 65536]).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let run = |opts: &str| {
        std::process::Command::new(&helper)
            .args(["bandsox", mnt.to_str().unwrap(), "-o", opts])
            .env("BANDSOX", env!("CARGO_BIN_EXE_bandsox"))
            .env("BANDSOX_HOST_AGENT", common::agent_binary())
            .output()
            .unwrap()
    };
    // Unknown options: refused with a message, nothing mounted.
    let out = run(&format!(
        "allow_other,state_dir={},colour=blue",
        state.display()
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown mount option(s): colour=blue"),
        "{err}"
    );
    assert!(!common::is_mounted(&mnt));

    // ro: reads work, every write answers EROFS. No allow_other: private to root.
    let out = run(&format!(
        "ro,default_permissions,nosuid,nodev,noauto,state_dir={}",
        state.display()
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(common::is_mounted(&mnt));
    let sh = |uid: u32, script: &str| {
        let id = uid.to_string();
        let o = std::process::Command::new("setpriv")
            .args([
                "--reuid",
                &id,
                "--regid",
                &id,
                "--clear-groups",
                "bash",
                "-c",
                script,
            ])
            .env("M", &mnt)
            .current_dir("/")
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    assert!(sh(0, "grep -q BandSox $M/README").0);
    let (ok, err) = sh(0, "echo 'create x' > $M/ctl");
    assert!(!ok && err.contains("Read-only file system"), "{err}");
    let (ok, err) = sh(0, "mkdir $M/x");
    assert!(!ok && err.contains("Read-only file system"), "{err}");
    let (ok, err) = sh(ALICE, "ls $M");
    assert!(
        !ok && err.contains("Permission denied"),
        "private mount: {err}"
    );
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_bandsox"))
        .arg("unmount")
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while common::is_mounted(&mnt) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!common::is_mounted(&mnt));
}
