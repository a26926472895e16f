//! Unit tests of the cookie codec: round trips in both formats, compatibility with the first
//! release's cookies, rotation, expiry, size limits and tamper rejection.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use super::*;

fn key(byte: u8) -> CookieKey {
    CookieKey::new(&[byte; 32]).unwrap()
}

fn codec(keys: &[u8], encryption: Encryption) -> CookieCodec {
    CookieCodec::new(
        KeyRing::new(keys.iter().map(|b| key(*b)).collect()).unwrap(),
        encryption,
    )
}

fn snapshot(value_len: usize) -> Snapshot {
    let now = unix_ms(SystemTime::now());
    Snapshot {
        id: "A".repeat(32),
        namespace: "default".into(),
        user_id: "alice".into(),
        attrs: BTreeMap::from([("cart".into(), vec![7u8; value_len])]),
        version: 3,
        created_at_ms: now - 1000,
        issued_at_ms: now,
        expires_at_ms: now + 60_000,
        ttl_ms: 60_000,
        epoch: "e1".into(),
        base_version: 2,
        offline_set: vec!["cart".into()],
        offline_removed: vec!["gone".into()],
        offline_user: true,
        confirmed_at_ms: now - 500,
        unsure_write_id: Default::default(),
        write_id: Default::default(),
    }
}

const MODES: [Encryption; 3] = [
    Encryption::None,
    Encryption::Aes256Gcm,
    Encryption::ChaCha20Poly1305,
];

#[test]
fn round_trips_in_every_mode_and_format() {
    for mode in MODES {
        for (format, prefix) in [(CookieFormat::V2, "v2."), (CookieFormat::V1, "v1.")] {
            let codec = codec(&[1], mode).with_format(format);
            let snap = snapshot(100);
            let value = codec.encode(&snap).unwrap();
            assert!(value.starts_with(prefix), "{value}");
            assert_eq!(codec.decode(&value).unwrap(), snap, "{mode:?} {format:?}");
            // Whatever a codec writes, a codec writing the other format reads.
            let other = codec.with_format(match format {
                CookieFormat::V1 => CookieFormat::V2,
                CookieFormat::V2 => CookieFormat::V1,
            });
            assert_eq!(other.decode(&value).unwrap(), snap, "{mode:?} {format:?}");
        }
    }
}

#[test]
fn v2_carries_one_tag_over_the_binary() {
    let snap = snapshot(1000);
    let body_len = |value: &str| {
        URL_SAFE_NO_PAD
            .decode(value.split('.').nth(2).unwrap())
            .unwrap()
            .len()
    };
    let plain = codec(&[1], Encryption::None).encode(&snap).unwrap();
    assert_eq!(plain.split('.').count(), 3, "no separate tag part");
    assert_eq!(body_len(&plain), 1 + snap.encoded_len() + TAG_LEN, "HMAC");
    for mode in [Encryption::Aes256Gcm, Encryption::ChaCha20Poly1305] {
        let sealed = codec(&[1], mode).encode(&snap).unwrap();
        assert_eq!(
            body_len(&sealed),
            1 + aead::NONCE_LEN + snap.encoded_len() + 16,
            "{mode:?}: nonce and AEAD tag, no HMAC"
        );
    }
    let v1 = codec(&[1], Encryption::None)
        .with_format(CookieFormat::V1)
        .encode(&snap)
        .unwrap();
    assert!(plain.len() < v1.len(), "{} vs {}", plain.len(), v1.len());
}

/// The snapshot the reference cookies below carry (valid 1_700_000_000_000 to +1 h). The first
/// release had fields 1 to 9 only: the later ones read as their defaults.
fn reference_snapshot() -> Snapshot {
    Snapshot {
        id: "A".repeat(32),
        namespace: "default".into(),
        user_id: "alice".into(),
        attrs: BTreeMap::from([
            ("cart".into(), vec![7u8; 20]),
            ("csrf".into(), b"tok".to_vec()),
        ]),
        version: 3,
        created_at_ms: 1_700_000_000_000,
        issued_at_ms: 1_700_000_000_000,
        expires_at_ms: 1_700_003_600_000,
        ttl_ms: 1_800_000,
        ..Default::default()
    }
}

/// Cookies made by the first release of this codec (key `[1; 32]`), one per mode: the
/// v1 wire format is fixed, so every later codec must read them.
const REFERENCE_COOKIES: [(Encryption, &str); 3] = [
    (
        Encryption::None,
        "v1.cs1uhCLE.AAogQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUESB2RlZmF1bHQaBWFsaWNlIhwKBGNh\
         cnQSFAcHBwcHBwcHBwcHBwcHBwcHBwcHIgsKBGNzcmYSA3RvaygDMIDQlf-8MTiA0JX_vDFAgK3xgL0xSMDubQ.\
         Owe5SqGnmmEiN-3fu9_pvifhb0hYtyp92C7utIPBTXo",
    ),
    (
        Encryption::Aes256Gcm,
        "v1.cs1uhCLE.AWsMgShlFEgsR8a6AifXLiEaQD3QnWGgs5IICEeWMQec6NXae4CnDlsVjmXpO_XmTAWMoKvSgKBs\
         G4RRyo1b8lbxKWG4NAyCwfZ-J67Zl8v7Jn6y6kwWibPZZhLbgjsEYVAPGMafrk4uTBnEunHbjqt8MwQgty-uWqla\
         BwGvLID1wJzcJGzE1He8VIDyzFDuyyAcYZo.Z4z4gP38V5JchkqhtrIU-k6yAYYw572snFyWLJxLsvY",
    ),
    (
        Encryption::ChaCha20Poly1305,
        "v1.cs1uhCLE.Apska75RkVKwGZG9DX4nfmDKwT16T6o2sIll8XkpTm_dcroAbTclOHIFM8M3AdS4zkf-8KNcpWtM\
         YMe719TyUQ98JDu3pmECfskr_W_6x9mHIpF2ZcKLdp16kX69XA0hqetKB0q6iHi-0EjAVvFVeGz2ABIERyX-e35K\
         lVYlZ_vd6mIxG3bVAX8t3yXWwKwwS_UGgxo.9NccpAZG6iZNXWt5hLmeaXopFd18xaRgec4aFqwxWzY",
    ),
];

#[test]
fn cookies_of_the_first_release_still_decode_in_every_mode() {
    let at = UNIX_EPOCH + Duration::from_millis(1_700_000_001_000);
    for (mode, value) in REFERENCE_COOKIES {
        // Any mode's codec reads every mode.
        let codec = codec(&[1], Encryption::None);
        assert_eq!(
            codec.decode_at(value, at),
            Ok(reference_snapshot()),
            "{mode:?}"
        );
    }
}

/// v2 cookies of the same snapshot and key: the v2 wire format is fixed from here on.
const REFERENCE_COOKIES_V2: [(Encryption, &str); 3] = [
    (
        Encryption::None,
        "v2.cs1uhCLE.AAogQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUESB2RlZmF1bHQaBWFsaWNlIhwKBGNh\
         cnQSFAcHBwcHBwcHBwcHBwcHBwcHBwcHIgsKBGNzcmYSA3RvaygDMIDQlf-8MTiA0JX_vDFAgK3xgL0xSMDubV6Y\
         ZZ4XLdUbvzspCTcgJTumOq886kKbpnY5Z5cS30Bj",
    ),
    (
        Encryption::Aes256Gcm,
        "v2.cs1uhCLE.AZxm3GjnV-AfEbx2E1Z1g-F_1LaHAfYvkcS0pN1rDB7aVSKcnl42xewUaynGaCbsTVPwlZQNIiD9\
         k_4BCVZwmYTWL9PH7lSz-HoP41Kv0Ey2onWQIkJh6RSNA94UPCRVBJT1ulKmhlHb3Uf2HSzdYVu8HDUx_zcU-ff7\
         vWdOms9QEgl7Q3KqsOl33uWOREWnCc7H3dI",
    ),
    (
        Encryption::ChaCha20Poly1305,
        "v2.cs1uhCLE.AsifVuALqqWY_buVGaldHP6PbxEDArAdCUC4oBBjxm00vqBAq7-BnPBL23jqJ6cMZWDPSWdO0E5x\
         PSvC8p7fbEyNabzmnhquu8c7tCga2VzBpoqaPtTks__56vbrk9Y80R3ZusIK7kuYnPQZ3k4RfKgno3OdxYy5EVTo\
         OgxRfhualtXfZM8YmYgVuO82gLICDFro3E0",
    ),
];

#[test]
fn v2_reference_cookies_decode_in_every_mode() {
    let at = UNIX_EPOCH + Duration::from_millis(1_700_000_001_000);
    for (mode, value) in REFERENCE_COOKIES_V2 {
        let codec = codec(&[1], Encryption::None).with_format(CookieFormat::V1);
        assert_eq!(
            codec.decode_at(value, at),
            Ok(reference_snapshot()),
            "{mode:?}"
        );
    }
}

#[test]
fn plain_cookies_are_byte_identical_to_the_references_in_both_formats() {
    // Plain mode has no nonce, so the same snapshot and key give the same value.
    let codec = |format| codec(&[1], Encryption::None).with_format(format);
    let snap = reference_snapshot();
    assert_eq!(
        codec(CookieFormat::V2).encode(&snap).unwrap(),
        REFERENCE_COOKIES_V2[0].1
    );
    assert_eq!(
        codec(CookieFormat::V1).encode(&snap).unwrap(),
        REFERENCE_COOKIES[0].1,
        "v1, as the first release wrote it"
    );
}

/// The worked example of docs/snapshot-cookie.md, section 8.
const SPEC: &str = include_str!("../../../docs/snapshot-cookie.md");
/// Its key material: the bytes 0 to 31.
const SPEC_MATERIAL: [u8; 32] = {
    let mut material = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        material[i] = i as u8;
        i += 1;
    }
    material
};
/// Its snapshot's canonical protobuf encoding, in hex.
const SPEC_BODY_HEX: &str = "0a203031323334353637383961626364656630313233343536373839616263646566\
    120473686f701a03616e6e220a0a04636172741202010222060a04666c616728053080d095ffbc3138e0a499ffbc31\
    40a0938780bd3148c0ee6d5202653158046204636172746a036f6c647880d095ffbc31";
/// Its plain cookie: deterministic, so every correct writer produces it.
const SPEC_PLAIN: &str = "v2.Yw3NKWbE.AAogMDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWYSBHNob3AaA2F\
    ubiIKCgRjYXJ0EgIBAiIGCgRmbGFnKAUwgNCV_7wxOOCkmf-8MUCgk4eAvTFIwO5tUgJlMVgEYgRjYXJ0agNvbGR4gNCV_\
    7wxpRW3HhhcfPDdo9L0Gq2CB4CNe3GdGOH_6y96MnZa_Ys";
/// Its sealed cookies, made with the nonce a0..ab (by the spec's Python implementation).
const SPEC_SEALED: [&str; 2] = [
    "v2.Yw3NKWbE.AaChoqOkpaanqKmqq8VeS5Ff9abHjBe1G9rlLhvfWHEO_Jd4iVSVxKf9xIpta1VfVXnqSlItvR72IVlx-X\
     E93b5Ge8aU_KVT5vdLnyU33xMaru3L7Xtq_Wm7Y18nwC2kWtJBIVDOuv0qG72XA9b_Blu0NJVpceudSmvGKpy1dW3j-1X2\
     l4xdBe7ZR5iL-tBd-w",
    "v2.Yw3NKWbE.AqChoqOkpaanqKmqq-2NCL2dRBZLwx7Lk2Pgc4_SBh6GQGw8IZCo5fKkwQ8bPxgl3FN7QPO37lRfLSQLSHPr\
     Rze8VCoQNtbyLhEqz9BFo_YZu6H7DtTmj9yo9_1v6xBzIIl90XkLRlPnn34TzsdIratYBEqTT6Z3UP52QnPaPMAtgtaTOc\
     oU_MOn_q_7aKr3Vw",
];

/// The spec's snapshot: confirmed at version 4, then changed once during an outage.
fn spec_snapshot() -> Snapshot {
    Snapshot {
        id: "0123456789abcdef0123456789abcdef".into(),
        namespace: "shop".into(),
        user_id: "ann".into(),
        attrs: BTreeMap::from([("cart".into(), vec![1, 2]), ("flag".into(), vec![])]),
        version: 5,
        created_at_ms: 1_700_000_000_000,
        issued_at_ms: 1_700_000_060_000,
        expires_at_ms: 1_700_001_860_000,
        ttl_ms: 1_800_000,
        epoch: "e1".into(),
        base_version: 4,
        offline_set: vec!["cart".into()],
        offline_removed: vec!["old".into()],
        offline_user: false,
        confirmed_at_ms: 1_700_000_000_000,
        unsure_write_id: Default::default(),
        write_id: Default::default(),
    }
}

#[test]
fn the_spec_test_vector_is_what_the_codec_writes() {
    let key = CookieKey::new(&SPEC_MATERIAL).unwrap();
    assert_eq!(key.id(), "Yw3NKWbE");
    let snap = spec_snapshot();
    let hex: String = snap
        .encode_to_vec()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(hex, SPEC_BODY_HEX);
    let plain = CookieCodec::new(KeyRing::new(vec![key]).unwrap(), Encryption::None);
    assert_eq!(plain.encode(&snap).unwrap(), SPEC_PLAIN);
    // Valid from 60 s before issued-at to 1 ms before expires-at, as the spec says.
    for now_ms in [1_700_000_000_000, 1_700_001_859_999] {
        let now = UNIX_EPOCH + Duration::from_millis(now_ms);
        for value in [SPEC_PLAIN, SPEC_SEALED[0], SPEC_SEALED[1]] {
            assert_eq!(plain.decode_at(value, now), Ok(snap.clone()), "{value}");
        }
    }
    for now_ms in [1_699_999_999_999, 1_700_001_860_000] {
        let now = UNIX_EPOCH + Duration::from_millis(now_ms);
        assert_eq!(plain.decode_at(SPEC_PLAIN, now), Err(CookieError::Expired));
    }
    // The page shows exactly these values (each on one line).
    for pinned in [
        SPEC_BODY_HEX,
        SPEC_PLAIN,
        SPEC_SEALED[0],
        SPEC_SEALED[1],
        "kid              Yw3NKWbE",
    ] {
        assert!(
            SPEC.contains(pinned),
            "docs/snapshot-cookie.md lacks {pinned}"
        );
    }
}

#[test]
fn sealed_v2_cookies_bind_the_header() {
    // Moving a sealed body under another key id, or relabelling its mode, breaks the AEAD.
    let snap = snapshot(50);
    let a = CookieCodec::new(
        KeyRing::new(vec![
            CookieKey::with_id("a", &[1; 32]).unwrap(),
            CookieKey::with_id("b", &[1; 32]).unwrap(),
        ])
        .unwrap(),
        Encryption::Aes256Gcm,
    );
    let value = a.encode(&snap).unwrap();
    let moved = value.replacen("v2.a.", "v2.b.", 1);
    assert_eq!(a.decode(&moved), Err(CookieError::BadSignature));
    // The body's first byte is the mode: relabel AES-256-GCM (1) as ChaCha20-Poly1305 (2).
    let mut body = URL_SAFE_NO_PAD
        .decode(value.split('.').nth(2).unwrap())
        .unwrap();
    body[0] = MODE_CHACHA20_POLY1305;
    let relabelled = format!("v2.a.{}", URL_SAFE_NO_PAD.encode(&body));
    assert_eq!(a.decode(&relabelled), Err(CookieError::BadSignature));
}

#[test]
fn the_tag_length_is_that_of_base64_hmac_sha256() {
    assert_eq!(TAG_B64_LEN, 43);
    for len in 0..10 {
        assert_eq!(base64_len(len), URL_SAFE_NO_PAD.encode(vec![0; len]).len());
    }
}

#[test]
fn sealed_cookies_hide_the_content() {
    let snap = Snapshot {
        user_id: "very-secret-user-name".into(),
        ..snapshot(0)
    };
    let plain = codec(&[1], Encryption::None).encode(&snap).unwrap();
    let sealed = codec(&[1], Encryption::Aes256Gcm).encode(&snap).unwrap();
    let body = |v: &str| {
        URL_SAFE_NO_PAD
            .decode(v.split('.').nth(2).unwrap())
            .unwrap()
    };
    let needle = b"very-secret-user-name";
    assert!(body(&plain).windows(needle.len()).any(|w| w == needle));
    assert!(!body(&sealed).windows(needle.len()).any(|w| w == needle));
}

#[test]
fn rotation_signs_with_the_new_key_and_verifies_with_both() {
    let old_only = codec(&[1], Encryption::None);
    let rotating = codec(&[2, 1], Encryption::None);
    let new_only = codec(&[2], Encryption::None);
    let old_cookie = old_only.encode(&snapshot(10)).unwrap();
    assert!(
        rotating.decode(&old_cookie).is_ok(),
        "old cookies survive the rotation"
    );
    let new_cookie = rotating.encode(&snapshot(10)).unwrap();
    assert!(
        new_only.decode(&new_cookie).is_ok(),
        "signed by the new key"
    );
    assert!(old_only.decode(&new_cookie).is_err());
    assert_eq!(
        new_only.decode(&old_cookie),
        Err(CookieError::UnknownKey),
        "retired key"
    );
}

#[test]
fn same_kid_with_another_secret_is_a_bad_signature() {
    let a = CookieCodec::new(
        KeyRing::new(vec![CookieKey::with_id("k", &[1; 32]).unwrap()]).unwrap(),
        Encryption::None,
    );
    let b = CookieCodec::new(
        KeyRing::new(vec![CookieKey::with_id("k", &[2; 32]).unwrap()]).unwrap(),
        Encryption::None,
    );
    let value = a.encode(&snapshot(10)).unwrap();
    assert_eq!(b.decode(&value), Err(CookieError::BadSignature));
}

#[test]
fn expired_and_future_cookies_are_rejected() {
    let codec = codec(&[1], Encryption::None);
    let snap = snapshot(10);
    let value = codec.encode(&snap).unwrap();
    let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
    assert!(codec.decode_at(&value, at(snap.expires_at_ms - 1)).is_ok());
    assert_eq!(
        codec.decode_at(&value, at(snap.expires_at_ms)),
        Err(CookieError::Expired)
    );
    assert_eq!(
        codec.decode_at(&value, at(snap.issued_at_ms - 61_000)),
        Err(CookieError::Expired),
        "issued more than a minute in the future"
    );
}

#[test]
fn refuses_to_emit_over_4096_bytes() {
    let codec = codec(&[1], Encryption::None);
    assert!(codec.encode(&snapshot(2000)).is_ok());
    assert!(matches!(codec.encode(&snapshot(3100)), Err(CookieError::TooLarge(n)) if n > 4096));
    assert!(matches!(
        codec.decode(&"a".repeat(5000)),
        Err(CookieError::TooLarge(5000))
    ));
}

#[test]
fn every_bit_flip_and_every_truncation_is_rejected() {
    for (mode, format) in [
        (Encryption::None, CookieFormat::V2),
        (Encryption::ChaCha20Poly1305, CookieFormat::V2),
        (Encryption::None, CookieFormat::V1),
        (Encryption::Aes256Gcm, CookieFormat::V1),
    ] {
        let codec = codec(&[1], mode).with_format(format);
        let value = codec.encode(&snapshot(300)).unwrap();
        let bytes = value.as_bytes();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut flipped = bytes.to_vec();
                flipped[i] ^= 1 << bit;
                let Ok(text) = String::from_utf8(flipped) else {
                    continue;
                };
                assert!(
                    codec.decode(&text).is_err(),
                    "flip of bit {bit} at {i} accepted"
                );
            }
        }
        for len in 0..bytes.len() {
            assert!(
                codec.decode(&value[..len]).is_err(),
                "truncation to {len} accepted"
            );
        }
    }
}

#[test]
fn keys_are_read_from_hex_or_base64() {
    assert_eq!(key_from_text(&"ab".repeat(32)), Some(vec![0xab; 32]));
    assert_eq!(
        key_from_text(&URL_SAFE_NO_PAD.encode([7u8; 40])),
        Some(vec![7u8; 40])
    );
    let standard = base64::engine::general_purpose::STANDARD.encode([0xfbu8; 33]);
    assert_eq!(key_from_text(&standard), Some(vec![0xfb; 33]));
    assert_eq!(key_from_text("not a key!"), None);
    assert_eq!(key_from_text(""), None);
}

#[test]
fn key_material_must_be_key_text_of_enough_bytes() {
    assert_eq!(
        key_material_from_text(&"ab".repeat(32), MIN_KEY_BYTES),
        Ok(vec![0xab; 32])
    );
    assert_eq!(
        key_material_from_text(&"ab".repeat(31), MIN_KEY_BYTES),
        Err(KeyTextError::TooShort { min: 32, got: 31 })
    );
    assert_eq!(
        key_material_from_text("not a key!", 1),
        Err(KeyTextError::NotHexOrBase64)
    );
    let error = key_material_from_text("abcd", MIN_KEY_BYTES).unwrap_err();
    assert_eq!(
        format!("cookie key {error}"),
        "cookie key must be at least 32 bytes, got 2 (e.g. `openssl rand -hex 32`)"
    );
}

#[test]
fn bad_keys_are_refused() {
    assert!(CookieKey::new(&[0; 31]).is_err());
    assert!(CookieKey::with_id("", &[0; 32]).is_err());
    assert!(CookieKey::with_id("has.dot", &[0; 32]).is_err());
    assert!(KeyRing::new(vec![]).is_err());
    assert!(KeyRing::new(vec![key(1), key(1)]).is_err());
}

#[test]
fn only_cookies_of_the_signing_key_and_written_format_are_current() {
    let old = codec(&[1], Encryption::Aes256Gcm);
    let rotated = codec(&[2, 1], Encryption::Aes256Gcm);
    let from_old = old.encode(&snapshot(10)).unwrap();
    let from_new = rotated.encode(&snapshot(10)).unwrap();
    // Still valid under [new, old], but due for re-issue under the new key.
    assert!(rotated.decode(&from_old).is_ok());
    assert!(!rotated.is_current(&from_old));
    assert!(rotated.is_current(&from_new));
    assert!(old.is_current(&from_old));
    // A v1 cookie of the signing key is due for re-issue by a codec writing v2, and back.
    let v1 = codec(&[2], Encryption::None).with_format(CookieFormat::V1);
    let from_v1 = v1.encode(&snapshot(10)).unwrap();
    assert!(!rotated.is_current(&from_v1));
    assert!(v1.is_current(&from_v1));
    assert!(!v1.is_current(&from_new));
    assert!(!rotated.is_current("garbage"));
}
