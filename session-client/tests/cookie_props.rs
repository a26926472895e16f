//! Property tests of the cookie codec: hostile input never panics and never verifies, and is
//! refused for the reason that applies. Shaped cookies use the ring's real key ids, so that the
//! signature check runs (a random key id is refused before it, as an unknown key).

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use proptest::prelude::*;
use session_client::cookie::{
    CookieCodec, CookieError, CookieFormat, CookieKey, Encryption, KeyRing, Snapshot, unix_ms,
};

/// Key material of the ring: the signing key, then one that only verifies.
const MATERIALS: [[u8; 32]; 2] = [[9; 32], [8; 32]];
/// Every encryption, in the order [`CODECS`] holds them.
const ENCRYPTIONS: [Encryption; 3] = [
    Encryption::None,
    Encryption::Aes256Gcm,
    Encryption::ChaCha20Poly1305,
];

/// A codec over the ring per encryption and format, made once: key derivation is most of a
/// case's cost in a debug build.
static CODECS: LazyLock<Vec<(Encryption, CookieFormat, CookieCodec)>> = LazyLock::new(|| {
    let mut codecs = Vec::new();
    for encryption in ENCRYPTIONS {
        for format in [CookieFormat::V1, CookieFormat::V2] {
            let keys = MATERIALS
                .iter()
                .map(|m| CookieKey::new(m).unwrap())
                .collect();
            let codec =
                CookieCodec::new(KeyRing::new(keys).unwrap(), encryption).with_format(format);
            codecs.push((encryption, format, codec));
        }
    }
    codecs
});

/// The ring's codec writing `format` with `encryption` (every codec reads both formats).
fn codec_for(encryption: Encryption, format: CookieFormat) -> &'static CookieCodec {
    CODECS
        .iter()
        .find(|(e, f, _)| *e == encryption && *f == format)
        .map(|(_, _, codec)| codec)
        .unwrap()
}

/// The ring's codec writing v2 with `encryption`.
fn codec(encryption: Encryption) -> &'static CookieCodec {
    codec_for(encryption, CookieFormat::V2)
}

/// The ids of the ring's two keys.
static KEY_IDS: LazyLock<[String; 2]> =
    LazyLock::new(|| MATERIALS.map(|m| CookieKey::new(&m).unwrap().id().to_owned()));

fn key_ids() -> &'static [String; 2] {
    &KEY_IDS
}

/// What a cookie named by `kid` must be refused as when the rest of it is not authentic:
/// malformed for an impossible kid, unknown for a well-shaped foreign one, else `authentic`
/// (the error of the signature check for this shape).
fn refusal_for_kid(kid: &str, ids: &[String; 2], authentic: CookieError) -> CookieError {
    if kid.is_empty() || kid.len() > 16 {
        CookieError::Malformed
    } else if ids.iter().any(|id| id == kid) {
        authentic
    } else {
        CookieError::UnknownKey
    }
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
        epoch: "prop-epoch".into(),
        base_version: 1,
        confirmed_at_ms: now,
        ..Default::default()
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
    fn random_shaped_v1_cookies_fail_the_signature_check(
        kid in "[A-Za-z0-9_-]{0,20}",
        payload in "[A-Za-z0-9_-]{0,400}",
        tag in any::<[u8; 32]>(),
        sealed in any::<bool>(),
    ) {
        // A well-formed tag (43 base64url characters of 32 bytes): with a real key id, only
        // the HMAC can refuse it, and it must.
        let codec = codec(if sealed { Encryption::Aes256Gcm } else { Encryption::None });
        let ids = key_ids();
        let tag = URL_SAFE_NO_PAD.encode(tag);
        for known in ids {
            let value = format!("v1.{known}.{payload}.{tag}");
            prop_assert_eq!(codec.decode(&value), Err(CookieError::BadSignature), "{}", value);
        }
        let value = format!("v1.{kid}.{payload}.{tag}");
        prop_assert_eq!(
            codec.decode(&value),
            Err(refusal_for_kid(&kid, ids, CookieError::BadSignature))
        );
    }

    #[test]
    fn random_v1_tags_are_malformed_or_fail_the_signature_check(
        payload in "[A-Za-z0-9_-]{0,400}",
        tag in "[A-Za-z0-9_-]{0,50}",
    ) {
        let codec = codec(Encryption::None);
        for known in key_ids() {
            let value = format!("v1.{known}.{payload}.{tag}");
            let refused = codec.decode(&value);
            if tag.len() == 43 {
                // 43 characters hold 32 bytes only when the last one's two spare bits are 0.
                prop_assert!(
                    matches!(refused, Err(CookieError::BadSignature | CookieError::Malformed)),
                    "{:?}",
                    refused
                );
            } else {
                prop_assert_eq!(refused, Err(CookieError::Malformed), "tag of {} chars", tag.len());
            }
        }
    }

    #[test]
    fn random_shaped_v2_cookies_never_verify(kid in "[A-Za-z0-9_-]{0,20}", body in "[A-Za-z0-9_-]{0,400}") {
        // The ring's key ids, so that the body is checked, not just the kid refused.
        let codec = codec(Encryption::None);
        let ids = key_ids();
        for known in [kid.as_str(), &ids[0], &ids[1]] {
            let value = format!("v2.{known}.{body}");
            let refused = codec.decode(&value);
            match refusal_for_kid(known, ids, CookieError::BadSignature) {
                // A random body with a real key: not base64, too short, an unknown mode, or a
                // tag that does not verify; never anything that got past the check.
                CookieError::BadSignature => prop_assert!(
                    matches!(refused, Err(CookieError::BadSignature | CookieError::Malformed)),
                    "{:?}",
                    refused
                ),
                expected => prop_assert_eq!(refused, Err(expected)),
            }
        }
    }

    #[test]
    fn v1_cookies_with_a_changed_payload_byte_fail_the_signature_check(
        attrs in proptest::collection::btree_map("[a-z]{1,8}", proptest::collection::vec(any::<u8>(), 0..64), 0..6),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
        mode in 0usize..3,
    ) {
        let codec = codec_for(ENCRYPTIONS[mode], CookieFormat::V1);
        let value = valid_cookie(codec, attrs);
        prop_assert!(codec.decode(&value).is_ok(), "the untouched cookie verifies");
        let (signed, tag) = value.rsplit_once('.').unwrap();
        let (header, payload) = signed.rsplit_once('.').unwrap();
        let mut body = URL_SAFE_NO_PAD.decode(payload).unwrap();
        let i = at.index(body.len());
        body[i] ^= flip;
        let tampered = format!("{header}.{}.{tag}", URL_SAFE_NO_PAD.encode(&body));
        prop_assert_eq!(codec.decode(&tampered), Err(CookieError::BadSignature));
    }

    #[test]
    fn mutated_cookies_never_verify(
        attrs in proptest::collection::btree_map("[a-z]{1,8}", proptest::collection::vec(any::<u8>(), 0..64), 0..6),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        sealed in any::<bool>(),
        v1 in any::<bool>(),
    ) {
        let format = if v1 { CookieFormat::V1 } else { CookieFormat::V2 };
        let codec = codec_for(
            if sealed { Encryption::ChaCha20Poly1305 } else { Encryption::None },
            format,
        );
        let value = valid_cookie(codec, attrs);
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

proptest! {
    // Each case derives a key of its own (the forger's): fewer cases.
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn v1_cookies_signed_by_a_key_of_another_ring_fail_the_signature_check(
        attrs in proptest::collection::btree_map("[a-z]{1,8}", proptest::collection::vec(any::<u8>(), 0..64), 0..6),
        material in any::<[u8; 32]>(),
    ) {
        // The same key id over other material: a forger who knows the id but not the secret.
        prop_assume!(material != MATERIALS[1]);
        let ids = key_ids();
        let forger = CookieCodec::new(
            KeyRing::new(vec![CookieKey::with_id(ids[1].clone(), &material).unwrap()]).unwrap(),
            Encryption::None,
        )
        .with_format(CookieFormat::V1);
        let forged = valid_cookie(&forger, attrs);
        prop_assert_eq!(codec(Encryption::None).decode(&forged), Err(CookieError::BadSignature));
    }
}
