//! The server's top-level service: calls of the SessionStore service go straight to it, behind
//! the bearer-token check, with the token's scope in their request extensions (the service
//! checks it once it has decoded the namespace); every other path (health, reflection, anything
//! unknown) goes to tonic's router.
//!
//! tonic's router matches paths with axum and re-boxes the request body and the response body
//! on the way through (tonic body, axum body, tonic body again), for every call. On the hot path
//! that cost more than the memory store's whole `get`, so the SessionStore service, which takes
//! nearly every call, is matched by its path prefix instead. Its answers are those of the same
//! generated service, so nothing a client sees changes.

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use session_proto::v1::session_store_server::SessionStoreServer;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::{Request, Response, header::AUTHORIZATION};
use tonic::server::NamedService;
use tonic::service::Routes;

use crate::auth::BearerAuth;
use crate::service::SessionService;

/// The generated SessionStore service.
type Api = SessionStoreServer<SessionService>;

/// Serves SessionStore calls itself and hands every other request to `rest`.
#[derive(Clone)]
pub(crate) struct ApiFirst {
    /// The SessionStore service.
    api: Api,
    /// Its bearer-token check, which gives each admitted call its token's scope.
    auth: BearerAuth,
    /// tonic's router for the other services.
    rest: Routes,
}

impl ApiFirst {
    /// `api` behind `auth`, then `rest` (prepared here).
    pub(crate) fn new(api: Api, auth: BearerAuth, rest: Routes) -> Self {
        ApiFirst {
            api,
            auth,
            rest: rest.prepare(),
        }
    }
}

/// Whether `path` is a method of the SessionStore service: `/session.v1.SessionStore/<Method>`.
fn is_api(path: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|p| p.strip_prefix(<Api as NamedService>::NAME))
        .is_some_and(|p| p.starts_with('/'))
}

impl Service<Request<Body>> for ApiFirst {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<
        Either<Ready<Result<Response<Body>, Infallible>>, <Api as Service<Request<Body>>>::Future>,
        <Routes as Service<Request<Body>>>::Future,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The generated service is always ready; the router says for itself.
        Service::<Request<Body>>::poll_ready(&mut self.rest, cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        if !is_api(request.uri().path()) {
            return Either::Right(self.rest.call(request));
        }
        let header = request.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
        match self.auth.check(header) {
            Ok(scope) => {
                // tonic hands the extensions on to the method's `tonic::Request`.
                if let Some(scope) = scope {
                    request.extensions_mut().insert(scope);
                }
                Either::Left(Either::Right(self.api.call(request)))
            }
            Err(status) => Either::Left(Either::Left(ready(Ok(status.into_http())))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_session_store_methods_take_the_direct_path() {
        assert!(is_api("/session.v1.SessionStore/Get"));
        assert!(is_api("/session.v1.SessionStore/"));
        for other in [
            "/session.v1.SessionStore",
            "/session.v1.SessionStoreX/Get",
            "session.v1.SessionStore/Get",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/",
            "",
        ] {
            assert!(!is_api(other), "{other}");
        }
    }
}
