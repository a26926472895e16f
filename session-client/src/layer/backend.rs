//! The calls the layer makes to the session store, as a trait: [`SessionClient`] in production,
//! an in-memory fake in the unit tests of the fallback state machine.
//!
//! Crate-private on purpose: a public trait would freeze the shape of calls (such as `restore`)
//! that follow the store's protocol as it evolves.

use std::future::Future;
use std::pin::Pin;

use crate::client::{ClientError, NewSession, Patch, RestoreRequest, SessionClient, SessionData};

/// A store call in flight (boxed, so the layer can hold any backend behind one pointer).
pub(crate) type Call<'a, T> = Pin<Box<dyn Future<Output = Result<T, ClientError>> + Send + 'a>>;

/// What the layer needs of the session store; each call means what [`SessionClient`]'s method
/// of the same name does, errors included.
pub(crate) trait SessionBackend: Send + Sync + 'static {
    /// The namespace every call uses (written into snapshots, and required of them).
    fn namespace(&self) -> &str;

    /// Reads a session; with `touch`, also slides its expiry ([`SessionClient::get`]).
    fn get<'a>(&'a self, id: &'a str, touch: bool) -> Call<'a, SessionData>;

    /// Creates a session; `ttl` `None` is the server's default ([`SessionClient::create_with`]).
    fn create(&self, new: NewSession) -> Call<'_, SessionData>;

    /// Applies an attribute-level patch, compare-and-set when it carries an expected version
    /// ([`SessionClient::update`]).
    fn update<'a>(&'a self, id: &'a str, patch: Patch) -> Call<'a, SessionData>;

    /// Moves a session to a new id ([`SessionClient::regenerate`]).
    fn regenerate<'a>(&'a self, id: &'a str) -> Call<'a, SessionData>;

    /// Deletes a session; false when there was none ([`SessionClient::delete`]).
    fn delete<'a>(&'a self, id: &'a str) -> Call<'a, bool>;

    /// Brings the store in step with a snapshot ([`SessionClient::restore`]).
    fn restore(&self, request: RestoreRequest) -> Call<'_, SessionData>;
}

impl SessionBackend for SessionClient {
    fn namespace(&self) -> &str {
        SessionClient::namespace(self)
    }

    fn get<'a>(&'a self, id: &'a str, touch: bool) -> Call<'a, SessionData> {
        Box::pin(SessionClient::get(self, id, touch))
    }

    fn create(&self, new: NewSession) -> Call<'_, SessionData> {
        Box::pin(SessionClient::create_with(self, new))
    }

    fn update<'a>(&'a self, id: &'a str, patch: Patch) -> Call<'a, SessionData> {
        Box::pin(SessionClient::update(self, id, patch))
    }

    fn regenerate<'a>(&'a self, id: &'a str) -> Call<'a, SessionData> {
        Box::pin(SessionClient::regenerate(self, id))
    }

    fn delete<'a>(&'a self, id: &'a str) -> Call<'a, bool> {
        Box::pin(SessionClient::delete(self, id))
    }

    fn restore(&self, request: RestoreRequest) -> Call<'_, SessionData> {
        Box::pin(SessionClient::restore(self, request))
    }
}
