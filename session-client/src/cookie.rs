//! The signed-cookie codec: a session snapshot a backend can trust when the store is
//! unreachable.
//!
//! Wire format: `v1.<kid>.<payload>.<tag>`, all parts base64url without padding except `v1` and
//! the key id:
//! - `kid` names the key that signed it (1 to 16 of `[A-Za-z0-9_-]`), so keys rotate: one key of
//!   the [`KeyRing`] signs, every key in it verifies, and a key dropped from the ring stops
//!   verifying.
//! - `payload` is a mode byte then the body: `0` plain (the snapshot, readable by the client),
//!   `1` AES-256-GCM or `2` ChaCha20-Poly1305 (a 96-bit random nonce, then the sealed snapshot).
//! - `tag` is HMAC-SHA256 over `v1.<kid>.<payload>` (encrypt-then-MAC), checked in constant time
//!   by `ring::hmac::verify` before anything else of the payload is looked at.
//!
//! The snapshot carries the session id, namespace, user, attributes, version, created-at,
//! issued-at, expires-at and ttl, all inside the signed part. Decoding refuses any value over
//! [`MAX_COOKIE_BYTES`] before reading it, so hostile input never costs more than that; it never
//! panics. Encoding refuses to produce a value over the same limit (browsers drop larger
//! cookies silently): the caller then keeps the session in the store only.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use prost::Message as _;
use ring::rand::{SecureRandom as _, SystemRandom};
use ring::{aead, hkdf, hmac};

/// The most bytes a cookie value may have: the common browser limit for one cookie.
pub const MAX_COOKIE_BYTES: usize = 4096;
/// Fewest bytes of secret a key must have (HMAC-SHA256 and AES-256 both want 256 bits).
pub const MIN_KEY_BYTES: usize = 32;
/// How far in the future an issued-at may be (clock skew between backends).
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);
/// Longest key id.
const MAX_KID_LEN: usize = 16;
/// Bytes of a base64url HMAC-SHA256 tag without padding.
const TAG_B64_LEN: usize = 43;
/// Payload mode bytes.
const MODE_PLAIN: u8 = 0;
const MODE_AES_256_GCM: u8 = 1;
const MODE_CHACHA20_POLY1305: u8 = 2;

/// A session as the cookie carries it.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Snapshot {
    /// Session id.
    #[prost(string, tag = "1")]
    pub id: String,
    /// Namespace of the session.
    #[prost(string, tag = "2")]
    pub namespace: String,
    /// Owner, or empty.
    #[prost(string, tag = "3")]
    pub user_id: String,
    /// Attributes.
    #[prost(btree_map = "string, bytes", tag = "4")]
    pub attrs: BTreeMap<String, Vec<u8>>,
    /// Session version this snapshot reflects.
    #[prost(uint64, tag = "5")]
    pub version: u64,
    /// When the session was created (unix ms).
    #[prost(uint64, tag = "6")]
    pub created_at_ms: u64,
    /// When this snapshot was made (unix ms).
    #[prost(uint64, tag = "7")]
    pub issued_at_ms: u64,
    /// When this snapshot stops being valid (unix ms).
    #[prost(uint64, tag = "8")]
    pub expires_at_ms: u64,
    /// The session's sliding ttl (ms).
    #[prost(uint64, tag = "9")]
    pub ttl_ms: u64,
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Key material written as text: hex (an even number of hex digits) or base64 (standard or
/// url-safe, padded or not). `None` when it is neither. The length is the caller's to check
/// (see [`MIN_KEY_BYTES`]), so that flags of every binary read keys the same way.
pub fn key_from_text(text: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if text.len().is_multiple_of(2) && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .ok();
    }
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(text).ok())
}

/// Which AEAD hides the content, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    /// Signed only: the user can read the snapshot, not change it.
    None,
    /// Signed and sealed with AES-256-GCM.
    Aes256Gcm,
    /// Signed and sealed with ChaCha20-Poly1305.
    ChaCha20Poly1305,
}

/// Why a cookie could not be made or trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CookieError {
    /// Not of the `v1.<kid>.<payload>.<tag>` shape, or its content does not decode.
    #[error("malformed session cookie")]
    Malformed,
    /// Signed by a key the ring does not hold (retired or foreign).
    #[error("session cookie signed by an unknown key")]
    UnknownKey,
    /// The tag does not match: forged or altered.
    #[error("session cookie signature does not verify")]
    BadSignature,
    /// Past its expiry, or issued in the future beyond clock skew.
    #[error("session cookie expired or not yet valid")]
    Expired,
    /// Over [`MAX_COOKIE_BYTES`].
    #[error("session cookie of {0} bytes is over the {MAX_COOKIE_BYTES}-byte limit")]
    TooLarge(usize),
    /// A key was refused (too short, bad id) or the random source failed.
    #[error("cookie key error: {0}")]
    Key(&'static str),
}

/// One key: an id and the secrets derived from its material.
pub struct CookieKey {
    /// Id written into cookies it signs.
    kid: String,
    /// HMAC-SHA256 key, derived with HKDF (info `stickless cookie mac v1`).
    mac: hmac::Key,
    /// AES-256-GCM key, derived with HKDF (info `stickless cookie aes-256-gcm v1`).
    aes: aead::LessSafeKey,
    /// ChaCha20-Poly1305 key, derived with HKDF (info `stickless cookie chacha20 v1`).
    chacha: aead::LessSafeKey,
}

impl std::fmt::Debug for CookieKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CookieKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// An HKDF output length for an AEAD key.
struct KeyLen(usize);

impl hkdf::KeyType for KeyLen {
    fn len(&self) -> usize {
        self.0
    }
}

fn derive(prk: &hkdf::Prk, info: &'static [u8], len: usize) -> Result<Vec<u8>, CookieError> {
    let mut out = vec![0u8; len];
    prk.expand(&[info], KeyLen(len))
        .and_then(|okm| okm.fill(&mut out))
        .map_err(|_| CookieError::Key("key derivation failed"))?;
    Ok(out)
}

impl CookieKey {
    /// A key from secret material (at least [`MIN_KEY_BYTES`]), with an id derived from it (a
    /// hash prefix, so every backend given the same material agrees on the id).
    pub fn new(material: &[u8]) -> Result<Self, CookieError> {
        let digest = ring::digest::digest(&ring::digest::SHA256, material);
        let kid = URL_SAFE_NO_PAD.encode(&digest.as_ref()[..6]);
        Self::with_id(kid, material)
    }

    /// A key with an explicit id (1 to 16 of `[A-Za-z0-9_-]`).
    pub fn with_id(kid: impl Into<String>, material: &[u8]) -> Result<Self, CookieError> {
        let kid = kid.into();
        if kid.is_empty()
            || kid.len() > MAX_KID_LEN
            || !kid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(CookieError::Key("key id must be 1 to 16 of [A-Za-z0-9_-]"));
        }
        if material.len() < MIN_KEY_BYTES {
            return Err(CookieError::Key("key material must be at least 32 bytes"));
        }
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"stickless-cookie").extract(material);
        let mac = hmac::Key::new(
            hmac::HMAC_SHA256,
            &derive(&prk, b"stickless cookie mac v1", 32)?,
        );
        let aead_key = |alg: &'static aead::Algorithm, info: &'static [u8]| {
            let bytes = derive(&prk, info, alg.key_len())?;
            aead::UnboundKey::new(alg, &bytes)
                .map(aead::LessSafeKey::new)
                .map_err(|_| CookieError::Key("bad AEAD key"))
        };
        Ok(CookieKey {
            kid,
            mac,
            aes: aead_key(&aead::AES_256_GCM, b"stickless cookie aes-256-gcm v1")?,
            chacha: aead_key(&aead::CHACHA20_POLY1305, b"stickless cookie chacha20 v1")?,
        })
    }

    /// The id written into cookies this key signs.
    pub fn id(&self) -> &str {
        &self.kid
    }
}

/// Keys for rotation: the first signs, all verify.
#[derive(Debug)]
pub struct KeyRing {
    /// Signing key first, then keys that only verify (rotated out, or rotating in).
    keys: Vec<CookieKey>,
}

impl KeyRing {
    /// A ring whose first key signs. Empty rings and duplicate ids are refused.
    pub fn new(keys: Vec<CookieKey>) -> Result<Self, CookieError> {
        if keys.is_empty() {
            return Err(CookieError::Key("a key ring needs at least one key"));
        }
        for (i, key) in keys.iter().enumerate() {
            if keys[..i].iter().any(|k| k.kid == key.kid) {
                return Err(CookieError::Key("two keys in the ring share an id"));
            }
        }
        Ok(KeyRing { keys })
    }

    fn signing(&self) -> &CookieKey {
        &self.keys[0]
    }

    fn find(&self, kid: &str) -> Option<&CookieKey> {
        self.keys.iter().find(|k| k.kid == kid)
    }
}

/// Encodes and verifies snapshot cookies with a [`KeyRing`].
#[derive(Debug)]
pub struct CookieCodec {
    /// The keys.
    ring: KeyRing,
    /// Whether, and with what, the content is sealed.
    encryption: Encryption,
    /// Nonces for sealing.
    rng: SystemRandom,
}

impl CookieCodec {
    /// A codec over `ring`, sealing content with `encryption`. Decoding accepts every mode, so
    /// turning encryption on or off never logs anyone out.
    pub fn new(ring: KeyRing, encryption: Encryption) -> Self {
        CookieCodec {
            ring,
            encryption,
            rng: SystemRandom::new(),
        }
    }

    /// The cookie value for `snapshot`, or [`CookieError::TooLarge`] past [`MAX_COOKIE_BYTES`].
    pub fn encode(&self, snapshot: &Snapshot) -> Result<String, CookieError> {
        let key = self.ring.signing();
        let plain = snapshot.encode_to_vec();
        let body = match self.encryption {
            Encryption::None => [&[MODE_PLAIN][..], &plain].concat(),
            Encryption::Aes256Gcm => self.seal(&key.aes, MODE_AES_256_GCM, &key.kid, plain)?,
            Encryption::ChaCha20Poly1305 => {
                self.seal(&key.chacha, MODE_CHACHA20_POLY1305, &key.kid, plain)?
            }
        };
        let signed = format!("v1.{}.{}", key.kid, URL_SAFE_NO_PAD.encode(body));
        // Refuse before signing: the tag adds 44 bytes.
        let len = signed.len() + 1 + TAG_B64_LEN;
        if len > MAX_COOKIE_BYTES {
            return Err(CookieError::TooLarge(len));
        }
        let tag = hmac::sign(&key.mac, signed.as_bytes());
        Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref())))
    }

    fn seal(
        &self,
        key: &aead::LessSafeKey,
        mode: u8,
        kid: &str,
        mut plain: Vec<u8>,
    ) -> Result<Vec<u8>, CookieError> {
        let mut nonce = [0u8; aead::NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| CookieError::Key("random source failed"))?;
        key.seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(kid.as_bytes()),
            &mut plain,
        )
        .map_err(|_| CookieError::Key("sealing failed"))?;
        Ok([&[mode][..], &nonce, &plain].concat())
    }

    /// Verifies and decodes a cookie value, checking its validity window against now.
    pub fn decode(&self, value: &str) -> Result<Snapshot, CookieError> {
        self.decode_at(value, SystemTime::now())
    }

    /// Verifies and decodes a cookie value as of `now`.
    pub fn decode_at(&self, value: &str, now: SystemTime) -> Result<Snapshot, CookieError> {
        if value.len() > MAX_COOKIE_BYTES {
            return Err(CookieError::TooLarge(value.len()));
        }
        let (signed, tag) = value.rsplit_once('.').ok_or(CookieError::Malformed)?;
        let mut parts = signed.splitn(3, '.');
        let (Some("v1"), Some(kid), Some(payload)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(CookieError::Malformed);
        };
        if kid.is_empty() || kid.len() > MAX_KID_LEN || payload.contains('.') {
            return Err(CookieError::Malformed);
        }
        if tag.len() != TAG_B64_LEN {
            return Err(CookieError::Malformed);
        }
        let key = self.ring.find(kid).ok_or(CookieError::UnknownKey)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| CookieError::Malformed)?;
        hmac::verify(&key.mac, signed.as_bytes(), &tag).map_err(|_| CookieError::BadSignature)?;

        // Authentic from here on; still decoded defensively.
        let body = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| CookieError::Malformed)?;
        let (&mode, rest) = body.split_first().ok_or(CookieError::Malformed)?;
        let plain = match mode {
            MODE_PLAIN => rest.to_vec(),
            MODE_AES_256_GCM => open(&key.aes, kid, rest)?,
            MODE_CHACHA20_POLY1305 => open(&key.chacha, kid, rest)?,
            _ => return Err(CookieError::Malformed),
        };
        let snapshot = Snapshot::decode(plain.as_slice()).map_err(|_| CookieError::Malformed)?;
        let now_ms = unix_ms(now);
        let skew_ms = u64::try_from(MAX_CLOCK_SKEW.as_millis()).unwrap_or(u64::MAX);
        if snapshot.expires_at_ms <= now_ms
            || snapshot.issued_at_ms > now_ms.saturating_add(skew_ms)
        {
            return Err(CookieError::Expired);
        }
        Ok(snapshot)
    }
}

fn open(key: &aead::LessSafeKey, kid: &str, sealed: &[u8]) -> Result<Vec<u8>, CookieError> {
    if sealed.len() < aead::NONCE_LEN {
        return Err(CookieError::Malformed);
    }
    let (nonce, ciphertext) = sealed.split_at(aead::NONCE_LEN);
    let nonce =
        aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| CookieError::Malformed)?;
    let mut buf = ciphertext.to_vec();
    let plain = key
        .open_in_place(nonce, aead::Aad::from(kid.as_bytes()), &mut buf)
        .map_err(|_| CookieError::Malformed)?;
    Ok(plain.to_vec())
}

#[cfg(test)]
mod tests {
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
        }
    }

    #[test]
    fn round_trips_in_every_mode() {
        for mode in [
            Encryption::None,
            Encryption::Aes256Gcm,
            Encryption::ChaCha20Poly1305,
        ] {
            let codec = codec(&[1], mode);
            let snap = snapshot(100);
            let value = codec.encode(&snap).unwrap();
            assert!(value.starts_with("v1."));
            assert_eq!(codec.decode(&value).unwrap(), snap, "{mode:?}");
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
        for mode in [Encryption::None, Encryption::ChaCha20Poly1305] {
            let codec = codec(&[1], mode);
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
    fn bad_keys_are_refused() {
        assert!(CookieKey::new(&[0; 31]).is_err());
        assert!(CookieKey::with_id("", &[0; 32]).is_err());
        assert!(CookieKey::with_id("has.dot", &[0; 32]).is_err());
        assert!(KeyRing::new(vec![]).is_err());
        assert!(KeyRing::new(vec![key(1), key(1)]).is_err());
    }
}
