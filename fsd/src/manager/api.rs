//! The seam between the filesystem core (`vfs`, `guestfs`, `core`) and the manager: the
//! cores reach the manager only through [`ManagerApi`], never through `Manager`'s
//! fields or its other methods, so a test can put a wrapper in between (to slow an
//! operation down, make it fail, or count calls) without touching the cores.
//!
//! Invariants: every method here is what a user's file operation needs, named as the
//! tree shows it; the slow ones (`create`, `delete`, `delete_snapshot`, `execute`) are
//! async and own their arguments, so the cores can run them as tasks of their own; the
//! others answer from memory or local files and never wait on a guest.
use std::sync::Arc;

use async_trait::async_trait;

use super::ctl::Command;
use super::vm::Vm;
use super::Manager;
use crate::ctl::CtlResults;
use crate::error::Result;
use crate::events::EventLog;

/// What the filesystem core needs of the manager (see the module docs).
#[async_trait]
pub trait ManagerApi: Send + Sync + 'static {
    /// The VM named `name`.
    fn get(&self, name: &str) -> Option<Arc<Vm>>;
    /// The VM with state-directory id `id` (the tree names VMs by id).
    fn get_by_id(&self, id: &str) -> Option<Arc<Vm>>;
    /// Every VM, in name order.
    fn list(&self) -> Vec<Arc<Vm>>;
    /// `mkdir NAME`: create a VM with the defaults and boot it.
    async fn create(self: Arc<Self>, name: String, uid: u32, gid: u32) -> Result<Arc<Vm>>;
    /// `rmdir NAME`: stop and delete a VM.
    async fn delete(self: Arc<Self>, name: String) -> Result<()>;

    /// Image names.
    fn images(&self) -> Vec<String>;
    /// The uid that imported or pulled image `name` (0 when unknown).
    fn image_owner(&self, name: &str) -> u32;
    /// `images/NAME/info`.
    fn image_info(&self, name: &str) -> Result<String>;
    /// `rmdir images/NAME` (ownership is checked by the caller).
    fn remove_image(&self, name: &str) -> Result<()>;

    /// Snapshot names.
    fn snapshots(&self) -> Vec<String>;
    /// Owner uid and gid of snapshot `name`, if it can be read.
    fn snapshot_owner(&self, name: &str) -> Option<(u32, u32)>;
    /// `snapshots/NAME/info`.
    fn snapshot_info(&self, name: &str) -> Result<String>;
    /// `rmdir snapshots/NAME` (ownership is checked by the caller).
    async fn delete_snapshot(self: Arc<Self>, name: String) -> Result<()>;

    /// The root `ctl`'s last result per session.
    fn ctl_results(&self) -> &CtlResults;
    /// Execute one parsed control-file command for `uid`/`gid` (see `manager::ctl`).
    async fn execute(self: Arc<Self>, cmd: Command, uid: u32, gid: u32) -> Result<String>;
    /// The `defaults` file's text.
    fn defaults_text(&self) -> String;
    /// The `usage` file as `uid` sees it.
    fn usage_text(&self, uid: u32) -> String;
    /// The event log (`events` files, and the VM-event feed of kernel invalidations).
    fn events(&self) -> &Arc<EventLog>;
}

#[async_trait]
impl ManagerApi for Manager {
    fn get(&self, name: &str) -> Option<Arc<Vm>> {
        Manager::get(self, name)
    }
    fn get_by_id(&self, id: &str) -> Option<Arc<Vm>> {
        Manager::get_by_id(self, id)
    }
    fn list(&self) -> Vec<Arc<Vm>> {
        Manager::list(self)
    }
    async fn create(self: Arc<Self>, name: String, uid: u32, gid: u32) -> Result<Arc<Vm>> {
        Manager::create(&self, &name, &[], uid, gid).await
    }
    async fn delete(self: Arc<Self>, name: String) -> Result<()> {
        Manager::delete(&self, &name).await
    }
    fn images(&self) -> Vec<String> {
        Manager::images(self)
    }
    fn image_owner(&self, name: &str) -> u32 {
        Manager::image_owner(self, name)
    }
    fn image_info(&self, name: &str) -> Result<String> {
        Manager::image_info(self, name)
    }
    fn remove_image(&self, name: &str) -> Result<()> {
        Manager::remove_image(self, name)
    }
    fn snapshots(&self) -> Vec<String> {
        Manager::snapshots(self)
    }
    fn snapshot_owner(&self, name: &str) -> Option<(u32, u32)> {
        Manager::snapshot_owner(self, name)
    }
    fn snapshot_info(&self, name: &str) -> Result<String> {
        Manager::snapshot_info(self, name)
    }
    async fn delete_snapshot(self: Arc<Self>, name: String) -> Result<()> {
        Manager::delete_snapshot(&self, &name).await
    }
    fn ctl_results(&self) -> &CtlResults {
        Manager::ctl_results(self)
    }
    async fn execute(self: Arc<Self>, cmd: Command, uid: u32, gid: u32) -> Result<String> {
        Manager::execute(&self, cmd, uid, gid).await
    }
    fn defaults_text(&self) -> String {
        self.defaults().to_defaults()
    }
    fn usage_text(&self, uid: u32) -> String {
        Manager::usage_text(self, uid)
    }
    fn events(&self) -> &Arc<EventLog> {
        &self.events
    }
}
