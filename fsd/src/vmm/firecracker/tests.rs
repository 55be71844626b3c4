//! Backend tests without a Firecracker binary: a plain process (`sleep`, `sh`) stands in
//! for Firecracker while a fake API server (hyper) and a fake vsock peer answer on its
//! sockets, so launch, configuration, control, adoption and every error path run.
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::api::tests::{fake_api, Responder, Seen};
use super::api::{ApiClient, ApiError};
use super::launch::{dir_relative, spawn, LogStarts};
use super::*;
use crate::vmm::process::VmmProcess;
use crate::vmm::testkit::{check_adoption, spec};

fn backend(binary: &str) -> FirecrackerBackend {
    FirecrackerBackend {
        binary: binary.into(),
        version: FcVersion::new(1, 10, 1),
        version_text: "1.10.1".into(),
        snapshot_format: None,
        accel_reason: "test".into(),
        forced: None,
        jailer: None,
    }
}

fn kvm() -> Accel {
    Accel {
        kind: AccelKind::Kvm,
        reason: "/dev/kvm opens and the CPU has hardware virtualisation".into(),
    }
}

#[test]
fn versions_parse_and_compare() {
    assert_eq!(FcVersion::parse("1.10.1"), Some(FcVersion::new(1, 10, 1)));
    assert_eq!(
        FcVersion::parse("v1.17.0-dev"),
        Some(FcVersion::new(1, 17, 0))
    );
    assert_eq!(
        FcVersion::parse("1.7.0-dirty"),
        Some(FcVersion::new(1, 7, 0))
    );
    assert_eq!(FcVersion::parse("1.9"), Some(FcVersion::new(1, 9, 0)));
    assert_eq!(FcVersion::parse("x.1"), None);
    assert_eq!(FcVersion::parse("1.2.3.4"), None);
    assert!(FcVersion::new(1, 10, 0) > FcVersion::new(1, 9, 9));
    let out = "Firecracker v1.12.1\n\nSupported snapshot data format versions: v5.0.0\n";
    assert_eq!(
        FcVersion::from_version_output(out),
        Some(FcVersion::new(1, 12, 1))
    );
    assert_eq!(FcVersion::from_version_output("firecracker 1.2"), None);
    assert!(!FcVersion::new(1, 11, 0).has_network_overrides());
    assert!(FcVersion::new(1, 12, 0).has_network_overrides());
    assert!(!FcVersion::new(1, 15, 9).has_vsock_override());
    assert!(FcVersion::new(1, 16, 0).has_vsock_override());
    // The text keeps suffixes; formats come from --snapshot-version/--describe-snapshot.
    let dev = "Firecracker v1.17.0-dev\n\n2026-12-01T07:37:55.118 [anonymous-instance:main] \
               Firecracker exiting successfully. exit_code=0\n";
    assert_eq!(version_text(dev).as_deref(), Some("1.17.0-dev"));
    assert_eq!(
        FcVersion::from_version_output(dev),
        Some(FcVersion::new(1, 17, 0))
    );
    assert_eq!(
        format_text("v11.0.0\n2026-12-01T07:37:58 [anonymous-instance:main] exit_code=0\n"),
        Some(FcVersion::new(11, 0, 0))
    );
    assert_eq!(format_text("Firecracker v1.17.0\n"), None);
    // Firecracker's load rule: same major, minor no newer, any patch.
    let v10 = FcVersion::new(10, 2, 0);
    assert!(v10.can_load_format(FcVersion::new(10, 2, 7)));
    assert!(v10.can_load_format(FcVersion::new(10, 0, 0)));
    assert!(!v10.can_load_format(FcVersion::new(10, 3, 0)));
    assert!(!v10.can_load_format(FcVersion::new(11, 0, 0)));
    assert!(!v10.can_load_format(FcVersion::new(9, 0, 0)));
}

#[test]
fn detection_decides_on_version_and_kvm() {
    let b = FirecrackerBackend::evaluate("/usr/bin/firecracker".into(), "Firecracker v1.10.1\n")
        .and_then(|b| b.check_host(&kvm(), false))
        .unwrap();
    assert_eq!(b.version(), FcVersion::new(1, 10, 1));
    assert_eq!(b.kind(), BackendKind::Firecracker);
    assert!(
        b.describe().contains("Firecracker 1.10.1"),
        "{}",
        b.describe()
    );
    assert!(b.describe().contains("hardware virtualisation"));

    let old = FirecrackerBackend::evaluate("/fc".into(), "Firecracker v1.7.0\n")
        .err()
        .unwrap();
    assert!(
        matches!(&old, VmmError::Unavailable(m) if m.contains("too old") && m.contains("1.8.0")),
        "{old}"
    );

    let pvm = Accel {
        kind: AccelKind::Tcg,
        reason: "the KVM module is kvm_pvm, which cannot run ordinary guests".into(),
    };
    let no_kvm = FirecrackerBackend::evaluate("/fc".into(), "Firecracker v1.10.1\n")
        .and_then(|b| b.check_host(&pvm, false))
        .err()
        .unwrap();
    assert!(
        matches!(&no_kvm, VmmError::Unavailable(m) if m.contains("kvm_pvm") && m.contains(FORCE_ENV)),
        "{no_kvm}"
    );
    // Forced (test only): offered, and it says so everywhere it is described.
    let forced = FirecrackerBackend::evaluate("/fc".into(), "Firecracker v1.17.0-dev\n")
        .and_then(|b| b.check_host(&pvm, true))
        .unwrap();
    let why = forced.forced().expect("marked as forced");
    assert!(why.contains(FORCE_ENV) && why.contains("kvm_pvm"), "{why}");
    assert!(
        forced.describe().contains("FORCED by"),
        "{}",
        forced.describe()
    );
    assert!(
        forced.describe().contains("1.17.0-dev"),
        "{}",
        forced.describe()
    );
    // Forcing where KVM works changes nothing.
    let real = FirecrackerBackend::evaluate("/fc".into(), "Firecracker v1.10.1\n")
        .and_then(|b| b.check_host(&kvm(), true))
        .unwrap();
    assert_eq!(real.forced(), None);

    let garbage = FirecrackerBackend::evaluate("/fc".into(), "Usage: foo\n")
        .err()
        .unwrap();
    assert!(
        matches!(&garbage, VmmError::Unavailable(m) if m.contains("Usage: foo")),
        "{garbage}"
    );
}

#[test]
fn detect_runs_the_configured_binary() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("firecracker");
    std::fs::write(&fake, "#!/bin/sh\necho 'Firecracker v1.5.0'\necho\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // Only this test sets the variable; other tests never read it.
    std::env::set_var(FIRECRACKER_ENV, &fake);
    let r = FirecrackerBackend::detect();
    std::env::remove_var(FIRECRACKER_ENV);
    match r {
        Err(VmmError::Unavailable(m)) => assert!(m.contains("1.5.0 at"), "{m}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("1.5.0 must be refused"),
    }
}

#[test]
fn argv_cmdline_and_validation() {
    let b = backend("/usr/bin/firecracker");
    let argv = b
        .build_argv(Path::new("/var/lib/bandsox/vms/0123abcd4567"))
        .unwrap();
    assert_eq!(
        argv,
        [
            "/usr/bin/firecracker",
            "--api-sock",
            "/var/lib/bandsox/vms/0123abcd4567/api.sock",
            "--id",
            "bx-0123abcd4567",
            "--log-path",
            "firecracker.log",
            "--level",
            "Info",
            "--show-level",
            "--metrics-path",
            "metrics.json"
        ]
    );
    let argv = b.build_argv(Path::new("/tmp/.tmp x")).unwrap();
    assert!(
        !argv.iter().any(|a| a == "--id"),
        "no --id for a name Firecracker would refuse"
    );
    let long = PathBuf::from(format!("/{}", "d".repeat(100)));
    assert!(
        matches!(b.build_argv(&long), Err(VmmError::StartFailed(m)) if m.contains("at most 107"))
    );

    let s = spec(Path::new("/v"));
    let cmdline = kernel_cmdline(&s);
    assert!(
        cmdline.starts_with("console=ttyS0 reboot=k panic=1 pci=off"),
        "{cmdline}"
    );
    assert!(cmdline.ends_with(" bandsox.name=web-1"), "{cmdline}");

    assert!(validate(&s).is_ok());
    let mut tap = spec(Path::new("/v"));
    tap.net = crate::net::plan(NetMode::Tap, "0123456789ab", Some(1)).unwrap();
    assert!(validate(&tap).is_ok());
    assert!(kernel_cmdline(&tap).contains(" bandsox.net=172.30.0.6/30,172.30.0.5"));
    for (mutate, want) in [
        (
            Box::new(|s: &mut VmSpec| s.net = crate::net::plan(NetMode::User, "a", None).unwrap())
                as Box<dyn Fn(&mut VmSpec)>,
            "net=user",
        ),
        (Box::new(|s: &mut VmSpec| s.vcpus = 33), "1-32"),
        (
            Box::new(|s: &mut VmSpec| s.name = "a b".into()),
            "kernel command line",
        ),
    ] {
        let mut s = spec(Path::new("/v"));
        mutate(&mut s);
        let e = validate(&s).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    assert_eq!(
        dir_relative(Path::new("/v"), Path::new("/v/disk.ext4")),
        "disk.ext4"
    );
    assert_eq!(
        dir_relative(Path::new("/v"), Path::new("/w/disk.ext4")),
        "/w/disk.ext4"
    );
    assert_eq!(dir_relative(Path::new("/v"), Path::new("/v/a/b")), "/v/a/b");
}

fn all_ok() -> Arc<Responder> {
    Arc::new(|method: &str, path: &str, _: &Value| {
        match (method, path) {
        ("GET", "/version") => (200, r#"{"firecracker_version":"1.10.1"}"#.into()),
        ("GET", "/") => (
            200,
            r#"{"app_name":"Firecracker","id":"x","state":"Running","vmm_version":"1.10.1"}"#.into(),
        ),
        ("PATCH", "/vm") => (
            400,
            r#"{"fault_message":"The requested operation is not supported after starting the microVM."}"#.into(),
        ),
        _ => (204, String::new()),
    }
    })
}

/// A fake API server's task, what it was asked, and the vsock peer's task (if any).
type Served = (
    tokio::task::JoinHandle<()>,
    Arc<std::sync::Mutex<Vec<Seen>>>,
    Option<tokio::task::JoinHandle<()>>,
);

/// Serve a fake API (and optionally a vsock peer) on `dir`'s sockets once `launch_argv`
/// has removed stale ones and started the process.
async fn serve_later(dir: &Path, respond: Arc<Responder>, vsock: bool) -> Served {
    serve_later_in(dir, dir, respond, vsock).await
}

/// `serve_later` for sockets in `root` of a VM in `vm_dir` (jailer mode).
async fn serve_later_in(vm_dir: &Path, dir: &Path, respond: Arc<Responder>, vsock: bool) -> Served {
    // launch_argv removes stale sockets first; wait until it has created its files.
    let record = vm_dir.join(RECORD_FILE);
    for _ in 0..500 {
        if record.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (t, seen) = fake_api(&dir.join(API_SOCK), respond);
    let peer = vsock.then(|| {
        super::vsock::tests::peer(
            tokio::net::UnixListener::bind(dir.join(VSOCK_SOCK)).unwrap(),
            Some(b"OK 1073741824\n"),
        )
    });
    (t, seen, peer)
}

#[tokio::test]
async fn fake_firecracker_lifecycle_and_adopt() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_path_buf();
    let b = backend("/bin/sleep");
    let s = spec(&d);
    let argv = vec!["/bin/sleep".to_string(), "30".into()];
    let d2 = d.clone();
    let server = tokio::spawn(async move { serve_later(&d2, all_ok(), true).await });
    let inst = b
        .launch_argv(&s, argv.clone(), Path::new("/s/boot/vmlinux"))
        .await
        .unwrap();
    let (api_task, seen, peer) = server.await.unwrap();
    assert!(inst.is_alive());
    assert_eq!(
        std::fs::read_to_string(d.join("vmm.pid")).unwrap().trim(),
        inst.pid().to_string()
    );
    for f in [FC_LOG, METRICS_FILE, VMM_LOG, "console.log"] {
        assert!(d.join(f).is_file(), "{f} missing");
    }
    assert_eq!(load_record(&d).unwrap().argv, argv);

    let seen_now: Vec<Seen> = seen.lock().unwrap().clone();
    let calls: Vec<String> = seen_now
        .iter()
        .filter(|s| s.path != "/version")
        .map(|s| format!("{} {}", s.method, s.path))
        .collect();
    // Logger and metrics are on the command line: nothing is logged to the console.
    assert_eq!(
        calls,
        [
            "PUT /boot-source",
            "PUT /machine-config",
            "PUT /drives/vda",
            "PUT /vsock",
            "PUT /entropy",
            "PUT /actions"
        ]
    );
    let body = |p: &str| {
        seen_now
            .iter()
            .find(|s| s.path == p)
            .map(|s| s.body.clone())
            .unwrap()
    };
    assert_eq!(
        body("/boot-source"),
        json!({"kernel_image_path": "/s/boot/vmlinux", "initrd_path": "/s/boot/initrd",
               "boot_args": kernel_cmdline(&s)})
    );
    assert_eq!(
        body("/machine-config"),
        json!({"vcpu_count": 2, "mem_size_mib": 256})
    );
    assert_eq!(
        body("/drives/vda"),
        json!({"drive_id": "vda", "path_on_host": "disk.ext4", "is_root_device": false,
               "is_read_only": false, "cache_type": "Writeback"})
    );
    assert_eq!(
        body("/vsock"),
        json!({"guest_cid": 3, "uds_path": "vsock.sock"})
    );
    assert_eq!(body("/entropy"), json!({}));
    assert_eq!(body("/actions"), json!({"action_type": "InstanceStart"}));

    // The agent channel, twice (callable repeatedly), bytes flow both ways.
    for _ in 0..2 {
        let mut a = inst.connect_agent().await.unwrap();
        a.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        a.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hi");
    }

    // Control: refusals carry fault_message verbatim.
    match inst.pause().await {
        Err(VmmError::Refused { op, message }) => {
            assert_eq!(op, "pause");
            assert_eq!(
                message,
                "The requested operation is not supported after starting the microVM."
            );
        }
        other => panic!("{other:?}"),
    }
    inst.request_shutdown().await.unwrap();
    let last = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.path, "/actions");
    assert_eq!(last.body, json!({"action_type": "SendCtrlAltDel"}));

    // Adopt from the directory: same argv, same cwd.
    let adopted = b.adopt(&s).await.unwrap().expect("adopt");
    let record = d.join(RECORD_FILE);
    check_adoption(&inst, adopted.as_ref(), &record, || adopt_dir(&d).is_some()).await;
    assert!(!d.join("vmm.pid").exists(), "pid file removed");
    assert!(matches!(
        inst.connect_agent().await,
        Err(VmmError::NotRunning)
    ));
    assert!(b.adopt(&s).await.unwrap().is_none());
    api_task.abort();
    if let Some(p) = peer {
        p.abort();
    }
}

#[tokio::test]
async fn refused_configuration_fails_the_launch_and_kills() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_path_buf();
    let respond: Arc<Responder> = Arc::new(|method: &str, path: &str, _: &Value| {
        match (method, path) {
        ("GET", "/version") => (200, r#"{"firecracker_version":"1.10.1"}"#.into()),
        ("PUT", "/boot-source") => (
            400,
            r#"{"fault_message":"The kernel file cannot be opened: No such file or directory (os error 2)"}"#
                .into(),
        ),
        _ => (204, String::new()),
    }
    });
    let d2 = d.clone();
    let server = tokio::spawn(async move { serve_later(&d2, respond, false).await });
    let err = backend("/bin/sleep")
        .launch_argv(
            &spec(&d),
            vec!["/bin/sleep".into(), "30".into()],
            Path::new("/k"),
        )
        .await
        .err()
        .unwrap();
    match &err {
        VmmError::StartFailed(m) => assert_eq!(
            m,
            "Firecracker refused PUT /boot-source: The kernel file cannot be opened: No such \
             file or directory (os error 2)"
        ),
        other => panic!("{other:?}"),
    }
    let (t, seen, _) = server.await.unwrap();
    t.abort();
    assert!(
        !seen.lock().unwrap().iter().any(|s| s.path == "/actions"),
        "nothing is started after a refusal"
    );
    // The process is gone and no pid file is left.
    let pid: Option<u32> = std::fs::read_to_string(d.join("vmm.pid"))
        .ok()
        .and_then(|t| t.trim().parse().ok());
    assert!(pid.is_none(), "pid file left behind");
}

#[tokio::test]
async fn early_death_reports_the_logs() {
    let tmp = tempfile::tempdir().unwrap();
    let argv = vec![
        "/bin/sh".to_string(),
        "-c".into(),
        "echo 'Error: Arguments parsing error: unexpected argument' >&2; \
         echo 'Linux version 6.1 (guest)'; exit 1"
            .into(),
    ];
    let err = backend("/bin/sh")
        .launch_argv(&spec(tmp.path()), argv, Path::new("/k"))
        .await
        .err()
        .unwrap();
    match err {
        VmmError::StartFailed(m) => {
            assert!(m.starts_with("Firecracker exited with status 1"), "{m}");
            assert!(m.contains("stderr: Error: Arguments parsing error"), "{m}");
            assert!(m.contains("console: Linux version"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    // A missing binary.
    let err = backend("/nonexistent/firecracker")
        .launch_argv(
            &spec(tmp.path()),
            vec!["/nonexistent/firecracker".into()],
            Path::new("/k"),
        )
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, VmmError::StartFailed(m) if m.contains("cannot run")),
        "{err}"
    );
}

#[tokio::test]
async fn api_that_never_comes_up_times_out() {
    let tmp = tempfile::tempdir().unwrap();
    let b = backend("/bin/sleep");
    let t0 = std::time::Instant::now();
    let inst = spawn(
        tmp.path(),
        tmp.path(),
        &["/bin/sleep".into(), "30".into()],
        None,
        LogStarts::default(),
    )
    .unwrap();
    let err = inst
        .wait_api(Instant::now() + Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::Connect { .. }), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(3));
    inst.kill().await.unwrap();
    drop(b);
}

/// A jailed start whose API socket never appears (here: the "jailer" made a jail under
/// another name) fails with a reason that names the jail expected and what exists.
#[tokio::test]
async fn a_missing_jail_socket_names_the_expected_and_the_found_jail() {
    let tmp = tempfile::tempdir().unwrap();
    let vm = tmp.path().join("0123456789ab");
    std::fs::create_dir(&vm).unwrap();
    let exec = jailer::ExecFile::recorded(Path::new("/opt/fc/firecracker")).unwrap();
    let cfg = jailer::JailerConfig::new("/bin/sh".into());
    let root = cfg.root(&vm, &exec).unwrap();
    let jail = Jail {
        root: root.clone(),
        exec,
        uid: 0,
        gid: 0,
        id: "bx-0123456789ab".into(),
        cgroups: Default::default(),
    };
    let inst = spawn(
        &vm,
        &root,
        &[
            "/bin/sh".into(),
            "-c".into(),
            "mkdir -p jail/firecracker-v1.10.1-x86_64/bx-0123456789ab/root && exec sleep 30".into(),
        ],
        Some(jail),
        LogStarts::default(),
    )
    .unwrap();
    let err = inst
        .wait_api(Instant::now() + Duration::from_millis(500))
        .await
        .unwrap_err();
    let why = inst.failure_reason(&err).await;
    inst.kill().await.unwrap();
    assert!(
        why.contains(&format!("expected the jail {}", root.display())),
        "{why}"
    );
    assert!(
        why.contains("holds firecracker-v1.10.1-x86_64/bx-0123456789ab/root"),
        "{why}"
    );
    assert!(why.contains("(for /opt/fc/firecracker)"), "{why}");
}

#[tokio::test]
async fn launch_refuses_bad_specs_before_starting_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let b = backend("/bin/false");
    let mut s = spec(tmp.path());
    // Kernel missing.
    let e = b.launch(&s).await.err().unwrap();
    assert!(
        matches!(&e, VmmError::StartFailed(m) if m.contains("kernel")),
        "{e}"
    );
    s.net = crate::net::plan(NetMode::User, "a", None).unwrap();
    let e = b.launch(&s).await.err().unwrap();
    assert!(
        matches!(&e, VmmError::Unavailable(m) if m.contains("net=user")),
        "{e}"
    );
    assert!(!tmp.path().join("vmm.pid").exists());
}

#[tokio::test]
async fn net_tap_puts_the_network_interface_before_start() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_path_buf();
    let b = backend("/bin/sleep");
    let mut s = spec(&d);
    s.net = crate::net::plan(NetMode::Tap, "0123456789ab", Some(2)).unwrap();
    let d2 = d.clone();
    let server = tokio::spawn(async move { serve_later(&d2, all_ok(), true).await });
    let inst = b
        .launch_argv(
            &s,
            vec!["/bin/sleep".into(), "30".into()],
            Path::new("/s/boot/vmlinux"),
        )
        .await
        .unwrap();
    let (_api, seen, _peer) = server.await.unwrap();
    let seen_now: Vec<Seen> = seen.lock().unwrap().clone();
    let calls: Vec<String> = seen_now
        .iter()
        .map(|s| format!("{} {}", s.method, s.path))
        .collect();
    let net = calls
        .iter()
        .position(|c| c == "PUT /network-interfaces/eth0")
        .expect("network interface configured");
    let start = calls.iter().position(|c| c == "PUT /actions").unwrap();
    assert!(net < start, "{calls:?}");
    let body = &seen_now[net].body;
    assert_eq!(
        *body,
        json!({"iface_id": "eth0", "host_dev_name": "bsx0123456789ab",
               "guest_mac": crate::net::mac_for("0123456789ab")})
    );
    let boot = seen_now.iter().find(|s| s.path == "/boot-source").unwrap();
    assert!(boot.body["boot_args"]
        .as_str()
        .unwrap()
        .contains(" bandsox.net=172.30.0.10/30,172.30.0.9"));
    inst.kill().await.unwrap();
}

/// A jailer stand-in (stays alive like the jailed Firecracker would) and, in `dir`, a
/// file named like a release binary (`firecracker-v1.10.1-x86_64`) with `firecracker`
/// linked to it, as release tarballs are installed; returns the link.
fn fake_jail(dir: &Path) -> (PathBuf, jailer::JailerConfig) {
    let fc = dir.join("firecracker");
    let fake_jailer = dir.join("jailer");
    std::fs::write(&fake_jailer, "#!/bin/sh\nexec sleep 30\n").unwrap();
    std::fs::set_permissions(
        &fake_jailer,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(dir.join(RELEASE_NAME), "").unwrap();
    std::os::unix::fs::symlink(RELEASE_NAME, &fc).unwrap();
    let jail = jailer::JailerConfig {
        binary: fake_jailer,
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        cgroups: Default::default(),
    };
    (fc, jail)
}

const RELEASE_NAME: &str = "firecracker-v1.10.1-x86_64";

#[tokio::test]
async fn jailed_launch_links_files_into_the_jail_and_uses_relative_paths() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let vm = tmp.path().join("0123456789ab");
    std::fs::create_dir(&vm).unwrap();
    let boot = tmp.path().join("boot");
    std::fs::create_dir(&boot).unwrap();
    for f in ["vmlinux", "initrd"] {
        std::fs::write(boot.join(f), f).unwrap();
    }
    std::fs::write(vm.join("disk.ext4"), b"disk").unwrap();
    let (fc, jail) = fake_jail(tmp.path());
    let b = backend(fc.to_str().unwrap()).with_jailer(Some(jail.clone()));
    let mut s = spec(&vm);
    s.initrd = boot.join("initrd");
    // The jail is named after the file the link resolves to, as the jailer names it.
    let exec = jailer::ExecFile::resolve(&fc).unwrap();
    let root = jail.root(&vm, &exec).unwrap();
    let d = b.describe();
    assert!(
        d.contains(&format!("{} -> {}", fc.display(), exec.path().display())),
        "{d}"
    );
    assert!(
        root.starts_with(vm.join("jail").join(RELEASE_NAME)),
        "{root:?}"
    );
    // Leftovers of an earlier start are wiped (the real jailer refuses to reuse them).
    std::fs::create_dir_all(root.join("dev/net")).unwrap();
    std::fs::write(root.join("dev/net/tun"), b"").unwrap();
    let shared_before = |p: &Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.uid(), m.gid(), m.mode(), m.ino())
    };
    let kernel0 = shared_before(&boot.join("vmlinux"));
    let (v2, r2) = (vm.clone(), root.clone());
    let server = tokio::spawn(async move {
        // The jail is rebuilt by the launch: serve once the record says it started.
        serve_later_in(&v2, &r2, all_ok(), true).await
    });
    let inst = b
        .launch_jailed(&s, &jail, &boot.join("vmlinux"))
        .await
        .unwrap();
    let (_api, seen, _peer) = server.await.unwrap();
    assert!(!root.join("dev").exists(), "the old jail was wiped");
    let seen_now: Vec<Seen> = seen.lock().unwrap().clone();
    let body = |p: &str| seen_now.iter().find(|s| s.path == p).unwrap().body.clone();
    assert_eq!(body("/boot-source")["kernel_image_path"], "vmlinux");
    assert_eq!(body("/boot-source")["initrd_path"], "initrd");
    assert_eq!(body("/drives/vda")["path_on_host"], "disk.ext4");
    assert_eq!(body("/vsock")["uds_path"], "vsock.sock");
    assert!(
        !seen_now.iter().any(|s| s.path == "/logger"),
        "logger is on the command line"
    );
    for (f, want) in [
        ("vmlinux", "vmlinux"),
        ("initrd", "initrd"),
        ("disk.ext4", "disk"),
    ] {
        assert_eq!(
            std::fs::read_to_string(root.join(f)).unwrap(),
            want,
            "{f} in the jail"
        );
    }
    assert_eq!(
        shared_before(&boot.join("vmlinux")),
        kernel0,
        "the shared kernel keeps owner, mode and inode"
    );
    for f in [FC_LOG, METRICS_FILE] {
        assert_eq!(
            std::fs::metadata(root.join(f)).unwrap().ino(),
            std::fs::metadata(vm.join(f)).unwrap().ino(),
            "{f}: the VM directory's file, linked into the jail"
        );
    }
    assert!(
        vm.join("console.log").is_file(),
        "console stays in the VM directory"
    );
    let rec = load_record(&vm).unwrap();
    assert_eq!(rec.jail_root.as_deref(), Some(root.to_str().unwrap()));
    assert_eq!(rec.jail_ids, Some((jail.uid, jail.gid)));
    assert_eq!(rec.exec_name(), Some(RELEASE_NAME));
    assert_eq!(
        rec.exec_file().map(Path::new),
        Some(
            tmp.path()
                .canonicalize()
                .unwrap()
                .join(RELEASE_NAME)
                .as_path()
        ),
        "the jailer is given the resolved binary"
    );
    let mut fc_args = vec!["--api-sock".to_string(), "api.sock".into()];
    fc_args.extend(log_args());
    assert_eq!(rec.argv, jail.argv(&exec, &vm, &fc_args).unwrap());
    assert_eq!(rec.firecracker_args(), fc_args.as_slice());
    // The agent channel is the jail's vsock socket.
    let mut a = inst.connect_agent().await.unwrap();
    a.write_all(b"hi").await.unwrap();
    let mut buf = [0u8; 2];
    a.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hi");

    // A snapshot of a jailed VM is written inside the jail (relative paths) and moved
    // out into the snapshot directory.
    let snap = tmp.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    let r3 = root.clone();
    let writes: Arc<Responder> = Arc::new(move |method: &str, path: &str, body: &Value| {
        if (method, path) == ("PUT", "/snapshot/create") {
            for k in ["snapshot_path", "mem_file_path"] {
                let rel = body[k].as_str().unwrap();
                assert!(!rel.starts_with('/'), "{k} must be jail-relative: {rel}");
                std::fs::write(r3.join(rel), k).unwrap();
            }
        }
        (204, String::new())
    });
    let (t, seen2) = fake_api(&root.join("api2.sock"), writes);
    let inst2 = FcInstance::new(
        VmmProcess::adopt(vm.join("vmm.pid"), "Firecracker")
            .unwrap()
            .0,
        &vm,
        &root,
        inst.jail.clone(),
        LogStarts::default(),
    );
    let inst2 = FcInstance {
        api: ApiClient::new(root.join("api2.sock")),
        ..inst2
    };
    let saved = inst2.save_snapshot(&snap).await.unwrap();
    t.abort();
    assert_eq!(
        seen2.lock().unwrap()[0].body,
        json!({"snapshot_type": "Full", "snapshot_path": "snapshot.state",
               "mem_file_path": "snapshot.memory"})
    );
    assert_eq!(
        std::fs::read_to_string(snap.join("state")).unwrap(),
        "snapshot_path"
    );
    assert_eq!(
        std::fs::read_to_string(snap.join("memory")).unwrap(),
        "mem_file_path"
    );
    assert!(!root.join("snapshot.state").exists() && !root.join("snapshot.memory").exists());
    assert_eq!(saved.restore["jailed"], json!(true));
    assert_eq!(saved.restore["firecracker_version"], json!("1.10.1"));
    inst.kill().await.unwrap();
}

/// A stand-in for Firecracker that ignores its arguments (`--api-sock ...`) and lives on.
fn fake_firecracker(dir: &Path) -> String {
    let p = dir.join("fake-firecracker");
    std::fs::write(&p, "#!/bin/sh\nexec sleep 30\n").unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    p.to_str().unwrap().to_string()
}

/// Snapshot create on a (fake) running instance, then restore into another directory:
/// the documented bodies, only logger/metrics before the load, `vsock_override` only from
/// 1.16, relative disk/vsock paths so the restored VM uses its own directory.
#[tokio::test]
async fn snapshot_create_and_restore_send_the_documented_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let snap = tmp.path().join("snap");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    let b = backend("/bin/sleep");
    let s = spec(&src);
    let argv = vec!["/bin/sleep".to_string(), "30".into()];
    let d2 = src.clone();
    // Like Firecracker, the fake writes the files it is asked for (absolute paths here).
    let writes: Arc<Responder> = Arc::new(|method: &str, path: &str, body: &Value| {
        if (method, path) == ("PUT", "/snapshot/create") {
            for k in ["snapshot_path", "mem_file_path"] {
                std::fs::write(body[k].as_str().unwrap(), k).unwrap();
            }
            return (204, String::new());
        }
        all_ok()(method, path, body)
    });
    let server = tokio::spawn(async move { serve_later(&d2, writes, false).await });
    let inst = b
        .launch_argv(&s, argv, Path::new("/s/boot/vmlinux"))
        .await
        .unwrap();
    let (api_task, seen, _) = server.await.unwrap();
    seen.lock().unwrap().clear();
    let saved = inst.save_snapshot(&snap).await.unwrap();
    assert_eq!(saved.state_file, "state");
    assert_eq!(saved.memory_file.as_deref(), Some("memory"));
    let create = seen.lock().unwrap().clone();
    assert_eq!(create.len(), 1);
    assert_eq!(
        (create[0].method.as_str(), create[0].path.as_str()),
        ("PUT", "/snapshot/create")
    );
    assert_eq!(
        create[0].body,
        json!({"snapshot_type": "Full",
               "snapshot_path": snap.join("state").to_str().unwrap(),
               "mem_file_path": snap.join("memory").to_str().unwrap()})
    );
    for f in ["state", "memory"] {
        let mode = std::fs::metadata(snap.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644, "{f}: readable for jailed clones");
    }
    inst.kill().await.unwrap();
    api_task.abort();
    for (version, with_override) in [
        (FcVersion::new(1, 10, 1), false),
        (FcVersion::new(1, 16, 0), true),
    ] {
        let dst = tmp.path().join(format!("dst-{with_override}"));
        std::fs::create_dir_all(&dst).unwrap();
        let mut b = backend(&fake_firecracker(tmp.path()));
        b.version = version;
        let mut s2 = spec(&dst);
        s2.name = "clone-1".into();
        let d3 = dst.clone();
        let server = tokio::spawn(async move { serve_later(&d3, all_ok(), false).await });
        let inst = snapshot::restore(&b, &s2, &snap, &saved).await.unwrap();
        let (api_task, seen, _) = server.await.unwrap();
        let calls: Vec<Seen> = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path != "/version")
            .cloned()
            .collect();
        let names: Vec<String> = calls
            .iter()
            .map(|s| format!("{} {}", s.method, s.path))
            .collect();
        assert_eq!(
            names,
            ["PUT /snapshot/load"],
            "nothing is configured before a load"
        );
        let mut expected = json!({
            "snapshot_path": snap.join("state").to_str().unwrap(),
            "mem_backend": {"backend_type": "File",
                            "backend_path": snap.join("memory").to_str().unwrap()},
            "resume_vm": true
        });
        if with_override {
            expected["vsock_override"] = json!({"uds_path": "vsock.sock"});
        }
        assert_eq!(calls[0].body, expected, "version {version}");
        assert!(load_record(&dst).is_some());
        inst.kill().await.unwrap();
        api_task.abort();
    }
}

#[tokio::test]
async fn refused_snapshot_load_fails_clearly_and_kills() {
    let tmp = tempfile::tempdir().unwrap();
    let (snap, dst) = (tmp.path().join("snap"), tmp.path().join("dst"));
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    let saved = crate::vmm::SavedState {
        state_file: "state".into(),
        memory_file: Some("memory".into()),
        restore: Value::Null,
    };
    let b = backend(&fake_firecracker(tmp.path()));
    // Missing files are refused before anything starts.
    match snapshot::restore(&b, &spec(&dst), &snap, &saved).await {
        Err(VmmError::StartFailed(m)) => assert!(m.contains("is missing"), "{m}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("restore without files succeeded"),
    }
    assert!(!dst.join("vmm.pid").exists());
    std::fs::write(snap.join("state"), b"s").unwrap();
    std::fs::write(snap.join("memory"), b"m").unwrap();
    let refuse: Arc<Responder> =
        Arc::new(|method: &str, path: &str, _: &Value| match (method, path) {
            ("GET", "/version") => (200, r#"{"firecracker_version":"1.10.1"}"#.into()),
            ("PUT", "/snapshot/load") => (
                400,
                r#"{"fault_message":"Load snapshot error: Cannot deserialize the microVM state"}"#
                    .into(),
            ),
            _ => (204, String::new()),
        });
    let d = dst.clone();
    let server = tokio::spawn(async move { serve_later(&d, refuse, false).await });
    let err = snapshot::restore(&b, &spec(&dst), &snap, &saved)
        .await
        .err()
        .unwrap();
    let (api_task, _, _) = server.await.unwrap();
    api_task.abort();
    match err {
        VmmError::StartFailed(m) => {
            assert!(m.contains("Cannot deserialize the microVM state"), "{m}");
            assert!(m.contains("/snapshot/load"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    let saved_ok = saved.clone();
    // No memory file recorded: a clear error, nothing started.
    let bad = crate::vmm::SavedState {
        memory_file: None,
        ..saved
    };
    assert!(snapshot::load_params(Some(&snap), &bad, FcVersion::new(1, 16, 0), None).is_err());
    // A clone of a net=tap VM: its own TAP device replaces the snapshot's (1.12+).
    let with_tap = snapshot::load_params(
        Some(&snap),
        &saved_ok,
        FcVersion::new(1, 12, 0),
        Some("bsxc"),
    )
    .unwrap();
    let j = serde_json::to_value(&with_tap).unwrap();
    assert_eq!(
        j["network_overrides"],
        serde_json::json!([{"iface_id": "eth0", "host_dev_name": "bsxc"}])
    );
    assert!(j.get("vsock_override").is_none(), "vsock_override is 1.16+");
    let old = snapshot::load_params(
        Some(&snap),
        &saved_ok,
        FcVersion::new(1, 11, 0),
        Some("bsxc"),
    );
    match old {
        Err(VmmError::StartFailed(m)) => assert!(m.contains("network_overrides"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_last_error_line_is_the_telling_one() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join(FC_LOG);
    assert_eq!(last_error_line(&log), None, "no log");
    std::fs::write(
        &log,
        "2026-12-01T07:40:34.02 [bx-1:main:INFO] Running Firecracker v1.16.1\n\
         2026-12-01T07:40:34.02 [bx-1:main:INFO] Listening on API socket (\"api.sock\").\n",
    )
    .unwrap();
    assert_eq!(last_error_line(&log), None, "the banner is no error");
    std::fs::write(
        &log,
        "2026-12-01T07:40:34.02 [bx-1:main:INFO] Listening on API socket (\"api.sock\").\n\
         2026-12-01T07:41:50.10 [bx-1:fc_vcpu 0:ERROR] Unexpected exit reason on vcpu run: \
         KVM_EXIT_INTERNAL_ERROR\n\
         2026-12-01T07:41:50.11 [bx-1:main:ERROR] Firecracker exiting with error. exit_code=1\n",
    )
    .unwrap();
    assert_eq!(
        last_error_line(&log).as_deref(),
        Some("[bx-1:fc_vcpu 0:ERROR] Unexpected exit reason on vcpu run: KVM_EXIT_INTERNAL_ERROR")
    );
    std::fs::write(
        &log,
        "2026-12-01T07:41:50.11 [bx-1:main:ERROR] Firecracker exiting with error. exit_code=1\n",
    )
    .unwrap();
    assert_eq!(
        last_error_line(&log).as_deref(),
        Some("[bx-1:main:ERROR] Firecracker exiting with error. exit_code=1"),
        "the generic line when it is all there is"
    );
}
