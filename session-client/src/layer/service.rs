//! The tower plumbing: [`SessionLayer`] wraps an application in a cookie manager and a
//! [`SessionService`], which reads the request's session cookies, hands the handler a
//! [`Session`], and after the handler saves it and writes the cookies the state machine asks
//! for.

use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue};
use tower::{Layer, Service};
use tower_cookies::cookie::SameSite;
use tower_cookies::cookie::time::{Duration as CookieDuration, OffsetDateTime};
use tower_cookies::{Cookie, CookieManager, CookieManagerLayer, Cookies};

use super::backend::SessionBackend;
use super::expiry::Expiry;
use super::fallback::{CookieUpdate, Fallback, IdLifetime, SnapshotCookie};
use super::session::Session;
use super::{FallbackMode, IdSource, SessionConfig, SessionError};
use crate::client::SessionClient;
use crate::cookie::CookieCodec;

/// The tower layer that installs sessions (and the cookie manager it needs).
///
/// Configure it with the builder methods (tower-sessions' names) or a [`SessionConfig`]:
///
/// ```no_run
/// # use session_client::{ClientConfig, Expiry, IdSource, SessionClient, SessionLayer};
/// # use std::time::Duration;
/// # fn build() -> Result<SessionLayer, Box<dyn std::error::Error>> {
/// let client = SessionClient::connect_lazy(ClientConfig::new("http://127.0.0.1:50051"))?;
/// let layer = SessionLayer::new(client)
///     .with_name("app_sid")
///     .with_secure(true)
///     .with_expiry(Expiry::OnInactivity(Duration::from_secs(30 * 60)))
///     .with_id_source(IdSource::both());
/// # Ok(layer) }
/// ```
#[derive(Clone)]
pub struct SessionLayer {
    /// The session store.
    backend: Arc<dyn SessionBackend>,
    /// The snapshot codec, if any.
    codec: Option<Arc<CookieCodec>>,
    /// The settings, as configured.
    config: SessionConfig,
    /// The state machine every request shares, made on first use from the above (the builder
    /// methods give a layer a new one).
    fallback: Arc<OnceLock<Arc<Fallback>>>,
}

impl std::fmt::Debug for SessionLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionLayer")
            .field("config", &self.config)
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
            backend: Arc::new(backend),
            codec: codec.map(Arc::new),
            config,
            fallback: Arc::new(OnceLock::new()),
        }
    }

    /// The state machine, made on first use.
    fn fallback(&self) -> &Arc<Fallback> {
        self.fallback.get_or_init(|| {
            Arc::new(Fallback::new(
                self.backend.clone(),
                self.codec.clone(),
                self.config.clone(),
            ))
        })
    }

    /// The settings as configured (before a fallback without a codec is turned off).
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// How many requests' offline changes (made while the store was unreachable) were dropped
    /// because the store had changed the session meanwhile: the store wins (see the module
    /// docs). Export it as a metric; each drop is also logged at warn level.
    pub fn dropped_offline_changes(&self) -> u64 {
        self.fallback().dropped_offline_changes()
    }

    /// The layer with `change` made to its settings (and a state machine of its own).
    fn configure(mut self, change: impl FnOnce(SessionConfig) -> SessionConfig) -> Self {
        self.config = change(self.config);
        self.fallback = Arc::new(OnceLock::new());
        self
    }

    /// The codec of the snapshot cookie (needed by any fallback mode but `Off`).
    pub fn with_codec(mut self, codec: CookieCodec) -> Self {
        self.codec = Some(Arc::new(codec));
        self.configure(|c| c)
    }

    /// [`SessionConfig::with_name`]: the id cookie's name.
    pub fn with_name(self, name: impl Into<String>) -> Self {
        self.configure(|c| c.with_name(name))
    }

    /// [`SessionConfig::with_domain`].
    pub fn with_domain(self, domain: impl Into<String>) -> Self {
        self.configure(|c| c.with_domain(domain))
    }

    /// [`SessionConfig::with_path`].
    pub fn with_path(self, path: impl Into<String>) -> Self {
        self.configure(|c| c.with_path(path))
    }

    /// [`SessionConfig::with_same_site`].
    pub fn with_same_site(self, same_site: SameSite) -> Self {
        self.configure(|c| c.with_same_site(same_site))
    }

    /// [`SessionConfig::with_secure`].
    pub fn with_secure(self, secure: bool) -> Self {
        self.configure(|c| c.with_secure(secure))
    }

    /// [`SessionConfig::with_http_only`].
    pub fn with_http_only(self, http_only: bool) -> Self {
        self.configure(|c| c.with_http_only(http_only))
    }

    /// [`SessionConfig::with_expiry`].
    pub fn with_expiry(self, expiry: Expiry) -> Self {
        self.configure(|c| c.with_expiry(expiry))
    }

    /// [`SessionConfig::with_ttl`].
    pub fn with_ttl(self, ttl: Option<Duration>) -> Self {
        self.configure(|c| c.with_ttl(ttl))
    }

    /// [`SessionConfig::with_snapshot_cookie_name`].
    pub fn with_snapshot_cookie_name(self, name: impl Into<String>) -> Self {
        self.configure(|c| c.with_snapshot_cookie_name(name))
    }

    /// [`SessionConfig::with_fallback`] (with a codec: [`SessionLayer::with_codec`]).
    pub fn with_fallback(self, fallback: FallbackMode) -> Self {
        self.configure(|c| c.with_fallback(fallback))
    }

    /// [`SessionConfig::with_id_source`].
    pub fn with_id_source(self, id_source: IdSource) -> Self {
        self.configure(|c| c.with_id_source(id_source))
    }
}

impl<S> Layer<S> for SessionLayer {
    type Service = CookieManager<SessionService<S>>;

    fn layer(&self, inner: S) -> Self::Service {
        CookieManagerLayer::new().layer(SessionService {
            inner,
            fallback: self.fallback().clone(),
        })
    }
}

/// The service [`SessionLayer`] wraps around the application (inside the cookie manager).
///
/// Any tower service whose responses are `http::Response<B>` works (`B: Default`: the layer's
/// own 503 and 500 have an empty body), axum or not; handlers outside axum take the request's
/// session with [`Session::from_request`].
#[derive(Clone)]
pub struct SessionService<S> {
    /// The application.
    inner: S,
    /// Store, codec, settings.
    fallback: Arc<Fallback>,
}

impl<S> std::fmt::Debug for SessionService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionService").finish_non_exhaustive()
    }
}

/// Where the request's session id came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdFrom {
    Cookie,
    Header,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for SessionService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        // The clone that was made ready goes into the future; a fresh clone stays (tower idiom).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let fallback = self.fallback.clone();
        Box::pin(async move {
            let Some(cookies) = request.extensions().get::<Cookies>().cloned() else {
                return Ok(SessionError::MissingLayer.empty_response());
            };
            let config = fallback.config();
            let header_id = config
                .id_source
                .header_name()
                .and_then(|name| request.headers().get(name))
                .and_then(|value| value.to_str().ok())
                .map(str::trim)
                .filter(|value| !value.is_empty())
                .map(str::to_owned);
            let cookie_id = config
                .id_source
                .uses_cookie()
                .then(|| {
                    cookies
                        .get(&config.cookie_name)
                        .map(|c| c.value().to_owned())
                })
                .flatten();
            let (id, from) = match (header_id, cookie_id) {
                (Some(id), _) => (Some(id), Some(IdFrom::Header)),
                (None, Some(id)) => (Some(id), Some(IdFrom::Cookie)),
                (None, None) => (None, None),
            };
            let cookie_snapshot = (config.fallback != FallbackMode::Off
                && config.id_source.uses_cookie())
            .then(|| {
                cookies
                    .get(&config.snapshot_cookie_name)
                    .map(|c| c.value().to_owned())
            })
            .flatten();
            let session = Session::new(fallback.clone(), id, cookie_snapshot);
            request.extensions_mut().insert(session.clone());
            let mut response = inner.call(request).await?;
            match session.save().await {
                Ok(update) => {
                    write_out(&cookies, response.headers_mut(), config, from, update);
                    Ok(response)
                }
                Err(error) => Ok(error.empty_response()),
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

/// The id cookie, with its lifetime.
fn id_cookie(config: &SessionConfig, id: String, lifetime: IdLifetime) -> Cookie<'static> {
    let mut cookie = cookie(config, config.cookie_name.clone(), id);
    match lifetime {
        IdLifetime::Session => {}
        IdLifetime::MaxAge(max_age) => {
            // To the nearest second: the store's expiry read a moment after it was set.
            let secs =
                i64::try_from((max_age + Duration::from_millis(500)).as_secs()).unwrap_or(i64::MAX);
            cookie.set_max_age(CookieDuration::seconds(secs.max(1)));
        }
        IdLifetime::Until(end) => {
            let secs = end
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            if let Ok(at) = OffsetDateTime::from_unix_timestamp(secs) {
                cookie.set_expires(at);
            }
        }
    }
    cookie
}

/// Expires cookie `name` in the browser, if the request sent it.
fn remove_sent(cookies: &Cookies, config: &SessionConfig, name: &str) {
    if cookies.get(name).is_some() {
        cookies.remove(cookie(config, name.to_owned(), String::new()));
    }
}

/// Applies the state machine's answer to the response: its cookie jar, and the id header
/// when ids travel in one. A new id goes back where the request's came from (with
/// [`IdSource::Both`] and no id in the request: both).
/// A response carrying a session id in a header is never stored by a shared cache (which
/// knows nothing of that header, unlike `Set-Cookie`, and would hand one session to every
/// visitor): `Cache-Control: no-store`, and `Vary` on the header for caches that key on it.
fn never_cached(headers: &mut HeaderMap, name: &http::HeaderName) {
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    if let Ok(vary) = HeaderValue::from_str(name.as_str()) {
        headers.append(http::header::VARY, vary);
    }
}

fn write_out(
    cookies: &Cookies,
    headers: &mut HeaderMap,
    config: &SessionConfig,
    from: Option<IdFrom>,
    update: CookieUpdate,
) {
    let header = config
        .id_source
        .header_name()
        .filter(|_| match config.id_source {
            IdSource::Both { .. } => from != Some(IdFrom::Cookie),
            _ => true,
        });
    let id_in_cookie = match config.id_source {
        IdSource::Cookie => true,
        IdSource::Header(_) => false,
        IdSource::Both { .. } => from != Some(IdFrom::Header),
    };
    match update {
        CookieUpdate::Keep => {}
        CookieUpdate::Clear => {
            if config.id_source.uses_cookie() {
                for name in [&config.cookie_name, &config.snapshot_cookie_name] {
                    remove_sent(cookies, config, name);
                }
            }
            if let Some(name) = header {
                // Spring's way: an empty id tells the client its session is gone.
                headers.insert(name.clone(), HeaderValue::from_static(""));
                never_cached(headers, name);
            }
        }
        CookieUpdate::Write {
            id,
            lifetime,
            snapshot,
        } => {
            if let Some(id) = id {
                if let Some(name) = header
                    && let Ok(value) = HeaderValue::from_str(&id)
                {
                    headers.insert(name.clone(), value);
                    never_cached(headers, name);
                }
                if id_in_cookie {
                    cookies.add(id_cookie(config, id, lifetime));
                }
            }
            if !config.id_source.uses_cookie() || from == Some(IdFrom::Header) {
                // The snapshot goes with a cookie-borne id only.
                return;
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
