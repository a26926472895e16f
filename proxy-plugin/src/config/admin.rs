//! The admin API's bearer token: `--admin-token TOKEN` or `--admin-token-file PATH` (env
//! `STICKLESS_PROXY_ADMIN_TOKEN`, `STICKLESS_PROXY_ADMIN_TOKEN_FILE`; `admin_token`,
//! `admin_token_file` in the file), the flags over the file, one of the two per source.
//!
//! The token file holds one token: its first line that is neither empty nor a `#` comment,
//! trimmed. It is read on every resolve, so a SIGHUP picks up a rotated token; a file that
//! cannot be read or holds no token is a configuration error (exit 2 at start; on a reload the
//! running token is kept).
//!
//! Authenticated by default: an `admin_listen` that is not a loopback address needs a token.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ring::digest::{SHA256, SHA256_OUTPUT_LEN, digest};

use super::ConfigError;
use super::values::{ParseSetting, Parsed, SecretArg};

/// The admin API's bearer token, kept only as its SHA-256 digest; its `Debug` shows nothing of
/// it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken {
    /// SHA-256 of the token.
    digest: [u8; SHA256_OUTPUT_LEN],
}

impl AdminToken {
    /// Whether `presented` (the credentials of an `Authorization: Bearer` header) is this
    /// token. Both are hashed and the digests compared with no early exit, so the time taken
    /// says nothing about where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let presented = sha256(presented);
        let difference = self
            .digest
            .iter()
            .zip(presented.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(difference) == 0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<hidden>)")
    }
}

impl ParseSetting for AdminToken {
    /// Visible ASCII, no spaces: what an `Authorization: Bearer` header can carry.
    fn parse_setting(text: &str) -> Result<Self, String> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the admin token must be non-empty visible ASCII, no spaces".to_owned());
        }
        Ok(AdminToken {
            digest: sha256(text.as_bytes()),
        })
    }
}

fn sha256(bytes: &[u8]) -> [u8; SHA256_OUTPUT_LEN] {
    let mut out = [0; SHA256_OUTPUT_LEN];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

/// The admin token from the flags (`--admin-token`, `--admin-token-file`), else from the
/// file (`admin_token`, `admin_token_file`); then the checks against `admin_listen`: a token
/// needs an admin listener, and a listener that is not loopback needs a token.
pub(super) fn resolve(
    flags: (Option<SecretArg>, Option<PathBuf>),
    file: (Option<Parsed<AdminToken>>, Option<PathBuf>),
    admin_listen: Option<SocketAddr>,
) -> Result<Option<AdminToken>, ConfigError> {
    let invalid = |message: String| Err(ConfigError::Invalid(message));
    let token = match flags {
        (Some(_), Some(_)) => {
            return invalid(
                "--admin-token and --admin-token-file are both given; keep one \
                 (--admin-token-file keeps the token out of the process list)"
                    .into(),
            );
        }
        // Checked here, not by clap, so that the error does not quote the token.
        (Some(token), None) => Some(token.parse("--admin-token (STICKLESS_PROXY_ADMIN_TOKEN)")?),
        (None, Some(path)) => Some(read_token_file(&path)?),
        (None, None) => match file {
            (Some(_), Some(_)) => {
                return invalid(
                    "admin_token and admin_token_file are both set in the config file; keep one"
                        .into(),
                );
            }
            (Some(token), None) => Some(token.0),
            (None, Some(path)) => Some(read_token_file(&path)?),
            (None, None) => None,
        },
    };
    match admin_listen {
        None if token.is_some() => invalid(
            "an admin token is given without an admin API: add --admin-listen ADDR (or \
             admin_listen), or drop the token"
                .into(),
        ),
        Some(address) if token.is_none() && !address.ip().to_canonical().is_loopback() => {
            invalid(format!(
                "refusing to serve the admin API on {address} without a token (not a loopback \
                 address): set --admin-token-file PATH (or --admin-token), or give \
                 --admin-listen a loopback address such as 127.0.0.1:{}",
                address.port()
            ))
        }
        _ => Ok(token),
    }
}

/// The token in the file at `path`: its first line that is neither empty nor a `#` comment,
/// trimmed. The messages never quote the file's contents.
fn read_token_file(path: &Path) -> Result<AdminToken, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::Invalid(format!(
            "cannot read the admin token file {}: {e}",
            path.display()
        ))
    })?;
    let line = text
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with('#'));
    let Some(line) = line else {
        return Err(ConfigError::Invalid(format!(
            "the admin token file {} holds no token (write it on a line of its own)",
            path.display()
        )));
    };
    AdminToken::parse_setting(line).map_err(|message| {
        ConfigError::Invalid(format!("admin token file {}: {message}", path.display()))
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use clap::Parser as _;

    use super::super::{Cli, ConfigError, ProxyConfig, resolve as resolve_all};
    use super::AdminToken;

    /// The whole configuration of these flags (plus a backend) over `file`.
    fn resolve(args: &[&str], file: Option<&str>) -> Result<ProxyConfig, ConfigError> {
        let args = ["session-proxy", "--backend", "http://127.0.0.1:9001"]
            .iter()
            .chain(args);
        let cli = Cli::try_parse_from(args).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        resolve_all(cli, file)
    }

    fn refused(args: &[&str], file: Option<&str>) -> String {
        match resolve(args, file) {
            Ok(config) => panic!("accepted: {config:?}"),
            Err(error) => error.to_string(),
        }
    }

    /// A file in a fresh temporary directory, removed with it on drop.
    struct TempFile {
        dir: PathBuf,
        path: PathBuf,
    }

    impl TempFile {
        fn new(name: &str, contents: &str) -> TempFile {
            let dir = std::env::temp_dir().join(format!(
                "stickless-admin-token-{}-{name}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("token");
            std::fs::write(&path, contents).unwrap();
            TempFile { dir, path }
        }

        fn path(&self) -> &str {
            self.path.to_str().unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn the_token_comes_from_a_flag_a_file_or_the_config_file() {
        let admin = ["--admin-listen", "127.0.0.1:0"];
        let config = resolve(&admin, None).unwrap();
        assert_eq!(config.admin_token, None, "no token by default");

        let flag = resolve(&[admin[0], admin[1], "--admin-token", "s3cret-flag"], None).unwrap();
        let token = flag.admin_token.unwrap();
        assert!(token.matches(b"s3cret-flag"));
        assert!(!token.matches(b"s3cret-fla"));
        assert!(!token.matches(b""));

        let file = TempFile::new("flag", "# the admin token\n\n  s3cret-file  \nignored\n");
        let from_file = resolve(
            &[admin[0], admin[1], "--admin-token-file", file.path()],
            None,
        )
        .unwrap()
        .admin_token
        .unwrap();
        assert!(from_file.matches(b"s3cret-file"));
        assert!(!from_file.matches(b"ignored"));

        let toml = "admin_listen = \"127.0.0.1:0\"\nadmin_token = \"s3cret-toml\"\n";
        let in_toml = resolve(&[], Some(toml)).unwrap().admin_token.unwrap();
        assert!(in_toml.matches(b"s3cret-toml"));
        let toml_file = format!(
            "admin_listen = \"127.0.0.1:0\"\nadmin_token_file = {:?}\n",
            file.path()
        );
        let via_toml = resolve(&[], Some(&toml_file)).unwrap().admin_token.unwrap();
        assert!(via_toml.matches(b"s3cret-file"));
        // Flags win over the file, whichever form each uses.
        let over = resolve(&["--admin-token", "s3cret-flag"], Some(&toml_file))
            .unwrap()
            .admin_token
            .unwrap();
        assert!(over.matches(b"s3cret-flag"));
    }

    #[test]
    fn bad_token_settings_are_refused() {
        let admin = ["--admin-listen", "127.0.0.1:0"];
        let file = TempFile::new("both", "s3cret\n");
        let m = refused(
            &[
                admin[0],
                admin[1],
                "--admin-token",
                "x",
                "--admin-token-file",
                file.path(),
            ],
            None,
        );
        assert!(m.contains("both given"), "{m}");
        let toml = format!(
            "admin_listen = \"127.0.0.1:0\"\nadmin_token = \"x\"\nadmin_token_file = {:?}\n",
            file.path()
        );
        let m = refused(&[], Some(&toml));
        assert!(m.contains("both set"), "{m}");

        for (name, contents) in [("empty", ""), ("comments", "# only a comment\n\n   \n")] {
            let empty = TempFile::new(name, contents);
            let m = refused(
                &[admin[0], admin[1], "--admin-token-file", empty.path()],
                None,
            );
            assert!(
                m.contains("holds no token") && m.contains(empty.path()),
                "{m}"
            );
        }
        let spaced = TempFile::new("spaced", "two words\n");
        let m = refused(
            &[admin[0], admin[1], "--admin-token-file", spaced.path()],
            None,
        );
        assert!(m.contains("visible ASCII") && !m.contains("words"), "{m}");
        let m = refused(
            &[
                admin[0],
                admin[1],
                "--admin-token-file",
                "/nonexistent/token",
            ],
            None,
        );
        assert!(m.contains("cannot read the admin token file"), "{m}");
        let m = refused(&["--admin-token", "x"], None);
        assert!(m.contains("--admin-listen"), "{m}");
    }

    #[test]
    fn a_non_loopback_admin_listener_needs_a_token() {
        for address in ["0.0.0.0:9090", "[::]:9090", "192.0.2.1:9090"] {
            let m = refused(&["--admin-listen", address], None);
            assert!(
                m.contains("refusing to serve the admin API")
                    && m.contains("--admin-token-file")
                    && !m.contains('\n'),
                "{m}"
            );
            resolve(&["--admin-listen", address, "--admin-token", "x"], None).unwrap();
        }
        for address in [
            "127.0.0.1:0",
            "127.0.0.2:9090",
            "[::1]:9090",
            "[::ffff:127.0.0.1]:1",
        ] {
            resolve(&["--admin-listen", address], None).unwrap();
        }
    }

    #[test]
    fn debug_output_never_shows_the_token() {
        let config = resolve(
            &[
                "--admin-listen",
                "127.0.0.1:0",
                "--admin-token",
                "hunter2-secret",
            ],
            None,
        )
        .unwrap();
        let debug = format!("{config:?}");
        assert!(debug.contains("AdminToken(<hidden>)"), "{debug}");
        assert!(!debug.contains("hunter2"), "{debug}");
        let cli =
            Cli::try_parse_from(["session-proxy", "--admin-token", "hunter2-secret"]).unwrap();
        assert!(!format!("{cli:?}").contains("hunter2"));
        let token: AdminToken = super::super::values::parse_setting("hunter2-secret").unwrap();
        assert_eq!(format!("{token:?}"), "AdminToken(<hidden>)");
    }
}
