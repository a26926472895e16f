//! The proxy's configuration as an operator writes it: flags, the TOML file, their precedence,
//! every balancing mode, and the messages a mistake gets (the session lookup's TLS files:
//! `lookup_tls.rs`).

use std::time::Duration;

use clap::Parser as _;
use ipnet::IpNet;
use proxy_plugin::balance::{BalanceMode, HashType, StickyConfig};
use proxy_plugin::config::{
    BackendConfig, Cli, ConfigError, HealthCheckKind, HealthConfig, Limits, LookupConfig,
    LookupFailure, ProxyConfig, load, resolve,
};

fn cli(args: &[&str]) -> Cli {
    try_cli(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn try_cli(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("session-proxy").chain(args.iter().copied()))
}

/// Flags plus one backend, so the configuration is complete.
fn with_backend(args: &[&str]) -> Cli {
    let mut all = vec!["--backend", "http://127.0.0.1:9001"];
    all.extend_from_slice(args);
    cli(&all)
}

fn backend(name: &str, authority: &str, weight: u32) -> BackendConfig {
    BackendConfig {
        name: name.into(),
        authority: authority.into(),
        weight,
        tls: false,
    }
}

/// The error message of a configuration that must be refused.
fn refused(cli: Cli, file: Option<&str>) -> String {
    match resolve(cli, file) {
        Ok(config) => panic!("accepted: {config:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn underscore_headers_are_refused_unless_a_flag_or_the_file_allows_them() {
    let allowed = |args: &[&str], file: Option<&str>| {
        resolve(with_backend(args), file)
            .unwrap()
            .allow_underscore_headers
    };
    let file = Some("allow_underscore_headers = true\n");
    assert!(!allowed(&[], None), "off by default, as nginx");
    assert!(allowed(&["--allow-underscore-headers"], None));
    assert!(allowed(&["--allow-underscore-headers=true"], None));
    assert!(allowed(&[], file));
    assert!(
        !allowed(&["--allow-underscore-headers=false"], file),
        "the flag wins over the file"
    );
    let error = try_cli(&["--allow-underscore-headers=maybe"]).unwrap_err();
    assert!(
        error.to_string().contains("--allow-underscore-headers"),
        "{error}"
    );
    let error = refused(
        with_backend(&[]),
        Some("allow_underscore_headers = \"yes\"\n"),
    );
    assert!(error.contains("allow_underscore_headers"), "{error}");
}

#[test]
fn flags_alone_configure_the_proxy_with_nginx_like_defaults() {
    let config = resolve(
        cli(&[
            "--backend",
            "http://127.0.0.1:9001,weight=2,name=s1",
            "--backend",
            "http://localhost:9002",
            "--listen",
            "0.0.0.0:8000",
            "--admin-listen",
            "127.0.0.1:8001",
            "--balance",
            "least-conn",
            "--trusted-proxies",
            "10.0.0.0/8,192.168.1.7",
        ]),
        None,
    )
    .unwrap();
    assert_eq!(
        config,
        ProxyConfig {
            listen: "0.0.0.0:8000".parse().unwrap(),
            admin_listen: Some("127.0.0.1:8001".parse().unwrap()),
            admin_token: None,
            backends: vec![
                backend("s1", "127.0.0.1:9001", 2),
                backend("localhost:9002", "localhost:9002", 1),
            ],
            balance: BalanceMode::LeastConn,
            trusted_proxies: vec![
                "10.0.0.0/8".parse::<IpNet>().unwrap(),
                "192.168.1.7/32".parse().unwrap(),
            ],
            allow_underscore_headers: false,
            client_limits: proxy_plugin::config::ClientLimits::default(),
            health: HealthConfig {
                kind: HealthCheckKind::Tcp,
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(1),
                rise: 2,
                fall: 3,
                max_fails: 1,
                fail_timeout: Duration::from_secs(10),
            },
            limits: Limits {
                header_read_timeout: Duration::from_secs(10),
                max_header_bytes: 64 * 1024,
                max_body_bytes: 10 * 1024 * 1024,
                connect_timeout: Duration::from_secs(2),
                response_timeout: Duration::from_secs(30),
                max_connections: 10_000,
                max_tries: 3,
                retry_buffer_bytes: 64 * 1024,
                body_read_timeout: Duration::from_secs(60),
                min_upload_rate: 500,
                send_timeout: Duration::from_secs(60),
                idle_timeout: Duration::from_secs(75),
            },
            lookup: None,
            tls: None,
            backend_ca: None,
        }
    );
}

#[test]
fn defaults_listen_on_loopback_round_robin_without_lookup() {
    let config = resolve(with_backend(&[]), None).unwrap();
    assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(config.admin_listen, None);
    assert_eq!(config.balance, BalanceMode::RoundRobin);
    assert!(config.trusted_proxies.is_empty());
    assert_eq!(config.health, HealthConfig::default());
    assert_eq!(config.limits, Limits::default());
    assert_eq!(config.lookup, None);
}

const FULL_FILE: &str = r#"
listen = "0.0.0.0:8080"
admin_listen = "127.0.0.1:8081"
balance = "cookie-hash:sid"
hash_type = "consistent"
trusted_proxies = ["10.0.0.0/8", "fd00::/8"]
allow_underscore_headers = true

[[backend]]
url = "http://127.0.0.1:9001"
weight = 2
name = "s1"

[[backend]]
url = "http://[::1]:9002"

[health]
check = "http:/healthz"
interval = "5s"
timeout = "500ms"
rise = 1
fall = 2
max_fails = 0
fail_timeout = "30s"

[limits]
header_read_timeout = "5s"
max_header_bytes = 16384
max_body_bytes = 1048576
connect_timeout = "1s"
response_timeout = "1m"
max_connections = 100
max_tries = 2
retry_buffer_bytes = 0
body_read_timeout = "20s"
min_upload_rate = "2k"
send_timeout = "30s"
idle_timeout = "2m"

[session_lookup]
url = "http://127.0.0.1:50051"
namespace = "shop"
cookie = "session"
attrs = ["cart", "role"]
on_failure = "closed"
timeout = "250ms"
auth_token = "s3cret"
snapshot_max_age = "10m"
outage_grace = "2s"
"#;

#[test]
fn a_file_alone_configures_everything() {
    let config = resolve(Cli::default(), Some(FULL_FILE)).unwrap();
    assert_eq!(
        config,
        ProxyConfig {
            listen: "0.0.0.0:8080".parse().unwrap(),
            admin_listen: Some("127.0.0.1:8081".parse().unwrap()),
            admin_token: None,
            backends: vec![
                backend("s1", "127.0.0.1:9001", 2),
                backend("[::1]:9002", "[::1]:9002", 1),
            ],
            balance: BalanceMode::CookieHash("sid".into(), HashType::Consistent),
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
            allow_underscore_headers: true,
            client_limits: proxy_plugin::config::ClientLimits::default(),
            health: HealthConfig {
                kind: HealthCheckKind::Http("/healthz".into()),
                interval: Duration::from_secs(5),
                timeout: Duration::from_millis(500),
                rise: 1,
                fall: 2,
                max_fails: 0,
                fail_timeout: Duration::from_secs(30),
            },
            limits: Limits {
                header_read_timeout: Duration::from_secs(5),
                max_header_bytes: 16384,
                max_body_bytes: 1048576,
                connect_timeout: Duration::from_secs(1),
                response_timeout: Duration::from_secs(60),
                max_connections: 100,
                max_tries: 2,
                retry_buffer_bytes: 0,
                body_read_timeout: Duration::from_secs(20),
                min_upload_rate: 2048,
                send_timeout: Duration::from_secs(30),
                idle_timeout: Duration::from_secs(120),
            },
            lookup: Some(LookupConfig {
                session_servers: vec!["http://127.0.0.1:50051".into()],
                namespace: "shop".into(),
                cookie: "session".into(),
                session_header: None,
                attrs: vec!["cart".into(), "role".into()],
                on_failure: LookupFailure::Closed,
                auth_token: Some("s3cret".into()),
                timeout: Duration::from_millis(250),
                snapshot_keys: vec![],
                snapshot_cookie: "sid_snap".into(),
                snapshot_max_age: Duration::from_secs(600),
                outage_grace: Duration::from_secs(2),
                cache: 0,
                tls: None,
            }),
            tls: None,
            backend_ca: None,
        }
    );
}

#[test]
fn flags_override_the_file_and_flag_backends_replace_its_list() {
    let config = resolve(
        cli(&[
            "--listen",
            "127.0.0.1:9999",
            "--backend",
            "http://10.0.0.5:80,name=only",
            "--balance",
            "uri",
            "--hash-type",
            "map",
            "--health-check",
            "off",
            "--max-tries",
            "5",
            "--session-attr",
            "user_name",
            "--session-fail",
            "open",
            "--min-upload-rate",
            "0",
            "--idle-timeout",
            "300ms",
        ]),
        Some(FULL_FILE),
    )
    .unwrap();
    assert_eq!(config.listen.to_string(), "127.0.0.1:9999");
    assert_eq!(config.backends, vec![backend("only", "10.0.0.5:80", 1)]);
    assert_eq!(config.balance, BalanceMode::Uri(HashType::Map));
    assert_eq!(config.health.kind, HealthCheckKind::Off);
    assert_eq!(config.limits.max_tries, 5);
    assert_eq!(config.limits.min_upload_rate, 0);
    assert_eq!(config.limits.idle_timeout, Duration::from_millis(300));
    let lookup = config.lookup.unwrap();
    assert_eq!(lookup.attrs, vec!["user_name".to_string()]);
    assert_eq!(lookup.on_failure, LookupFailure::Open);
    // What no flag touched still comes from the file.
    assert_eq!(config.admin_listen.unwrap().to_string(), "127.0.0.1:8081");
    assert_eq!(config.health.interval, Duration::from_secs(5));
    assert_eq!(config.limits.max_connections, 100);
    assert_eq!(config.limits.send_timeout, Duration::from_secs(30));
    assert_eq!(lookup.namespace, "shop");
    assert_eq!(lookup.auth_token.as_deref(), Some("s3cret"));
}

#[test]
fn every_balance_mode_string_parses_to_its_mode() {
    let sticky = StickyConfig {
        cookie: "stickless_backend".into(),
        key: vec![7u8; 32],
    };
    let hex_key = "07".repeat(32);
    let sticky_args = ["--sticky-key", hex_key.as_str()];
    let cases: Vec<(&str, &[&str], BalanceMode)> = vec![
        ("round-robin", &[], BalanceMode::RoundRobin),
        ("roundrobin", &[], BalanceMode::RoundRobin),
        ("static-rr", &[], BalanceMode::StaticRr),
        ("least-conn", &[], BalanceMode::LeastConn),
        ("least_conn", &[], BalanceMode::LeastConn),
        ("random", &[], BalanceMode::Random),
        ("ip-hash", &[], BalanceMode::IpHash),
        ("ip_hash", &[], BalanceMode::IpHash),
        ("source", &[], BalanceMode::Source(HashType::Map)),
        (
            "source",
            &["--hash-type", "consistent"],
            BalanceMode::Source(HashType::Consistent),
        ),
        ("uri", &[], BalanceMode::Uri(HashType::Map)),
        (
            "url-param:user",
            &[],
            BalanceMode::UrlParam("user".into(), HashType::Map),
        ),
        (
            "header:X-Tenant",
            &["--hash-type", "consistent"],
            BalanceMode::Header("x-tenant".into(), HashType::Consistent),
        ),
        (
            "cookie-hash:sid",
            &[],
            BalanceMode::CookieHash("sid".into(), HashType::Map),
        ),
        (
            "rdp-cookie:mstshash",
            &["--hash-type", "consistent"],
            BalanceMode::CookieHash("mstshash".into(), HashType::Consistent),
        ),
        (
            "sticky-cookie",
            &sticky_args,
            BalanceMode::StickyCookie(sticky),
        ),
    ];
    for (mode, extra, expected) in cases {
        let mut args = vec!["--balance", mode];
        args.extend_from_slice(extra);
        let config = resolve(with_backend(&args), None).unwrap();
        assert_eq!(config.balance, expected, "--balance {mode} {extra:?}");
        // The same text in the file means the same.
        let file = format!("balance = \"{mode}\"\n");
        let config = resolve(with_backend(extra), Some(&file)).unwrap();
        assert_eq!(config.balance, expected, "balance = {mode:?} {extra:?}");
    }
}

#[test]
fn sticky_cookie_takes_its_name_and_key_from_flags_or_the_sticky_table() {
    let b64 = "Zm9v".repeat(11); // 33 bytes of base64 (not hex)
    let config = resolve(
        with_backend(&["--balance", "sticky-cookie", "--sticky-cookie-name", "pin"]),
        Some(&format!(
            "[sticky]\nkey = \"{b64}\"\ncookie = \"ignored\"\n"
        )),
    )
    .unwrap();
    let BalanceMode::StickyCookie(sticky) = config.balance else {
        panic!("{:?}", config.balance)
    };
    assert_eq!(sticky.cookie, "pin");
    assert_eq!(sticky.key.len(), 33);
}

#[test]
fn sticky_cookie_without_a_key_gets_one_random_key_per_process() {
    let key = |config: ProxyConfig| match config.balance {
        BalanceMode::StickyCookie(sticky) => sticky.key,
        other => panic!("{other:?}"),
    };
    let first = key(resolve(with_backend(&["--balance", "sticky-cookie"]), None).unwrap());
    let again = key(resolve(with_backend(&["--balance", "sticky-cookie"]), None).unwrap());
    assert_eq!(first.len(), 32);
    assert_ne!(first, vec![0u8; 32]);
    assert_eq!(first, again, "a reload must keep the pins");
}

#[test]
fn session_lookup_is_on_with_a_url_and_has_defaults() {
    let config = resolve(
        with_backend(&["--session-lookup", "https://sessions.internal:50051"]),
        None,
    )
    .unwrap();
    assert_eq!(
        config.lookup,
        Some(LookupConfig {
            session_servers: vec!["https://sessions.internal:50051".into()],
            namespace: "default".into(),
            cookie: "sid".into(),
            session_header: None,
            attrs: vec!["cart".into()],
            on_failure: LookupFailure::Open,
            auth_token: None,
            timeout: Duration::from_millis(500),
            snapshot_keys: vec![],
            snapshot_cookie: "sid_snap".into(),
            snapshot_max_age: Duration::from_secs(60 * 60),
            outage_grace: Duration::from_secs(5),
            cache: 0,
            tls: None,
        })
    );
    let message = refused(with_backend(&["--session-attr", "cart"]), None);
    assert!(
        message.contains("--session-attr") && message.contains("--session-lookup"),
        "{message}"
    );
    let message = refused(
        with_backend(&[]),
        Some("[session_lookup]\ncookie = \"sid\"\n"),
    );
    assert!(message.contains("session_lookup"), "{message}");
}

#[test]
fn unknown_keys_are_errors_naming_the_key_and_its_line() {
    let cases = [
        (
            "listen = \"127.0.0.1:1\"\nlisten_port = 5\n",
            "listen_port",
            2,
        ),
        (
            "[[backend]]\nurl = \"http://127.0.0.1:1\"\nwieght = 3\n",
            "wieght",
            3,
        ),
        (
            "[limits]\nmax_tries = 2\n\nmax_retries = 4\n",
            "max_retries",
            4,
        ),
        ("[health]\nchek = \"tcp\"\n", "chek", 2),
        (
            "[session_lookup]\nurl = \"http://a:1\"\ncookies = \"x\"\n",
            "cookies",
            3,
        ),
        ("[sticky]\nsecret = \"x\"\n", "secret", 2),
        ("[proxy]\nlisten = \"127.0.0.1:1\"\n", "proxy", 1),
    ];
    for (file, key, line) in cases {
        let message = refused(with_backend(&[]), Some(file));
        assert!(message.contains(key), "{key}: {message}");
        assert!(
            message.contains(&format!("line {line}")),
            "{key} line {line}: {message}"
        );
    }
}

#[test]
fn bad_file_values_are_refused_naming_their_line() {
    let cases = [
        ("balance = \"fastest\"\n", "unknown balance mode", 1),
        (
            "\n[[backend]]\nurl = \"http://a:1\"\nweight = 0\n",
            "weight must be 1..=1000",
            2,
        ),
        ("[[backend]]\nurl = \"ftp://a:1\"\n", "https://host:port", 1),
        ("[health]\ninterval = \"soon\"\n", "bad duration", 2),
        ("[health]\nrise = 0\n", "at least 1", 2),
        ("[limits]\nmax_header_bytes = 100\n", "at least 8192", 2),
        ("[limits]\nconnect_timeout = \"0s\"\n", "above zero", 2),
        ("[limits]\nmin_upload_rate = \"fast\"\n", "bad rate", 2),
        (
            "[limits]\nmin_upload_rate = -1\n",
            "must not be negative",
            2,
        ),
        ("[limits]\nidle_timeout = \"0s\"\n", "above zero", 2),
        ("trusted_proxies = [\"10.0.0.0/33\"]\n", "not a CIDR", 1),
        ("[sticky]\nkey = \"abcd\"\n", "at least 32 bytes", 2),
        (
            "[session_lookup]\nurl = \"redis://a:1\"\n",
            "http://host:port",
            2,
        ),
        ("listen = 8080\n", "invalid type", 1),
    ];
    for (file, expected, line) in cases {
        let message = refused(with_backend(&[]), Some(file));
        assert!(message.contains(expected), "{file:?}: {message}");
        assert!(
            message.contains(&format!("line {line}")),
            "{file:?}: {message}"
        );
    }
}

#[test]
fn bad_flag_values_are_refused_with_clear_messages() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--backend", "127.0.0.1:9001"],
            "must look like http://host:port",
        ),
        (
            &["--backend", "ftp://a:1"],
            "must look like http://host:port",
        ),
        (&["--backend", "http://a:1/app"], "must not have a path"),
        (
            &["--backend", "http://a:1,weight=0"],
            "weight must be 1..=1000",
        ),
        (
            &["--backend", "http://a:1,weight=1001"],
            "weight must be 1..=1000",
        ),
        (&["--backend", "http://a:1,weight=heavy"], "not a number"),
        (
            &["--backend", "http://a:1,wait=2"],
            "not weight=N or name=NAME",
        ),
        (&["--backend", "http://a:1,name=a/b"], "backend name"),
        (&["--balance", "fastest"], "unknown balance mode"),
        (&["--balance", "header"], "needs the header's name"),
        (&["--balance", "cookie-hash:"], "needs the cookie's name"),
        (&["--balance", "round-robin:x"], "takes no :NAME"),
        (
            &["--balance", "header:bad header"],
            "not a valid header name",
        ),
        (&["--hash-type", "ring"], "not map or consistent"),
        (&["--health-check", "http"], "http:/PATH"),
        (&["--health-check", "http:healthz"], "absolute path"),
        (&["--health-interval", "0s"], "above zero"),
        (&["--health-timeout", "fast"], "bad duration"),
        (&["--health-rise", "0"], "0 is not in 1.."),
        (&["--max-tries", "0"], "0 is not in 1.."),
        (&["--max-header-bytes", "512"], "512 is not in 8192.."),
        (&["--min-upload-rate", "1.5k"], "bad rate"),
        (&["--body-read-timeout", "0s"], "above zero"),
        (&["--send-timeout", "soon"], "bad duration"),
        (&["--trusted-proxies", "10.0.0.0/8,nope"], "not a CIDR"),
        (&["--sticky-key", "00ff"], "at least 32 bytes"),
        (&["--sticky-key", "!!not-a-key!!"], "hex or base64"),
        (&["--sticky-cookie-name", "a;b"], "not a cookie name"),
        (&["--session-lookup", "127.0.0.1:50051"], "http://host:port"),
        (&["--session-namespace", "a b"], "[A-Za-z0-9_.-]"),
        (&["--session-fail", "maybe"], "not open"),
        (
            &[
                "--session-lookup",
                "http://127.0.0.1:50051",
                "--session-auth-token",
                "",
            ],
            "non-empty",
        ),
        (&["--listen", "localhost"], "invalid value"),
    ];
    for (args, expected) in cases {
        // Secrets are checked when resolving (clap would quote them): with a backend, so that
        // its absence is not what is refused.
        let message = match try_cli(args) {
            Err(e) => e.to_string(),
            Ok(_) => refused(with_backend(args), None),
        };
        assert!(message.contains(expected), "{args:?}: {message}");
    }
}

#[test]
fn settings_that_do_not_fit_together_are_refused() {
    let message = refused(Cli::default(), None);
    assert!(message.contains("no backend"), "{message}");
    let message = refused(
        cli(&[
            "--backend",
            "http://a:1",
            "--backend",
            "http://b:1,name=a:1",
        ]),
        None,
    );
    assert!(
        message.contains("two backends are named \"a:1\""),
        "{message}"
    );
    let message = refused(
        with_backend(&["--balance", "ip-hash", "--hash-type", "consistent"]),
        None,
    );
    assert!(message.contains("hash_type"), "{message}");
    let message = refused(
        with_backend(&[
            "--listen",
            "127.0.0.1:7000",
            "--admin-listen",
            "127.0.0.1:7000",
        ]),
        None,
    );
    assert!(message.contains("same address"), "{message}");
}

#[test]
fn load_names_the_file_it_could_not_read_or_parse() {
    let missing = std::env::temp_dir().join("stickless-proxy-no-such-file.toml");
    let error = load(cli(&["--config", missing.to_str().unwrap()])).unwrap_err();
    assert!(matches!(error, ConfigError::Read { .. }), "{error:?}");
    assert!(
        error.to_string().contains("stickless-proxy-no-such-file"),
        "{error}"
    );

    let path =
        std::env::temp_dir().join(format!("stickless-proxy-cfg-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        "[[backend]]\nurl = \"http://127.0.0.1:9001\"\nbogus = 1\n",
    )
    .unwrap();
    let error = load(cli(&["--config", path.to_str().unwrap()])).unwrap_err();
    std::fs::write(&path, "[[backend]]\nurl = \"http://127.0.0.1:9001\"\n").unwrap();
    let config = load(cli(&["--config", path.to_str().unwrap()]));
    let _ = std::fs::remove_file(&path);
    let message = error.to_string();
    assert!(
        message.contains(path.to_str().unwrap()) && message.contains("line 3"),
        "{message}"
    );
    assert_eq!(
        config.unwrap().backends,
        vec![backend("127.0.0.1:9001", "127.0.0.1:9001", 1)]
    );
}
