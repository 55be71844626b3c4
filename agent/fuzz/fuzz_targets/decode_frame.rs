//! Fuzz target: every decoder entry point on arbitrary bytes must return (Ok or Err)
//! without panicking, hanging or allocating more than one frame.
#![no_main]

use bandsox_agent::proto::codec::{decode_frame, decode_message, FrameReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_frame(data);
    let _ = decode_message(data);
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else {
        return;
    };
    rt.block_on(async {
        let mut r = FrameReader::new(data);
        for _ in 0..=data.len() {
            if r.next().await.is_err() {
                break;
            }
        }
        let mut r = FrameReader::new(data);
        for _ in 0..=data.len() {
            if r.scan_sync().await.is_err() {
                break;
            }
            let _ = r.next().await;
        }
    });
});
