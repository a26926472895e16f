//! The defaults of the binaries that must agree, pinned (issue 15): `demo-app --sessions proxy`
//! behind `session-proxy --session-lookup` over `session-server`, each with its defaults, must
//! work together. A first run once answered 401 to every logged-in request because demo-app's
//! namespace defaulted to `demo` and the proxy's to `default`; every pair is checked here so
//! that none can drift again. The binaries themselves, started with their defaults, are
//! exercised end to end in `bench/tests/first_run_defaults.rs`.

use std::time::Duration;

use clap::Parser as _;
use demo::proxy_mode;
use demo::{DemoConfig, Sessions};
use proxy_plugin::config::{
    self, Cli, DEFAULT_OUTAGE_GRACE, DEFAULT_SESSION_ATTRS, DEFAULT_SESSION_COOKIE,
    DEFAULT_SESSION_NAMESPACE, DEFAULT_SNAPSHOT_COOKIE, DEFAULT_SNAPSHOT_MAX_AGE,
};
use proxy_plugin::lookup::{
    SESSION_ATTR_PREFIX, SESSION_DEGRADED_HEADER, SESSION_ID_HEADER, SESSION_USER_HEADER,
};
use session_client::SessionConfig;

/// The proxy's lookup settings from `--session-lookup` alone (and the backend it needs).
fn proxy_lookup_defaults() -> config::LookupConfig {
    let cli = Cli::try_parse_from([
        "session-proxy",
        "--backend",
        "http://127.0.0.1:9001",
        "--session-lookup",
        "http://127.0.0.1:50051",
    ])
    .expect("flags parse");
    config::resolve(cli, None)
        .expect("valid config")
        .lookup
        .expect("the lookup plugin is on")
}

#[test]
fn the_namespace_is_the_session_servers_default_everywhere() {
    assert_eq!(
        DEFAULT_SESSION_NAMESPACE,
        session_server::service::DEFAULT_NAMESPACE
    );
    assert_eq!(demo::DEFAULT_NAMESPACE, DEFAULT_SESSION_NAMESPACE);
    assert_eq!(proxy_lookup_defaults().namespace, demo::DEFAULT_NAMESPACE);
}

#[test]
fn cookie_names_agree_with_session_clients_defaults() {
    let layer = SessionConfig::default();
    assert_eq!(DEFAULT_SESSION_COOKIE, layer.cookie_name);
    assert_eq!(DEFAULT_SNAPSHOT_COOKIE, layer.snapshot_cookie_name);
    let proxy = proxy_lookup_defaults();
    assert_eq!(proxy.cookie, layer.cookie_name);
    assert_eq!(proxy.snapshot_cookie, layer.snapshot_cookie_name);
    assert_ne!(proxy.cookie, proxy.snapshot_cookie);
    // No session header unless asked for: cookie-only, as before.
    assert_eq!(proxy.session_header, None);
}

#[test]
fn snapshot_max_age_and_outage_grace_agree() {
    let layer = SessionConfig::default();
    let demo = DemoConfig::new("a", Sessions::Proxy("http://127.0.0.1:50051".into()));
    let proxy = proxy_lookup_defaults();
    assert_eq!(DEFAULT_SNAPSHOT_MAX_AGE, layer.snapshot_max_age);
    assert_eq!(demo.snapshot_max_age, layer.snapshot_max_age);
    assert_eq!(proxy.snapshot_max_age, layer.snapshot_max_age);
    assert_eq!(DEFAULT_OUTAGE_GRACE, layer.outage_grace);
    assert_eq!(demo::DEFAULT_OUTAGE_GRACE, layer.outage_grace);
    assert_eq!(demo.outage_grace, layer.outage_grace);
    assert_eq!(proxy.outage_grace, layer.outage_grace);
    // The values the READMEs state.
    assert_eq!(layer.snapshot_max_age, Duration::from_secs(60 * 60));
    assert_eq!(layer.outage_grace, Duration::from_secs(5));
}

#[test]
fn the_headers_the_proxy_sets_are_the_ones_demo_reads() {
    assert_eq!(proxy_mode::SESSION_ID, SESSION_ID_HEADER);
    assert_eq!(proxy_mode::SESSION_USER, SESSION_USER_HEADER);
    assert_eq!(proxy_mode::SESSION_DEGRADED, SESSION_DEGRADED_HEADER);
    // The cart travels as a configured attribute, forwarded by default.
    let cart = proxy_mode::SESSION_CART
        .strip_prefix(SESSION_ATTR_PREFIX)
        .expect("the cart header is an attribute header");
    assert!(DEFAULT_SESSION_ATTRS.contains(&cart), "{cart}");
    assert!(proxy_lookup_defaults().attrs.iter().any(|a| a == cart));
}

#[test]
fn demo_reaches_the_session_server_where_it_listens_by_default() {
    assert_eq!(
        demo::DEFAULT_SESSION_SERVER,
        format!("http://{}", session_server::config::DEFAULT_LISTEN)
    );
}

#[test]
fn the_token_is_read_from_the_same_environment_variable() {
    use clap::CommandFactory as _;
    let proxy = Cli::command();
    let token = proxy
        .get_arguments()
        .find(|arg| arg.get_id() == "session_auth_token")
        .expect("--session-auth-token");
    assert_eq!(
        token.get_env().and_then(|env| env.to_str()),
        Some("STICKLESS_AUTH_TOKEN")
    );
    let server = session_server::config::Cli::command();
    let token = server
        .get_arguments()
        .find(|arg| arg.get_long() == Some("auth-token"))
        .expect("session-server --auth-token");
    assert_eq!(
        token.get_env().and_then(|env| env.to_str()),
        Some("STICKLESS_AUTH_TOKEN")
    );
    // demo-app's (a binary-only Cli) is exercised by the end-to-end test, which gives all
    // three the token in STICKLESS_AUTH_TOKEN alone.
}
