//! What each reader of `events` sees: the event log filtered to the lines they may see
//! (see `events` for the stored scope of each line).
//!
//! - `/events` read by root: every line; by a user: daemon-wide and image lines, and the
//!   lines of their own VMs and snapshots (like `ls`, which shows them only their VMs'
//!   insides).
//! - `<vm>/events` (mode 0400, its owner): the lines of that VM only.
//!
//! A view is a growing file of its own: offsets count the bytes of its visible lines, so
//! `cat` ends at the current end and `tail -f` follows it by size. Views are kept per
//! filter (root, a uid, a VM) and shared by every open file and `stat` with that filter;
//! each scans the log only once, incrementally, and keeps sparse checkpoints (offset in
//! the view → position in the log) for reads at any offset. Rotation of the log
//! (`events.log` → `events.log.1`) is followed: the view continues in the new file at
//! the same offsets; only the current and the previous file are kept readable, and a
//! reader still behind them is moved forward (with a note), like a capped console.
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::Result;
use crate::events::Scope;

/// Which lines a view shows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Filter {
    /// root: everything.
    All,
    /// A user: public lines and their own.
    Owner(u32),
    /// One VM's lines.
    Vm(String),
}

impl Filter {
    /// The `/events` filter for a caller.
    pub fn for_uid(uid: u32) -> Filter {
        if uid == 0 {
            Filter::All
        } else {
            Filter::Owner(uid)
        }
    }

    /// The public text of a stored line if this filter shows it.
    fn show<'a>(&self, line: &'a [u8]) -> Option<&'a [u8]> {
        match Scope::parse(line) {
            Some((scope, public)) => {
                let ok = match self {
                    Filter::All => true,
                    Filter::Owner(u) => scope.owner.is_none() || scope.owner == Some(*u),
                    Filter::Vm(id) => scope.vm_id.as_deref() == Some(id.as_str()),
                };
                ok.then_some(public)
            }
            // Unscoped lines (written before scopes existed): root only.
            None => matches!(self, Filter::All).then_some(line),
        }
    }
}

/// A checkpoint every this many view bytes, or log bytes, at a visible line start.
const CHECK_VIEW: u64 = 64 * 1024;
const CHECK_RAW: u64 = 1024 * 1024;
/// Log files a view keeps open (current and previous).
const KEEP_SEGMENTS: usize = 2;

struct Segment {
    file: File,
    ino: u64,
    /// Log bytes scanned (whole lines only).
    scanned: u64,
    /// View offset of this segment's first visible byte.
    base: u64,
}

#[derive(Clone, Copy)]
struct Checkpoint {
    view: u64,
    seg: u64,
    raw: u64,
}

struct View {
    path: PathBuf,
    filter: Filter,
    /// Segment number of `segs[0]` (segments are numbered from the view's start).
    first_seg: u64,
    segs: Vec<Segment>,
    len: u64,
    checks: Vec<Checkpoint>,
}

impl View {
    fn new(path: PathBuf, filter: Filter) -> View {
        View {
            path,
            filter,
            first_seg: 0,
            segs: Vec::new(),
            len: 0,
            checks: Vec::new(),
        }
    }

    /// View offset where the kept segments start.
    fn start(&self) -> u64 {
        self.segs.first().map(|s| s.base).unwrap_or(self.len)
    }

    /// Scan what was appended (and follow a rotation).
    fn refresh(&mut self) {
        if let Some(cur) = self.segs.len().checked_sub(1) {
            self.scan(cur);
        }
        let Ok(meta) = std::fs::metadata(&self.path) else {
            return;
        };
        if self.segs.last().map(|s| s.ino) == Some(meta.ino()) {
            return;
        }
        // A new file at the path: the log rotated (or this is the first look).
        let Ok(file) = File::open(&self.path) else {
            return;
        };
        let seg_no = self.first_seg + self.segs.len() as u64;
        self.segs.push(Segment {
            file,
            ino: meta.ino(),
            scanned: 0,
            base: self.len,
        });
        self.checks.push(Checkpoint {
            view: self.len,
            seg: seg_no,
            raw: 0,
        });
        while self.segs.len() > KEEP_SEGMENTS {
            self.segs.remove(0);
            self.first_seg += 1;
            let first = self.first_seg;
            self.checks.retain(|c| c.seg >= first);
        }
        let cur = self.segs.len() - 1;
        self.scan(cur);
    }

    /// Scan segment `i` from where it was left to its last complete line.
    fn scan(&mut self, i: usize) {
        let seg_no = self.first_seg + i as u64;
        let mut pos = self.segs[i].scanned;
        let mut f = &self.segs[i].file;
        if f.seek(SeekFrom::Start(pos)).is_err() {
            return;
        }
        let mut buf = vec![0u8; 256 * 1024];
        let mut carry: Vec<u8> = Vec::new();
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            carry.extend_from_slice(&buf[..n]);
            let mut line_start = 0;
            while let Some(nl) = carry[line_start..].iter().position(|&b| b == b'\n') {
                let line = &carry[line_start..line_start + nl];
                if let Some(public) = self.filter.show(line) {
                    let last = self.checks.last().copied();
                    if last.is_none_or(|c| {
                        self.len - c.view >= CHECK_VIEW
                            || c.seg != seg_no
                            || pos - c.raw >= CHECK_RAW
                    }) {
                        self.checks.push(Checkpoint {
                            view: self.len,
                            seg: seg_no,
                            raw: pos,
                        });
                    }
                    self.len += public.len() as u64 + 1;
                }
                pos += nl as u64 + 1;
                line_start += nl + 1;
            }
            carry.drain(..line_start);
            f = &self.segs[i].file;
        }
        self.segs[i].scanned = pos;
    }

    /// Up to `size` view bytes at `off` (>= `start()`).
    fn read(&self, off: u64, size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        if off >= self.len {
            return out;
        }
        let idx = self.checks.partition_point(|c| c.view <= off);
        let Some(cp) = idx.checked_sub(1).map(|i| self.checks[i]) else {
            return out;
        };
        let mut view = cp.view;
        let mut seg = cp.seg;
        let mut raw = cp.raw;
        let end = off.saturating_add(size as u64).min(self.len);
        let mut buf = vec![0u8; 256 * 1024];
        'segs: while view < end {
            let Some(s) = seg
                .checked_sub(self.first_seg)
                .and_then(|i| usize::try_from(i).ok())
                .and_then(|i| self.segs.get(i))
            else {
                break;
            };
            let mut carry: Vec<u8> = Vec::new();
            while raw < s.scanned {
                let want = usize::try_from(s.scanned - raw).map_or(buf.len(), |w| w.min(buf.len()));
                let n = match s.file.read_at(&mut buf[..want], raw) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                raw += n as u64;
                carry.extend_from_slice(&buf[..n]);
                let mut ls = 0;
                while let Some(nl) = carry[ls..].iter().position(|&b| b == b'\n') {
                    if let Some(public) = self.filter.show(&carry[ls..ls + nl]) {
                        let line_len = public.len() as u64 + 1;
                        if view + line_len > off {
                            let from =
                                usize::try_from(off.saturating_sub(view)).unwrap_or(usize::MAX);
                            let mut full = public.to_vec();
                            full.push(b'\n');
                            let to = usize::try_from(end - view)
                                .map_or(full.len(), |t| t.min(full.len()));
                            out.extend_from_slice(&full[from.min(to)..to]);
                        }
                        view += line_len;
                        if view >= end {
                            break 'segs;
                        }
                    }
                    ls += nl + 1;
                }
                carry.drain(..ls);
            }
            seg += 1;
            raw = 0;
        }
        out
    }
}

/// Every view of one event log, shared by all readers.
pub struct EventViews {
    path: PathBuf,
    views: Mutex<HashMap<Filter, Arc<Mutex<View>>>>,
}

/// More filters than this and the cache starts over (each view is cheap to rebuild).
const MAX_VIEWS: usize = 4096;

impl EventViews {
    pub fn new(path: PathBuf) -> EventViews {
        EventViews {
            path,
            views: Mutex::new(HashMap::new()),
        }
    }

    fn view(&self, f: &Filter) -> Arc<Mutex<View>> {
        let mut views = self.views.lock();
        if views.len() >= MAX_VIEWS && !views.contains_key(f) {
            views.clear();
        }
        views
            .entry(f.clone())
            .or_insert_with(|| Arc::new(Mutex::new(View::new(self.path.clone(), f.clone()))))
            .clone()
    }

    /// The view's current size (what `stat` shows this reader).
    pub fn len(&self, f: &Filter) -> u64 {
        let v = self.view(f);
        let mut v = v.lock();
        v.refresh();
        v.len
    }

    /// An open `events` file with this filter.
    pub fn open(&self, f: &Filter) -> EventsHandle {
        EventsHandle {
            view: self.view(f),
            skew: Mutex::new(0),
        }
    }
}

/// One open `events` file.
pub struct EventsHandle {
    view: Arc<Mutex<View>>,
    /// Added to the kernel's offset when the reader was moved past dropped lines.
    skew: Mutex<u64>,
}

impl EventsHandle {
    pub fn read(&self, offset: u64, size: u32) -> Result<Vec<u8>> {
        let size = size.min(4 * 1024 * 1024) as usize;
        let mut v = self.view.lock();
        v.refresh();
        let mut skew = self.skew.lock();
        let at = offset.saturating_add(*skew);
        let start = v.start();
        if at >= start {
            return Ok(v.read(at, size));
        }
        let skipped = start - at;
        let note = format!("[bandsox: {skipped} bytes of older events were rotated away]\n");
        let mut out = Vec::new();
        if skipped >= note.len() as u64 && note.len() < size {
            out.extend_from_slice(note.as_bytes());
            *skew += skipped - note.len() as u64;
        } else {
            *skew += skipped;
        }
        out.extend_from_slice(&v.read(start, size - out.len()));
        Ok(out)
    }
}

#[allow(
    clippy::cast_possible_truncation,
    reason = "test code: sizes, offsets and ids are small values the test constructs"
)]
#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventLog, Scopes};

    struct Owners;
    impl Scopes for Owners {
        fn vm_scope(&self, name: &str) -> Option<(u32, String)> {
            match name {
                "a" => Some((1000, "id-a".into())),
                "b" => Some((1001, "id-b".into())),
                _ => None,
            }
        }
    }

    fn read_all(h: &EventsHandle, chunk: u32) -> String {
        let mut out = Vec::new();
        loop {
            let b = h.read(out.len() as u64, chunk).unwrap();
            if b.is_empty() {
                break;
            }
            out.extend_from_slice(&b);
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn each_reader_sees_only_their_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.log");
        let log = EventLog::open(&path).unwrap();
        let owners: Arc<dyn Scopes> = Arc::new(Owners);
        log.set_scopes(Arc::downgrade(&owners));
        std::fs::write(&path, "2020-01-01T00:00:00Z old legacy-line\n").unwrap();
        let log = EventLog::open(&path).unwrap();
        log.set_scopes(Arc::downgrade(&owners));
        for i in 0..2000 {
            log.emit("a", "ran", &format!("i={i}"));
            log.emit("b", "ran", &format!("i={i}"));
            if i % 100 == 0 {
                log.emit("", "daemon-start", "");
                log.emit("images/x", "imported", "");
            }
        }
        let views = EventViews::new(path.clone());
        let root = read_all(&views.open(&Filter::All), 4096);
        let alice = read_all(&views.open(&Filter::Owner(1000)), 4096);
        let bob = read_all(&views.open(&Filter::Owner(1001)), 777);
        let vm_a = read_all(&views.open(&Filter::Vm("id-a".into())), 100_000);
        assert_eq!(root.lines().count(), 1 + 4000 + 40);
        assert!(root.contains("old legacy-line") && !root.contains("u="));
        assert_eq!(alice.lines().count(), 2000 + 40);
        assert!(!alice.contains(" b ran") && !alice.contains("legacy"));
        assert_eq!(bob.lines().count(), 2000 + 40);
        assert!(!bob.contains(" a ran"));
        assert_eq!(vm_a.lines().count(), 2000);
        assert_eq!(views.len(&Filter::Owner(1000)), alice.len() as u64);
        // Reads at any offset agree with the whole (tail reads near the end).
        let h = views.open(&Filter::Owner(1000));
        for off in [
            0u64,
            1,
            5000,
            alice.len() as u64 / 2 + 3,
            alice.len() as u64 - 10,
        ] {
            let got = h.read(off, 300).unwrap();
            let end = (off as usize + 300).min(alice.len());
            assert_eq!(
                got,
                alice.as_bytes()[off as usize..end].to_vec(),
                "off {off}"
            );
        }
        // Growth is seen; rotation is followed at the same offsets.
        let before = views.len(&Filter::Owner(1000));
        log.emit("a", "later", "");
        assert!(views.len(&Filter::Owner(1000)) > before);
        std::fs::rename(&path, dir.path().join("events.log.1")).unwrap();
        let log2 = EventLog::open(&path).unwrap();
        log2.set_scopes(Arc::downgrade(&owners));
        log2.emit("a", "after-rotation", "");
        let now = views.len(&Filter::Owner(1000));
        let tail = h.read(before, 4096).unwrap();
        let tail = String::from_utf8(tail).unwrap();
        assert!(
            tail.contains(" a later") && tail.contains(" a after-rotation"),
            "{tail}"
        );
        assert_eq!(before + tail.len() as u64, now);
    }
}
