//! `fs/` of a stopped VM through [`GuestFs`], without root, a mount or a VM: the VM of
//! the in-process backend is stopped and its `disk.ext4` replaced by an image made with
//! `mkfs.ext4 -d`; lookups, attributes, listings and reads come from the image, changes
//! give EROFS with a message for `cat ctl`, a disk that is no ext4 gives ENODATA, a
//! corrupt one EIO, and once the VM runs again the view's numbers answer ESTALE.
mod inproc;

use std::sync::Arc;
use std::time::Duration;

use bandsox_fsd::error::{Error, Result};
use bandsox_fsd::guestfs::{DirItem, GuestFs, Looked, Owner, Target};
use bandsox_fsd::manager::vm::Vm;
use inproc::InProcBackend;

const T: Duration = Duration::from_secs(30);

/// Call a `GuestFs` operation and wait for its answer.
async fn ask<R: Send + 'static>(f: impl FnOnce(Box<dyn FnOnce(Result<R>) + Send>)) -> Result<R> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    f(Box::new(move |r| {
        let _ = tx.send(r);
    }));
    tokio::time::timeout(T, rx)
        .await
        .expect("answered in time")
        .expect("answered")
}

fn root(vm: &Vm) -> Target {
    Target::Root {
        vm_id: vm.id.clone(),
        generation: vm.generation(),
        ino: 4242,
    }
}

async fn lookup(g: &Arc<GuestFs>, parent: Target, name: &str) -> Result<Looked> {
    let name = name.as_bytes().to_vec();
    ask(|d| g.lookup(parent, name, d)).await
}

fn mkfs(dir: &std::path::Path, img: &std::path::Path) -> bool {
    let tree = dir.join("tree");
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(tree.join("root/d")).unwrap();
    std::fs::write(tree.join("root/d/hello"), "hello\n").unwrap();
    std::os::unix::fs::symlink("hello", tree.join("root/d/link")).unwrap();
    std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(img)
        .arg("8M")
        .output()
        .is_ok_and(|o| {
            if !o.status.success() {
                eprintln!("mkfs.ext4: {}", String::from_utf8_lossy(&o.stderr));
            }
            o.status.success()
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_vms_fs_is_its_disk_read_only() {
    let tmp = tempfile::tempdir().unwrap();
    let backend = InProcBackend::new();
    let mgr = inproc::manager(&tmp.path().join("state"), backend.clone());
    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    let vm = tokio::time::timeout(T, mgr.create("st", &[], uid, gid))
        .await
        .unwrap()
        .unwrap();
    let g = GuestFs::new(mgr.clone(), tokio::runtime::Handle::current());
    tokio::time::timeout(T, vm.stop()).await.unwrap().unwrap();
    let disk = vm.dir.join("disk.ext4");

    // The in-process backend's disk is zeros: no ext4 on it.
    let e = lookup(&g, root(&vm), "root").await.unwrap_err();
    assert_eq!(e.errno, libc::ENODATA, "{e}");
    assert!(
        vm.ctl_results().get(0).contains("no ext4"),
        "{}",
        vm.ctl_results().get(0)
    );

    if !mkfs(tmp.path(), &disk) {
        return; // no e2fsprogs
    }
    let r = lookup(&g, root(&vm), "root").await.unwrap();
    assert!(r.ino >= bandsox_fsd::guestfs::FS_INO_BASE);
    assert_eq!(r.attr.mode & libc::S_IFMT, libc::S_IFDIR);
    let d = lookup(&g, Target::Node(r.ino), "d").await.unwrap();
    let hello = lookup(&g, Target::Node(d.ino), "hello").await.unwrap();
    assert_eq!(hello.attr.size, 6);
    // The same number on the next lookup; a missing name is a negative entry.
    assert_eq!(
        lookup(&g, Target::Node(d.ino), "hello").await.unwrap().ino,
        hello.ino
    );
    assert_eq!(
        lookup(&g, Target::Node(d.ino), "nope").await.unwrap().ino,
        0
    );

    let opened = ask(|c| g.opendir(Target::Node(d.ino), c)).await.unwrap();
    let items: Vec<DirItem> = ask(|c| g.readdir(Target::Node(d.ino), opened.fh, 0, true, c))
        .await
        .unwrap();
    let mut names: Vec<_> = items.iter().map(|i| i.name.clone()).collect();
    names.sort();
    assert_eq!(names, [&b"."[..], b"..", b"hello", b"link"]);
    let listed = items.iter().find(|i| i.name == b"hello").unwrap();
    assert_eq!(listed.ino, hello.ino, "d_ino = st_ino");
    // From the offset after the last entry: nothing more.
    let last = items.last().unwrap().next_offset;
    let rest = ask(|c| g.readdir(Target::Node(d.ino), opened.fh, last, false, c))
        .await
        .unwrap();
    assert!(rest.is_empty());

    let link = lookup(&g, Target::Node(d.ino), "link").await.unwrap();
    let target = ask(|c| g.readlink(Target::Node(link.ino), c))
        .await
        .unwrap();
    assert_eq!(target, b"hello");
    let f = ask(|c| g.open(Target::Node(hello.ino), libc::O_RDONLY, c))
        .await
        .unwrap();
    let data = ask(|c| g.read(Target::Node(hello.ino), f.fh, 0, 4096, c))
        .await
        .unwrap();
    assert_eq!(data, b"hello\n");
    let data = ask(|c| g.read(Target::Node(hello.ino), f.fh, 2, 2, c))
        .await
        .unwrap();
    assert_eq!(data, b"ll");

    // Changes: EROFS, and `cat ctl` says to start the VM.
    let e = ask(|c| g.open(Target::Node(hello.ino), libc::O_WRONLY, c))
        .await
        .unwrap_err();
    assert_eq!(e.errno, libc::EROFS, "{e}");
    let owner = Owner { uid, gid };
    let e = ask(|c| g.mkdir(Target::Node(d.ino), b"x".to_vec(), 0o755, owner, c))
        .await
        .unwrap_err();
    assert_eq!(e.errno, libc::EROFS);
    let e: Error = ask(|c| g.unlink(Target::Node(d.ino), b"hello".to_vec(), false, c))
        .await
        .unwrap_err();
    assert_eq!(e.errno, libc::EROFS);
    assert!(
        vm.ctl_results().get(0).contains("start"),
        "{}",
        vm.ctl_results().get(0)
    );

    // A corrupt disk: EIO with a reason, and the daemon goes on.
    let good = std::fs::read(&disk).unwrap();
    std::fs::write(&disk, &good[..good.len() / 2]).unwrap();
    let e = lookup(&g, Target::Node(d.ino), "hello").await.unwrap_err();
    assert_eq!(e.errno, libc::EIO, "{e}");
    assert!(e.message.contains("truncated"), "{e}");

    // Running again: the view's numbers are stale, and the agent answers fs/.
    std::fs::write(&disk, &good).unwrap();
    tokio::time::timeout(T, vm.start(T)).await.unwrap().unwrap();
    let e = ask(|c| g.getattr(Target::Node(hello.ino), None, c))
        .await
        .unwrap_err();
    assert_eq!(e.errno, libc::ESTALE, "{e}");
    let e = lookup(&g, root(&vm), "nope-live").await;
    assert!(
        e.as_ref().is_ok_and(|l| l.ino == 0) || e.as_ref().is_err_and(|e| e.errno == libc::ENOENT)
    );
    let _ = tokio::time::timeout(T, vm.kill()).await;
}
