//! The tower plumbing: [`SessionLayer`] wraps an application in a cookie manager and a
//! [`SessionService`], which reads the request's session cookies, hands the handler a
//! [`Session`], and after the handler saves it and writes the cookies the state machine asks
//! for.

use std::sync::Arc;
use std::task::{Context, Poll};

use axum::response::{IntoResponse, Response};
use tower::{Layer, Service};
use tower_cookies::{Cookie, CookieManager, CookieManagerLayer, Cookies};

use super::backend::SessionBackend;
use super::fallback::{CookieUpdate, Fallback, SnapshotCookie};
use super::session::Session;
use super::{FallbackMode, SessionConfig, SessionError};
use crate::client::SessionClient;
use crate::cookie::CookieCodec;

/// The tower layer that installs sessions (and the cookie manager it needs).
#[derive(Clone)]
pub struct SessionLayer {
    /// Store, codec, settings: the state machine every request shares.
    fallback: Arc<Fallback>,
}

impl std::fmt::Debug for SessionLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionLayer")
            .field("config", self.fallback.config())
            .finish_non_exhaustive()
    }
}

impl SessionLayer {
    /// Sessions in the store only, with default cookies (fallback off).
    pub fn new(client: SessionClient) -> Self {
        Self::with_config(client, None, SessionConfig::default())
    }

    /// Sessions with the given settings; `codec` is needed for any fallback mode other than
    /// `Off` (without one, fallback is turned off and a warning logged).
    pub fn with_config(
        client: SessionClient,
        codec: Option<CookieCodec>,
        config: SessionConfig,
    ) -> Self {
        Self::with_backend(client, codec, config)
    }

    /// As [`SessionLayer::with_config`], over any store backend (the unit tests' fake).
    pub(crate) fn with_backend(
        backend: impl SessionBackend,
        codec: Option<CookieCodec>,
        config: SessionConfig,
    ) -> Self {
        SessionLayer {
            fallback: Arc::new(Fallback::new(Box::new(backend), codec, config)),
        }
    }
    /// How many requests' offline changes (made while the store was unreachable) were dropped
    /// because the store had changed the session meanwhile: the store wins (see the module
    /// docs). Export it as a metric; each drop is also logged at warn level.
    pub fn dropped_offline_changes(&self) -> u64 {
        self.fallback.dropped_offline_changes()
    }
}

impl<S> Layer<S> for SessionLayer {
    type Service = CookieManager<SessionService<S>>;

    fn layer(&self, inner: S) -> Self::Service {
        CookieManagerLayer::new().layer(SessionService {
            inner,
            fallback: self.fallback.clone(),
        })
    }
}

/// The service [`SessionLayer`] wraps around the application (inside the cookie manager).
#[derive(Clone)]
pub struct SessionService<S> {
    /// The application.
    inner: S,
    /// Store, codec, settings.
    fallback: Arc<Fallback>,
}

impl<S, B> Service<http::Request<B>> for SessionService<S>
where
    S: Service<http::Request<B>, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone that was made ready goes into the future; a fresh clone stays (tower idiom).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let fallback = self.fallback.clone();
        Box::pin(async move {
            let Some(cookies) = request.extensions().get::<Cookies>().cloned() else {
                return Ok(SessionError::MissingLayer.into_response());
            };
            let config = fallback.config();
            let cookie_id = cookies
                .get(&config.cookie_name)
                .map(|c| c.value().to_owned());
            let cookie_snapshot = (config.fallback != FallbackMode::Off)
                .then(|| {
                    cookies
                        .get(&config.snapshot_cookie_name)
                        .map(|c| c.value().to_owned())
                })
                .flatten();
            let session = Session::new(fallback.clone(), cookie_id, cookie_snapshot);
            request.extensions_mut().insert(session.clone());
            let response = inner.call(request).await?;
            match session.save().await {
                Ok(update) => {
                    write_cookies(&cookies, fallback.config(), update);
                    Ok(response)
                }
                Err(error) => Ok(error.into_response()),
            }
        })
    }
}

/// A cookie with the configured attributes.
fn cookie(config: &SessionConfig, name: String, value: String) -> Cookie<'static> {
    let mut cookie = Cookie::new(name, value);
    cookie.set_http_only(config.http_only);
    cookie.set_secure(config.secure);
    cookie.set_same_site(config.same_site);
    cookie.set_path(config.path.clone());
    if let Some(domain) = &config.domain {
        cookie.set_domain(domain.clone());
    }
    cookie
}

/// Expires cookie `name` in the browser, if the request sent it.
fn remove_sent(cookies: &Cookies, config: &SessionConfig, name: &str) {
    if cookies.get(name).is_some() {
        cookies.remove(cookie(config, name.to_owned(), String::new()));
    }
}

/// Applies the state machine's answer to the response's cookie jar.
fn write_cookies(cookies: &Cookies, config: &SessionConfig, update: CookieUpdate) {
    match update {
        CookieUpdate::Keep => {}
        CookieUpdate::Clear => {
            for name in [&config.cookie_name, &config.snapshot_cookie_name] {
                remove_sent(cookies, config, name);
            }
        }
        CookieUpdate::Write { id, snapshot } => {
            if let Some(id) = id {
                cookies.add(cookie(config, config.cookie_name.clone(), id));
            }
            match snapshot {
                SnapshotCookie::Keep => {}
                SnapshotCookie::Set(value) => {
                    cookies.add(cookie(config, config.snapshot_cookie_name.clone(), value));
                }
                SnapshotCookie::Remove => {
                    remove_sent(cookies, config, &config.snapshot_cookie_name);
                }
            }
        }
    }
}
