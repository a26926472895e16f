//! Session ids: 192 random bits from `ring::rand::SystemRandom`, base64url without padding.
//! Store epochs ([`new_epoch`]) come from the same source.
//!
//! 192 bits (not the 128 minimum) make the id exactly 32 characters with no padding, and put
//! guessing a live id far beyond reach even with billions of sessions.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};

/// Random bytes in an id.
const ID_BYTES: usize = 24;
/// Characters in an encoded id: 24 bytes in base64 without padding.
pub const ID_LEN: usize = 32;

/// Random bytes in a store epoch.
const EPOCH_BYTES: usize = 16;
/// Characters in an encoded store epoch: 16 bytes in base64 without padding.
pub const EPOCH_LEN: usize = 22;

/// A fresh store epoch (see [`crate::store::SessionStore::epoch`]): 128 random bits,
/// base64url without padding (22 characters of `[A-Za-z0-9_-]`). An error if the operating
/// system's random source failed: an epoch must never repeat one a store had before.
pub fn new_epoch() -> Result<String, ring::error::Unspecified> {
    let mut bytes = [0u8; EPOCH_BYTES];
    SystemRandom::new().fill(&mut bytes)?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// Makes new session ids from the operating system's secure random source.
#[derive(Debug, Clone)]
pub struct IdGenerator {
    /// The CSPRNG; `SystemRandom` is cheap to clone and safe to share.
    rng: SystemRandom,
}

impl Default for IdGenerator {
    fn default() -> Self {
        Self::new()
    }
}

impl IdGenerator {
    /// A generator over `ring`'s system random source.
    pub fn new() -> Self {
        Self {
            rng: SystemRandom::new(),
        }
    }

    /// A fresh id, or an error if the operating system's random source failed (never silently a
    /// weak id).
    pub fn generate(&self) -> Result<String, ring::error::Unspecified> {
        let mut bytes = [0u8; ID_BYTES];
        self.rng.fill(&mut bytes)?;
        Ok(URL_SAFE_NO_PAD.encode(bytes))
    }
}

/// Whether `id` has the shape of a server-made id: exactly [`ID_LEN`] base64url characters.
/// Checked on every call before any store sees the id, so keys built from ids stay well-formed.
pub fn is_valid(id: &str) -> bool {
    id.len() == ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        // The last character of 24 bytes in base64 carries 6 full bits, so any alphabet
        // character is fine; the decode check keeps the rule exact if ID_BYTES ever changes.
        && URL_SAFE_NO_PAD.decode(id).is_ok_and(|b| b.len() == ID_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let generator = IdGenerator::new();
        let a = generator.generate().unwrap();
        let b = generator.generate().unwrap();
        assert!(is_valid(&a), "{a}");
        assert_eq!(a.len(), ID_LEN);
        assert_ne!(a, b);
    }

    #[test]
    fn epochs_are_22_base64url_characters_and_distinct() {
        let (a, b) = (new_epoch().unwrap(), new_epoch().unwrap());
        assert_eq!(a.len(), EPOCH_LEN);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
        assert_ne!(a, b);
    }

    #[test]
    fn malformed_ids_are_rejected() {
        for bad in [
            "",
            "short",
            "x".repeat(31).as_str(),
            "x".repeat(33).as_str(),
            "abcdefghijklmnopqrstuvwxyz01234+",
            "abcdefghijklmnopqrstuvwxyz01234=",
            "abcdefghijklmnopqrstuvwxyz0123 5",
            "abcdefghijklmnopqrstuvwxyz0123é",
            "{abcdefghijklmnopqrstuvwxyz0123}",
        ] {
            assert!(!is_valid(bad), "{bad:?} accepted");
        }
        assert!(is_valid(&"x".repeat(32)));
    }
}
