//! Fuzzes request decoding and validation: arbitrary bytes decoded as each
//! upload header and request message, then run through the same validation
//! the server applies. Nothing may panic; accepted names must obey the rules;
//! page tokens and entry cursors round-trip exactly (what a token or cursor
//! decodes to encodes back to the same text, and every name and position
//! encodes to a token or cursor that decodes back to it).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use trove_proto::cache::CacheScope;
use trove_proto::entries::{EntryCursor, NewEntry};
use trove_proto::pb;
use trove_proto::types::{
    decode_page_token, encode_page_token, ListPage, Name, Namespace, MAX_NAME_BYTES,
};

fn check_name(field: &str, raw: &str) {
    if let Ok(name) = Name::new(field, raw.to_owned()) {
        assert!(!name.as_str().is_empty() && name.as_str().len() <= MAX_NAME_BYTES);
        assert!(!name.as_str().contains('\0'));
        let _ = name.sha256_digest();
    }
}

/// A page token that decodes must be the encoding of what it decodes to.
fn check_page_token(token: &str) {
    if let Ok(after) = decode_page_token(token) {
        assert_eq!(encode_page_token(&after), token, "page tokens are canonical");
    }
}

/// A cursor that decodes must be the encoding of what it decodes to.
fn check_cursor(text: &str) {
    if let Ok(cursor) = EntryCursor::decode("after", text) {
        assert_eq!(cursor.encode(), text, "cursors are canonical");
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = pb::PutArtifactRequest::decode(data) {
        if let Some(h) = m.header {
            check_name("key", &h.key);
            let _ = Namespace::new(&h.namespace);
            let _ = trove_proto::artifacts::PutOptions::new(&h.content_type, h.size);
        }
    }
    if let Ok(m) = pb::ListArtifactsRequest::decode(data) {
        if let Ok(page) = ListPage::new(&m.prefix, m.page_size, &m.page_token) {
            // A validated page goes back to the wire as the same request.
            let (prefix, page_size, token) = page.to_wire();
            assert_eq!(prefix, m.prefix);
            assert_eq!(token, m.page_token);
            assert!(page_size >= 1 && page_size <= trove_proto::types::MAX_PAGE_SIZE);
        }
        check_page_token(&m.page_token);
    }
    if let Ok(m) = pb::AppendRequest::decode(data) {
        check_name("cassette", &m.cassette);
        for e in m.entries {
            let _ = NewEntry::parse("entries", e.json, e.recorded_at);
        }
    }
    if let Ok(m) = pb::ReadRequest::decode(data) {
        check_cursor(&m.after);
    }
    if let Ok(m) = pb::UploadRequest::decode(data) {
        if let Some(h) = m.header {
            let _ = CacheScope::from_wire("scope", h.scope.as_ref());
            check_name("ref", &h.r#ref);
        }
    }
    let _ = NewEntry::parse("entry", Bytes::copy_from_slice(data), None);
    if let Ok(text) = std::str::from_utf8(data) {
        check_name("key", text);
        check_cursor(text);
        check_page_token(text);
        // Every valid name is the last name of some page: its token decodes back.
        if Name::new("key", text.to_owned()).is_ok() {
            let token = encode_page_token(text);
            assert_eq!(decode_page_token(&token).as_deref(), Ok(text));
        }
    }
    // Every position is a cursor that decodes back to it.
    if data.len() >= 16 {
        let mut ts = [0u8; 8];
        let mut seq = [0u8; 8];
        ts.copy_from_slice(&data[..8]);
        seq.copy_from_slice(&data[8..16]);
        let cursor = EntryCursor {
            recorded_at: i64::from_le_bytes(ts),
            seq: u64::from_le_bytes(seq),
        };
        assert_eq!(EntryCursor::decode("after", &cursor.encode()), Ok(cursor));
    }
});
