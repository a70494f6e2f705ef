//! Fuzzes the store's key encoding: any input splits into parts whose
//! encoding must decode back exactly, sort like the parts, and keep prefix
//! scans inside their namespace; decoding arbitrary bytes must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The module is dependency-free, so it is compiled in directly rather than
// building the whole server under the fuzzer's instrumentation.
#[path = "../../server/src/engine/sled/keys.rs"]
#[allow(dead_code)]
mod keys;

fuzz_target!(|data: &[u8]| {
    // Arbitrary bytes as an encoded key: decoding must not panic.
    let mut rest = data;
    while let Some((_, tail)) = keys::take_part(rest) {
        if tail.len() >= rest.len() {
            break;
        }
        rest = tail;
    }
    let _ = keys::take_u64(data);
    let _ = keys::prefix_end(data);

    // The input as parts separated by 0xFE.
    let parts: Vec<&[u8]> = data.split(|b| *b == 0xFE).take(4).collect();
    let encoded = keys::key(&parts);
    let mut rest = encoded.as_slice();
    for part in &parts {
        let (decoded, tail) = keys::take_part(rest).expect("an encoded key decodes");
        assert_eq!(&decoded, part);
        rest = tail;
    }
    assert!(rest.is_empty());
    if parts.len() >= 2 {
        let (a, b) = (parts[0], parts[1]);
        let (ka, kb) = (keys::key(&[a]), keys::key(&[b]));
        assert_eq!(ka.cmp(&kb), a.cmp(b), "order preserved");
        // A scan of (a, prefix b) never matches a key of another namespace.
        let mut scan = keys::key(&[a]);
        keys::push_escaped(&mut scan, b);
        let other = keys::key(&[b, a]);
        assert_eq!(other.starts_with(&scan), a == b && a.starts_with(b));
    }
});
