//! Issue 12: non-Rust backends can share the cookie fallback. `tests/foreign/snapshot_cookie.py`
//! is a Python implementation written from `docs/snapshot-cookie.md` alone (protobuf by hand,
//! `cryptography` for HKDF and the AEADs): it reads what the Rust codec writes and the other way
//! round, in every mode, and both refuse tampered and wrongly keyed cookies.
//!
//! Skipped (with a printed reason) when python3 with the `cryptography` module is missing,
//! unless `STICKLESS_REQUIRE_SERVICES=1`; `.ci/run` installs it. The script runs under
//! `python3 -O`, so its checks cannot be bare asserts.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use session_client::cookie::{
    CookieCodec, CookieError, CookieFormat, CookieKey, Encryption, KeyRing, Snapshot,
};

/// The time every cookie here is read at (2023-11-14T22:13:20Z).
const NOW_MS: u64 = 1_700_000_000_000;
/// The key material both sides share.
const MATERIAL: [u8; 32] = [0x5a; 32];
/// Material of another key (a forger's, or a retired one).
const OTHER_MATERIAL: [u8; 32] = [0xa5; 32];
/// An explicit key id, as an operator may give one.
const EXPLICIT_KID: &str = "k-2024_a";
/// Every v2 mode: the Rust codec's name for it and the script's.
const MODES: [(Encryption, &str); 3] = [
    (Encryption::None, "plain"),
    (Encryption::Aes256Gcm, "aes-256-gcm"),
    (Encryption::ChaCha20Poly1305, "chacha20-poly1305"),
];

/// True when `STICKLESS_REQUIRE_SERVICES=1`: a missing Python fails instead of skipping.
fn required() -> bool {
    std::env::var("STICKLESS_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// Whether python3 with `cryptography` is here; when not, prints why and skips `test`, or fails
/// it under `STICKLESS_REQUIRE_SERVICES=1`.
fn python_available(test: &str) -> bool {
    let found = Command::new("python3")
        .args(["-c", "import cryptography"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !found {
        let why = "python3 with the cryptography module is not installed";
        if required() {
            panic!("{test}: {why} (STICKLESS_REQUIRE_SERVICES=1, so this is a failure)");
        }
        // Written to the stderr handle itself, not through eprintln!, which the test harness
        // captures and hides for passing tests: a skip must show in every run's output.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: {why} (apt-get install python3-cryptography, or see .ci/run)"
        );
    }
    found
}

/// Runs the Python implementation on `requests` (a JSON array) and returns its answers.
fn python(requests: &Value) -> Vec<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/foreign/snapshot_cookie.py");
    // -O strips `assert`: the script's checks must hold without it.
    let mut child = Command::new("python3")
        .arg("-O")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(requests.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "snapshot_cookie.py failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Vec<Value> = serde_json::from_slice(&out.stdout).expect("a JSON array");
    assert_eq!(
        answers.len(),
        requests.as_array().map_or(0, Vec::len),
        "one answer per request"
    );
    answers
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A snapshot as the script reads and writes it: the message's field names, values in hex.
fn to_json(s: &Snapshot) -> Value {
    json!({
        "id": s.id,
        "namespace": s.namespace,
        "user_id": s.user_id,
        "attrs": s.attrs.iter().map(|(k, v)| (k.clone(), Value::from(hex(v)))).collect::<serde_json::Map<_, _>>(),
        "version": s.version,
        "created_at_ms": s.created_at_ms,
        "issued_at_ms": s.issued_at_ms,
        "expires_at_ms": s.expires_at_ms,
        "ttl_ms": s.ttl_ms,
        "epoch": s.epoch,
        "base_version": s.base_version,
        "offline_set": s.offline_set,
        "offline_removed": s.offline_removed,
        "offline_user": s.offline_user,
        "confirmed_at_ms": s.confirmed_at_ms,
    })
}

/// The key as the script takes it.
fn key_json(material: &[u8], kid: Option<&str>) -> Value {
    match kid {
        Some(kid) => json!({ "material": hex(material), "kid": kid }),
        None => json!({ "material": hex(material) }),
    }
}

/// A request to decode `cookie` with `keys` at `NOW_MS`.
fn decode_request(cookie: &str, keys: &[Value]) -> Value {
    json!({ "op": "decode", "keys": keys, "cookie": cookie, "now_ms": NOW_MS })
}

/// The snapshot in a decode answer, or why it was refused.
fn decoded(answer: &Value) -> Result<Value, String> {
    match (answer.get("snapshot"), answer.get("refused")) {
        (Some(snapshot), None) => Ok(snapshot.clone()),
        (None, Some(Value::String(why))) => Err(why.clone()),
        _ => panic!("not a decode answer: {answer}"),
    }
}

/// The snapshots both sides exchange: every field set, binary and empty values, an empty and a
/// non-ASCII key, 64-bit extremes; a confirmed one without offline changes; a bare one.
fn snapshots() -> Vec<Snapshot> {
    let full = Snapshot {
        id: "Zm9vYmFyYmF6cXV4MDEyMzQ1Njc4OWFi".into(),
        namespace: "shop".into(),
        user_id: "ann@example.com".into(),
        attrs: BTreeMap::from([
            ("bin".into(), (0..=255).collect()),
            ("empty".into(), vec![]),
            (String::new(), b"empty key".to_vec()),
            ("clé ✓".into(), "välue".as_bytes().to_vec()),
            ("cart".into(), b"[1,2,3]".to_vec()),
        ]),
        version: 7,
        created_at_ms: NOW_MS - 86_400_000,
        issued_at_ms: NOW_MS,
        expires_at_ms: u64::MAX,
        ttl_ms: u64::MAX,
        epoch: "01HF0Z7Q8J3X5K2M9N4P6R8T0V".into(),
        base_version: 5,
        offline_set: vec!["bin".into(), "cart".into(), String::new()],
        offline_removed: vec!["gone".into(), "clé ✗".into()],
        offline_user: true,
        confirmed_at_ms: NOW_MS - 60_000,
        unsure_write_id: Default::default(),
        write_id: Default::default(),
    };
    let confirmed = Snapshot {
        id: "A".repeat(32),
        namespace: "default".into(),
        user_id: "bob".into(),
        attrs: BTreeMap::from([("csrf".into(), b"tok".to_vec())]),
        version: 3,
        created_at_ms: NOW_MS - 1_000,
        issued_at_ms: NOW_MS,
        expires_at_ms: NOW_MS + 1_800_000,
        ttl_ms: 1_800_000,
        epoch: "e1".into(),
        base_version: 3,
        confirmed_at_ms: NOW_MS,
        ..Default::default()
    };
    let bare = Snapshot {
        id: "x".into(),
        expires_at_ms: NOW_MS + 1,
        ..Default::default()
    };
    vec![full, confirmed, bare]
}

/// A codec over `material` (derived key id, or `kid`) sealing with `encryption`.
fn codec(material: &[u8], kid: Option<&str>, encryption: Encryption) -> CookieCodec {
    let key = match kid {
        Some(kid) => CookieKey::with_id(kid, material),
        None => CookieKey::new(material),
    }
    .unwrap();
    CookieCodec::new(KeyRing::new(vec![key]).unwrap(), encryption)
}

/// `value` with one bit of its binary body (v2) flipped, `percent` of the way from its first
/// byte (the mode) to its last (the end of the tag).
fn flip_body_byte(value: &str, percent: usize) -> String {
    let (header, body) = value.rsplit_once('.').unwrap();
    let mut bytes = URL_SAFE_NO_PAD.decode(body).unwrap();
    let i = (bytes.len() - 1) * percent / 100;
    bytes[i] ^= 0x01;
    format!("{header}.{}", URL_SAFE_NO_PAD.encode(bytes))
}

fn at_now() -> std::time::SystemTime {
    UNIX_EPOCH + Duration::from_millis(NOW_MS)
}

#[test]
fn python_reads_what_rust_writes_in_every_mode_and_format() {
    if !python_available("python_reads_what_rust_writes_in_every_mode_and_format") {
        return;
    }
    let keys = [
        key_json(&MATERIAL, None),
        key_json(&OTHER_MATERIAL, Some(EXPLICIT_KID)),
    ];
    let mut requests = Vec::new();
    let mut expected = Vec::new();
    for snapshot in snapshots() {
        for (encryption, mode) in MODES {
            // v2 with a derived key id and with an explicit one; v1 as during an upgrade.
            let writers = [
                (codec(&MATERIAL, None, encryption), "v2"),
                (
                    codec(&OTHER_MATERIAL, Some(EXPLICIT_KID), encryption),
                    "v2 explicit kid",
                ),
                (
                    codec(&MATERIAL, None, encryption).with_format(CookieFormat::V1),
                    "v1",
                ),
            ];
            for (writer, format) in writers {
                let cookie = writer.encode(&snapshot).unwrap();
                requests.push(decode_request(&cookie, &keys));
                expected.push((
                    format!("{mode} {format} {}", snapshot.id),
                    to_json(&snapshot),
                ));
            }
        }
    }
    let answers = python(&Value::from(requests));
    for ((what, snapshot), answer) in expected.iter().zip(&answers) {
        assert_eq!(decoded(answer).as_ref(), Ok(snapshot), "{what}");
    }

    // Python applies the reader's checks after decoding too (spec, section 5, steps 7 to 10).
    let [full, confirmed, _] = <[Snapshot; 3]>::try_from(snapshots()).unwrap();
    let plain = codec(&MATERIAL, None, Encryption::None);
    let unconfirmed = Snapshot {
        confirmed_at_ms: 0,
        ..confirmed.clone()
    };
    let future = Snapshot {
        issued_at_ms: NOW_MS + 60_001,
        ..confirmed.clone()
    };
    let checks = [
        (
            &confirmed,
            NOW_MS + 1_800_000,
            "default",
            3_600_000,
            "expired",
        ),
        (&future, NOW_MS, "default", 3_600_000, "expired"),
        (&confirmed, NOW_MS, "shop", 3_600_000, "other session"),
        (&unconfirmed, NOW_MS, "default", 3_600_000, "unconfirmed"),
        (&confirmed, NOW_MS + 1_000, "default", 1_000, "past max age"),
        (&confirmed, NOW_MS + 999, "default", 1_000, "accepted"),
        (&full, NOW_MS, "shop", 3_600_000, "accepted"),
    ];
    let requests: Vec<Value> = checks
        .iter()
        .map(|(snapshot, now_ms, namespace, max_age_ms, _)| {
            json!({
                "op": "decode",
                "keys": [key_json(&MATERIAL, None)],
                "cookie": plain.encode(snapshot).unwrap(),
                "now_ms": now_ms,
                "for": { "id": snapshot.id, "namespace": namespace, "max_age_ms": max_age_ms },
            })
        })
        .collect();
    let answers = python(&Value::from(requests));
    for ((snapshot, now_ms, namespace, _, outcome), answer) in checks.iter().zip(&answers) {
        let got = decoded(answer);
        if *outcome == "accepted" {
            assert_eq!(got, Ok(to_json(snapshot)), "{namespace} at {now_ms}");
        } else {
            assert_eq!(got, Err((*outcome).to_owned()), "{namespace} at {now_ms}");
        }
    }
}

#[test]
fn rust_reads_what_python_writes_in_every_mode() {
    if !python_available("rust_reads_what_python_writes_in_every_mode") {
        return;
    }
    let mut requests = Vec::new();
    let mut cases = Vec::new();
    for snapshot in snapshots() {
        for (encryption, mode) in MODES {
            for kid in [None, Some(EXPLICIT_KID)] {
                requests.push(json!({
                    "op": "encode",
                    "key": key_json(&MATERIAL, kid),
                    "mode": mode,
                    "snapshot": to_json(&snapshot),
                }));
                cases.push((snapshot.clone(), encryption, kid));
            }
        }
    }
    let answers = python(&Value::from(requests));
    for ((snapshot, encryption, kid), answer) in cases.iter().zip(&answers) {
        let cookie = answer["cookie"].as_str().expect("a cookie");
        // Any mode's codec reads every mode.
        let reader = codec(&MATERIAL, *kid, Encryption::None);
        assert_eq!(
            reader.decode_at(cookie, at_now()).as_ref(),
            Ok(snapshot),
            "{encryption:?} {kid:?}: {cookie}"
        );
        assert!(
            reader.is_current(cookie),
            "written with the signing key's id, in v2"
        );
        if *encryption == Encryption::None {
            // Plain mode is deterministic, and both write the canonical encoding.
            assert_eq!(
                cookie,
                codec(&MATERIAL, *kid, Encryption::None)
                    .encode(snapshot)
                    .unwrap(),
                "byte for byte"
            );
        }
    }
}

#[test]
fn tampered_and_wrongly_keyed_cookies_are_refused_both_ways() {
    if !python_available("tampered_and_wrongly_keyed_cookies_are_refused_both_ways") {
        return;
    }
    let snapshot = snapshots().swap_remove(1);
    let right_key = [key_json(&MATERIAL, Some(EXPLICIT_KID))];
    let wrong_material = [key_json(&OTHER_MATERIAL, Some(EXPLICIT_KID))];
    let wrong_id = [key_json(&MATERIAL, None)];

    // Rust writes, Python reads.
    let mut requests = Vec::new();
    let mut expected = Vec::new();
    for (encryption, mode) in MODES {
        let cookie = codec(&MATERIAL, Some(EXPLICIT_KID), encryption)
            .encode(&snapshot)
            .unwrap();
        for percent in [0, 50, 100] {
            // The mode byte, the middle of the snapshot (or nonce), the last tag byte.
            requests.push(decode_request(
                &flip_body_byte(&cookie, percent),
                &right_key,
            ));
            expected.push((
                format!("{mode}: byte at {percent}% flipped"),
                "bad signature",
            ));
        }
        requests.push(decode_request(&cookie, &wrong_material));
        expected.push((
            format!("{mode}: the same kid, other material"),
            "bad signature",
        ));
        requests.push(decode_request(&cookie, &wrong_id));
        expected.push((format!("{mode}: no key of that id"), "unknown key"));
        requests.push(decode_request(&cookie, &right_key));
        expected.push((format!("{mode}: untouched"), "accepted"));
    }
    let answers = python(&Value::from(requests));
    for ((what, outcome), answer) in expected.iter().zip(&answers) {
        let got = decoded(answer);
        if *outcome == "accepted" {
            assert_eq!(got, Ok(to_json(&snapshot)), "{what}");
        } else if what.contains("byte at 0%") {
            // Flipping the mode byte makes plain mode 1 (AES-GCM, whose tag fails) and AES-GCM
            // mode 0 (plain, whose HMAC fails): refused either way, never read.
            assert!(
                matches!(
                    got.as_ref().map_err(String::as_str),
                    Err("bad signature" | "malformed")
                ),
                "{what}: {got:?}"
            );
        } else {
            assert_eq!(got, Err((*outcome).to_owned()), "{what}");
        }
    }

    // Python writes, Rust reads.
    let requests: Vec<Value> = MODES
        .iter()
        .map(|(_, mode)| {
            json!({
                "op": "encode",
                "key": key_json(&MATERIAL, Some(EXPLICIT_KID)),
                "mode": mode,
                "snapshot": to_json(&snapshot),
            })
        })
        .collect();
    let answers = python(&Value::from(requests));
    let reader = codec(&MATERIAL, Some(EXPLICIT_KID), Encryption::None);
    let forger_ring = codec(&OTHER_MATERIAL, Some(EXPLICIT_KID), Encryption::None);
    let other_ring = codec(&MATERIAL, None, Encryption::None);
    for ((_, mode), answer) in MODES.iter().zip(&answers) {
        let cookie = answer["cookie"].as_str().expect("a cookie");
        assert_eq!(
            reader.decode_at(cookie, at_now()).as_ref(),
            Ok(&snapshot),
            "{mode}"
        );
        for percent in [50, 100] {
            assert_eq!(
                reader.decode_at(&flip_body_byte(cookie, percent), at_now()),
                Err(CookieError::BadSignature),
                "{mode}: byte at {percent}% flipped"
            );
        }
        assert!(
            reader
                .decode_at(&flip_body_byte(cookie, 0), at_now())
                .is_err(),
            "{mode}: mode byte flipped"
        );
        assert_eq!(
            forger_ring.decode_at(cookie, at_now()),
            Err(CookieError::BadSignature),
            "{mode}: the same kid, other material"
        );
        assert_eq!(
            other_ring.decode_at(cookie, at_now()),
            Err(CookieError::UnknownKey),
            "{mode}: no key of that id"
        );
    }
}

#[test]
fn python_derives_the_keys_the_spec_shows() {
    if !python_available("python_derives_the_keys_the_spec_shows") {
        return;
    }
    let spec = include_str!("../../docs/snapshot-cookie.md");
    let material: Vec<u8> = (0..32).collect();
    let answers = python(&json!([{ "op": "derive", "material": hex(&material) }]));
    let derived = &answers[0];
    let kid = derived["kid"].as_str().unwrap();
    assert_eq!(
        kid,
        CookieKey::new(&material).unwrap().id(),
        "the same key id"
    );
    for line in [
        format!("SHA-256          {}", derived["sha256"].as_str().unwrap()),
        format!("kid              {kid}"),
        format!("HKDF PRK         {}", derived["prk"].as_str().unwrap()),
        format!("mac key          {}", derived["mac"].as_str().unwrap()),
        format!("aes-256-gcm key  {}", derived["aes"].as_str().unwrap()),
        format!("chacha20 key     {}", derived["chacha"].as_str().unwrap()),
    ] {
        assert!(
            spec.contains(&line),
            "docs/snapshot-cookie.md lacks `{line}`"
        );
    }
    // And the derived secrets are the ones the Rust codec uses: its plain cookie of a snapshot
    // (the mac key), and its sealed ones (the AEAD keys), read in Python with this material.
    let snapshot = snapshots().swap_remove(1);
    let requests: Vec<Value> = MODES
        .iter()
        .map(|(encryption, _)| {
            let cookie = codec(&material, None, *encryption)
                .encode(&snapshot)
                .unwrap();
            decode_request(&cookie, &[key_json(&material, None)])
        })
        .collect();
    for answer in python(&Value::from(requests)) {
        assert_eq!(decoded(&answer), Ok(to_json(&snapshot)));
    }
}
