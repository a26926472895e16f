//! Property tests of the cookie codec: hostile input never panics and never verifies.

use std::collections::BTreeMap;
use std::time::SystemTime;

use proptest::prelude::*;
use session_client::cookie::{CookieCodec, CookieKey, Encryption, KeyRing, Snapshot, unix_ms};

fn codec(encryption: Encryption) -> CookieCodec {
    let keys = vec![
        CookieKey::new(&[9; 32]).unwrap(),
        CookieKey::new(&[8; 32]).unwrap(),
    ];
    CookieCodec::new(KeyRing::new(keys).unwrap(), encryption)
}

fn valid_cookie(codec: &CookieCodec, attrs: BTreeMap<String, Vec<u8>>) -> String {
    let now = unix_ms(SystemTime::now());
    let snapshot = Snapshot {
        id: "B".repeat(32),
        namespace: "default".into(),
        user_id: "prop".into(),
        attrs,
        version: 1,
        created_at_ms: now,
        issued_at_ms: now,
        expires_at_ms: now + 3_600_000,
        ttl_ms: 3_600_000,
    };
    codec.encode(&snapshot).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn random_strings_never_panic_nor_verify(input in ".{0,600}") {
        prop_assert!(codec(Encryption::None).decode(&input).is_err());
    }

    #[test]
    fn random_shaped_cookies_never_verify(kid in "[A-Za-z0-9_-]{0,20}", payload in "[A-Za-z0-9_-]{0,400}",
                                          tag in "[A-Za-z0-9_-]{0,50}") {
        let value = format!("v1.{kid}.{payload}.{tag}");
        prop_assert!(codec(Encryption::Aes256Gcm).decode(&value).is_err());
    }

    #[test]
    fn random_shaped_v2_cookies_never_verify(kid in "[A-Za-z0-9_-]{0,20}", body in "[A-Za-z0-9_-]{0,400}") {
        // The ring's key ids, so that the body is checked, not just the kid refused.
        let codec = codec(Encryption::None);
        let ids: Vec<String> = [[9u8; 32], [8u8; 32]]
            .iter()
            .map(|m| CookieKey::new(m).unwrap().id().to_owned())
            .collect();
        for known in [kid.as_str(), &ids[0], &ids[1]] {
            let value = format!("v2.{known}.{body}");
            prop_assert!(codec.decode(&value).is_err());
        }
    }

    #[test]
    fn mutated_cookies_never_verify(
        attrs in proptest::collection::btree_map("[a-z]{1,8}", proptest::collection::vec(any::<u8>(), 0..64), 0..6),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        sealed in any::<bool>(),
    ) {
        let codec = codec(if sealed { Encryption::ChaCha20Poly1305 } else { Encryption::None });
        let value = valid_cookie(&codec, attrs);
        let mut bytes = value.clone().into_bytes();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        if let Ok(mutated) = String::from_utf8(bytes)
            && mutated != value
        {
            prop_assert!(codec.decode(&mutated).is_err(), "mutation accepted: {mutated}");
        }
    }
}
