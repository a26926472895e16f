//! README: `SessionLayer`'s cookies are "`HttpOnly`, `Secure` (switch off only for plain-HTTP
//! localhost), `SameSite=Lax`, `Path=/`". Checked on the `Set-Cookie` headers of the session
//! cookie and of the snapshot cookie, as issued and as cleared on logout, with the defaults and
//! with every attribute configured otherwise.

mod support;

use http::StatusCode;
use session_client::{FallbackMode, SessionConfig, SessionLayer};
use support::app::{Reply, app, codec, send};
use support::counting_server::CountingServer;
use tower_cookies::cookie::SameSite;

/// The attributes a cookie set by the layer must carry.
struct Expected {
    /// `Secure` present.
    secure: bool,
    /// `SameSite` value.
    same_site: SameSite,
    /// `Path` value.
    path: &'static str,
}

/// Checks `name` in `reply` against `expected` (and `HttpOnly`, always), parsed and raw.
fn check(reply: &Reply, name: &str, expected: &Expected) {
    let cookie = reply
        .cookie(name)
        .unwrap_or_else(|| panic!("no {name} cookie: {:?}", reply.raw_cookies));
    let raw = reply.raw_cookie(name).unwrap();
    let attributes: Vec<String> = raw
        .split(';')
        .skip(1)
        .map(|a| a.trim().to_ascii_lowercase())
        .collect();
    assert_eq!(cookie.http_only(), Some(true), "{raw}");
    assert!(attributes.iter().any(|a| a == "httponly"), "{raw}");
    assert_eq!(
        attributes.iter().any(|a| a == "secure"),
        expected.secure,
        "Secure in {raw}"
    );
    assert_eq!(cookie.secure() == Some(true), expected.secure, "{raw}");
    assert_eq!(cookie.same_site(), Some(expected.same_site), "{raw}");
    assert_eq!(cookie.path(), Some(expected.path), "{raw}");
}

/// Logs in, checks both cookies, logs out and checks that both are cleared with the same
/// attributes (a removal with another `Path` would not clear them in a browser).
async fn cookies_carry(config: SessionConfig, expected: &Expected) {
    let server = CountingServer::start().await;
    let config = SessionConfig {
        fallback: FallbackMode::OnOutage,
        ..config
    };
    let app = app(SessionLayer::with_config(
        server.client(),
        Some(codec(&[[3u8; 32]])),
        config,
    ));

    let login = send(&app, "POST", "/login", &[]).await;
    assert_eq!(login.status, StatusCode::OK, "{:?}", login.body);
    for name in ["sid", "sid_snap"] {
        check(&login, name, expected);
    }

    let (sid, snap) = (login.value("sid"), login.value("sid_snap"));
    let logout = send(
        &app,
        "POST",
        "/logout",
        &[("sid", &sid), ("sid_snap", &snap)],
    )
    .await;
    assert_eq!(logout.status, StatusCode::OK, "{:?}", logout.body);
    for name in ["sid", "sid_snap"] {
        check(&logout, name, expected);
        let cleared = logout.cookie(name).unwrap();
        assert_eq!(cleared.value(), "", "{name} emptied");
        assert_eq!(
            cleared.max_age(),
            Some(tower_cookies::cookie::time::Duration::ZERO),
            "{name} expired: {:?}",
            logout.raw_cookie(name)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_cookies_are_http_only_secure_same_site_lax_with_path_root() {
    let expected = Expected {
        secure: true,
        same_site: SameSite::Lax,
        path: "/",
    };
    cookies_carry(SessionConfig::default(), &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_cookies_drop_secure_and_carry_the_configured_same_site_and_path() {
    let config = SessionConfig {
        secure: false,
        same_site: SameSite::Strict,
        path: "/app".into(),
        ..SessionConfig::default()
    };
    let expected = Expected {
        secure: false,
        same_site: SameSite::Strict,
        path: "/app",
    };
    cookies_carry(config, &expected).await;
}
