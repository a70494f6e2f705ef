//! The one place where store keys are laid out as bytes.
//!
//! Every variable-length part (namespace, key, hash, branch...) is written
//! escaped and terminated: `0x00` becomes `0x00 0xFF` and the part ends with
//! `0x00 0x01`. This is order-preserving (a shorter string sorts before its
//! extensions, bytes compare as in the raw string) and prefix-free, so no
//! choice of names can make one composite key collide with, or fall inside the
//! prefix range of, another. Numbers are fixed-width big-endian so byte order
//! is numeric order. Which parts make which key of which tree is written in
//! `schema.rs`; the object-storage engine has its own text encoding
//! (`engine/bucket/layout.rs`), with the same ordering property.
//!
//! This module never touches sled; it only builds and parses byte strings.

/// Marks the end of a variable-length part.
const TERMINATOR: [u8; 2] = [0x00, 0x01];
/// Stands for a literal `0x00` inside a part.
const ESCAPED_NUL: [u8; 2] = [0x00, 0xFF];

/// Appends `part` escaped but not terminated: the form used for prefix scans.
pub fn push_escaped(out: &mut Vec<u8>, part: &[u8]) {
    for &b in part {
        if b == 0 {
            out.extend_from_slice(&ESCAPED_NUL);
        } else {
            out.push(b);
        }
    }
}

/// Appends `part` escaped and terminated: one complete component of a key.
pub fn push_part(out: &mut Vec<u8>, part: &[u8]) {
    push_escaped(out, part);
    out.extend_from_slice(&TERMINATOR);
}

/// Appends a big-endian `u64`.
pub fn push_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(&n.to_be_bytes());
}

/// Appends an `i64` so that byte order is numeric order (sign bit flipped).
pub fn push_i64(out: &mut Vec<u8>, n: i64) {
    push_u64(out, flip_sign(n));
}

fn flip_sign(n: i64) -> u64 {
    u64::from_be_bytes(n.to_be_bytes()) ^ (1 << 63)
}

/// Reads back what [`push_i64`] wrote.
pub fn unflip_sign(n: u64) -> i64 {
    i64::from_be_bytes((n ^ (1 << 63)).to_be_bytes())
}

/// Builds a key from complete parts.
pub fn key(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 2).sum());
    for part in parts {
        push_part(&mut out, part);
    }
    out
}

/// Parses one terminated part at the start of `input`; returns the unescaped
/// part and the rest. `None` when `input` is not a well-formed part.
pub fn take_part(input: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        if b != 0 {
            out.push(b);
            i += 1;
            continue;
        }
        match input.get(i + 1) {
            Some(0xFF) => {
                out.push(0);
                i += 2;
            }
            Some(0x01) => return Some((out, &input[i + 2..])),
            _ => return None,
        }
    }
    None
}

/// Parses a big-endian `u64` at the start of `input`.
pub fn take_u64(input: &[u8]) -> Option<(u64, &[u8])> {
    let (head, rest) = input.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*head), rest))
}

/// The smallest key greater than every key starting with `prefix`, or `None`
/// when no such key exists (the prefix is all `0xFF`).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Vec<u8>> {
        vec![
            b"".to_vec(),
            b"a".to_vec(),
            b"a/".to_vec(),
            b"a/b".to_vec(),
            b"a\0".to_vec(),
            b"a\0b".to_vec(),
            b"a\x01".to_vec(),
            b"ab".to_vec(),
            b"..".to_vec(),
            vec![0xFF],
            vec![0, 0],
            "ü/🦀".as_bytes().to_vec(),
        ]
    }

    /// Two-part keys round-trip, never collide, and sort like their parts.
    #[test]
    fn composite_keys_are_injective_and_ordered() {
        let s = samples();
        let mut seen = std::collections::BTreeMap::new();
        for a in &s {
            for b in &s {
                let k = key(&[a, b]);
                let (pa, rest) = take_part(&k).expect("first part");
                let (pb, rest) = take_part(rest).expect("second part");
                assert_eq!((&pa, &pb, rest.len()), (a, b, 0));
                assert!(
                    seen.insert(k, (a.clone(), b.clone())).is_none(),
                    "collision"
                );
            }
        }
        let by_key: Vec<_> = seen.values().cloned().collect();
        let mut by_parts = by_key.clone();
        by_parts.sort();
        assert_eq!(
            by_key, by_parts,
            "byte order of keys is the order of their parts"
        );
    }

    /// A scan prefix built from (ns, p) matches exactly the keys (ns, k) with k starting with p.
    #[test]
    fn prefix_scans_never_leak() {
        let s = samples();
        for ns in &s {
            for p in &s {
                let mut scan = key(&[ns]);
                push_escaped(&mut scan, p);
                for ns2 in &s {
                    for k in &s {
                        let full = key(&[ns2, k]);
                        let expected = ns2 == ns && k.starts_with(p);
                        assert_eq!(
                            full.starts_with(&scan),
                            expected,
                            "ns={ns:?} p={p:?} ns2={ns2:?} k={k:?}"
                        );
                    }
                }
            }
        }
    }

    /// Signed numbers keep their order as bytes.
    #[test]
    fn signed_numbers_sort_numerically() {
        let nums = [i64::MIN, -5, -1, 0, 1, 7, i64::MAX];
        let encoded: Vec<Vec<u8>> = nums
            .iter()
            .map(|n| {
                let mut v = Vec::new();
                push_i64(&mut v, *n);
                v
            })
            .collect();
        let mut sorted = encoded.clone();
        sorted.sort();
        assert_eq!(encoded, sorted);
        for n in nums {
            assert_eq!(unflip_sign(flip_sign(n)), n);
        }
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[b'a', 0xFF]), Some(b"b".to_vec()));
        assert_eq!(prefix_end(&[0xFF]), None);
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn part() -> impl Strategy<Value = Vec<u8>> {
            // Bias towards the bytes the encoding treats specially.
            prop::collection::vec(
                prop_oneof![Just(0u8), Just(1u8), Just(0xFFu8), Just(b'/'), any::<u8>()],
                0..12,
            )
        }

        proptest! {
            /// Any sequence of parts decodes back to itself: the encoding is injective.
            #[test]
            fn parts_round_trip(parts in prop::collection::vec(part(), 1..4)) {
                let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
                let encoded = key(&refs);
                let mut rest = encoded.as_slice();
                for expected in &parts {
                    let (decoded, tail) = take_part(rest).expect("well-formed");
                    prop_assert_eq!(&decoded, expected);
                    rest = tail;
                }
                prop_assert!(rest.is_empty());
            }

            /// Byte order of encoded keys is the order of their part tuples.
            #[test]
            fn order_is_preserved(a in prop::collection::vec(part(), 2), b in prop::collection::vec(part(), 2)) {
                let ka = key(&[&a[0], &a[1]]);
                let kb = key(&[&b[0], &b[1]]);
                prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            }

            /// A prefix scan of (namespace, prefix) matches exactly the keys of that
            /// namespace whose next part starts with the prefix: nothing leaks.
            #[test]
            fn prefix_scans_are_isolated(ns1 in part(), ns2 in part(), prefix in part(), k in part(), suffix in part()) {
                let mut scan = key(&[&ns1]);
                push_escaped(&mut scan, &prefix);
                let full = key(&[&ns2, &k, &suffix]);
                prop_assert_eq!(full.starts_with(&scan), ns1 == ns2 && k.starts_with(&prefix));
            }

            /// Signed numbers sort as numbers once encoded.
            #[test]
            fn signed_order(a in any::<i64>(), b in any::<i64>()) {
                let (mut ea, mut eb) = (Vec::new(), Vec::new());
                push_i64(&mut ea, a);
                push_i64(&mut eb, b);
                prop_assert_eq!(ea.cmp(&eb), a.cmp(&b));
                prop_assert_eq!(unflip_sign(u64::from_be_bytes(ea.try_into().expect("8 bytes"))), a);
            }
        }
    }
}
