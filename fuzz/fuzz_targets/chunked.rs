//! The chunked decoder on any bytes: it never panics, never claims more bytes than it was
//! given, and reads a body the same whether it arrives whole or split anywhere (the first
//! two bytes pick the split) — the relay sees arbitrary read boundaries.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_forwarder::l7::chunked::ChunkedDecoder;

/// Feeds `parts` in turn; the bytes used, the data decoded, whether it ended — or the error.
fn decode(parts: &[&[u8]]) -> Result<(usize, Vec<u8>, bool), &'static str> {
    let mut decoder = ChunkedDecoder::default();
    let mut data = Vec::new();
    let mut used = 0;
    for part in parts {
        if decoder.is_done() {
            break;
        }
        let n = decoder.feed(part, Some(&mut data)).map_err(|e| e.0)?;
        assert!(n <= part.len());
        used += n;
    }
    Ok((used, data, decoder.is_done()))
}

fuzz_target!(|data: &[u8]| {
    let Some((split, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    let at = usize::from(u16::from_le_bytes(*split)) % (body.len() + 1);
    let (head, tail) = body.split_at(at);
    let whole = decode(&[body]);
    let split = decode(&[head, tail]);
    assert_eq!(whole, split, "split at {at}");
});
