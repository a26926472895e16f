//! The `--mysql-url`: the query parameters it may carry, what its `ssl-mode` asks for, and the
//! sqlx connect options made from it.
//!
//! sqlx parses the URL (host, port, user, password, database, `ssl-mode`, `ssl-ca`, ...) but
//! silently ignores a parameter it does not know, so a misspelt `ssl_mode=required` would
//! connect in cleartext. Here every parameter must be one of [`PARAMETERS`], given once, and
//! the TLS ones must make sense together, before sqlx sees the URL.

use std::str::FromStr as _;

use sqlx::mysql::{MySqlConnectOptions, MySqlDatabaseError, MySqlSslMode};

/// The query parameters a MySQL URL may carry, each with sqlx's older spelling (no dash):
/// `ssl-mode` (`disabled`, `preferred`, `required`, `verify_ca`, `verify_identity`; default
/// `preferred`), `ssl-ca` (PEM CA certificates, with `verify_ca` or `verify_identity`),
/// `ssl-cert` and `ssl-key` (a client certificate and its key, together).
pub const PARAMETERS: [(&str, &str); 4] = [
    ("ssl-mode", "sslmode"),
    ("ssl-ca", "sslca"),
    ("ssl-cert", "sslcert"),
    ("ssl-key", "sslkey"),
];

/// A checked MySQL URL: sqlx's options and the TLS mode they ask for.
pub(super) struct MysqlUrl {
    /// What sqlx connects with (TLS settings included).
    pub(super) options: MySqlConnectOptions,
    /// `ssl-mode`, as sqlx understood it.
    pub(super) ssl_mode: MySqlSslMode,
}

impl MysqlUrl {
    /// Checks `url` (see the module docs and [`check_url`]) and parses it with sqlx. The
    /// message names what is wrong, never the password.
    pub(super) fn parse(url: &str) -> Result<MysqlUrl, String> {
        if !(url.starts_with("mysql://") || url.starts_with("mariadb://")) {
            return Err("invalid mysql url: it must start with mysql:// or mariadb://".into());
        }
        let parameters = query_parameters(url)?;
        let options = MySqlConnectOptions::from_str(url).map_err(|e| {
            format!(
                "invalid mysql url {}: {e}",
                crate::store::redact_one_url(url)
            )
        })?;
        let ssl_mode = options.get_ssl_mode();
        let verifies = matches!(
            ssl_mode,
            MySqlSslMode::VerifyCa | MySqlSslMode::VerifyIdentity
        );
        let value = |name: &str| {
            parameters
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.as_str())
        };
        if let Some(ca) = value("ssl-ca") {
            // A CA with a mode that does not verify would be read and then ignored: the
            // operator believes the server is verified, and it is not.
            if !verifies {
                return Err(format!(
                    "mysql url: ssl-ca is set but ssl-mode={} does not verify the server's \
                     certificate: add ssl-mode=verify_ca (or verify_identity)",
                    mode_name(ssl_mode)
                ));
            }
            check_pem(ca, "ssl-ca", "CERTIFICATE")?;
        }
        match (value("ssl-cert"), value("ssl-key")) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                if matches!(ssl_mode, MySqlSslMode::Disabled) {
                    return Err(
                        "mysql url: ssl-cert and ssl-key are set but ssl-mode=disabled".into(),
                    );
                }
                check_pem(cert, "ssl-cert", "CERTIFICATE")?;
                check_pem(key, "ssl-key", "PRIVATE KEY")?;
            }
            _ => return Err("mysql url: ssl-cert and ssl-key go together: set both".into()),
        }
        Ok(MysqlUrl { options, ssl_mode })
    }

    /// Whether [`MysqlUrl::ssl_mode`] refuses a connection that is not TLS.
    pub(super) fn requires_tls(&self) -> bool {
        !matches!(
            self.ssl_mode,
            MySqlSslMode::Disabled | MySqlSslMode::Preferred
        )
    }

    /// The error of a first connection that failed: a failed TLS negotiation says so, with the
    /// URL's `ssl-mode` (never a fallback to cleartext); anything else as every store call's.
    pub(super) fn connect_error(&self, e: sqlx::Error) -> crate::store::StoreError {
        let tls_failed = match &e {
            sqlx::Error::Tls(_) => true,
            // rustls reports a refused certificate as an I/O error wrapping its own.
            sqlx::Error::Io(io) => io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>()),
            _ => false,
        };
        if !tls_failed {
            // MySQL says "insecure transport" (3159); MariaDB only "access denied" (1045).
            let maybe_transport = matches!(self.ssl_mode, MySqlSslMode::Disabled)
                && e.as_database_error()
                    .and_then(|db| db.try_downcast_ref::<MySqlDatabaseError>())
                    .is_some_and(|db| matches!(db.number(), 1045 | 3159));
            return match super::error::store_error(e) {
                crate::store::StoreError::Internal(msg) if maybe_transport => {
                    crate::store::StoreError::Internal(format!(
                        "{msg} (ssl-mode=disabled in --mysql-url: a server that requires \
                         secure transport refuses cleartext clients)"
                    ))
                }
                other => other,
            };
        }
        let mode = mode_name(self.ssl_mode);
        let refusal = if self.requires_tls() {
            "; not connecting in cleartext"
        } else {
            ""
        };
        crate::store::StoreError::Unavailable(format!(
            "mysql: TLS to the database failed with ssl-mode={mode} (--mysql-url){refusal}: {e}"
        ))
    }
}

/// Checks a MySQL URL as [`super::MysqlStore::connect`] will: the scheme, that every query
/// parameter is one of [`PARAMETERS`] given once, a valid `ssl-mode`, an `ssl-ca` only with a
/// mode that verifies, `ssl-cert` with `ssl-key`, and that the named PEM files can be read. The
/// message says what to fix and never holds the password.
pub fn check_url(url: &str) -> Result<(), String> {
    MysqlUrl::parse(url).map(|_| ())
}

/// The name of `mode` as written in a URL.
fn mode_name(mode: MySqlSslMode) -> &'static str {
    match mode {
        MySqlSslMode::Disabled => "disabled",
        MySqlSslMode::Preferred => "preferred",
        MySqlSslMode::Required => "required",
        MySqlSslMode::VerifyCa => "verify_ca",
        MySqlSslMode::VerifyIdentity => "verify_identity",
    }
}

/// The query parameters of `url`, decoded, each under its dashed name: an error for one
/// that is not in [`PARAMETERS`], or given twice (under either spelling).
fn query_parameters(url: &str) -> Result<Vec<(String, String)>, String> {
    let without_fragment = url.split_once('#').map_or(url, |(before, _)| before);
    let Some((_, query)) = without_fragment.split_once('?') else {
        return Ok(Vec::new());
    };
    let mut found: Vec<(String, String)> = Vec::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(key);
        let Some((name, _)) = PARAMETERS
            .iter()
            .find(|(dashed, plain)| key == *dashed || key == *plain)
        else {
            let known: Vec<&str> = PARAMETERS.iter().map(|(dashed, _)| *dashed).collect();
            return Err(format!(
                "mysql url: unknown parameter {key:?}; known: {}",
                known.join(", ")
            ));
        };
        if found.iter().any(|(seen, _)| seen == name) {
            return Err(format!("mysql url: parameter {name} is given twice"));
        }
        found.push(((*name).to_owned(), decode(value)));
    }
    Ok(found)
}

/// A query component decoded as sqlx decodes it (`application/x-www-form-urlencoded`: `+` is
/// a space, `%XX` a byte).
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match bytes.get(i + 1..i + 3).and_then(hex_byte) {
                Some(byte) => {
                    out.push(byte);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The byte of two hex digits.
fn hex_byte(digits: &[u8]) -> Option<u8> {
    let text = std::str::from_utf8(digits).ok()?;
    u8::from_str_radix(text, 16).ok()
}

/// Checks that `path` (the value of `parameter`) is a readable PEM file holding a `kind`
/// section (`CERTIFICATE`, or any `PRIVATE KEY`).
fn check_pem(path: &str, parameter: &str, kind: &str) -> Result<(), String> {
    let pem = std::fs::read_to_string(path)
        .map_err(|e| format!("mysql url: cannot read {parameter} {path}: {e}"))?;
    let has_kind = pem.lines().any(|line| {
        line.strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
            .is_some_and(|label| label.ends_with(kind))
    });
    if has_kind {
        Ok(())
    } else {
        Err(format!("mysql url: {parameter} {path} holds no PEM {kind}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_kept_and_others_refused() {
        let dir = std::env::temp_dir().join(format!("stickless-mysql-url-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let ca = ca.display();

        let url = format!("mysql://u:pw@db:3306/test?ssl-mode=VERIFY_CA&ssl-ca={ca}");
        let parsed = MysqlUrl::parse(&url).unwrap();
        assert!(matches!(parsed.ssl_mode, MySqlSslMode::VerifyCa));
        assert!(parsed.requires_tls());
        assert!(MysqlUrl::parse("mysql://db/test").is_ok_and(|u| !u.requires_tls()));
        assert!(
            check_url(&format!(
                "mysql://db/test?sslmode=verify_identity&sslca={ca}"
            ))
            .is_ok()
        );

        for (url, expected) in [
            (
                "mysql://db/test?ssl_mode=required",
                "unknown parameter \"ssl_mode\"",
            ),
            (
                "mysql://db/test?charset=latin1",
                "unknown parameter \"charset\"",
            ),
            (
                "mysql://db/test?ssl-mode=required&sslmode=disabled",
                "given twice",
            ),
            ("mysql://db/test?ssl-mode=sometimes", "sometimes"),
            (
                "mysql://db/test?ssl-mode=required&ssl-ca=/x.pem",
                "ssl-mode=required does not verify",
            ),
            (
                "mysql://db/test?ssl-ca=/x.pem",
                "ssl-mode=preferred does not verify",
            ),
            (
                "mysql://db/test?ssl-mode=verify_ca&ssl-ca=/nonexistent/ca.pem",
                "cannot read ssl-ca",
            ),
            (
                "mysql://db/test?ssl-mode=required&ssl-cert=/c.pem",
                "go together",
            ),
            ("postgres://db/test", "mysql://"),
        ] {
            let refused = check_url(url).expect_err(url);
            assert!(refused.contains(expected), "{url}: {refused}");
        }
        let wrong = format!("mysql://u:s3cret@db:notaport/test?ssl-mode=verify_ca&ssl-ca={ca}");
        let refused = check_url(&wrong).unwrap_err();
        assert!(!refused.contains("s3cret"), "{refused}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn query_components_are_decoded() {
        assert_eq!(decode("%2Fetc%2Fmy+ca.pem"), "/etc/my ca.pem");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
    }
}
