//! The session-lookup plugin's settings: flags over `[session_lookup]` over the defaults.
//!
//! The TLS files (`--session-ca`, `--session-client-cert`, `--session-client-key`, or `ca`,
//! `client_cert`, `client_key` in the table) are read here, on every resolve: at start (a file
//! that cannot be read is a configuration error, exit 2) and on every SIGHUP (a reload that
//! cannot read them is refused and the running configuration kept). They are only for an
//! `https://` session server: given with an `http://` one, they are refused, not ignored.

use std::path::PathBuf;

use session_client::{ClientError, ClientTls};

use super::file::FileLookup;
use super::{
    Cli, ConfigError, DEFAULT_LOOKUP_TIMEOUT, DEFAULT_OUTAGE_GRACE, DEFAULT_SESSION_ATTRS,
    DEFAULT_SESSION_COOKIE, DEFAULT_SESSION_NAMESPACE, DEFAULT_SNAPSHOT_COOKIE,
    DEFAULT_SNAPSHOT_MAX_AGE, LookupConfig, LookupFailure, MAX_SESSION_CACHE, SnapshotKey, Token,
    pick,
};

/// The plugin is on when a session server URL is given (flag or file); its other settings
/// without one are a mistake worth reporting rather than ignoring.
pub(super) fn resolve(
    cli: &Cli,
    file: Option<FileLookup>,
) -> Result<Option<LookupConfig>, ConfigError> {
    let file = file.unwrap_or_default();
    let flags: Vec<String> = cli
        .session_lookup
        .iter()
        .flat_map(|urls| urls.0.iter().cloned())
        .collect();
    let urls = if flags.is_empty() {
        file.url.map(|u| u.0).unwrap_or_default()
    } else {
        flags
    };
    if urls.is_empty() {
        let stray = [
            ("--session-namespace", cli.session_namespace.is_some()),
            ("--session-cookie", cli.session_cookie.is_some()),
            ("--session-header", cli.session_header.is_some()),
            ("--session-attr", !cli.session_attrs.is_empty()),
            ("--session-fail", cli.session_fail.is_some()),
            ("--session-timeout", cli.session_timeout.is_some()),
            (
                "--session-snapshot-key",
                !cli.session_snapshot_keys.is_empty(),
            ),
            (
                "--session-snapshot-cookie",
                cli.session_snapshot_cookie.is_some(),
            ),
            ("--snapshot-max-age", cli.snapshot_max_age.is_some()),
            ("--session-outage-grace", cli.session_outage_grace.is_some()),
            ("--session-cache", cli.session_cache.is_some()),
            ("--session-ca", cli.session_ca.is_some()),
            ("--session-client-cert", cli.session_client_cert.is_some()),
            ("--session-client-key", cli.session_client_key.is_some()),
            (
                "[session_lookup] settings",
                file.namespace.is_some()
                    || file.cookie.is_some()
                    || file.header.is_some()
                    || file.attrs.is_some()
                    || file.on_failure.is_some()
                    || file.timeout.is_some()
                    || file.auth_token.is_some()
                    || file.snapshot_keys.is_some()
                    || file.snapshot_cookie.is_some()
                    || file.snapshot_max_age.is_some()
                    || file.outage_grace.is_some()
                    || file.cache.is_some()
                    || file.ca.is_some()
                    || file.client_cert.is_some()
                    || file.client_key.is_some(),
            ),
        ];
        if let Some((what, _)) = stray.iter().find(|(_, given)| *given) {
            return Err(ConfigError::Invalid(format!(
                "{what} given without a session server: add --session-lookup URL or \
                 [session_lookup] url"
            )));
        }
        return Ok(None);
    }
    if let Some(twice) = urls
        .iter()
        .enumerate()
        .find_map(|(i, url)| urls[..i].contains(url).then_some(url))
    {
        return Err(ConfigError::Invalid(format!(
            "--session-lookup names the session server {twice} twice"
        )));
    }
    let tls = tls(
        &urls,
        cli.session_ca.clone().or(file.ca),
        cli.session_client_cert.clone().or(file.client_cert),
        cli.session_client_key.clone().or(file.client_key),
    )?;
    let config = LookupConfig {
        session_servers: urls,
        tls,
        namespace: cli
            .session_namespace
            .clone()
            .map(|n| n.0)
            .or(file.namespace.map(|n| n.0.0))
            .unwrap_or_else(|| DEFAULT_SESSION_NAMESPACE.to_owned()),
        cookie: cli
            .session_cookie
            .clone()
            .map(|c| c.0)
            .or(file.cookie.map(|c| c.0.0))
            .unwrap_or_else(|| DEFAULT_SESSION_COOKIE.to_owned()),
        session_header: cli
            .session_header
            .clone()
            .map(|h| h.0)
            .or(file.header.map(|h| h.0.0)),
        attrs: if cli.session_attrs.is_empty() {
            file.attrs.map_or_else(
                || {
                    DEFAULT_SESSION_ATTRS
                        .iter()
                        .map(|&a| a.to_owned())
                        .collect()
                },
                |attrs| attrs.into_iter().map(|a| a.0.0).collect(),
            )
        } else {
            cli.session_attrs.iter().map(|a| a.0.clone()).collect()
        },
        on_failure: cli
            .session_fail
            .or(file.on_failure.map(|f| f.0))
            .unwrap_or(LookupFailure::Open),
        // The secrets are checked here, not by clap, so that no error quotes them.
        auth_token: cli
            .session_auth_token
            .as_ref()
            .map(|t| t.parse::<Token>("--session-auth-token (STICKLESS_AUTH_TOKEN)"))
            .transpose()?
            .map(|t| t.0)
            .or(file.auth_token.map(|t| t.0.0)),
        timeout: pick(cli.session_timeout, file.timeout, DEFAULT_LOOKUP_TIMEOUT),
        snapshot_keys: if cli.session_snapshot_keys.is_empty() {
            file.snapshot_keys
                .unwrap_or_default()
                .into_iter()
                .map(|k| k.0)
                .collect()
        } else {
            cli.session_snapshot_keys
                .iter()
                .map(|key| {
                    key.parse::<SnapshotKey>(
                        "--session-snapshot-key (STICKLESS_PROXY_SESSION_SNAPSHOT_KEYS)",
                    )
                })
                .collect::<Result<_, _>>()?
        },
        snapshot_cookie: cli
            .session_snapshot_cookie
            .clone()
            .map(|c| c.0)
            .or(file.snapshot_cookie.map(|c| c.0.0))
            .unwrap_or_else(|| DEFAULT_SNAPSHOT_COOKIE.to_owned()),
        snapshot_max_age: pick(
            cli.snapshot_max_age,
            file.snapshot_max_age,
            DEFAULT_SNAPSHOT_MAX_AGE,
        ),
        outage_grace: pick(
            cli.session_outage_grace,
            file.outage_grace,
            DEFAULT_OUTAGE_GRACE,
        ),
        cache: cli.session_cache.or(file.cache).unwrap_or(0),
    };
    if config.cache > MAX_SESSION_CACHE {
        return Err(ConfigError::Invalid(format!(
            "--session-cache / [session_lookup] cache of {} sessions is above the limit of \
             {MAX_SESSION_CACHE}",
            config.cache
        )));
    }
    if config.snapshot_cookie == config.cookie {
        return Err(ConfigError::Invalid(format!(
            "the session snapshot cookie and the session cookie are both named {:?}; give them \
             distinct names",
            config.cookie
        )));
    }
    let keys = &config.snapshot_keys;
    if keys.iter().enumerate().any(|(i, k)| keys[..i].contains(k)) {
        return Err(ConfigError::Invalid(
            "the same session snapshot key is given twice".into(),
        ));
    }
    Ok(Some(config))
}

/// Reads the TLS files of the session server at `url`: refused with an `http://` URL, and
/// when a file cannot be read or holds no usable PEM (the message names the file).
fn tls(
    urls: &[String],
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Option<ClientTls>, ConfigError> {
    let given = [
        ("--session-ca / ca", ca.is_some()),
        ("--session-client-cert / client_cert", cert.is_some()),
        ("--session-client-key / client_key", key.is_some()),
    ];
    let cleartext = urls.iter().find(|url| {
        !url.get(..8)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
    });
    if let Some((what, _)) = given.iter().find(|(_, given)| *given)
        && let Some(url) = cleartext
    {
        return Err(ConfigError::Invalid(format!(
            "{what} is for an https:// session server, but the session server is {url}: use \
             https:// for TLS, or drop the TLS settings"
        )));
    }
    ClientTls::from_files(ca.as_deref(), cert.as_deref(), key.as_deref()).map_err(|e| {
        ConfigError::Invalid(match e {
            ClientError::Config(message) => format!("session lookup TLS: {message}"),
            other => format!("session lookup TLS: {other}"),
        })
    })
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use clap::Parser as _;

    use super::super::{Cli, ConfigError, SnapshotKey, resolve as resolve_all};
    use super::LookupConfig;

    /// The lookup settings of these flags (plus a backend) over `file`.
    fn resolve(args: &[&str], file: Option<&str>) -> Result<Option<LookupConfig>, ConfigError> {
        let args = ["session-proxy", "--backend", "http://127.0.0.1:9001"]
            .iter()
            .chain(args);
        let cli = Cli::try_parse_from(args).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        resolve_all(cli, file).map(|config| config.lookup)
    }

    #[test]
    fn several_session_servers_come_repeated_comma_separated_or_as_a_file_list() {
        let servers = |args: &[&str], file: Option<&str>| {
            resolve(args, file).map(|c| c.expect("lookup on").session_servers)
        };
        let two = ["http://a:1".to_owned(), "http://b:2".to_owned()];
        assert_eq!(
            servers(&["--session-lookup", "http://a:1,http://b:2/"], None).unwrap(),
            two
        );
        assert_eq!(
            servers(
                &[
                    "--session-lookup",
                    "http://a:1",
                    "--session-lookup",
                    "http://b:2"
                ],
                None
            )
            .unwrap(),
            two
        );
        let array = "[session_lookup]\nurl = [\"http://a:1\", \"http://b:2\"]\n";
        assert_eq!(servers(&[], Some(array)).unwrap(), two);
        let list = "[session_lookup]\nurl = \"http://a:1, http://b:2\"\n";
        assert_eq!(servers(&[], Some(list)).unwrap(), two);
        // Flags win over the file, whole.
        assert_eq!(
            servers(&["--session-lookup", "http://c:3"], Some(array)).unwrap(),
            ["http://c:3".to_owned()]
        );
        for bad in [
            "http://a:1,",
            "http://a:1,ftp://b:2",
            "http://a:1,http://a:1",
        ] {
            assert!(servers(&["--session-lookup", bad], None).is_err(), "{bad}");
        }
        let twice = servers(
            &[
                "--session-lookup",
                "http://a:1",
                "--session-lookup",
                "http://a:1",
            ],
            None,
        );
        assert!(twice.unwrap_err().to_string().contains("twice"));
        // TLS files need every server to be https://.
        let mixed = resolve(
            &[
                "--session-lookup",
                "https://a:1,http://b:2",
                "--session-ca",
                "/nonexistent",
            ],
            None,
        );
        assert!(mixed.unwrap_err().to_string().contains("http://b:2"));
    }

    #[test]
    fn debug_shows_that_a_session_token_is_set_but_never_the_token() {
        let config = resolve(
            &[
                "--session-lookup",
                "http://127.0.0.1:1",
                "--session-auth-token",
                "s3cret-lookup-token",
            ],
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(config.auth_token.as_deref(), Some("s3cret-lookup-token"));
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("<hidden>"), "{shown}");
    }

    #[test]
    fn snapshot_keys_come_from_flags_or_file_and_default_to_none() {
        let hex = "ab".repeat(32);
        let b64 = base64::engine::general_purpose::STANDARD.encode([0xab; 32]);
        let other = "cd".repeat(40);
        let plain = resolve(&["--session-lookup", "http://127.0.0.1:1"], None)
            .unwrap()
            .unwrap();
        assert!(plain.snapshot_keys.is_empty());
        assert_eq!(plain.snapshot_cookie, "sid_snap");

        let flags = resolve(
            &[
                "--session-lookup",
                "http://127.0.0.1:1",
                "--session-snapshot-key",
                &hex,
                "--session-snapshot-key",
                &other,
                "--session-snapshot-cookie",
                "snap",
            ],
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            flags.snapshot_keys,
            [SnapshotKey(vec![0xab; 32]), SnapshotKey(vec![0xcd; 40])],
            "signing key first"
        );
        assert_eq!(flags.snapshot_cookie, "snap");

        let file = format!(
            "[session_lookup]\nurl = \"http://127.0.0.1:1\"\nsnapshot_keys = [\"{b64}\"]\n\
             snapshot_cookie = \"s2\"\n"
        );
        let from_file = resolve(&[], Some(&file)).unwrap().unwrap();
        assert_eq!(from_file.snapshot_keys, [SnapshotKey(vec![0xab; 32])]);
        assert_eq!(from_file.snapshot_cookie, "s2");
        let overridden = resolve(&["--session-snapshot-key", &other], Some(&file))
            .unwrap()
            .unwrap();
        assert_eq!(overridden.snapshot_keys, [SnapshotKey(vec![0xcd; 40])]);
        assert!(
            !format!("{overridden:?}").contains("205"),
            "keys never printed"
        );
    }

    #[test]
    fn snapshot_max_age_and_outage_grace_come_from_flags_or_file_with_defaults() {
        use std::time::Duration;
        let url = ["--session-lookup", "http://127.0.0.1:1"];
        let plain = resolve(&url, None).unwrap().unwrap();
        assert_eq!(plain.snapshot_max_age, Duration::from_secs(3600));
        assert_eq!(plain.outage_grace, Duration::from_secs(5));

        let file = "[session_lookup]\nurl = \"http://127.0.0.1:1\"\nsnapshot_max_age = \"10m\"\n\
                    outage_grace = \"2s\"\n";
        let from_file = resolve(&[], Some(file)).unwrap().unwrap();
        assert_eq!(from_file.snapshot_max_age, Duration::from_secs(600));
        assert_eq!(from_file.outage_grace, Duration::from_secs(2));
        let flags = resolve(
            &[
                "--snapshot-max-age",
                "90s",
                "--session-outage-grace",
                "250ms",
            ],
            Some(file),
        )
        .unwrap()
        .unwrap();
        assert_eq!(flags.snapshot_max_age, Duration::from_secs(90));
        assert_eq!(flags.outage_grace, Duration::from_millis(250));
    }

    #[test]
    fn a_zero_or_stray_snapshot_max_age_or_outage_grace_is_refused() {
        let message = |args: &[&str], file: Option<&str>| match resolve(args, file) {
            Ok(config) => panic!("accepted: {config:?}"),
            Err(error) => error.to_string(),
        };
        let url = ["--session-lookup", "http://127.0.0.1:1"];
        for flag in ["--snapshot-max-age", "--session-outage-grace"] {
            let m = message(&[url[0], url[1], flag, "0s"], None);
            assert!(m.contains("above zero"), "{flag}: {m}");
            let m = message(&[flag, "1m"], None);
            assert!(m.contains(flag) && m.contains("--session-lookup"), "{m}");
        }
        let m = message(
            &[],
            Some("[session_lookup]\nurl = \"http://h:1\"\nsnapshot_max_age = \"0s\"\n"),
        );
        assert!(m.contains("line 3") && m.contains("above zero"), "{m}");
        let m = message(&[], Some("[session_lookup]\noutage_grace = \"1s\"\n"));
        assert!(m.contains("session_lookup"), "{m}");
    }

    #[test]
    fn the_session_cache_comes_from_flag_or_file_is_off_by_default_and_bounded() {
        let url = ["--session-lookup", "http://127.0.0.1:1"];
        let cache = |args: &[&str], file: Option<&str>| {
            resolve(args, file).map(|c| c.expect("lookup on").cache)
        };
        assert_eq!(cache(&url, None).unwrap(), 0);
        assert_eq!(
            cache(&[url[0], url[1], "--session-cache", "5000"], None).unwrap(),
            5000
        );
        let file = "[session_lookup]\nurl = \"http://127.0.0.1:1\"\ncache = 100\n";
        assert_eq!(cache(&[], Some(file)).unwrap(), 100);
        assert_eq!(cache(&["--session-cache", "0"], Some(file)).unwrap(), 0);
        let too_many = cache(&[url[0], url[1], "--session-cache", "1000001"], None);
        assert!(
            too_many
                .unwrap_err()
                .to_string()
                .contains("above the limit")
        );
        assert!(cache(&[url[0], url[1], "--session-cache", "-1"], None).is_err());
        let stray = resolve(&["--session-cache", "10"], None).unwrap_err();
        assert!(stray.to_string().contains("--session-cache"), "{stray}");
        let stray = resolve(&[], Some("[session_lookup]\ncache = 10\n")).unwrap_err();
        assert!(stray.to_string().contains("session_lookup"), "{stray}");
    }

    #[test]
    fn bad_snapshot_settings_are_refused() {
        let url = ["--session-lookup", "http://127.0.0.1:1"];
        let short = "ab".repeat(31);
        let message = |args: &[&str], file: Option<&str>| match resolve(args, file) {
            Ok(config) => panic!("accepted: {config:?}"),
            Err(error) => error.to_string(),
        };
        let m = message(&[url[0], url[1], "--session-snapshot-key", &short], None);
        assert!(m.contains("at least 32 bytes"), "{m}");
        let m = message(
            &[url[0], url[1], "--session-snapshot-key", "not a key!"],
            None,
        );
        assert!(m.contains("hex or base64"), "{m}");
        let key = "ab".repeat(32);
        let m = message(&["--session-snapshot-key", &key], None);
        assert!(
            m.contains("--session-snapshot-key") && m.contains("--session-lookup"),
            "{m}"
        );
        let m = message(&[url[0], url[1], "--session-snapshot-cookie", "sid"], None);
        assert!(m.contains("distinct"), "{m}");
        let m = message(
            &[
                url[0],
                url[1],
                "--session-snapshot-key",
                &key,
                "--session-snapshot-key",
                &key,
            ],
            None,
        );
        assert!(m.contains("twice"), "{m}");
        let m = message(&[], Some("[session_lookup]\nsnapshot_cookie = \"s\"\n"));
        assert!(m.contains("session_lookup"), "{m}");
        let m = message(
            &[],
            Some("[session_lookup]\nurl = \"http://h:1\"\nsnapshot_keys = [\"abcd\"]\n"),
        );
        assert!(
            m.contains("line 3") && m.contains("at least 32 bytes"),
            "{m}"
        );
    }
}
