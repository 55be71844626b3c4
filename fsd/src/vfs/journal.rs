//! The one path by which control-tree outcomes reach `cat ctl`.
//!
//! Reading `ctl` (or `<vm>/ctl`) gives the caller session's last result. Every operation
//! that reports there runs through a [`Journal`]: the lines written to a control file
//! (and a line dropped unrun), an `exec` that is refused or fails to start, and every
//! `mkdir`/`rmdir` of the control tree, refused or not.
//!
//! - [`Journal::finish`] records the outcome the caller is answered with and hands it
//!   back; [`Journal::refuse`] records a refusal and hands back its error. The
//!   operations that report build their answer through one of them, so an answer that
//!   is not recorded cannot be returned (a [`Journal`] is `#[must_use]`).
//! - [`Journal::detach`] runs a slow operation (a boot, a deletion, a pull, a start) as
//!   a task of its own: an interrupted caller gets `EINTR` at once, the operation goes
//!   on, and its eventual outcome is recorded when it ends.
//!
//! Invariants:
//! - `CtlResults::record` is called from this module only.
//! - A detached operation's late outcome is recorded after the `EINTR` its caller was
//!   answered with, never before (one lock orders them), so `cat ctl` ends with what
//!   really happened.
//! - A failure is always recorded; a success when it has something to say (a control
//!   command's `ok: ...`), and when it comes late (`ok: rmdir NAME`), since the caller
//!   was told `EINTR` (a started `exec` shows itself in `runs/` instead).
use std::future::Future;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::manager::runs::Run;
use crate::manager::vm::Vm;
use crate::manager::ManagerApi;

/// Whose `ctl` shows an outcome.
#[derive(Clone)]
pub enum Scope {
    /// The root `ctl`.
    Root(Arc<dyn ManagerApi>),
    /// A VM's `ctl`.
    Vm(Arc<Vm>),
    /// A file whose outcomes nobody reads (`runs/<n>/ctl`, `winsize`, `defaults`).
    Unshown,
}

/// What a success says in `cat ctl`, if anything.
pub trait Report {
    /// The text of a success its caller was answered with (None: the session's result
    /// stays as it was).
    fn report(&self) -> Option<String> {
        None
    }
    /// The text of a success that came after its caller was answered `EINTR`.
    fn late(&self, what: Option<&str>) -> Option<String> {
        Some(self.report().unwrap_or_else(|| match what {
            Some(what) => format!("ok: {what}"),
            None => "ok".to_string(),
        }))
    }
}

/// A control-file command's success text (`ok: paused`; empty: nothing to show).
impl Report for String {
    fn report(&self) -> Option<String> {
        Some(self.clone()).filter(|s| !s.is_empty())
    }
}

impl Report for () {}

impl Report for Arc<Vm> {}

/// A started `exec`: its run shows it (a late start is also interrupted, see `exec`).
impl Report for Arc<Run> {
    fn late(&self, _what: Option<&str>) -> Option<String> {
        None
    }
}

/// Records one operation's outcome for one session (see the module docs).
#[must_use = "an outcome is recorded only through Journal::finish or Journal::refuse"]
pub struct Journal {
    inner: Arc<Inner>,
}

struct Inner {
    scope: Scope,
    session: u32,
    /// The operation (`mkdir a`): the context of its errors and the text of a late success.
    what: Option<String>,
    late: Mutex<Late>,
}

#[derive(Default)]
struct Late {
    /// The caller's answer was recorded (or will never be).
    answered: bool,
    /// A late outcome that came before the caller's answer was recorded.
    parked: Option<Result<String>>,
}

impl Journal {
    /// A journal of `session`'s operation `what` (None: errors keep their own words).
    pub fn new(scope: Scope, session: u32, what: Option<String>) -> Journal {
        Journal {
            inner: Arc::new(Inner {
                scope,
                session,
                what,
                late: Mutex::new(Late::default()),
            }),
        }
    }

    /// Record the outcome the caller is answered with, and return it (errors in the
    /// operation's context).
    pub fn finish<T: Report>(self, res: Result<T>) -> Result<T> {
        let res = res.map_err(|e| self.inner.context(e));
        let text = match &res {
            Ok(v) => v.report().map(Ok),
            Err(e) => Some(Err(e.clone())),
        };
        let mut late = self.inner.late.lock();
        if let Some(text) = text {
            self.inner.put(text);
        }
        self.inner.answered(&mut late);
        res
    }

    /// Record a refusal (nothing ran) and return its error, in the operation's context.
    pub fn refuse(self, e: Error) -> Error {
        match self.finish::<()>(Err(e)) {
            Err(e) => e,
            Ok(()) => Error::io("a refusal was recorded as a success"),
        }
    }

    /// Record a failure nobody is answered with (a writer killed, a line dropped at
    /// release): `cat ctl` is where it shows.
    pub fn unanswered(self, e: Error) {
        drop(self.refuse(e));
    }

    /// Run `op` as a task of its own and wait for it, unless the caller (`pid`) is
    /// interrupted: then answer `EINTR` at once and record `op`'s outcome when it ends.
    pub async fn detach<T, F>(&self, pid: u32, op: F) -> Result<T>
    where
        T: Report + Send + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
    {
        self.detach_with(pid, op, |_: &Result<T>| {}).await
    }

    /// [`Journal::detach`], and `on_late` sees an outcome that came too late.
    pub async fn detach_with<T, F, L>(&self, pid: u32, op: F, on_late: L) -> Result<T>
    where
        T: Report + Send + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
        L: FnOnce(&Result<T>) + Send + 'static,
    {
        let inner = self.inner.clone();
        let abandoned = move |out: Result<T>| {
            on_late(&out);
            inner.late(out);
        };
        match crate::interrupt::detachable(pid, op, abandoned).await {
            Ok(out) => out,
            Err(e) if e.errno == libc::EINTR => Err(Error::new(
                libc::EINTR,
                "interrupted; it goes on, and reading ctl shows its result when it ends",
            )),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Journal {
    /// A journal dropped without an answer (a panic, a cancelled request) still lets
    /// late outcomes through.
    fn drop(&mut self) {
        let mut late = self.inner.late.lock();
        self.inner.answered(&mut late);
    }
}

impl Inner {
    /// `e` in the operation's context (once: an error already in it is left alone).
    fn context(&self, e: Error) -> Error {
        match &self.what {
            Some(what) if !e.message.starts_with(&format!("{what}: ")) => e.with_context(what),
            _ => e,
        }
    }

    /// The outcome of a detached operation whose caller was interrupted.
    fn late<T: Report>(&self, out: Result<T>) {
        let text = match out {
            Ok(v) => match v.late(self.what.as_deref()) {
                Some(text) => Ok(text),
                None => return,
            },
            Err(e) => Err(self.context(e)),
        };
        let mut late = self.late.lock();
        if late.answered {
            self.put(text);
        } else {
            late.parked = Some(text);
        }
    }

    fn answered(&self, late: &mut Late) {
        late.answered = true;
        if let Some(text) = late.parked.take() {
            self.put(text);
        }
    }

    fn put(&self, outcome: Result<String>) {
        let results = match &self.scope {
            Scope::Root(mgr) => mgr.ctl_results(),
            Scope::Vm(vm) => vm.ctl_results(),
            Scope::Unshown => return,
        };
        results.record(self.session, outcome);
    }
}
