//! Test-only pause points, so end-to-end tests can kill the daemon at an exact step of an
//! operation instead of after a guessed delay.
//!
//! `BANDSOX_TEST_PAUSE_AT=POINT[,POINT...]` (tests only, never set in service): when a
//! task of the daemon reaches a listed point it logs `test hook: paused at POINT`
//! (warn level, in `daemon.log`) and waits there for ever; the rest of the daemon keeps
//! serving. The test then kills the daemon (`kill -9`) and checks what the next daemon
//! makes of the half-done operation (tests/e2e/t-36-clone-crash-points.sh).
//!
//! Invariants:
//! - Unset, a point costs one look at a value read once per process; nothing else
//!   changes. Set, the daemon says so at start (warn), like every test-only switch.
//! - A point is only ever placed where the daemon may also die for real (a SIGKILL can
//!   land anywhere), so a pause never creates a state a crash could not.
use std::sync::OnceLock;

/// The environment variable naming the points.
pub const ENV: &str = "BANDSOX_TEST_PAUSE_AT";

/// The named points, in the order a `clone` reaches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// A clone's VMM runs but has not loaded the snapshot yet (QEMU: started with
    /// `-incoming defer`, before `migrate-incoming`); `vm.json` says `restoring`.
    CloneVmmStarted,
    /// The clone's VMM has loaded the snapshot and runs the guest; `vm.json` says
    /// `identity-pending`; the agent has not been contacted.
    CloneRestored,
    /// The clone took its identity (hostname, entropy, machine id, clock); `running`
    /// is not recorded yet.
    CloneIdentitySet,
}

impl Point {
    pub const ALL: [Point; 3] = [
        Point::CloneVmmStarted,
        Point::CloneRestored,
        Point::CloneIdentitySet,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Point::CloneVmmStarted => "clone-vmm-started",
            Point::CloneRestored => "clone-restored",
            Point::CloneIdentitySet => "clone-identity-set",
        }
    }
}

fn armed() -> &'static [Point] {
    static ARMED: OnceLock<Vec<Point>> = OnceLock::new();
    ARMED.get_or_init(|| match std::env::var(ENV) {
        Ok(v) => parse(&v),
        Err(_) => Vec::new(),
    })
}

/// The points named in `value` (comma-separated); unknown names are logged and ignored.
fn parse(value: &str) -> Vec<Point> {
    value
        .split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .filter_map(|w| {
            let p = Point::ALL.into_iter().find(|p| p.as_str() == w);
            if p.is_none() {
                tracing::warn!("{ENV}: unknown point {w:?} ignored");
            }
            p
        })
        .collect()
}

/// Log, once at start, that pause points are armed (a no-op when none is).
pub fn announce() {
    let points = armed();
    if !points.is_empty() {
        let names: Vec<_> = points.iter().map(|p| p.as_str()).collect();
        tracing::warn!(
            "TEST HOOK: {ENV}={} is set: tasks reaching these points stop there for ever. \
             Never use it for a service.",
            names.join(",")
        );
    }
}

/// Stop here for ever when `point` is armed (for VM `vm`); return at once otherwise.
pub async fn pause_at(point: Point, vm: &str) {
    if armed().contains(&point) {
        tracing::warn!(vm, "test hook: paused at {}", point.as_str());
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_points_and_skips_the_rest() {
        assert_eq!(
            parse("clone-restored, nonsense,clone-identity-set,"),
            [Point::CloneRestored, Point::CloneIdentitySet]
        );
        assert!(parse("").is_empty());
        for p in Point::ALL {
            assert_eq!(parse(p.as_str()), [p]);
        }
    }
}
