//! The three ways a Firecracker release is installed, each started **jailed** (root and a
//! jailer) against the real binaries, the way the daemon finds them on PATH (the path
//! `<dir>/firecracker`, symlinks unresolved):
//! - `copy`: the binaries copied in as `firecracker` and `jailer`;
//! - `link`: `firecracker` and `jailer` symlinks to the binaries elsewhere (absolute);
//! - `release`: the release tarball's names, `firecracker-vX.Y.Z-x86_64` and
//!   `jailer-vX.Y.Z-x86_64`, with relative `firecracker` and `jailer` links beside them.
//!
//! For each: launch (every API call through `InstanceStart`), paused at once; the jail is
//! where the jailer made it (named after the *resolved* binary) and holds the API socket;
//! the record names the resolved binary. Then the `firecracker` link is moved to another
//! binary: the running VM is still adopted (by what it was started with), and the next
//! start is jailed under the new name. Nothing is left behind.
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use bandsox_fsd::vmm::firecracker::jailer::{find_beside, JailerConfig};
use bandsox_fsd::vmm::firecracker::{adopt_dir, load_record, FirecrackerBackend};
use bandsox_fsd::vmm::{Backend, VmmInstance};

use super::{alive, is_root, rmdir, skip, Fixture, Outcome, Reaper};

#[derive(Debug, Clone, Copy)]
enum Install {
    Copy,
    Link,
    Release,
}

/// Lay out `install` of (`fc`, `jailer`) in `bin`; returns `bin/firecracker`.
fn install(how: Install, bin: &Path, fc: &Path, jailer: &Path, version: &str) -> PathBuf {
    std::fs::create_dir_all(bin).unwrap();
    match how {
        Install::Copy => {
            std::fs::copy(fc, bin.join("firecracker")).unwrap();
            std::fs::copy(jailer, bin.join("jailer")).unwrap();
        }
        Install::Link => {
            symlink(fc, bin.join("firecracker")).unwrap();
            symlink(jailer, bin.join("jailer")).unwrap();
        }
        Install::Release => {
            for (src, name) in [(fc, "firecracker"), (jailer, "jailer")] {
                let release = format!("{name}-v{version}-x86_64");
                std::fs::copy(src, bin.join(&release)).unwrap();
                symlink(&release, bin.join(name)).unwrap();
            }
        }
    }
    bin.join("firecracker")
}

/// The jail directory's name for `fc`: its file name once resolved.
fn resolved_name(fc: &Path) -> String {
    fc.canonicalize()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

async fn launch_paused(
    b: &FirecrackerBackend,
    spec: &bandsox_fsd::vmm::VmSpec,
    reaper: &Reaper,
) -> Result<Box<dyn VmmInstance>, String> {
    let inst = b.launch(spec).await.map_err(|e| format!("launch: {e}"))?;
    reaper.add(inst.pid());
    inst.pause()
        .await
        .map_err(|e| format!("pause after InstanceStart: {e}"))?;
    Ok(inst)
}

/// The jail of `spec` for binary name `name` holds the API socket, and it is the only
/// jail there.
fn jailed_as(spec: &bandsox_fsd::vmm::VmSpec, name: &str) -> Outcome {
    let base = spec.dir.join("jail");
    let id = JailerConfig::jail_id(&spec.dir).map_err(|e| e.to_string())?;
    let sock = base.join(name).join(&id).join("root/api.sock");
    let names: Vec<String> = std::fs::read_dir(&base)
        .map_err(|e| format!("{}: {e}", base.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    check!(
        sock.exists(),
        "no API socket at {} (jail holds {names:?})",
        sock.display()
    );
    check!(names == [name], "jail directories {names:?}, want [{name}]");
    Ok(())
}

async fn case(fx: &Fixture, how: Install, fc: &Path, jailer: &Path, version: &str) -> Outcome {
    let reaper = Reaper::default();
    let bin = fx.root.path().join(format!("bin-{how:?}").to_lowercase());
    let path_fc = install(how, &bin, fc, jailer, version);
    let found_jailer = find_beside(&path_fc).ok_or("no jailer found beside the install")?;
    let backend = FirecrackerBackend::probe(path_fc.clone())
        .map_err(|e| format!("probe: {e}"))?
        .with_jailer(Some(JailerConfig::new(found_jailer)));
    let spec = fx.vm("a1000000000a", None);
    let name = resolved_name(&path_fc);

    let inst = launch_paused(&backend, &spec, &reaper).await?;
    jailed_as(&spec, &name)?;
    let rec = load_record(&spec.dir).ok_or("no firecracker.json")?;
    check!(
        rec.exec_file().map(Path::new) == Some(path_fc.canonicalize().unwrap().as_path()),
        "recorded exec file {:?}",
        rec.exec_file()
    );
    eprintln!("  {how:?}: launched and paused, jailed as {name}");

    // Move the link (a copy install is replaced by another file): the running VM is
    // still recognised by what it was started with.
    let moved = bin.join("firecracker-moved");
    std::fs::copy(fc, &moved).map_err(|e| e.to_string())?;
    std::fs::remove_file(&path_fc).map_err(|e| e.to_string())?;
    match how {
        Install::Copy => std::fs::copy(&moved, &path_fc).map(drop),
        Install::Link | Install::Release => symlink("firecracker-moved", &path_fc),
    }
    .map_err(|e| e.to_string())?;
    let pid = inst.pid();
    drop(inst);
    let adopted = adopt_dir(&spec.dir).ok_or("not adopted after the link was moved")?;
    check!(
        adopted.pid() == pid,
        "adopted pid {}, want {pid}",
        adopted.pid()
    );
    let info = adopted
        .api()
        .instance_info()
        .await
        .map_err(|e| e.to_string())?;
    check!(info.state == "Paused", "adopted VM state {}", info.state);
    adopted.kill().await.map_err(|e| e.to_string())?;
    check!(!alive(pid), "pid {pid} alive after kill");

    // The next start runs what the link names now.
    let again = launch_paused(&backend, &spec, &reaper).await?;
    let now = resolved_name(&path_fc);
    jailed_as(&spec, &now)?;
    eprintln!("  {how:?}: after the move, jailed as {now}");
    let pid2 = again.pid();
    again.kill().await.map_err(|e| e.to_string())?;
    check!(!alive(pid2), "pid {pid2} alive after kill");
    rmdir(&spec)?;
    std::fs::remove_dir_all(&bin).map_err(|e| e.to_string())?;
    Ok(())
}

#[test]
fn real_firecracker_contract_installs() {
    let (fcs, jailer, _) = super::find_binaries();
    let (Some(fc), Some(jailer)) = (fcs.first(), jailer) else {
        return skip("installs: needs a firecracker and a jailer");
    };
    if !is_root() {
        return skip("installs: needs root (the jailer)");
    }
    let fx = match Fixture::new() {
        Ok(f) => f,
        Err(e) => return skip(&e),
    };
    // The real files, whatever links led to them.
    let (fc, jailer) = (fc.canonicalize().unwrap(), jailer.canonicalize().unwrap());
    let version = FirecrackerBackend::probe(fc.clone())
        .expect("probe the binary under test")
        .version()
        .to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut failures = Vec::new();
    rt.block_on(async {
        for how in [Install::Copy, Install::Link, Install::Release] {
            eprintln!("firecracker_contract installs: {how:?} of {}", fc.display());
            if let Err(e) = case(&fx, how, &fc, &jailer, &version).await {
                failures.push(format!("{how:?}: {e}"));
            }
        }
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
