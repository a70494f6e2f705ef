//! Fuzzes request decoding and validation: arbitrary bytes decoded as each
//! upload header and request message, then run through the same validation
//! the server applies. Nothing may panic; accepted names must obey the rules.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use trove_proto::cache::CacheScope;
use trove_proto::entries::{EntryCursor, NewEntry};
use trove_proto::pb;
use trove_proto::types::{decode_page_token, ListPage, Name, Namespace, MAX_NAME_BYTES};

fn check_name(field: &str, raw: &str) {
    if let Ok(name) = Name::new(field, raw.to_owned()) {
        assert!(!name.as_str().is_empty() && name.as_str().len() <= MAX_NAME_BYTES);
        assert!(!name.as_str().contains('\0'));
        let _ = name.sha256_digest();
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
        let _ = ListPage::new(&m.prefix, m.page_size, &m.page_token);
        let _ = decode_page_token(&m.page_token);
    }
    if let Ok(m) = pb::AppendRequest::decode(data) {
        check_name("cassette", &m.cassette);
        for e in m.entries {
            let _ = NewEntry::parse("entries", e.json, e.recorded_at);
        }
    }
    if let Ok(m) = pb::ReadRequest::decode(data) {
        let _ = EntryCursor::decode("after", &m.after);
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
        let _ = EntryCursor::decode("after", text);
        let _ = decode_page_token(text);
    }
});
