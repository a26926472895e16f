//! Bearer tokens and their scopes for the SessionStore service.
//!
//! Tokens come from `--auth-token X` (every namespace, read-write) and from the lines of
//! `--auth-token-file` ([`parse_token_file`]), each with the namespaces it may reach and its
//! [`Rights`]. The check runs before a call's request is decoded: the call gets the matched
//! token's [`Scope`] in its request extensions, and the service checks the method and the
//! namespace against it once it knows them ([`Scope::check`]). No token or an unknown one is
//! UNAUTHENTICATED; a known token outside its scope is PERMISSION_DENIED.
//!
//! Comparison: the server keeps no token, only each token's SHA-256 digest (a `sha256:<hex>`
//! line gives the digest itself). At start-up it draws a random HMAC key and signs each digest
//! with it; a call's token is hashed and checked against every entry with `ring::hmac::verify`,
//! whose tag comparison is constant-time, with no early exit: one HMAC of 32 bytes per
//! configured token per call. Health and reflection stay open, so load balancers and stock gRPC
//! tools can probe and list the server without a token.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::digest::{SHA256, SHA256_OUTPUT_LEN, digest};
use ring::hmac;
use ring::rand::SystemRandom;
use tonic::Status;

use crate::config::Settings;
use crate::service::is_valid_namespace;

/// The prefix of a token line that gives the token's SHA-256 instead of the token.
pub const DIGEST_PREFIX: &str = "sha256:";

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rights {
    /// `ro`: Get (with or without touch), ListByUser and Watch.
    ReadOnly,
    /// `rw`: every method.
    ReadWrite,
}

/// What a method needs: reading (Get, ListByUser, Watch) or changing sessions (the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Allowed to `ro` and `rw` tokens.
    Read,
    /// Allowed to `rw` tokens only.
    Write,
}

/// The namespaces and rights of one token; put in a call's request extensions by the token
/// check, read by the service once the request is decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The namespaces the token reaches; `None` is `*`, every namespace.
    namespaces: Option<Arc<[String]>>,
    /// What it may do there.
    rights: Rights,
}

impl Scope {
    /// Every namespace, read-write: the scope of `--auth-token`.
    pub fn unrestricted() -> Scope {
        Scope {
            namespaces: None,
            rights: Rights::ReadWrite,
        }
    }

    /// `namespaces` (`None`: every one) with `rights`.
    pub fn new(namespaces: Option<Vec<String>>, rights: Rights) -> Scope {
        Scope {
            namespaces: namespaces.map(Arc::from),
            rights,
        }
    }

    /// `Ok` when the token may call `method` (which needs `access`) on `namespace` (resolved:
    /// `default` for an empty one), else PERMISSION_DENIED saying which rule refused it.
    pub fn check(&self, method: &str, access: Access, namespace: &str) -> Result<(), Status> {
        if let Some(allowed) = &self.namespaces
            && !allowed.iter().any(|n| n == namespace)
        {
            return Err(Status::permission_denied(format!(
                "this token may not reach namespace {namespace:?}"
            )));
        }
        if access == Access::Write && self.rights == Rights::ReadOnly {
            return Err(Status::permission_denied(format!(
                "this token is read-only (ro): {method} needs a read-write (rw) token"
            )));
        }
        Ok(())
    }
}

/// A token the server accepts, kept as its SHA-256 digest, and its scope. Its `Debug` shows the
/// scope only.
#[derive(Clone, PartialEq, Eq)]
pub struct ScopedToken {
    /// SHA-256 of the token.
    digest: [u8; SHA256_OUTPUT_LEN],
    /// What the token may do.
    scope: Scope,
}

impl std::fmt::Debug for ScopedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScopedToken")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl ScopedToken {
    /// `token` with `scope`.
    pub fn new(token: &str, scope: Scope) -> ScopedToken {
        ScopedToken {
            digest: sha256(token.as_bytes()),
            scope,
        }
    }

    /// Whether `self` and `other` are the same token (whatever their scopes).
    pub fn same_token(&self, other: &ScopedToken) -> bool {
        self.digest == other.digest
    }
}

fn sha256(bytes: &[u8]) -> [u8; SHA256_OUTPUT_LEN] {
    let mut out = [0; SHA256_OUTPUT_LEN];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

/// Why one line of a token file was refused. The messages never quote the line: it holds a
/// secret, and a line split wrongly may have it in any field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// Not three fields (a comment after them, starting with `#`, is allowed).
    #[error("expected `TOKEN NAMESPACES RIGHTS`, found {0} field(s)")]
    Fields(usize),
    /// `sha256:` not followed by 64 hex digits.
    #[error("`sha256:` must be followed by the 64 hex digits of the token's SHA-256")]
    Digest,
    /// NAMESPACES is neither `*` nor a comma list of valid names.
    #[error("NAMESPACES must be `*` or a comma-separated list of names of 1 to 64 [A-Za-z0-9_.-]")]
    Namespaces,
    /// RIGHTS is neither `rw` nor `ro`.
    #[error("RIGHTS must be `rw` or `ro`")]
    Rights,
    /// The token is on an earlier line too.
    #[error("the same token as line {0}: give each token once")]
    Repeated(usize),
}

/// Why a token file was refused: a configuration error, the server does not start.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file could not be read.
    #[error("cannot read auth token file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("invalid auth token file {path}, line {line}: {error}")]
    Line {
        /// The file.
        path: PathBuf,
        /// Its 1-based line number.
        line: usize,
        /// What is wrong with it.
        error: LineError,
    },
    /// The file has comments and blank lines only.
    #[error("auth token file {path} holds no token")]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// Reads and parses the token file at `path`.
pub fn read_token_file(path: &Path) -> Result<Vec<ScopedToken>, TokenFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let tokens = parse_token_file(&text).map_err(|(line, error)| TokenFileError::Line {
        path: path.to_owned(),
        line,
        error,
    })?;
    if tokens.is_empty() {
        return Err(TokenFileError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(tokens)
}

/// Parses a token file: one token a line, `TOKEN NAMESPACES RIGHTS` separated by whitespace,
/// e.g. `app-secret demo,shop rw`; blank lines and lines starting with `#` are skipped, and a
/// `#` field after the three starts a comment. `TOKEN` is the token as clients send it, or
/// `sha256:<hex>` of it (so a token cannot start with `#` or `sha256:`); `NAMESPACES` is `*` or
/// a comma list; `RIGHTS` is `rw` or `ro`. The error is the 1-based number of the first bad
/// line and what is wrong with it.
pub fn parse_token_file(text: &str) -> Result<Vec<ScopedToken>, (usize, LineError)> {
    let mut tokens: Vec<(usize, ScopedToken)> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let fields: Vec<&str> = line
            .split_whitespace()
            .take_while(|field| !field.starts_with('#'))
            .collect();
        if fields.is_empty() {
            continue;
        }
        let token = parse_line(&fields).map_err(|e| (number, e))?;
        if let Some((first, _)) = tokens.iter().find(|(_, t)| t.same_token(&token)) {
            return Err((number, LineError::Repeated(*first)));
        }
        tokens.push((number, token));
    }
    Ok(tokens.into_iter().map(|(_, token)| token).collect())
}

/// One line's fields (comments removed) as a token.
fn parse_line(fields: &[&str]) -> Result<ScopedToken, LineError> {
    let &[token, namespaces, rights] = fields else {
        return Err(LineError::Fields(fields.len()));
    };
    let rights = match rights {
        "rw" => Rights::ReadWrite,
        "ro" => Rights::ReadOnly,
        _ => return Err(LineError::Rights),
    };
    let namespaces = if namespaces == "*" {
        None
    } else {
        let list: Vec<String> = namespaces.split(',').map(str::to_owned).collect();
        if !list.iter().all(|n| is_valid_namespace(n)) {
            return Err(LineError::Namespaces);
        }
        Some(list)
    };
    let scope = Scope::new(namespaces, rights);
    match token.strip_prefix(DIGEST_PREFIX) {
        Some(hex) => Ok(ScopedToken {
            digest: parse_hex_digest(hex).ok_or(LineError::Digest)?,
            scope,
        }),
        None => Ok(ScopedToken::new(token, scope)),
    }
}

/// The 32 bytes written as 64 hex digits (either case) in `hex`.
fn parse_hex_digest(hex: &str) -> Option<[u8; SHA256_OUTPUT_LEN]> {
    // Hex digits only: from_str_radix alone would take a sign ("+f").
    if hex.len() != 2 * SHA256_OUTPUT_LEN || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0; SHA256_OUTPUT_LEN];
    for (byte, pair) in out.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
        let pair = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

/// The SessionStore service's token check: it admits calls carrying `authorization: Bearer
/// <token>` for a configured token, and gives their scope; with no token configured it admits
/// every call, unscoped.
#[derive(Clone)]
pub struct BearerAuth {
    /// The random key and each token's tag under it; `None` admits every call.
    tokens: Option<Arc<SignedTokens>>,
}

/// The configured tokens, signed with a key of this process.
struct SignedTokens {
    /// Random, drawn at start-up, never leaves the process.
    key: hmac::Key,
    /// HMAC of each token's digest under `key`, and the token's scope.
    entries: Vec<(hmac::Tag, Scope)>,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerAuth")
            .field("tokens", &self.token_count())
            .finish()
    }
}

impl BearerAuth {
    /// Admits calls carrying one of `tokens`, or every call when there is none.
    pub fn new(tokens: &[ScopedToken]) -> Result<Self, ring::error::Unspecified> {
        if tokens.is_empty() {
            return Ok(Self { tokens: None });
        }
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new())?;
        let entries = tokens
            .iter()
            .map(|t| (hmac::sign(&key, &t.digest), t.scope.clone()))
            .collect();
        Ok(Self {
            tokens: Some(Arc::new(SignedTokens { key, entries })),
        })
    }

    /// The tokens of `settings`: `--auth-token` (every namespace, read-write), then those of
    /// the token file.
    pub fn from_settings(settings: &Settings) -> Result<Self, ring::error::Unspecified> {
        let flag = settings
            .auth_token
            .as_deref()
            .map(|token| ScopedToken::new(token, Scope::unrestricted()));
        let tokens: Vec<ScopedToken> = flag
            .into_iter()
            .chain(settings.auth_file_tokens.iter().cloned())
            .collect();
        Self::new(&tokens)
    }

    /// How many tokens are accepted; 0 means authentication is off.
    pub fn token_count(&self) -> usize {
        self.tokens.as_ref().map_or(0, |t| t.entries.len())
    }

    /// The scope of the token in `header` (the whole `authorization` value, if any): `None`
    /// when no token is configured, UNAUTHENTICATED when the header is missing, malformed or
    /// carries an unknown token.
    pub fn check(&self, header: Option<&[u8]>) -> Result<Option<Scope>, Status> {
        let Some(tokens) = &self.tokens else {
            return Ok(None);
        };
        header
            .and_then(|h| h.strip_prefix(b"Bearer "))
            .and_then(|token| tokens.scope_of(token))
            .map(Some)
            .ok_or_else(|| {
                Status::unauthenticated(
                    "missing or unknown bearer token in `authorization` metadata",
                )
            })
    }
}

impl SignedTokens {
    /// The scope of `token`, if it is one of these. Every entry is checked, in constant time
    /// each, whichever matches.
    fn scope_of(&self, token: &[u8]) -> Option<Scope> {
        let presented = sha256(token);
        let mut matched = None;
        for (tag, scope) in &self.entries {
            // verify() signs `presented` and compares the tags in constant time.
            if hmac::verify(&self.key, &presented, tag.as_ref()).is_ok() {
                matched = Some(scope);
            }
        }
        matched.cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(file: &str) -> BearerAuth {
        BearerAuth::new(&parse_token_file(file).unwrap()).unwrap()
    }

    #[test]
    fn only_the_exact_token_is_admitted() {
        let auth = BearerAuth::new(&[ScopedToken::new("s3cret", Scope::unrestricted())]).unwrap();
        assert_eq!(
            auth.check(Some(b"Bearer s3cret")).unwrap(),
            Some(Scope::unrestricted())
        );
        for bad in [
            &b"Bearer s3cre"[..],
            b"Bearer s3cret ",
            b"bearer s3cret",
            b"s3cret",
            b"Bearer ",
            b"",
        ] {
            let status = auth.check(Some(bad)).unwrap_err();
            assert_eq!(
                status.code(),
                tonic::Code::Unauthenticated,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(auth.check(None).is_err());
    }

    #[test]
    fn without_a_token_everything_is_admitted_unscoped() {
        let auth = BearerAuth::new(&[]).unwrap();
        assert_eq!(auth.token_count(), 0);
        assert_eq!(auth.check(None).unwrap(), None);
        assert_eq!(auth.check(Some(b"Bearer anything")).unwrap(), None);
    }

    #[test]
    fn each_token_gets_the_scope_of_its_line() {
        let auth = auth(
            "# who may do what\n\
             \n\
             proxy-secret demo ro   # the proxy's lookup\n\
             \tapp-secret  demo,shop  rw\n\
             root * rw\n",
        );
        assert_eq!(auth.token_count(), 3);
        let scope = |t: &str| {
            auth.check(Some(format!("Bearer {t}").as_bytes()))
                .unwrap()
                .unwrap()
        };
        let proxy = scope("proxy-secret");
        assert!(proxy.check("Get", Access::Read, "demo").is_ok());
        assert!(proxy.check("Create", Access::Write, "demo").is_err());
        assert!(proxy.check("Get", Access::Read, "shop").is_err());
        let app = scope("app-secret");
        assert!(app.check("Create", Access::Write, "shop").is_ok());
        assert!(app.check("Get", Access::Read, "default").is_err());
        assert_eq!(scope("root"), Scope::unrestricted());
    }

    #[test]
    fn a_digest_is_64_hex_digits_and_nothing_else() {
        assert!(parse_hex_digest(&"ab".repeat(32)).is_some());
        // from_str_radix takes "+f": a digest must not.
        assert!(parse_hex_digest(&format!("+f{}", "ab".repeat(31))).is_none());
        assert!(parse_hex_digest(&format!("-f{}", "ab".repeat(31))).is_none());
        assert!(parse_hex_digest(&"ag".repeat(32)).is_none());
        assert!(parse_hex_digest(&"ab".repeat(31)).is_none());
    }

    #[test]
    fn a_digest_line_admits_the_token_it_hashes_in_either_case() {
        // SHA-256 of "app-secret", as `printf %s app-secret | sha256sum` prints it.
        let hex = "6c904c5190e8b45c2f0af062eefdb2f5b41ce3809b0e6b5bc50aafdd60b290d8";
        for written in [hex.to_owned(), hex.to_uppercase()] {
            let auth = auth(&format!("sha256:{written} shop ro\n"));
            let scope = auth.check(Some(b"Bearer app-secret")).unwrap().unwrap();
            assert!(scope.check("Get", Access::Read, "shop").is_ok());
            // The digest itself is not a token.
            let as_token = format!("Bearer sha256:{written}");
            assert!(auth.check(Some(as_token.as_bytes())).is_err());
        }
    }

    #[test]
    fn malformed_lines_are_refused_with_their_number() {
        let digest = "sha256:".to_owned() + &"ab".repeat(31);
        for (text, line, error) in [
            ("a demo rw\nlonely\n", 2, LineError::Fields(1)),
            ("a demo\n", 1, LineError::Fields(2)),
            ("a b c d\n", 1, LineError::Fields(4)),
            ("\n# x\na demo rx\n", 3, LineError::Rights),
            ("a demo RW\n", 1, LineError::Rights),
            ("a demo,,shop ro\n", 1, LineError::Namespaces),
            ("a demo,* ro\n", 1, LineError::Namespaces),
            ("a dé ro\n", 1, LineError::Namespaces),
            (&format!("{digest} demo ro\n"), 1, LineError::Digest),
            ("sha256:zz demo ro\n", 1, LineError::Digest),
            ("a demo ro\nb * rw\na shop rw\n", 3, LineError::Repeated(1)),
        ] {
            assert_eq!(
                parse_token_file(text).map(|t| t.len()),
                Err((line, error)),
                "{text:?}"
            );
        }
    }

    #[test]
    fn scope_debug_and_errors_never_show_a_token() {
        let tokens = parse_token_file("hunter2-token demo ro\n").unwrap();
        assert!(!format!("{tokens:?}").contains("hunter2"));
        let error = TokenFileError::Line {
            path: "/etc/tokens".into(),
            line: 4,
            error: parse_token_file("hunter2-token demo rx").unwrap_err().1,
        };
        let message = error.to_string();
        assert!(message.contains("/etc/tokens, line 4"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }
}
