//! The agent client against a damaged connection: an in-process agent
//! (`Agent::serve_stream`) behind a [`FaultStream`] that delays, drops, truncates,
//! corrupts or closes the byte stream at a chosen byte. Whatever happens, every call
//! returns within its deadline with an error (never a hang, never a wrong answer), and
//! the client says whether the connection is still usable.
use std::time::{Duration, Instant};

use bandsox_agent::client::{AgentClient, ClientError, ExecEvent};
use bandsox_agent::faults::{Fault, FaultHandle, FaultStream, Faults};
use bandsox_agent::proto::ExitStatus;

mod common;
use common::{script, serve_duplex};

const T: Duration = Duration::from_secs(10);

/// A client connected (cleanly) to an in-process agent through a fault stream; faults
/// are armed afterwards through the handle.
async fn connect() -> (AgentClient, FaultHandle) {
    let stream = FaultStream::new(serve_duplex(), Faults::none());
    let handle = stream.handle();
    let (c, _) = AgentClient::connect(stream, T).await.expect("handshake");
    (c, handle)
}

/// Run `script` and collect its events until it ends (or 20 s pass).
async fn run(c: &AgentClient, source: &str) -> (Vec<u8>, Option<ExecEvent>) {
    let mut h = c.exec(script(source), T).await.expect("exec starts");
    let mut out = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match h.next().await {
                Some(ExecEvent::Output(_, d)) => out.extend(d),
                Some(e) => return Some(e),
                None => return None,
            }
        }
    })
    .await
    .expect("the command's stream ended in time");
    (out, end)
}

#[tokio::test]
async fn a_clean_stream_is_transparent() {
    let (c, _) = connect().await;
    c.ping(T).await.unwrap();
    let (out, end) = run(&c, "head -c 300000 /dev/zero").await;
    assert_eq!(out.len(), 300_000);
    assert!(matches!(end, Some(ExecEvent::Exited(ExitStatus::Code(0)))));
}

#[tokio::test]
async fn a_connection_closed_mid_output_loses_the_run_and_fails_later_calls_at_once() {
    let (c, h) = connect().await;
    h.arm(Faults::read(Fault::CloseAt { at: 100_000 }));
    let (out, end) = run(&c, "head -c 1000000 /dev/zero").await;
    assert!(
        out.len() < 1_000_000,
        "all output arrived through a closed stream"
    );
    assert!(matches!(end, Some(ExecEvent::Lost) | None), "{end:?}");
    let t0 = Instant::now();
    let e = c.ping(T).await.unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "ping waited for a dead connection"
    );
    assert!(matches!(e, ClientError::Closed | ClientError::Io(_)), "{e}");
    assert!(c.is_closed());
}

#[tokio::test]
async fn a_truncated_stream_ends_the_connection() {
    let (c, h) = connect().await;
    h.arm(Faults::read(Fault::TruncateAt { at: 50_000 }));
    let (_, end) = run(&c, "head -c 1000000 /dev/zero").await;
    assert!(matches!(end, Some(ExecEvent::Lost) | None), "{end:?}");
    tokio::time::timeout(T, c.closed())
        .await
        .expect("the client saw the end");
    assert!(c.ping(T).await.is_err());
}

#[tokio::test]
async fn a_silent_agent_times_out_instead_of_hanging() {
    let (c, h) = connect().await;
    // From now on nothing the agent sends arrives.
    h.arm(Faults::read(Fault::DropFrom { at: 0 }));
    let e = ping_fails_within(&c, Duration::from_millis(300), Duration::from_secs(3)).await;
    assert!(matches!(e, ClientError::Timeout), "{e}");
}

/// A ping with deadline `timeout` fails, and within `bound`; its error.
async fn ping_fails_within(c: &AgentClient, timeout: Duration, bound: Duration) -> ClientError {
    let t0 = Instant::now();
    let e = c.ping(timeout).await.unwrap_err();
    let took = t0.elapsed();
    assert!(took < bound, "the ping failed only after {took:?}: {e}");
    e
}

#[tokio::test]
async fn requests_the_agent_never_gets_time_out() {
    let (c, h) = connect().await;
    h.arm(Faults::write(Fault::DropFrom { at: 0 }));
    let e = c.ping(Duration::from_millis(300)).await.unwrap_err();
    assert!(matches!(e, ClientError::Timeout), "{e}");
}

#[tokio::test]
async fn a_corrupted_frame_header_fails_the_connection_not_the_process() {
    let (c, h) = connect().await;
    // The first byte the agent sends next is the start of a frame (its length): flipped,
    // the frame announces more bytes than ever come, and the reader waits for them.
    h.arm(Faults::read(Fault::CorruptAt { at: 0 }));
    let r = c.ping(Duration::from_secs(2)).await;
    assert!(r.is_err(), "a corrupted answer was accepted");
    // The timeout, with the reader stuck inside that frame, marks the stream out of step:
    // the connection is dead (so its owner reconnects) and later calls fail at once.
    assert!(c.is_closed(), "an out-of-step connection stayed open");
    later_calls_fail_at_once(&c).await;
}

/// A dead connection answers every later call with `Closed`, without waiting.
async fn later_calls_fail_at_once(c: &AgentClient) {
    let e = ping_fails_within(c, Duration::from_secs(5), Duration::from_secs(1)).await;
    assert!(matches!(e, ClientError::Closed), "{e}");
}

#[tokio::test]
async fn an_undecodable_frame_fails_requests_in_flight_with_a_protocol_error_at_once() {
    let (c, h) = connect().await;
    // Byte 4 is the first byte of the next frame's payload (the message tag): flipped,
    // the frame cannot be decoded.
    h.arm(Faults::read(Fault::CorruptAt { at: 4 }));
    // Answered at once, not at the ping's deadline.
    let e = ping_fails_within(&c, Duration::from_secs(10), Duration::from_secs(2)).await;
    assert!(matches!(e, ClientError::Protocol(_)), "{e}");
    assert!(c.is_closed());
    later_calls_fail_at_once(&c).await;
}

#[tokio::test]
async fn a_slow_link_still_works_within_deadlines() {
    let (c, h) = connect().await;
    h.arm(Faults {
        read: Fault::Delay(Duration::from_millis(20)),
        write: Fault::Delay(Duration::from_millis(20)),
    });
    let (out, end) = run(&c, "echo slow-but-whole").await;
    assert_eq!(out, b"slow-but-whole\n");
    assert!(matches!(end, Some(ExecEvent::Exited(ExitStatus::Code(0)))));
}
