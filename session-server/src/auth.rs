//! Bearer-token authentication for the SessionStore service.
//!
//! The token is compared in constant time: at start-up the server signs the expected token with
//! a random HMAC key, and each call's token is checked with `ring::hmac::verify`, whose tag
//! comparison is constant-time. Health and reflection stay open, so load balancers and stock
//! gRPC tools can probe and list the server without the token.

use std::sync::Arc;

use ring::hmac;
use ring::rand::SystemRandom;
use tonic::Status;

/// The SessionStore service's check: it admits calls carrying `authorization: Bearer <token>`, or
/// every call when no token is configured.
#[derive(Clone)]
pub struct BearerAuth {
    /// The random key and the expected token's tag under it; `None` admits every call.
    expected: Option<Arc<(hmac::Key, hmac::Tag)>>,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerAuth")
            .field("enabled", &self.expected.is_some())
            .finish()
    }
}

impl BearerAuth {
    /// Requires `token` on every call, or nothing when `None`.
    pub fn new(token: Option<&str>) -> Result<Self, ring::error::Unspecified> {
        let expected = match token {
            Some(token) => {
                let key = hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new())?;
                let tag = hmac::sign(&key, token.as_bytes());
                Some(Arc::new((key, tag)))
            }
            None => None,
        };
        Ok(Self { expected })
    }

    /// `Ok` when `header` (the whole `authorization` value, if any) carries the right token,
    /// else UNAUTHENTICATED.
    pub fn check(&self, header: Option<&[u8]>) -> Result<(), Status> {
        if self.admits(header) {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "missing or wrong bearer token in `authorization` metadata",
            ))
        }
    }

    /// Whether `header` (the whole `authorization` value) carries the right token.
    fn admits(&self, header: Option<&[u8]>) -> bool {
        let Some(expected) = &self.expected else {
            return true;
        };
        let Some(token) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return false;
        };
        let (key, tag) = expected.as_ref();
        // verify() signs `token` and compares the tags in constant time.
        hmac::verify(key, token, tag.as_ref()).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_is_admitted() {
        let auth = BearerAuth::new(Some("s3cret")).unwrap();
        assert!(auth.admits(Some(b"Bearer s3cret")));
        for bad in [
            &b"Bearer s3cre"[..],
            b"Bearer s3cret ",
            b"bearer s3cret",
            b"s3cret",
            b"Bearer ",
            b"",
        ] {
            assert!(
                !auth.admits(Some(bad)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(!auth.admits(None));
    }

    #[test]
    fn without_a_token_everything_is_admitted() {
        let auth = BearerAuth::new(None).unwrap();
        assert!(auth.admits(None));
        assert!(auth.admits(Some(b"Bearer anything")));
    }
}
