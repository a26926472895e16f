//! The signed-cookie codec: a session snapshot a backend can trust when the store is
//! unreachable.
//!
//! Wire format v2 (written by default): `v2.<kid>.<body>`, the body base64url without padding.
//! - `kid` names the key that made it (1 to 16 of `[A-Za-z0-9_-]`), so keys rotate: one key of
//!   the [`KeyRing`] signs, every key in it verifies, and a key dropped from the ring stops
//!   verifying.
//! - `body` is a mode byte, then:
//!   - `0` plain: the snapshot (readable by the client), then an HMAC-SHA256 tag over the
//!     bytes `v2.<kid>.`, the mode byte and the snapshot, checked in constant time by
//!     `ring::hmac::verify` before the snapshot is looked at;
//!   - `1` AES-256-GCM or `2` ChaCha20-Poly1305: a 96-bit random nonce, then the sealed
//!     snapshot and its AEAD tag, with `v2.<kid>.` and the mode byte as associated data. The
//!     AEAD tag authenticates, so no HMAC is added.
//!
//! Wire format v1 (the first release; always read, written only when asked with
//! [`CookieFormat::V1`], for a rolling upgrade from a release that reads nothing else):
//! `v1.<kid>.<payload>.<tag>`, `payload` the base64url mode byte and body as above without the
//! HMAC, and `tag` the base64url HMAC-SHA256 over the text `v1.<kid>.<payload>` (in sealed modes
//! too, with the kid alone as associated data).
//!
//! The snapshot carries the session id, namespace, user, attributes, version, created-at,
//! issued-at, expires-at and ttl, all inside the authenticated part. Decoding refuses any value
//! over [`MAX_COOKIE_BYTES`] before reading it, so hostile input never costs more than that; it
//! never panics. Encoding refuses to produce a value over the same limit (browsers drop larger
//! cookies silently): the caller then keeps the session in the store only.
//!
//! Cost: v1 ran HMAC-SHA256 over the base64 text (a third larger than the binary) in every mode,
//! and that was three quarters of a round trip's instructions for a 1 KB session. v2 runs it over
//! the binary in plain mode only, and the value is built in one buffer that the MAC and the AEAD
//! work on in place: no other copies of the session.
//!
//! Which session a snapshot stands for, when it is re-issued and how it converts to and from a
//! session is one policy, in [`Snapshot`]'s methods, [`CookieCodec::decode_for`] and
//! [`fits_in_cookie`]: every writer of snapshot cookies follows it. Key material written as text
//! (flags, environment) is read by [`key_material_from_text`].

use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use prost::Message as _;
use ring::rand::{SecureRandom as _, SystemRandom};
use ring::{aead, hkdf, hmac};

/// The most bytes a cookie value may have: the common browser limit for one cookie.
pub const MAX_COOKIE_BYTES: usize = 4096;
/// Fewest bytes of secret a key must have (HMAC-SHA256 and AES-256 both want 256 bits).
pub const MIN_KEY_BYTES: usize = 32;
/// How far in the future an issued-at may be, in ms (clock skew between backends).
const MAX_CLOCK_SKEW_MS: u64 = 60_000;
/// Longest key id.
const MAX_KID_LEN: usize = 16;
/// Bytes of an HMAC-SHA256 tag.
const TAG_LEN: usize = 32;
/// Bytes of a base64url HMAC-SHA256 tag without padding.
const TAG_B64_LEN: usize = base64_len(TAG_LEN);
/// What every v1 value starts with: the format version and its separator.
const V1_PREFIX: &str = "v1.";
/// What every v2 value starts with.
const V2_PREFIX: &str = "v2.";
/// Payload mode bytes.
const MODE_PLAIN: u8 = 0;
const MODE_AES_256_GCM: u8 = 1;
const MODE_CHACHA20_POLY1305: u8 = 2;

mod snapshot;

pub use snapshot::{DEFAULT_SNAPSHOT_MAX_AGE, Snapshot, SnapshotPolicy, fits_in_cookie, unix_ms};

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

/// Why key material written as text was refused. Its message is a predicate, for the caller to
/// prefix with the key's name (`format!("cookie key {error}")`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyTextError {
    /// Neither hex nor base64.
    #[error("must be hex or base64")]
    NotHexOrBase64,
    /// Fewer bytes than asked for.
    #[error("must be at least {min} bytes, got {got} (e.g. `openssl rand -hex 32`)")]
    TooShort {
        /// Fewest bytes accepted.
        min: usize,
        /// Bytes given.
        got: usize,
    },
}

/// Key material written as text ([`key_from_text`]: hex or base64) of at least `min` bytes
/// ([`MIN_KEY_BYTES`] for a [`CookieKey`]): how every binary reads a key from a flag or the
/// environment.
pub fn key_material_from_text(text: &str, min: usize) -> Result<Vec<u8>, KeyTextError> {
    let bytes = key_from_text(text).ok_or(KeyTextError::NotHexOrBase64)?;
    if bytes.len() < min {
        return Err(KeyTextError::TooShort {
            min,
            got: bytes.len(),
        });
    }
    Ok(bytes)
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

/// Which wire format [`CookieCodec::encode`] writes. Decoding reads both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CookieFormat {
    /// The first release's `v1.<kid>.<payload>.<tag>`: only for a rolling upgrade, while some
    /// backend still runs a release that reads nothing else.
    V1,
    /// `v2.<kid>.<body>`: the MAC over the binary, and no MAC beside an AEAD.
    #[default]
    V2,
}

/// Why a cookie could not be made or trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CookieError {
    /// Not of the `v2.<kid>.<body>` or `v1.<kid>.<payload>.<tag>` shape, or its content does
    /// not decode.
    #[error("malformed session cookie")]
    Malformed,
    /// Signed by a key the ring does not hold (retired or foreign).
    #[error("session cookie signed by an unknown key")]
    UnknownKey,
    /// The HMAC or AEAD tag does not match: forged or altered.
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
    /// The wire format written.
    format: CookieFormat,
    /// Nonces for sealing.
    rng: SystemRandom,
}

impl CookieCodec {
    /// A codec over `ring`, sealing content with `encryption` and writing [`CookieFormat::V2`].
    /// Decoding accepts every mode and both formats, so turning encryption on or off, or
    /// upgrading from a release that wrote v1, never logs anyone out.
    pub fn new(ring: KeyRing, encryption: Encryption) -> Self {
        CookieCodec {
            ring,
            encryption,
            format: CookieFormat::default(),
            rng: SystemRandom::new(),
        }
    }

    /// The same codec writing `format` (decoding still reads both).
    pub fn with_format(mut self, format: CookieFormat) -> Self {
        self.format = format;
        self
    }

    /// The cookie value for `snapshot`, or [`CookieError::TooLarge`] past [`MAX_COOKIE_BYTES`].
    pub fn encode(&self, snapshot: &Snapshot) -> Result<String, CookieError> {
        let key = self.ring.signing();
        let sealing = match self.encryption {
            Encryption::None => None,
            Encryption::Aes256Gcm => Some((MODE_AES_256_GCM, &key.aes)),
            Encryption::ChaCha20Poly1305 => Some((MODE_CHACHA20_POLY1305, &key.chacha)),
        };
        match self.format {
            CookieFormat::V1 => self.encode_v1(key, sealing, snapshot),
            CookieFormat::V2 => self.encode_v2(key, sealing, snapshot),
        }
    }

    /// `v2.<kid>.<body>`: the header and the binary body are built in one buffer, so that the
    /// HMAC (plain) or the AEAD (sealed, the header as associated data) reads them in place.
    fn encode_v2(
        &self,
        key: &CookieKey,
        sealing: Option<(u8, &aead::LessSafeKey)>,
        snapshot: &Snapshot,
    ) -> Result<String, CookieError> {
        let header_len = V2_PREFIX.len() + key.kid.len() + 1;
        let body_len = 1
            + snapshot.encoded_len()
            + sealing.map_or(TAG_LEN, |(_, k)| aead::NONCE_LEN + k.algorithm().tag_len());
        let len = header_len + base64_len(body_len);
        if len > MAX_COOKIE_BYTES {
            return Err(CookieError::TooLarge(len));
        }
        let mut buf = Vec::with_capacity(header_len + body_len);
        buf.extend_from_slice(V2_PREFIX.as_bytes());
        buf.extend_from_slice(key.kid.as_bytes());
        buf.push(b'.');
        match sealing {
            None => {
                buf.push(MODE_PLAIN);
                encode_snapshot(snapshot, &mut buf)?;
                let tag = hmac::sign(&key.mac, &buf);
                buf.extend_from_slice(tag.as_ref());
            }
            Some((mode, aead_key)) => {
                buf.push(mode);
                let mut nonce = [0u8; aead::NONCE_LEN];
                self.rng
                    .fill(&mut nonce)
                    .map_err(|_| CookieError::Key("random source failed"))?;
                buf.extend_from_slice(&nonce);
                encode_snapshot(snapshot, &mut buf)?;
                let (aad, rest) = buf.split_at_mut(header_len + 1);
                let tag = aead_key
                    .seal_in_place_separate_tag(
                        aead::Nonce::assume_unique_for_key(nonce),
                        aead::Aad::from(&*aad),
                        &mut rest[aead::NONCE_LEN..],
                    )
                    .map_err(|_| CookieError::Key("sealing failed"))?;
                buf.extend_from_slice(tag.as_ref());
            }
        }
        let mut value = String::with_capacity(len);
        value.push_str(V2_PREFIX);
        value.push_str(&key.kid);
        value.push('.');
        URL_SAFE_NO_PAD.encode_string(&buf[header_len..], &mut value);
        Ok(value)
    }

    /// `v1.<kid>.<payload>.<tag>`, the HMAC over the text.
    fn encode_v1(
        &self,
        key: &CookieKey,
        sealing: Option<(u8, &aead::LessSafeKey)>,
        snapshot: &Snapshot,
    ) -> Result<String, CookieError> {
        let plain_len = snapshot.encoded_len();
        let body_len =
            1 + plain_len + sealing.map_or(0, |(_, k)| aead::NONCE_LEN + k.algorithm().tag_len());
        let payload_len = base64_len(body_len);
        // Refuse before any work: the whole value's length is known from the snapshot's.
        let len = V1_PREFIX.len() + key.kid.len() + 1 + payload_len + 1 + TAG_B64_LEN;
        if len > MAX_COOKIE_BYTES {
            return Err(CookieError::TooLarge(len));
        }

        // The body (mode byte, then nonce, snapshot, AEAD tag when sealed) is built in one buffer.
        let mut body = Vec::with_capacity(body_len);
        match sealing {
            None => {
                body.push(MODE_PLAIN);
                encode_snapshot(snapshot, &mut body)?;
            }
            Some((mode, aead_key)) => {
                let mut nonce = [0u8; aead::NONCE_LEN];
                self.rng
                    .fill(&mut nonce)
                    .map_err(|_| CookieError::Key("random source failed"))?;
                body.push(mode);
                body.extend_from_slice(&nonce);
                encode_snapshot(snapshot, &mut body)?;
                let tag = aead_key
                    .seal_in_place_separate_tag(
                        aead::Nonce::assume_unique_for_key(nonce),
                        aead::Aad::from(key.kid.as_bytes()),
                        &mut body[1 + aead::NONCE_LEN..],
                    )
                    .map_err(|_| CookieError::Key("sealing failed"))?;
                body.extend_from_slice(tag.as_ref());
            }
        }

        // The value is written once, into a string of its final size; the MAC reads it in place.
        let mut value = String::with_capacity(len);
        value.push_str(V1_PREFIX);
        value.push_str(&key.kid);
        value.push('.');
        URL_SAFE_NO_PAD.encode_string(&body, &mut value);
        let tag = hmac::sign(&key.mac, value.as_bytes());
        value.push('.');
        URL_SAFE_NO_PAD.encode_string(tag.as_ref(), &mut value);
        Ok(value)
    }

    /// Whether `value` is written the way this codec writes now: its format and the signing
    /// key's id. A valid cookie that is not current (signed by a key rotating out, or in the
    /// v1 format during an upgrade) should be re-issued, so that the old key can be dropped
    /// without losing anyone's snapshot. Says nothing about authenticity: decode for that.
    pub fn is_current(&self, value: &str) -> bool {
        let prefix = match self.format {
            CookieFormat::V1 => V1_PREFIX,
            CookieFormat::V2 => V2_PREFIX,
        };
        value
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_once('.'))
            .is_some_and(|(kid, _)| kid == self.ring.signing().kid)
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
        let mut buf = Vec::new();
        let plain = if value.starts_with(V2_PREFIX) {
            self.open_v2(value, &mut buf)?
        } else {
            self.open_v1(value, &mut buf)?
        };
        // Authentic from here on; still decoded defensively.
        let snapshot = Snapshot::decode(plain).map_err(|_| CookieError::Malformed)?;
        let now_ms = unix_ms(now);
        if snapshot.expires_at_ms <= now_ms
            || snapshot.issued_at_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS)
        {
            return Err(CookieError::Expired);
        }
        Ok(snapshot)
    }

    /// Authenticates a v2 value, decoding it into `buf` behind its header, and returns the
    /// snapshot's bytes.
    fn open_v2<'a>(&self, value: &str, buf: &'a mut Vec<u8>) -> Result<&'a [u8], CookieError> {
        let (kid, body) = value[V2_PREFIX.len()..]
            .split_once('.')
            .ok_or(CookieError::Malformed)?;
        if kid.is_empty() || kid.len() > MAX_KID_LEN || body.contains('.') {
            return Err(CookieError::Malformed);
        }
        let key = self.ring.find(kid).ok_or(CookieError::UnknownKey)?;
        let header_len = V2_PREFIX.len() + kid.len() + 1;
        buf.reserve(value.len());
        buf.extend_from_slice(&value.as_bytes()[..header_len]);
        URL_SAFE_NO_PAD
            .decode_vec(body, buf)
            .map_err(|_| CookieError::Malformed)?;
        let mode = *buf.get(header_len).ok_or(CookieError::Malformed)?;
        match mode {
            MODE_PLAIN => {
                let signed_len = buf
                    .len()
                    .checked_sub(TAG_LEN)
                    .filter(|&n| n > header_len)
                    .ok_or(CookieError::Malformed)?;
                let (signed, tag) = buf.split_at(signed_len);
                hmac::verify(&key.mac, signed, tag).map_err(|_| CookieError::BadSignature)?;
                Ok(&signed[header_len + 1..])
            }
            MODE_AES_256_GCM | MODE_CHACHA20_POLY1305 => {
                let aead_key = if mode == MODE_AES_256_GCM {
                    &key.aes
                } else {
                    &key.chacha
                };
                let (aad, sealed) = buf.split_at_mut(header_len + 1);
                if sealed.len() < aead::NONCE_LEN + aead_key.algorithm().tag_len() {
                    return Err(CookieError::Malformed);
                }
                let (nonce, ciphertext) = sealed.split_at_mut(aead::NONCE_LEN);
                let nonce = aead::Nonce::try_assume_unique_for_key(nonce)
                    .map_err(|_| CookieError::Malformed)?;
                let plain = aead_key
                    .open_in_place(nonce, aead::Aad::from(&*aad), ciphertext)
                    .map_err(|_| CookieError::BadSignature)?;
                Ok(plain)
            }
            _ => Err(CookieError::Malformed),
        }
    }

    /// Authenticates a v1 value, decoding its payload into `buf`, and returns the snapshot's
    /// bytes.
    fn open_v1<'a>(&self, value: &str, buf: &'a mut Vec<u8>) -> Result<&'a [u8], CookieError> {
        let (signed, tag) = value.rsplit_once('.').ok_or(CookieError::Malformed)?;
        let (kid, payload) = signed
            .strip_prefix(V1_PREFIX)
            .and_then(|rest| rest.split_once('.'))
            .ok_or(CookieError::Malformed)?;
        if kid.is_empty()
            || kid.len() > MAX_KID_LEN
            || payload.contains('.')
            || tag.len() != TAG_B64_LEN
        {
            return Err(CookieError::Malformed);
        }
        let key = self.ring.find(kid).ok_or(CookieError::UnknownKey)?;
        let mut tag_bytes = [0u8; TAG_LEN];
        match URL_SAFE_NO_PAD.decode_slice(tag, &mut tag_bytes) {
            Ok(TAG_LEN) => {}
            _ => return Err(CookieError::Malformed),
        }
        hmac::verify(&key.mac, signed.as_bytes(), &tag_bytes)
            .map_err(|_| CookieError::BadSignature)?;

        // Authentic from here on. Sealed bodies open in place.
        URL_SAFE_NO_PAD
            .decode_vec(payload, buf)
            .map_err(|_| CookieError::Malformed)?;
        let (&mut mode, rest) = buf.split_first_mut().ok_or(CookieError::Malformed)?;
        match mode {
            MODE_PLAIN => Ok(rest),
            MODE_AES_256_GCM => open_v1_sealed(&key.aes, kid, rest).map(|p| &*p),
            MODE_CHACHA20_POLY1305 => open_v1_sealed(&key.chacha, kid, rest).map(|p| &*p),
            _ => Err(CookieError::Malformed),
        }
    }
}

/// Appends the snapshot's protobuf encoding to `body`.
fn encode_snapshot(snapshot: &Snapshot, body: &mut Vec<u8>) -> Result<(), CookieError> {
    // A Vec grows to any size, so the only failure is one past what a cookie could hold.
    snapshot
        .encode(body)
        .map_err(|e| CookieError::TooLarge(e.required_capacity()))
}

/// Characters of the unpadded base64 of `len` bytes.
const fn base64_len(len: usize) -> usize {
    len / 3 * 4 + (len % 3 * 4).div_ceil(3)
}

/// Opens a v1 `sealed` body (a nonce, then the ciphertext and its tag, the kid as associated
/// data) in place, returning the plaintext.
fn open_v1_sealed<'a>(
    key: &aead::LessSafeKey,
    kid: &str,
    sealed: &'a mut [u8],
) -> Result<&'a mut [u8], CookieError> {
    if sealed.len() < aead::NONCE_LEN {
        return Err(CookieError::Malformed);
    }
    let (nonce, ciphertext) = sealed.split_at_mut(aead::NONCE_LEN);
    let nonce =
        aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| CookieError::Malformed)?;
    key.open_in_place(nonce, aead::Aad::from(kid.as_bytes()), ciphertext)
        .map_err(|_| CookieError::Malformed)
}

#[cfg(test)]
mod tests;
