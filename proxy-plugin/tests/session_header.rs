//! Sessions without cookies, proxy side (issue 15): `session-proxy --session-header
//! x-session-token` reads the session id from that request header as well as from the cookie
//! (the header wins; empty counts as absent), forwards it to the backend, and treats a
//! backend's response carrying it empty (Spring's `HeaderHttpSessionIdResolver` on logout) as
//! it treats one clearing the session cookie: the snapshot cookie is expired.
//!
//! Real pieces: a session server (memory store) in-process, the proxy with snapshot keys, and
//! a small axum backend that echoes the session headers it was given.

mod support;

use std::collections::HashMap;

use axum::Router;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use clap::{CommandFactory as _, Parser as _};
use proxy_plugin::config::{self, BackendConfig, Cli, LookupConfig, LookupFailure};
use reqwest::StatusCode;
use session_client::SessionClient;
use support::lookup::{NAMESPACE, lookup_config, lookups};
use support::proxy::{TestProxy, client, config};
use support::session::TestSessionServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The key material of the snapshot cookie.
const KEY: [u8; 32] = [0x3c; 32];
/// The session header under test.
const TOKEN: &str = "x-session-token";

/// The backend: echoes the `x-session-*` headers it got as JSON; `/logout` answers the token
/// header empty, `/renew` answers a new token.
fn backend_app() -> Router {
    async fn echo(headers: HeaderMap) -> axum::Json<HashMap<String, String>> {
        axum::Json(
            headers
                .iter()
                .filter(|(name, _)| name.as_str().starts_with("x-session"))
                .map(|(name, value)| {
                    (
                        name.as_str().to_owned(),
                        value.to_str().unwrap_or("<binary>").to_owned(),
                    )
                })
                .collect(),
        )
    }
    Router::new()
        .route("/echo", get(echo))
        .route(
            "/logout",
            post(|| async { ([(TOKEN, "")], "logged out").into_response() }),
        )
        .route(
            "/renew",
            get(|| async {
                ([(TOKEN, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")], "renewed").into_response()
            }),
        )
}

/// A session server, the backend and the proxy in front with `--session-header
/// x-session-token` and snapshot keys.
struct Stack {
    sessions: TestSessionServer,
    proxy: TestProxy,
    _backend: JoinHandle<()>,
}

impl Stack {
    async fn start() -> Stack {
        let sessions = TestSessionServer::start().await;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local address");
        let backend = tokio::spawn(async move {
            let _ = axum::serve(listener, backend_app()).await;
        });
        let mut proxy_config = config(&[]);
        proxy_config.backends = vec![BackendConfig {
            name: "echo".to_owned(),
            authority: addr.to_string(),
            weight: 1,
            tls: false,
        }];
        proxy_config.lookup = Some(LookupConfig {
            session_header: Some(TOKEN.to_owned()),
            ..lookup_config(&sessions.url(), LookupFailure::Open, &[&KEY])
        });
        let proxy = TestProxy::start(proxy_config).await;
        Stack {
            sessions,
            proxy,
            _backend: backend,
        }
    }

    fn store(&self) -> SessionClient {
        self.sessions.client(NAMESPACE)
    }

    /// A new session of `user`; its id.
    async fn login(&self, user: &str) -> String {
        self.store()
            .create(user, HashMap::new(), None)
            .await
            .expect("session created")
            .id
    }

    /// `GET /echo` with `headers`: the status, the session headers the backend saw, and the
    /// response's `Set-Cookie` lines.
    async fn echo(&self, headers: &[(&str, &str)]) -> (StatusCode, Echoed, Vec<String>) {
        let mut request = client().get(self.proxy.url("/echo"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("proxy answered");
        let status = response.status();
        let cookies = set_cookies(response.headers());
        let seen = response.json().await.expect("JSON from the backend");
        (status, Echoed(seen), cookies)
    }
}

/// The session headers the backend saw.
#[derive(Debug, PartialEq)]
struct Echoed(HashMap<String, String>);

impl Echoed {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

fn set_cookies(headers: &reqwest::header::HeaderMap) -> Vec<String> {
    headers
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect()
}

/// The value the snapshot cookie is set to by one of `lines` (not an expiry).
fn snapshot_set(lines: &[String]) -> Option<String> {
    lines.iter().find_map(|line| {
        let value = line.strip_prefix("sid_snap=")?.split(';').next()?;
        (!value.is_empty()).then(|| value.to_owned())
    })
}

/// Whether one of `lines` expires the snapshot cookie.
fn snapshot_expired(lines: &[String]) -> bool {
    lines
        .iter()
        .any(|line| line.starts_with("sid_snap=;") && line.contains("Max-Age=0"))
}

#[tokio::test]
async fn a_request_with_only_the_header_gets_its_session_looked_up_and_forwarded() {
    let stack = Stack::start().await;
    let id = stack.login("alice").await;
    let (status, seen, cookies) = stack.echo(&[(TOKEN, &id)]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(seen.get("x-session-id"), Some(id.as_str()), "{seen:?}");
    assert_eq!(seen.get("x-session-user"), Some("alice"));
    // The header reaches the backend (one built on session-client's header id source reads
    // it), the one x-session-* name a client may send.
    assert_eq!(seen.get(TOKEN), Some(id.as_str()));
    assert_eq!(lookups(&stack.proxy, "found"), 1);
    // A header-borne id gets no snapshot cookie (no cookie jar to keep it).
    assert_eq!(snapshot_set(&cookies), None, "{cookies:?}");

    // The same session by cookie gets one: the snapshot is for cookie-borne ids.
    let (_, seen, cookies) = stack.echo(&[("cookie", &format!("sid={id}"))]).await;
    assert_eq!(seen.get("x-session-user"), Some("alice"));
    assert!(snapshot_set(&cookies).is_some(), "{cookies:?}");
}

#[tokio::test]
async fn the_header_wins_over_the_cookie_and_an_empty_one_counts_as_absent() {
    let stack = Stack::start().await;
    let alice = stack.login("alice").await;
    let bob = stack.login("bob").await;
    let bobs_cookie = format!("sid={bob}");
    let (_, seen, _) = stack
        .echo(&[(TOKEN, &alice), ("cookie", &bobs_cookie)])
        .await;
    assert_eq!(seen.get("x-session-user"), Some("alice"), "{seen:?}");
    let (_, seen, _) = stack.echo(&[(TOKEN, ""), ("cookie", &bobs_cookie)]).await;
    assert_eq!(seen.get("x-session-user"), Some("bob"), "{seen:?}");
    let (_, seen, _) = stack.echo(&[(TOKEN, "  "), ("cookie", &bobs_cookie)]).await;
    assert_eq!(seen.get("x-session-user"), Some("bob"), "{seen:?}");
}

#[tokio::test]
async fn an_unknown_or_malformed_token_behaves_like_such_a_cookie() {
    let stack = Stack::start().await;
    let unknown = "AbCdEfGhIjKlMnOpQrStUvWxYz012345";
    for (value, outcome) in [(unknown, "missing"), ("../../etc/passwd", "malformed")] {
        let before = lookups(&stack.proxy, outcome);
        let (by_cookie_status, by_cookie, _) =
            stack.echo(&[("cookie", &format!("sid={value}"))]).await;
        assert_eq!(lookups(&stack.proxy, outcome), before + 1, "{value}");
        let (by_header_status, by_header, _) = stack.echo(&[(TOKEN, value)]).await;
        assert_eq!(lookups(&stack.proxy, outcome), before + 2, "{value}");
        assert_eq!(by_cookie_status, StatusCode::OK);
        assert_eq!(by_header_status, by_cookie_status);
        // No session either way: only the token itself reaches the backend.
        assert_eq!(by_cookie, Echoed(HashMap::new()), "{value}");
        assert_eq!(
            by_header,
            Echoed(HashMap::from([(TOKEN.to_owned(), value.to_owned())])),
            "{value}"
        );
    }
}

#[tokio::test]
async fn a_client_still_cannot_claim_a_session_with_other_spellings() {
    let stack = Stack::start().await;
    let id = stack.login("alice").await;
    // The `_` spelling of the session header is dropped like every x_session_* name, and the
    // plugin's own headers cannot be forged next to an unknown token.
    let (_, seen, _) = stack
        .echo(&[
            ("x_session_token", &id),
            ("x-session-id", &id),
            ("x-session-user", "admin"),
            (TOKEN, "AbCdEfGhIjKlMnOpQrStUvWxYz012345"),
        ])
        .await;
    assert_eq!(seen.get("x-session-id"), None, "{seen:?}");
    assert_eq!(seen.get("x-session-user"), None, "{seen:?}");
    assert_eq!(seen.get("x_session_token"), None, "{seen:?}");
}

#[tokio::test]
async fn an_empty_session_header_in_the_response_ends_the_session_like_a_cleared_cookie() {
    let stack = Stack::start().await;
    let id = stack.login("alice").await;
    let (_, _, cookies) = stack.echo(&[("cookie", &format!("sid={id}"))]).await;
    let snapshot = snapshot_set(&cookies).expect("a snapshot cookie for the cookie-borne id");
    let jar = format!("sid_snap={snapshot}");

    // A response that leaves the header alone leaves the snapshot alone.
    let (_, seen, cookies) = stack.echo(&[(TOKEN, &id), ("cookie", &jar)]).await;
    assert_eq!(seen.get("x-session-user"), Some("alice"));
    assert!(!snapshot_expired(&cookies), "{cookies:?}");

    // The logout: the backend answers the header empty; the proxy expires the snapshot
    // cookie, as it does when a backend clears `sid`, and the empty header reaches the client.
    let response = client()
        .post(stack.proxy.url("/logout"))
        .header(TOKEN, &id)
        .header("cookie", &jar)
        .send()
        .await
        .expect("proxy answered");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers().get(TOKEN).map(|v| v.as_bytes()),
        Some(&b""[..])
    );
    let cookies = set_cookies(response.headers());
    assert!(snapshot_expired(&cookies), "{cookies:?}");
    assert_eq!(snapshot_set(&cookies), None, "{cookies:?}");

    // The same for a cookie-borne session: the empty header is the logout, whatever carried
    // the id in.
    let response = client()
        .post(stack.proxy.url("/logout"))
        .header("cookie", format!("sid={id}; {jar}"))
        .send()
        .await
        .expect("proxy answered");
    assert!(snapshot_expired(&set_cookies(response.headers())));
}

#[tokio::test]
async fn a_new_token_in_the_response_is_a_new_session_whose_snapshot_waits() {
    let stack = Stack::start().await;
    let id = stack.login("alice").await;
    // Cookie-borne and due a snapshot, but the response names a new id (a login or a
    // regenerate): its snapshot is left to the next request, as for a response setting `sid`.
    let response = client()
        .get(stack.proxy.url("/renew"))
        .header("cookie", format!("sid={id}"))
        .send()
        .await
        .expect("proxy answered");
    let cookies = set_cookies(response.headers());
    assert_eq!(snapshot_set(&cookies), None, "{cookies:?}");
    assert!(!snapshot_expired(&cookies), "{cookies:?}");
}

/// `--session-header` parsed from `args` (after a backend and `--session-lookup`) and TOML.
fn resolved(args: &[&str], file: Option<&str>) -> Result<Option<String>, String> {
    let mut all = vec![
        "session-proxy",
        "--backend",
        "http://127.0.0.1:9001",
        "--session-lookup",
        "http://127.0.0.1:50051",
    ];
    all.extend_from_slice(args);
    let cli = Cli::try_parse_from(all).map_err(|e| e.to_string())?;
    config::resolve(cli, file)
        .map(|config| config.lookup.expect("lookup on").session_header)
        .map_err(|e| e.to_string())
}

#[test]
fn the_session_header_setting_comes_from_the_flag_env_or_file() {
    assert_eq!(resolved(&[], None), Ok(None));
    assert_eq!(
        resolved(&["--session-header", "X-Session-Token"], None),
        Ok(Some(TOKEN.to_owned()))
    );
    assert_eq!(
        resolved(&[], Some("[session_lookup]\nheader = \"x-api-session\"\n")),
        Ok(Some("x-api-session".to_owned()))
    );
    // The flag wins over the file.
    assert_eq!(
        resolved(
            &["--session-header", TOKEN],
            Some("[session_lookup]\nheader = \"x-api-session\"\n")
        ),
        Ok(Some(TOKEN.to_owned()))
    );
    let arg = Cli::command()
        .get_arguments()
        .find(|arg| arg.get_long() == Some("session-header"))
        .expect("--session-header")
        .clone();
    assert_eq!(
        arg.get_env().and_then(|env| env.to_str()),
        Some("STICKLESS_PROXY_SESSION_HEADER")
    );
}

#[test]
fn a_session_header_the_plugin_sets_or_drops_is_refused() {
    for name in [
        "x-session-id",
        "x-session-user",
        "x-session-degraded",
        "x-session-attr-cart",
        "x_session_token",
        "not a header",
    ] {
        let error = resolved(&["--session-header", name], None).expect_err(name);
        assert!(error.contains("session header"), "{name}: {error}");
        let file = format!("[session_lookup]\nheader = \"{name}\"\n");
        assert!(resolved(&[], Some(&file)).is_err(), "{name} in the file");
    }
    // Without a session server, the setting is a mistake worth reporting.
    let cli = Cli::try_parse_from([
        "session-proxy",
        "--backend",
        "http://127.0.0.1:9001",
        "--session-header",
        TOKEN,
    ])
    .expect("flags parse");
    let error = config::resolve(cli, None).expect_err("stray --session-header");
    assert!(error.to_string().contains("--session-header"), "{error}");
}
