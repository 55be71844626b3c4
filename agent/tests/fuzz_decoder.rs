//! Property tests ("fuzzing" in `cargo test`): the decoder never panics, never allocates
//! beyond the frame limit and always terminates, whatever the input.
use bandsox_agent::proto::codec::{decode_frame, encode_frame, FrameReader};
use bandsox_agent::proto::*;
use proptest::prelude::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

/// Feed `bytes` to every decoder entry point.
fn exercise(bytes: &[u8]) {
    let _ = decode_frame(bytes);
    let _ = decode_message(bytes);
    rt().block_on(async {
        let mut r = FrameReader::new(bytes);
        // Each call consumes input or fails, so this ends.
        for _ in 0..bytes.len() + 1 {
            if r.next().await.is_err() {
                break;
            }
        }
        let mut r = FrameReader::new(bytes);
        for _ in 0..bytes.len() + 1 {
            if r.scan_sync().await.is_err() {
                break;
            }
            let _ = r.next().await;
        }
    });
}

fn valid_frames() -> Vec<Vec<u8>> {
    let msgs = [
        Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            nonce: 1,
        }),
        Message::Request {
            id: 3,
            req: Request::Exec(ExecSpec {
                program: Program::Argv(vec![b"ls".to_vec(), b"-l".to_vec()]),
                env: vec![(b"K".to_vec(), b"V".to_vec())],
                cwd: Some(b"/".to_vec()),
                stdin: true,
            }),
        },
        Message::Output {
            id: 9,
            stream: OutStream::Stdout,
            data: b"hello world".to_vec(),
        },
        Message::Response {
            id: 2,
            resp: Response::Error {
                errno: 2,
                message: "nope".into(),
            },
        },
        Message::Exited {
            id: 9,
            status: ExitStatus::Code(3),
        },
    ];
    msgs.iter().map(|m| encode_frame(m).unwrap()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        exercise(&bytes);
    }

    #[test]
    fn mutated_valid_frames(which in 0usize..5, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
                            prefix in proptest::collection::vec(any::<u8>(), 0..16), magic in any::<bool>()) {
        let mut bytes = prefix;
        if magic {
            bytes.extend_from_slice(&SYNC_MAGIC);
        }
        let frame = &valid_frames()[which];
        let start = bytes.len();
        bytes.extend_from_slice(frame);
        for (pos, val) in flips {
            let i = start + pos % frame.len();
            bytes[i] = val;
        }
        exercise(&bytes);
    }

    #[test]
    fn roundtrip(id in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 0..1024), err in any::<bool>()) {
        let stream = if err { OutStream::Stderr } else { OutStream::Stdout };
        let m = Message::Output { id, stream, data };
        let f = encode_frame(&m).unwrap();
        let (d, used) = decode_frame(&f).unwrap().unwrap();
        prop_assert_eq!(d, m);
        prop_assert_eq!(used, f.len());
    }
}
