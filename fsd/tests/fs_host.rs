//! The fs/ scenarios (tests/fs/*.sh) against the real daemon and FUSE mount with the
//! agent in host mode: fast coverage of the whole file path without a VM. The same
//! scripts run against real VMs in tests/e2e.
mod common;

use std::path::PathBuf;
use std::process::Command;

use common::Mounted;

fn scenario(name: &str, extra_env: &[(&str, &str)]) {
    let Some(m) = Mounted::new() else { return };
    m.ok("mkdir $M/a && test \"$(cat $M/a/state)\" = running");
    let vm_dir = std::fs::read_dir(m.state.join("vms"))
        .unwrap()
        .flatten()
        .next()
        .expect("the VM's state directory")
        .path();
    let rel = format!("t-{name}");
    let fsdir = m.mnt.join("a/fs").join(&rel);
    std::fs::create_dir(&fsdir).unwrap();
    let work = tempfile::Builder::new()
        .prefix("bandsox-fs-work")
        .tempdir_in("/var/tmp")
        .unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fs")
        .join(format!("{name}.sh"));
    let mut cmd = Command::new("timeout");
    cmd.arg("600")
        .arg("bash")
        .arg(&script)
        .env("FSDIR", &fsdir)
        .env("FSROOT", m.mnt.join("a/fs"))
        .env("GREL", &rel)
        .env("VMDIR", m.mnt.join("a"))
        .env("WORK", work.path())
        .env("BANDSOX_DEVTOOLS", env!("CARGO_BIN_EXE_bandsox-devtools"))
        .env("VMM_PID_FILE", vm_dir.join("vmm.pid"));
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{name}: {stderr}");
    assert!(
        out.status.success(),
        "scenario {name} failed ({:?}):\nstdout: {}\nstderr: {stderr}\ndaemon log (tail): {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        m.log()
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn coherence_both_ways() {
    scenario("coherence", &[]);
}

#[test]
fn cp_a_round_trip_keeps_everything() {
    scenario("cp-a", &[]);
}

#[test]
fn random_offset_io_matches_a_reference() {
    scenario("fsx", &[("FSX_OPS", "1500")]);
}

#[test]
fn concurrent_writers_and_readers() {
    scenario("concurrent", &[]);
}

#[test]
fn git_inside_fs() {
    scenario("git", &[]);
}

#[test]
fn big_file_round_trip() {
    scenario("big", &[("BIG_MB", "256")]);
}

#[test]
fn rsync_of_5000_files() {
    scenario("rsync", &[]);
}

#[test]
fn paused_and_killed_vms_fail_promptly() {
    scenario("down", &[("KILL_MB", "512")]);
}

#[test]
fn fallocate_modes_answer_as_the_guest_filesystem() {
    scenario("fallocate", &[]);
}

#[test]
fn posix_semantics_match_ext4() {
    scenario("posix", &[]);
}

#[test]
fn lost_agent_connections_are_reestablished_transparently() {
    scenario("reconnect", &[]);
}

#[test]
fn inode_numbers_are_stable_and_rename_is_posix() {
    scenario("identity", &[]);
}

#[test]
fn the_working_directory_never_breaks() {
    scenario("cwd", &[]);
}

#[test]
fn large_directories_and_trees_stay_within_bounds() {
    scenario("scale", &[]);
}

#[test]
fn inode_numbers_survive_a_daemon_restart() {
    let Some(mut m) = Mounted::new() else { return };
    m.ok("mkdir $M/a && test \"$(cat $M/a/state)\" = running");
    let before = m.ok("echo x > $M/a/fs/f && ln $M/a/fs/f $M/a/fs/g && mkdir $M/a/fs/d && stat -c '%i %n' $M/a/fs/f $M/a/fs/g $M/a/fs/d");
    m.restart();
    assert_eq!(
        m.ok(
            "test \"$(cat $M/a/state)\" = running && stat -c '%i %n' $M/a/fs/f $M/a/fs/g $M/a/fs/d"
        ),
        before,
        "st_ino after a daemon restart"
    );
}
