//! Unit tests of the fallback state machine against an in-memory fake store that follows the
//! session server's rules (store epoch, tombstones, `Restore` as `session.proto` states it):
//! outage, offline changes and their restore after recovery, the store winning over offline
//! changes made against a version it has moved past, logout (also during an outage, and
//! replayed cookies after it), timeouts that are not outages, the snapshot's absolute limit in
//! degraded mode, the ttl of sessions made during an outage. The end-to-end tests against real
//! servers are in `tests/` and `demo/`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::response::IntoResponse as _;
use axum::routing::post;
use parking_lot::Mutex;
use tower::ServiceExt as _;

use super::backend::{Call, SessionBackend};
use super::fallback::{CookieUpdate, Fallback, IdLifetime, SnapshotCookie};
use super::session::{Source, State};
use super::{
    EXPIRY_ATTRIBUTE, Expiry, FallbackMode, Session, SessionConfig, SessionError, SessionLayer,
};
use crate::client::{ClientError, NewSession, Patch, RestoreRequest, SessionData};
use crate::cookie::{
    CookieCodec, CookieKey, DEFAULT_SNAPSHOT_MAX_AGE, Encryption, KeyRing, Snapshot,
    SnapshotPolicy as _, unix_ms,
};

/// The ttl the fake gives a session created without one.
const FAKE_DEFAULT_TTL: Duration = Duration::from_secs(600);

/// The fake store's epoch when it starts.
const FIRST_EPOCH: &str = "epoch-1";

/// A store call the fake saw.
#[derive(Debug, Clone, PartialEq)]
enum Called {
    Get(String),
    Create(String),
    Update(String),
    Regenerate(String),
    Delete(String),
    Restore(Box<RestoreRequest>),
}

/// Which call, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Create,
    Update,
    Regenerate,
    Delete,
    Restore,
}

impl Called {
    fn method(&self) -> Method {
        match self {
            Called::Get(_) => Method::Get,
            Called::Create(_) => Method::Create,
            Called::Update(_) => Method::Update,
            Called::Regenerate(_) => Method::Regenerate,
            Called::Delete(_) => Method::Delete,
            Called::Restore(_) => Method::Restore,
        }
    }
}

/// How the fake fails every call while it is told to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Unreachable (connection refused, UNAVAILABLE).
    Unavailable,
    /// No answer in time (DEADLINE_EXCEEDED, the client's timeout).
    TimedOut,
    /// The token may not write (PERMISSION_DENIED): an error no retry mends.
    Denied,
}

impl Failure {
    fn error(self) -> ClientError {
        match self {
            Failure::Unavailable => ClientError::Unavailable("fake store is down".into()),
            Failure::TimedOut => ClientError::TimedOut("fake store is slow".into()),
            Failure::Denied => ClientError::PermissionDenied("read-only token".into()),
        }
    }
}

/// The fake's data, behind one lock.
#[derive(Debug)]
struct FakeData {
    /// The store's epoch: changes when the store loses its data.
    epoch: String,
    /// Epochs made so far.
    epochs: u64,
    /// Live sessions by id.
    sessions: HashMap<String, SessionData>,
    /// Deleted ids (a restore of one is refused, as the server's tombstones do).
    tombstones: HashSet<String>,
    /// While set, every call fails so.
    failing: Option<Failure>,
    /// While set, every `Restore` fails so (the other calls answer).
    failing_restore: Option<Failure>,
    /// NOT_FOUND without the store's epoch (a store that does not say it).
    silent_epoch: bool,
    /// Ids made so far.
    made: u64,
    /// Every call, in order.
    calls: Vec<Called>,
    /// How many of `calls` `take_calls` returned already.
    taken: usize,
}

/// An in-memory store with the session server's rules for the calls the layer makes.
#[derive(Debug, Clone)]
struct FakeStore(Arc<Mutex<FakeData>>);

impl FakeStore {
    fn new() -> Self {
        FakeStore(Arc::new(Mutex::new(FakeData {
            epoch: FIRST_EPOCH.into(),
            epochs: 1,
            sessions: HashMap::new(),
            tombstones: HashSet::new(),
            failing: None,
            failing_restore: None,
            silent_epoch: false,
            made: 0,
            calls: Vec::new(),
            taken: 0,
        })))
    }

    /// Every call fails with UNAVAILABLE while `down`.
    fn set_down(&self, down: bool) {
        self.fail(down.then_some(Failure::Unavailable));
    }

    /// Every call fails so (`None`: answers again).
    fn fail(&self, failure: Option<Failure>) {
        self.0.lock().failing = failure;
    }

    /// The store loses its data (a memory store restarted, a Redis flushed): no sessions, no
    /// tombstones, a new epoch.
    fn lose_data(&self) -> String {
        let mut data = self.0.lock();
        data.sessions.clear();
        data.tombstones.clear();
        data.epochs += 1;
        data.epoch = format!("epoch-{}", data.epochs);
        data.epoch.clone()
    }

    /// Every `Restore` fails so (`None`: answers again).
    fn fail_restore(&self, failure: Option<Failure>) {
        self.0.lock().failing_restore = failure;
    }

    /// NOT_FOUND says no epoch while `silent`.
    fn hide_epoch(&self, silent: bool) {
        self.0.lock().silent_epoch = silent;
    }

    /// Puts `session` into the store as is.
    fn put(&self, session: SessionData) {
        self.0.lock().sessions.insert(session.id.clone(), session);
    }

    /// An administrator's change made in the store directly (not through the layer): `change`
    /// applied, version bumped.
    fn admin_change(&self, id: &str, change: impl FnOnce(&mut SessionData)) -> SessionData {
        let mut data = self.0.lock();
        let session = data.sessions.get_mut(id).expect("a live session");
        change(session);
        session.version += 1;
        session.clone()
    }

    fn stored(&self, id: &str) -> Option<SessionData> {
        self.0.lock().sessions.get(id).cloned()
    }

    fn has_tombstone(&self, id: &str) -> bool {
        self.0.lock().tombstones.contains(id)
    }

    fn epoch(&self) -> String {
        self.0.lock().epoch.clone()
    }

    /// The calls since the last `take_calls`.
    fn take_calls(&self) -> Vec<Called> {
        let mut data = self.0.lock();
        let calls = data.calls[data.taken..].to_vec();
        data.taken = data.calls.len();
        calls
    }

    /// How many calls of `method` the store saw since it started (failed ones included).
    fn count(&self, method: Method) -> usize {
        self.0
            .lock()
            .calls
            .iter()
            .filter(|c| c.method() == method)
            .count()
    }

    /// Records `call`, then answers with `answer` unless the store is told to fail.
    fn call<T: Send + 'static>(
        &self,
        call: Called,
        answer: impl FnOnce(&mut FakeData) -> Result<T, ClientError>,
    ) -> Call<'static, T> {
        let mut data = self.0.lock();
        let failing = match call {
            Called::Restore(_) => data.failing.or(data.failing_restore),
            _ => data.failing,
        };
        data.calls.push(call);
        let result = match failing {
            Some(failure) => Err(failure.error()),
            None => answer(&mut data),
        };
        Box::pin(std::future::ready(result))
    }
}

impl FakeData {
    /// NOT_FOUND, with the store's epoch as the server sends it.
    fn not_found(&self) -> ClientError {
        ClientError::NotFound {
            epoch: (!self.silent_epoch).then(|| self.epoch.clone()),
        }
    }

    /// The live session `id`, or NOT_FOUND.
    fn live(&mut self, id: &str) -> Result<&mut SessionData, ClientError> {
        let not_found = self.not_found();
        self.sessions.get_mut(id).ok_or(not_found)
    }
}

fn slide(session: &mut SessionData) {
    session.expires_at = SystemTime::now() + session.ttl;
}

/// Applies a patch's attribute and user changes to `session`.
fn apply(
    session: &mut SessionData,
    set: HashMap<String, Vec<u8>>,
    remove: &[String],
    user: Option<String>,
) {
    session.attrs.extend(set);
    for key in remove {
        session.attrs.remove(key);
    }
    if let Some(user) = user {
        session.user_id = user;
    }
}

impl SessionBackend for FakeStore {
    fn namespace(&self) -> &str {
        "shop"
    }

    fn get<'a>(&'a self, id: &'a str, touch: bool) -> Call<'a, SessionData> {
        self.call(Called::Get(id.into()), |data| {
            let session = data.live(id)?;
            if touch {
                slide(session);
            }
            Ok(session.clone())
        })
    }

    fn create(&self, new: NewSession) -> Call<'_, SessionData> {
        let NewSession {
            user_id,
            attrs,
            ttl,
            max_lifetime,
        } = new;
        self.call(Called::Create(user_id.clone()), |data| {
            data.made += 1;
            let now = SystemTime::now();
            let ttl = ttl.unwrap_or(FAKE_DEFAULT_TTL);
            let session = SessionData {
                id: format!("{:A>32}", data.made),
                namespace: "shop".into(),
                user_id,
                attrs,
                version: 1,
                created_at: now,
                expires_at: now + ttl,
                ttl,
                epoch: data.epoch.clone(),
                write_id: Default::default(),
                ends_at: max_lifetime.map(|lifetime| now + lifetime),
            };
            data.sessions.insert(session.id.clone(), session.clone());
            Ok(session)
        })
    }

    fn update<'a>(&'a self, id: &'a str, patch: Patch) -> Call<'a, SessionData> {
        self.call(Called::Update(id.into()), |data| {
            let session = data.live(id)?;
            if patch.expected_version.is_some_and(|v| v != session.version) {
                return Err(ClientError::Conflict("version moved on".into()));
            }
            apply(session, patch.set, &patch.remove, patch.user_id);
            if let Some(ttl) = patch.ttl {
                session.ttl = ttl;
            }
            if let Some(lifetime) = patch.max_lifetime {
                session.ends_at = Some(session.created_at + lifetime);
            }
            session.version += 1;
            slide(session);
            Ok(session.clone())
        })
    }

    fn regenerate<'a>(&'a self, id: &'a str) -> Call<'a, SessionData> {
        self.call(Called::Regenerate(id.into()), |data| {
            let mut session = data.live(id)?.clone();
            data.sessions.remove(id);
            data.tombstones.insert(id.into());
            data.made += 1;
            session.id = format!("{:R>32}", data.made);
            session.version += 1;
            data.sessions.insert(session.id.clone(), session.clone());
            Ok(session)
        })
    }

    fn delete<'a>(&'a self, id: &'a str) -> Call<'a, bool> {
        self.call(Called::Delete(id.into()), |data| {
            let deleted = data.sessions.remove(id).is_some();
            if deleted {
                data.tombstones.insert(id.into());
            }
            Ok(deleted)
        })
    }

    /// The rules of `Restore` in `session.proto`.
    fn restore(&self, request: RestoreRequest) -> Call<'_, SessionData> {
        self.call(Called::Restore(Box::new(request.clone())), |data| {
            let id = request.session.id.clone();
            if data.tombstones.contains(&id) {
                return Err(ClientError::Refused("deleted less than one ttl ago".into()));
            }
            let same_epoch = !request.epoch.is_empty() && request.epoch == data.epoch;
            let epoch = data.epoch.clone();
            match (same_epoch, data.sessions.get_mut(&id)) {
                (true, None) => Err(ClientError::Refused("deleted or expired".into())),
                (true, Some(stored)) if stored.version != request.base_version => Err(
                    ClientError::Conflict("the store holds another version".into()),
                ),
                (true, Some(stored)) => {
                    if request.has_changes() {
                        apply(stored, request.set, &request.remove, request.user_id);
                        stored.version += 1;
                        slide(stored);
                    }
                    Ok(stored.clone())
                }
                (false, Some(_)) => Err(ClientError::Conflict("restored already".into())),
                (false, None) => {
                    let mut restored = SessionData {
                        namespace: "shop".into(),
                        version: 1,
                        epoch,
                        ..request.session
                    };
                    slide(&mut restored);
                    data.sessions.insert(id, restored.clone());
                    Ok(restored)
                }
            }
        })
    }
}

fn codec() -> CookieCodec {
    let key = CookieKey::new(&[9; 32]).unwrap();
    CookieCodec::new(KeyRing::new(vec![key]).unwrap(), Encryption::None)
}

fn config(fallback: FallbackMode) -> SessionConfig {
    SessionConfig {
        fallback,
        secure: false,
        ..SessionConfig::default()
    }
}

/// The state machine over `store`, with the snapshot fallback on outage.
fn machine(store: &FakeStore) -> Fallback {
    machine_with(store, config(FallbackMode::OnOutage))
}

/// The state machine over `store` with `config`.
fn machine_with(store: &FakeStore, config: SessionConfig) -> Fallback {
    Fallback::new(Arc::new(store.clone()), Some(Arc::new(codec())), config)
}

/// A session in the store: `user`'s, version `version`, with `role=admin` and `theme=dark`.
fn session_of(store: &FakeStore, id: &str, user: &str, version: u64) -> SessionData {
    let now = SystemTime::now();
    let session = SessionData {
        id: id.into(),
        namespace: "shop".into(),
        user_id: user.into(),
        attrs: HashMap::from([
            ("role".into(), json("admin")),
            ("theme".into(), json("dark")),
        ]),
        version,
        created_at: now,
        expires_at: now + FAKE_DEFAULT_TTL,
        ttl: FAKE_DEFAULT_TTL,
        epoch: store.epoch(),
        write_id: Default::default(),
        ends_at: Default::default(),
    };
    store.put(session.clone());
    session
}

/// Ann's session in the store (see [`session_of`]).
fn stored_session(store: &FakeStore, version: u64) -> SessionData {
    session_of(store, &"S".repeat(32), "ann", version)
}

fn json(value: &str) -> Vec<u8> {
    serde_json::to_vec(value).unwrap()
}

/// The snapshot cookie a response of the layer would carry for `session` as the store
/// returned it.
fn snapshot_cookie(session: &SessionData) -> String {
    codec()
        .encode(&Snapshot::confirmed(
            session,
            "shop",
            SystemTime::now(),
            DEFAULT_SNAPSHOT_MAX_AGE,
        ))
        .unwrap()
}

/// A request that sent these cookies.
fn request(id: Option<&str>, snapshot: Option<&str>) -> State {
    State::new(id.map(str::to_owned), snapshot.map(str::to_owned))
}

/// Loads, as the first session call of a handler does.
async fn load(fallback: &Fallback, state: &mut State) -> Result<(), SessionError> {
    fallback.load(state).await?;
    state.loaded = true;
    Ok(())
}

/// Writes `key` as `Session::insert` does.
fn insert(state: &mut State, key: &str, value: &str) {
    state.current.attrs.insert(key.into(), json(value));
    state.changes.remove.remove(key);
    state.changes.set.insert(key.into());
}

/// Removes `key` as `Session::remove` does.
fn remove(state: &mut State, key: &str) {
    state.current.attrs.remove(key);
    state.changes.set.remove(key);
    state.changes.remove.insert(key.into());
}

/// Sets the user as `Session::set_user` does.
fn set_user(state: &mut State, user: &str) {
    state.current.user_id = user.into();
    state.changes.user = true;
}

/// The snapshot a saved response sets.
fn set_snapshot(update: &CookieUpdate) -> Snapshot {
    match update {
        CookieUpdate::Write {
            snapshot: SnapshotCookie::Set(value),
            ..
        } => codec().decode(value).unwrap(),
        other => panic!("no snapshot set: {other:?}"),
    }
}

fn attr<'a>(session: &'a SessionData, key: &str) -> Option<&'a [u8]> {
    session.attrs.get(key).map(Vec::as_slice)
}

/// The session cookies a browser holds, as the responses left them.
#[derive(Debug, Clone, Default)]
struct Browser {
    id: Option<String>,
    snapshot: Option<String>,
}

impl Browser {
    /// A browser that holds `session`'s cookies as a response of the layer set them.
    fn holding(session: &SessionData) -> Self {
        Browser {
            id: Some(session.id.clone()),
            snapshot: Some(snapshot_cookie(session)),
        }
    }

    /// The snapshot cookie it holds, decoded.
    fn snapshot(&self) -> Snapshot {
        codec()
            .decode(self.snapshot.as_deref().expect("a snapshot cookie"))
            .unwrap()
    }

    /// One request: load, `handler`, save, and the response's cookies kept. Returns the
    /// request's state after the save, and the cookie update.
    async fn send(
        &mut self,
        fallback: &Fallback,
        handler: impl FnOnce(&mut State),
    ) -> Result<(State, CookieUpdate), SessionError> {
        let mut state = request(self.id.as_deref(), self.snapshot.as_deref());
        load(fallback, &mut state).await?;
        handler(&mut state);
        let update = fallback.save(&mut state).await?;
        match &update {
            CookieUpdate::Keep => {}
            CookieUpdate::Clear => *self = Browser::default(),
            CookieUpdate::Write { id, snapshot, .. } => {
                if let Some(id) = id {
                    self.id = Some(id.clone());
                }
                match snapshot {
                    SnapshotCookie::Keep => {}
                    SnapshotCookie::Set(value) => self.snapshot = Some(value.clone()),
                    SnapshotCookie::Remove => self.snapshot = None,
                }
            }
        }
        Ok((state, update))
    }

    /// A request that only reads the session.
    async fn read(&mut self, fallback: &Fallback) -> Result<(State, CookieUpdate), SessionError> {
        self.send(fallback, |_| {}).await
    }

    /// A logout request (the handler calls `destroy`, nothing loaded).
    async fn logout(&mut self, fallback: &Fallback) -> CookieUpdate {
        let mut state = request(self.id.as_deref(), self.snapshot.as_deref());
        state.changes.destroy = true;
        let update = fallback.save(&mut state).await.unwrap();
        assert_eq!(update, CookieUpdate::Clear, "logout clears both cookies");
        *self = Browser::default();
        update
    }
}

#[tokio::test]
async fn a_store_outage_serves_the_session_from_its_snapshot() {
    let store = FakeStore::new();
    let session = stored_session(&store, 1);
    let fallback = machine(&store);
    store.set_down(true);

    let mut state = request(Some(&session.id), Some(&snapshot_cookie(&session)));
    load(&fallback, &mut state).await.unwrap();
    assert_eq!(state.source, Source::Snapshot);
    assert_eq!(
        (state.current.user_id.as_str(), state.current.version),
        ("ann", 1)
    );
    assert_eq!(store.take_calls(), [Called::Get(session.id.clone())]);

    // Without a snapshot there is nothing to stand in: 503, never a silent logout.
    let mut state = request(Some(&session.id), None);
    assert!(matches!(
        load(&fallback, &mut state).await,
        Err(SessionError::Unavailable(_))
    ));
}

#[tokio::test]
async fn changes_during_an_outage_go_into_the_snapshot_as_offline_changes() {
    let store = FakeStore::new();
    let session = stored_session(&store, 1);
    let fallback = machine(&store);
    store.set_down(true);

    let mut state = request(Some(&session.id), Some(&snapshot_cookie(&session)));
    load(&fallback, &mut state).await.unwrap();
    insert(&mut state, "cart", "book");
    let update = fallback.save(&mut state).await.unwrap();
    let snapshot = set_snapshot(&update);
    assert_eq!(
        (
            snapshot.id.as_str(),
            snapshot.version,
            snapshot.base_version
        ),
        (session.id.as_str(), 2, 1)
    );
    assert_eq!(snapshot.epoch, FIRST_EPOCH, "the epoch it last agreed with");
    assert_eq!(snapshot.offline_set, ["cart"]);
    assert!(snapshot.offline_removed.is_empty() && !snapshot.offline_user);
    assert!(snapshot.attrs.contains_key("cart"));
    assert!(
        snapshot.expires_at_ms + 1_000 >= unix_ms(SystemTime::now()) + snapshot.ttl_ms,
        "the only copy's expiry slides"
    );
    assert!(
        matches!(update, CookieUpdate::Write { id: None, .. }),
        "same id"
    );
    assert_eq!(
        store.take_calls(),
        [Called::Get(session.id.clone())],
        "no write tried: the session lives in its snapshot"
    );
    assert_eq!(store.stored(&session.id).unwrap().version, 1);
}

#[tokio::test]
async fn a_write_that_finds_the_store_gone_is_an_offline_change_against_the_loaded_version() {
    let store = FakeStore::new();
    let session = stored_session(&store, 4);
    let fallback = machine(&store);

    let mut state = request(Some(&session.id), None);
    load(&fallback, &mut state).await.unwrap();
    store.set_down(true);
    insert(&mut state, "cart", "book");
    let snapshot = set_snapshot(&fallback.save(&mut state).await.unwrap());
    assert_eq!(
        (
            snapshot.version,
            snapshot.base_version,
            snapshot.epoch.as_str()
        ),
        (5, 4, FIRST_EPOCH)
    );
    assert_eq!(snapshot.offline_set, ["cart"]);
    assert_eq!(store.count(Method::Update), 1, "tried once");
    assert_eq!(store.stored(&session.id).unwrap().version, 4);
}

#[tokio::test]
async fn after_recovery_the_offline_changes_are_restored() {
    let store = FakeStore::new();
    let session = stored_session(&store, 1);
    let fallback = machine(&store);
    // During the outage the cart went into the snapshot, against base version 1.
    let mut snapshot = Snapshot::confirmed(
        &session,
        "shop",
        SystemTime::now(),
        DEFAULT_SNAPSHOT_MAX_AGE,
    );
    snapshot.record_offline(&HashMap::from([("cart".into(), json("book"))]), &[], None);
    let cookie = codec().encode(&snapshot).unwrap();

    let mut state = request(Some(&session.id), Some(&cookie));
    load(&fallback, &mut state).await.unwrap();
    let calls = store.take_calls();
    assert_eq!(calls[0], Called::Get(session.id.clone()));
    let [_, Called::Restore(pushed)] = &calls[..] else {
        panic!("one get, then one restore: {calls:?}");
    };
    assert_eq!(
        (
            pushed.epoch.as_str(),
            pushed.base_version,
            &pushed.set,
            pushed.remove.is_empty(),
            &pushed.user_id
        ),
        (
            FIRST_EPOCH,
            1,
            &HashMap::from([("cart".into(), json("book"))]),
            true,
            &None
        ),
        "the offline changes against the confirmed version"
    );
    assert_eq!(state.source, Source::Store);
    assert_eq!(state.current.version, 2);
    let stored = store.stored(&session.id).unwrap();
    assert_eq!(
        (stored.version, attr(&stored, "cart")),
        (2, Some(json("book").as_slice()))
    );
    // The new snapshot is the store's confirmation, without offline changes.
    let reissued = set_snapshot(&fallback.save(&mut state).await.unwrap());
    assert_eq!((reissued.version, reissued.base_version), (2, 2));
    assert!(!reissued.has_offline_changes());
}

#[tokio::test]
async fn the_store_wins_over_a_snapshot_without_offline_changes_whatever_its_version() {
    let store = FakeStore::new();
    let session = stored_session(&store, 1);
    let cookie = snapshot_cookie(&session);
    // An administrator demotes ann in the store (version 2); her browser still holds version 1.
    store.admin_change(&session.id, |s| {
        s.attrs.remove("role");
    });
    let fallback = machine(&store);

    let mut state = request(Some(&session.id), Some(&cookie));
    load(&fallback, &mut state).await.unwrap();
    assert_eq!(
        store.take_calls(),
        [Called::Get(session.id.clone())],
        "no restore"
    );
    assert_eq!(state.source, Source::Store);
    assert!(!state.current.attrs.contains_key("role"), "still demoted");
    // The stale snapshot is replaced by one of the stored session.
    let snapshot = set_snapshot(&fallback.save(&mut state).await.unwrap());
    assert_eq!(snapshot.version, 2);
    assert!(!snapshot.attrs.contains_key("role"));

    // A snapshot of a higher version (with the role) does not overwrite the store either: the
    // version is no causal order, only offline changes are pushed back.
    let mut higher = session.clone();
    higher.version = 9;
    let mut state = request(Some(&session.id), Some(&snapshot_cookie(&higher)));
    load(&fallback, &mut state).await.unwrap();
    assert_eq!(store.count(Method::Restore), 0);
    assert_eq!(state.current.version, 2);
    assert!(!state.current.attrs.contains_key("role"));
    let stored = store.stored(&session.id).unwrap();
    assert_eq!(stored.version, 2);
    assert!(!stored.attrs.contains_key("role"));
}

#[tokio::test]
async fn not_found_without_a_snapshot_restores_nothing_and_clears_the_cookie() {
    let store = FakeStore::new();
    let fallback = machine(&store);
    let id = "G".repeat(32);

    let mut state = request(Some(&id), None);
    load(&fallback, &mut state).await.unwrap();
    assert_eq!(store.take_calls(), [Called::Get(id.clone())], "no restore");
    assert_eq!(state.current.id, "");
    assert_eq!(
        fallback.save(&mut state).await.unwrap(),
        CookieUpdate::Clear
    );
}

#[tokio::test]
async fn a_logged_out_session_does_not_come_back_from_its_snapshot() {
    let store = FakeStore::new();
    let session = stored_session(&store, 1);
    let cookie = snapshot_cookie(&session);
    let fallback = machine(&store);
    let mut state = request(Some(&session.id), Some(&cookie));
    state.changes.destroy = true;
    fallback.save(&mut state).await.unwrap();

    // The old cookies, replayed: the store answers NOT_FOUND in the snapshot's epoch.
    let mut state = request(Some(&session.id), Some(&cookie));
    load(&fallback, &mut state).await.unwrap();
    assert_eq!(state.current.id, "", "no session");
    assert_eq!(store.count(Method::Restore), 0, "never pushed back");
    assert!(store.stored(&session.id).is_none());
    assert_eq!(
        fallback.save(&mut state).await.unwrap(),
        CookieUpdate::Clear
    );
}

#[tokio::test]
async fn logout_deletes_the_session_and_clears_both_cookies() {
    let store = FakeStore::new();
    let session = stored_session(&store, 1);
    let fallback = machine(&store);

    let mut state = request(Some(&session.id), Some(&snapshot_cookie(&session)));
    state.changes.destroy = true;
    assert_eq!(
        fallback.save(&mut state).await.unwrap(),
        CookieUpdate::Clear
    );
    assert_eq!(store.take_calls(), [Called::Delete(session.id.clone())]);
    assert!(store.stored(&session.id).is_none());
    assert!(store.has_tombstone(&session.id));
}

#[tokio::test]
async fn logout_during_an_outage_still_clears_both_cookies() {
    let store = FakeStore::new();
    let session = stored_session(&store, 1);
    let fallback = machine(&store);
    store.set_down(true);

    let mut state = request(Some(&session.id), Some(&snapshot_cookie(&session)));
    state.changes.destroy = true;
    assert_eq!(
        fallback.save(&mut state).await.unwrap(),
        CookieUpdate::Clear
    );
    assert_eq!(store.take_calls(), [Called::Delete(session.id.clone())]);
}

#[tokio::test]
async fn a_new_session_is_created_in_the_store_with_its_snapshot() {
    let store = FakeStore::new();
    let fallback = machine(&store);

    let mut state = request(None, None);
    load(&fallback, &mut state).await.unwrap();
    insert(&mut state, "cart", "book");
    let update = fallback.save(&mut state).await.unwrap();
    assert_eq!(store.take_calls(), [Called::Create(String::new())]);
    let CookieUpdate::Write { id: Some(id), .. } = &update else {
        panic!("the new id is set: {update:?}");
    };
    let snapshot = set_snapshot(&update);
    assert_eq!(snapshot.id, *id);
    assert_eq!(
        (snapshot.epoch.as_str(), snapshot.base_version),
        (FIRST_EPOCH, 1)
    );
    assert!(!snapshot.has_offline_changes());
    assert_eq!(store.stored(id).unwrap().version, 1);
}

#[tokio::test]
async fn an_up_to_date_snapshot_is_left_alone_on_a_read() {
    let store = FakeStore::new();
    let session = stored_session(&store, 1);
    let fallback = machine(&store);

    let mut state = request(Some(&session.id), Some(&snapshot_cookie(&session)));
    load(&fallback, &mut state).await.unwrap();
    assert_eq!(
        store.take_calls(),
        [Called::Get(session.id.clone())],
        "a snapshot of the stored version is not restored"
    );
    assert_eq!(
        fallback.save(&mut state).await.unwrap(),
        CookieUpdate::Write {
            id: None,
            lifetime: IdLifetime::Session,
            snapshot: SnapshotCookie::Keep
        }
    );
}

/// Issue 12, scenario 1: cookies copied before a logout and replayed are refused while the
/// store keeps its data; only a store that lost its data (another epoch) recreates a session
/// from its snapshot.
#[tokio::test]
async fn a_replayed_logout_is_not_restored_but_a_store_that_lost_its_data_is() {
    let store = FakeStore::new();
    let ann = session_of(&store, &"A".repeat(32), "ann", 3);
    let bob = session_of(&store, &"B".repeat(32), "bob", 5);
    let fallback = machine(&store);
    let mut ann_browser = Browser::holding(&ann);
    let copied = ann_browser.clone();
    let bob_copy = Browser::holding(&bob);

    ann_browser.logout(&fallback).await;
    assert!(store.stored(&ann.id).is_none() && store.has_tombstone(&ann.id));

    // The copied cookies, replayed against the same store: no Restore, no session, cleared.
    let mut replay = copied.clone();
    let (state, update) = replay.read(&fallback).await.unwrap();
    assert_eq!(state.current.id, "", "no session");
    assert_eq!(update, CookieUpdate::Clear);
    assert_eq!(store.count(Method::Restore), 0);
    assert!(store.stored(&ann.id).is_none());

    // The store loses its data: bob's snapshot (a live session) brings his session back.
    let epoch = store.lose_data();
    let mut bob_browser = bob_copy.clone();
    let (state, _) = bob_browser.read(&fallback).await.unwrap();
    assert_eq!(store.count(Method::Restore), 1);
    assert_eq!(state.source, Source::Store);
    assert_eq!(
        (state.current.user_id.as_str(), state.current.version),
        ("bob", 1)
    );
    let restored = store.stored(&bob.id).expect("recreated in the store");
    assert_eq!(
        (restored.version, restored.epoch.as_str()),
        (1, epoch.as_str())
    );
    assert_eq!(restored.attrs, bob.attrs, "attributes kept");
    assert_eq!(restored.user_id, "bob");
    // The browser now holds the new store's confirmation.
    let snapshot = bob_browser.snapshot();
    assert_eq!(
        (
            snapshot.epoch.as_str(),
            snapshot.version,
            snapshot.base_version
        ),
        (epoch.as_str(), 1, 1)
    );
}

/// Issue 12, scenario 2: the store's change made during a partition (a demotion) wins over the
/// offline changes made on the other side, whatever their count.
#[tokio::test]
async fn a_demotion_during_a_partition_stays_and_the_offline_changes_are_dropped() {
    let store = FakeStore::new();
    let session = stored_session(&store, 3);
    let fallback = machine(&store);
    let mut browser = Browser {
        id: Some(session.id.clone()),
        snapshot: None,
    };
    // Confirmed at version 3 with role=admin.
    browser.read(&fallback).await.unwrap();
    let confirmed = browser.snapshot();
    assert_eq!((confirmed.version, confirmed.base_version), (3, 3));
    assert!(confirmed.attrs.contains_key("role"));

    // The backend cannot reach the store: two requests change other keys offline.
    store.set_down(true);
    let (state, _) = browser
        .send(&fallback, |s| insert(s, "cart", "book"))
        .await
        .unwrap();
    assert_eq!(state.source, Source::Snapshot);
    browser
        .send(&fallback, |s| {
            insert(s, "lang", "fr");
            remove(s, "theme");
        })
        .await
        .unwrap();
    let offline = browser.snapshot();
    assert_eq!((offline.version, offline.base_version), (5, 3));
    // Meanwhile the administrator removes the role in the store (version 4).
    let demoted = store.admin_change(&session.id, |s| {
        s.attrs.remove("role");
    });
    assert_eq!(demoted.version, 4);

    store.set_down(false);
    let (state, update) = browser.read(&fallback).await.unwrap();
    assert_eq!(store.count(Method::Restore), 1);
    assert_eq!(state.source, Source::Store);
    let stored = store.stored(&session.id).unwrap();
    assert_eq!(
        state.current, stored,
        "the stored session is served as it is"
    );
    assert!(!state.current.attrs.contains_key("role"), "still demoted");
    assert!(
        !state.current.attrs.contains_key("cart") && !state.current.attrs.contains_key("lang"),
        "offline changes dropped"
    );
    assert!(state.current.attrs.contains_key("theme"), "removal dropped");
    assert_eq!(fallback.dropped_offline_changes(), 1);
    assert_eq!(
        (stored.version, &stored.attrs, &stored.user_id),
        (4, &demoted.attrs, &demoted.user_id),
        "store untouched"
    );
    assert_eq!(store.count(Method::Update), 0);
    // The new snapshot is the store's confirmation of version 4, with no offline changes.
    let snapshot = set_snapshot(&update);
    assert_eq!(
        (
            snapshot.version,
            snapshot.base_version,
            snapshot.epoch.as_str()
        ),
        (4, 4, FIRST_EPOCH)
    );
    assert!(!snapshot.has_offline_changes());
    assert!(!snapshot.attrs.contains_key("role"));

    // The next request does not push anything back.
    browser.read(&fallback).await.unwrap();
    assert_eq!(store.count(Method::Restore), 1);
    assert_eq!(fallback.dropped_offline_changes(), 1);
}

#[tokio::test]
async fn offline_changes_apply_as_one_patch_when_the_store_did_not_move() {
    let store = FakeStore::new();
    let session = stored_session(&store, 3);
    let fallback = machine(&store);
    let mut browser = Browser::holding(&session);

    store.set_down(true);
    browser
        .send(&fallback, |s| insert(s, "cart", "book"))
        .await
        .unwrap();
    browser
        .send(&fallback, |s| {
            insert(s, "lang", "fr");
            remove(s, "theme");
            set_user(s, "ann2");
        })
        .await
        .unwrap();
    assert_eq!(browser.snapshot().version, 5);

    store.set_down(false);
    let (state, update) = browser.read(&fallback).await.unwrap();
    assert_eq!(store.count(Method::Restore), 1);
    assert_eq!(store.count(Method::Update), 0, "no separate write");
    let stored = store.stored(&session.id).unwrap();
    assert_eq!(stored.version, 4, "one patch: base + 1");
    assert_eq!(attr(&stored, "cart"), Some(json("book").as_slice()));
    assert_eq!(attr(&stored, "lang"), Some(json("fr").as_slice()));
    assert_eq!(attr(&stored, "role"), Some(json("admin").as_slice()));
    assert!(!stored.attrs.contains_key("theme"));
    assert_eq!(stored.user_id, "ann2");
    assert_eq!(state.current, stored, "the store's answer is served");
    assert_eq!(fallback.dropped_offline_changes(), 0);
    let snapshot = set_snapshot(&update);
    assert_eq!((snapshot.version, snapshot.base_version), (4, 4));
    assert!(!snapshot.has_offline_changes());
}

#[tokio::test]
async fn a_timeout_right_after_an_answer_is_a_503_with_retry_after_not_the_snapshot() {
    let store = FakeStore::new();
    let session = stored_session(&store, 1);
    let fallback = machine(&store);
    let mut browser = Browser::holding(&session);
    browser.read(&fallback).await.unwrap();

    store.fail(Some(Failure::TimedOut));
    let mut state = request(browser.id.as_deref(), browser.snapshot.as_deref());
    let error = load(&fallback, &mut state).await.unwrap_err();
    assert!(matches!(error, SessionError::TimedOut(_)), "{error:?}");
    assert_ne!(state.source, Source::Snapshot, "snapshot not used");
    let response = error.into_response();
    assert_eq!(response.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()[http::header::RETRY_AFTER], "1");

    // A write that times out is no offline change either.
    store.fail(None);
    let mut state = request(browser.id.as_deref(), browser.snapshot.as_deref());
    load(&fallback, &mut state).await.unwrap();
    store.fail(Some(Failure::TimedOut));
    insert(&mut state, "cart", "book");
    assert!(matches!(
        fallback.save(&mut state).await,
        Err(SessionError::TimedOut(_))
    ));
    assert_ne!(state.source, Source::Snapshot);
}

#[tokio::test]
async fn a_timeout_after_the_store_was_silent_past_the_grace_uses_the_snapshot() {
    let store = FakeStore::new();
    let session = stored_session(&store, 1);
    let grace = Duration::from_millis(50);
    let fallback = machine_with(
        &store,
        SessionConfig {
            outage_grace: grace,
            ..config(FallbackMode::OnOutage)
        },
    );
    let mut browser = Browser::holding(&session);
    browser.read(&fallback).await.unwrap();

    store.fail(Some(Failure::TimedOut));
    // A lower bound: the store's last answer is older than the grace once this returns.
    tokio::time::sleep(grace * 2).await;
    let (state, update) = browser
        .send(&fallback, |s| insert(s, "cart", "book"))
        .await
        .unwrap();
    assert_eq!(state.source, Source::Snapshot);
    let snapshot = set_snapshot(&update);
    assert_eq!(snapshot.offline_set, ["cart"]);
}

#[tokio::test]
async fn unavailable_right_after_an_answer_uses_the_snapshot_at_once() {
    let store = FakeStore::new();
    let session = stored_session(&store, 1);
    let fallback = machine(&store);
    let mut browser = Browser::holding(&session);
    browser.read(&fallback).await.unwrap();

    store.fail(Some(Failure::Unavailable));
    let (state, _) = browser.read(&fallback).await.unwrap();
    assert_eq!(state.source, Source::Snapshot);
    assert_eq!(state.current.user_id, "ann");
}

#[tokio::test]
async fn in_degraded_mode_the_snapshot_never_outlives_its_confirmation_by_the_max_age() {
    let store = FakeStore::new();
    let session = stored_session(&store, 1);
    let max_age = Duration::from_secs(20);
    assert!(
        max_age < FAKE_DEFAULT_TTL,
        "the limit, not the ttl, must bind"
    );
    let fallback = machine_with(
        &store,
        SessionConfig {
            snapshot_max_age: max_age,
            ..config(FallbackMode::OnOutage)
        },
    );
    let mut browser = Browser {
        id: Some(session.id.clone()),
        snapshot: None,
    };
    browser.read(&fallback).await.unwrap();
    let confirmed = browser.snapshot();
    let limit = confirmed.confirmed_at_ms + 20_000;
    assert!(confirmed.expires_at_ms <= limit);

    store.set_down(true);
    for n in 0..3 {
        let (state, update) = browser
            .send(&fallback, |s| insert(s, "n", &n.to_string()))
            .await
            .unwrap();
        assert_eq!(state.source, Source::Snapshot);
        let snapshot = set_snapshot(&update);
        assert_eq!(snapshot.confirmed_at_ms, confirmed.confirmed_at_ms);
        assert!(
            snapshot.expires_at_ms <= limit,
            "{} past the limit {limit}",
            snapshot.expires_at_ms
        );
        // A read re-issues it too (its expiry slides), within the same limit.
        let (_, update) = browser.read(&fallback).await.unwrap();
        assert!(set_snapshot(&update).expires_at_ms <= limit);
    }
}

#[tokio::test]
async fn a_snapshot_confirmed_longer_ago_than_the_max_age_is_not_used() {
    let store = FakeStore::new();
    let session = stored_session(&store, 1);
    let fallback = machine(&store);
    store.set_down(true);
    let now = SystemTime::now();
    let cookie_confirmed_ago = |ago: Duration| {
        let mut snapshot = Snapshot::confirmed(&session, "shop", now, DEFAULT_SNAPSHOT_MAX_AGE);
        snapshot.confirmed_at_ms = unix_ms(now - ago);
        // Still valid by its own expiry: only the confirmation's age refuses it.
        snapshot.expires_at_ms = unix_ms(now + Duration::from_secs(600));
        codec().encode(&snapshot).unwrap()
    };

    let old = cookie_confirmed_ago(DEFAULT_SNAPSHOT_MAX_AGE + Duration::from_secs(1));
    let mut state = request(Some(&session.id), Some(&old));
    assert!(matches!(
        load(&fallback, &mut state).await,
        Err(SessionError::Unavailable(_))
    ));
    assert_ne!(state.source, Source::Snapshot);

    let recent = cookie_confirmed_ago(DEFAULT_SNAPSHOT_MAX_AGE - Duration::from_secs(60));
    let mut state = request(Some(&session.id), Some(&recent));
    load(&fallback, &mut state).await.unwrap();
    assert_eq!(state.source, Source::Snapshot);
}

#[tokio::test]
async fn a_logout_during_an_outage_is_deleted_once_the_store_answers_and_not_replayed() {
    let store = FakeStore::new();
    let ann = session_of(&store, &"A".repeat(32), "ann", 2);
    let bob = session_of(&store, &"B".repeat(32), "bob", 2);
    let fallback = machine(&store);
    let mut ann_browser = Browser::holding(&ann);
    let copied = ann_browser.clone();
    let mut bob_browser = Browser::holding(&bob);

    store.set_down(true);
    ann_browser.logout(&fallback).await;
    assert_eq!(store.count(Method::Delete), 1, "tried");
    assert!(store.stored(&ann.id).is_some(), "not yet deleted");

    // The store answers again: the next request of any session runs the deferred delete.
    store.set_down(false);
    bob_browser.read(&fallback).await.unwrap();
    assert_eq!(store.count(Method::Delete), 2);
    assert!(store.stored(&ann.id).is_none());
    assert!(store.has_tombstone(&ann.id));

    // Ann's copied cookies, replayed: not restored, cleared.
    let mut replay = copied;
    let (state, update) = replay.read(&fallback).await.unwrap();
    assert_eq!(state.current.id, "");
    assert_eq!(update, CookieUpdate::Clear);
    assert_eq!(
        store.count(Method::Restore),
        1,
        "the deferred logout's own (before its delete), none for the replay"
    );
    assert!(store.stored(&ann.id).is_none());
    // Done once: later requests delete nothing more.
    bob_browser.read(&fallback).await.unwrap();
    assert_eq!(store.count(Method::Delete), 2);
}

#[tokio::test]
async fn cookies_of_a_logout_during_an_outage_replayed_first_after_recovery_are_refused() {
    let store = FakeStore::new();
    let ann = session_of(&store, &"A".repeat(32), "ann", 2);
    let fallback = machine(&store);
    let mut browser = Browser::holding(&ann);
    let copied = browser.clone();

    store.set_down(true);
    browser.logout(&fallback).await;
    store.set_down(false);

    // The very first request after recovery is the replay of the copied cookies.
    let mut replay = copied;
    let (state, update) = replay.read(&fallback).await.unwrap();
    assert_eq!(state.current.id, "", "the logged-out session is not served");
    assert_eq!(update, CookieUpdate::Clear);
    assert!(store.stored(&ann.id).is_none());
    assert!(store.has_tombstone(&ann.id));
}

#[tokio::test]
async fn a_login_during_an_outage_is_recreated_in_the_store_once_it_is_back() {
    let store = FakeStore::new();
    let fallback = machine(&store);
    let mut browser = Browser::default();

    store.set_down(true);
    let (state, update) = browser
        .send(&fallback, |s| {
            set_user(s, "bob");
            insert(s, "cart", "book");
        })
        .await
        .unwrap();
    assert_eq!(state.source, Source::Snapshot);
    let CookieUpdate::Write { id: Some(id), .. } = &update else {
        panic!("an id made here: {update:?}");
    };
    let offline = browser.snapshot();
    assert_eq!(
        (
            offline.epoch.as_str(),
            offline.base_version,
            offline.version
        ),
        ("", 0, 1),
        "made offline"
    );
    assert!(store.stored(id).is_none());

    store.set_down(false);
    let (state, update) = browser.read(&fallback).await.unwrap();
    assert_eq!(store.count(Method::Restore), 1);
    let stored = store.stored(id).expect("recreated by Restore");
    assert_eq!(
        (
            stored.version,
            stored.user_id.as_str(),
            stored.epoch.as_str()
        ),
        (1, "bob", FIRST_EPOCH)
    );
    assert_eq!(attr(&stored, "cart"), Some(json("book").as_slice()));
    assert_eq!(state.current, stored);
    let snapshot = set_snapshot(&update);
    assert_eq!(
        (
            snapshot.epoch.as_str(),
            snapshot.version,
            snapshot.base_version
        ),
        (FIRST_EPOCH, 1, 1)
    );
    assert!(!snapshot.has_offline_changes());
}

/// A login of a guest (no cookies) while the store is down, through `fallback`: the snapshot
/// it sets.
async fn login_during_outage(fallback: &Fallback) -> Snapshot {
    let mut state = request(None, None);
    load(fallback, &mut state).await.unwrap();
    set_user(&mut state, "bob");
    let snapshot = set_snapshot(&fallback.save(&mut state).await.unwrap());
    assert_eq!((snapshot.user_id.as_str(), snapshot.version), ("bob", 1));
    snapshot
}

#[tokio::test]
async fn a_session_made_during_an_outage_gets_the_ttl_the_server_gave() {
    let store = FakeStore::new();
    let fallback = machine(&store);
    // A first session, made while the store answers: its ttl is the server's default.
    let mut state = request(None, None);
    load(&fallback, &mut state).await.unwrap();
    insert(&mut state, "a", "1");
    fallback.save(&mut state).await.unwrap();

    store.set_down(true);
    let snapshot = login_during_outage(&fallback).await;
    assert_eq!(snapshot.ttl(), FAKE_DEFAULT_TTL);
    let now = unix_ms(SystemTime::now());
    assert!(
        snapshot.expires_at_ms <= now + 600_000 && snapshot.expires_at_ms + 60_000 > now + 600_000
    );
}

#[tokio::test]
async fn before_any_server_answer_the_configured_ttl_applies() {
    let store = FakeStore::new();
    store.set_down(true);
    let configured = Duration::from_secs(120);
    let fallback = machine_with(
        &store,
        SessionConfig {
            ttl: Some(configured),
            ..config(FallbackMode::OnOutage)
        },
    );
    assert_eq!(login_during_outage(&fallback).await.ttl(), configured);
}

#[tokio::test]
async fn without_a_create_the_ttl_of_any_stored_session_is_learned() {
    let store = FakeStore::new();
    let mut session = stored_session(&store, 1);
    session.ttl = Duration::from_secs(240);
    store.put(session.clone());
    let fallback = machine(&store);
    let mut state = request(Some(&session.id), None);
    load(&fallback, &mut state).await.unwrap();

    store.set_down(true);
    assert_eq!(
        login_during_outage(&fallback).await.ttl(),
        Duration::from_secs(240)
    );
}

/// Logs out, as a handler does.
async fn logout(session: Session) -> Result<(), SessionError> {
    session.destroy().await
}

#[tokio::test]
async fn through_the_layer_logout_expires_both_cookies() {
    let store = FakeStore::new();
    let session = stored_session(&store, 1);
    let layer =
        SessionLayer::with_backend(store.clone(), Some(codec()), config(FallbackMode::OnOutage));
    let app = Router::new().route("/logout", post(logout)).layer(layer);
    let cookies = format!("sid={}; sid_snap={}", session.id, snapshot_cookie(&session));
    let request = http::Request::post("/logout")
        .header(http::header::COOKIE, cookies)
        .body(Body::empty())
        .unwrap();

    let response = app.oneshot(request).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    assert_eq!(store.take_calls(), [Called::Delete(session.id.clone())]);
    let mut expired: Vec<&str> = response
        .headers()
        .get_all(http::header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap())
        .filter(|v| v.contains("Max-Age=0"))
        .filter_map(|v| v.split_once('=').map(|(name, _)| name))
        .collect();
    expired.sort_unstable();
    assert_eq!(expired, ["sid", "sid_snap"]);
}

#[tokio::test]
async fn a_session_made_and_logged_out_during_an_outage_is_never_recreated() {
    let store = FakeStore::new();
    let fallback = machine(&store);
    let mut browser = Browser::default();
    let mut other = Browser::holding(&stored_session(&store, 1));

    store.set_down(true);
    login_during_outage_in(&fallback, &mut browser).await;
    let id = browser.id.clone().expect("an id made here");
    let copied = browser.clone();
    browser.logout(&fallback).await;

    // Back: the next request settles the logout: restored from its snapshot, then deleted,
    // which leaves the tombstone that refuses the snapshot from now on.
    store.set_down(false);
    other.read(&fallback).await.unwrap();
    assert!(store.stored(&id).is_none());
    assert!(store.has_tombstone(&id));

    let mut replay = copied;
    let (state, update) = replay.read(&fallback).await.unwrap();
    assert_eq!(state.current.id, "", "the logged-out session is not served");
    assert_eq!(update, CookieUpdate::Clear);
    assert!(store.stored(&id).is_none(), "and not recreated");
}

#[tokio::test]
async fn cookies_of_an_offline_session_logged_out_offline_replayed_first_are_refused() {
    let store = FakeStore::new();
    let fallback = machine(&store);
    let mut browser = Browser::default();

    store.set_down(true);
    login_during_outage_in(&fallback, &mut browser).await;
    let id = browser.id.clone().expect("an id made here");
    let copied = browser.clone();
    browser.logout(&fallback).await;
    store.set_down(false);

    let mut replay = copied;
    let (state, update) = replay.read(&fallback).await.unwrap();
    assert_eq!(state.current.id, "");
    assert_eq!(update, CookieUpdate::Clear);
    assert!(store.stored(&id).is_none());
    assert!(store.has_tombstone(&id));
    // A second replay finds the tombstone.
    let (state, _) = replay_of(&id).read(&fallback).await.unwrap();
    assert_eq!(state.current.id, "");
}

/// A browser holding the cookies of a session made offline with id `id` (its snapshot made
/// here): what a copy of the cookies replays.
fn replay_of(id: &str) -> Browser {
    let now = SystemTime::now();
    let session = SessionData {
        id: id.into(),
        namespace: "shop".into(),
        user_id: "bob".into(),
        attrs: HashMap::new(),
        version: 1,
        created_at: now,
        expires_at: now + FAKE_DEFAULT_TTL,
        ttl: FAKE_DEFAULT_TTL,
        epoch: String::new(),
        write_id: Default::default(),
        ends_at: Default::default(),
    };
    let snapshot = Snapshot::made_offline(&session, "shop", now, DEFAULT_SNAPSHOT_MAX_AGE);
    Browser {
        id: Some(id.into()),
        snapshot: Some(codec().encode(&snapshot).unwrap()),
    }
}

/// A guest's login while the store is down, through `browser` (which keeps the cookies).
async fn login_during_outage_in(fallback: &Fallback, browser: &mut Browser) {
    let (state, _) = browser
        .send(fallback, |s| set_user(s, "bob"))
        .await
        .unwrap();
    assert_eq!(state.source, Source::Snapshot);
}

#[tokio::test]
async fn regenerating_a_stored_session_during_an_outage_is_a_503_and_changes_nothing() {
    let store = FakeStore::new();
    let ann = stored_session(&store, 3);
    let fallback = machine(&store);
    let mut browser = Browser::holding(&ann);
    let before = browser.clone();

    store.set_down(true);
    let error = browser
        .send(&fallback, |s| {
            s.changes.regenerate = true;
            set_user(s, "ann-admin");
        })
        .await
        .expect_err("no new id offline for a stored session");
    assert!(matches!(error, SessionError::Unavailable(_)), "{error:?}");
    assert_eq!(browser.id, before.id);
    assert_eq!(browser.snapshot, before.snapshot);

    // Back: the stored session is as it was, and no Restore was needed.
    store.set_down(false);
    let (state, _) = browser.read(&fallback).await.unwrap();
    assert_eq!(state.current, store.stored(&ann.id).unwrap());
    assert_eq!(state.current.user_id, "ann");
    assert_eq!(store.count(Method::Restore), 0);
}

#[tokio::test]
async fn not_found_without_an_epoch_is_no_session_never_a_restore() {
    let store = FakeStore::new();
    let ann = stored_session(&store, 2);
    let fallback = machine(&store);
    let mut browser = Browser::holding(&ann);
    store.lose_data();
    store.hide_epoch(true);

    let (state, update) = browser.read(&fallback).await.unwrap();
    assert_eq!(state.current.id, "");
    assert_eq!(update, CookieUpdate::Clear);
    assert_eq!(store.count(Method::Restore), 0);
    assert!(store.stored(&ann.id).is_none());
}

#[tokio::test]
async fn a_restore_failing_after_not_found_is_a_503_never_the_snapshot() {
    let store = FakeStore::new();
    let ann = stored_session(&store, 2);
    let fallback = machine(&store);
    let mut browser = Browser::holding(&ann);
    store.lose_data();

    store.fail_restore(Some(Failure::Unavailable));
    let error = browser.read(&fallback).await.expect_err("not served");
    assert!(matches!(error, SessionError::Unavailable(_)), "{error:?}");
    assert!(browser.id.is_some(), "cookies kept for the next try");

    store.fail_restore(Some(Failure::TimedOut));
    let error = browser.read(&fallback).await.expect_err("not served");
    assert!(matches!(error, SessionError::TimedOut(_)), "{error:?}");

    // Restore answers again: the session comes back from its snapshot (the store lost it).
    store.fail_restore(None);
    let (state, _) = browser.read(&fallback).await.unwrap();
    assert_eq!(state.current.id, ann.id);
    assert!(store.stored(&ann.id).is_some());
}

#[tokio::test]
async fn a_restore_refused_outright_serves_the_stored_session_and_drops_the_offline_changes() {
    let store = FakeStore::new();
    let ann = stored_session(&store, 2);
    let fallback = machine(&store);
    let mut browser = Browser::holding(&ann);

    store.set_down(true);
    browser
        .send(&fallback, |s| insert(s, "cart", "book"))
        .await
        .unwrap();
    assert!(browser.snapshot().has_offline_changes());
    store.set_down(false);

    store.fail_restore(Some(Failure::Denied));
    let (state, update) = browser.read(&fallback).await.unwrap();
    assert_eq!(state.current, store.stored(&ann.id).unwrap());
    assert_eq!(attr(&state.current, "cart"), None);
    assert_eq!(fallback.dropped_offline_changes(), 1);
    assert!(
        !set_snapshot(&update).has_offline_changes(),
        "the store's session, confirmed"
    );

    // And when Get itself is refused, the session is not served from its snapshot.
    store.fail(Some(Failure::Denied));
    let error = browser.read(&fallback).await.expect_err("an error");
    assert!(matches!(error, SessionError::Store(_)), "{error:?}");
}

#[tokio::test]
async fn a_logout_the_store_cannot_take_stays_queued_until_it_can() {
    let store = FakeStore::new();
    let ann = session_of(&store, &"A".repeat(32), "ann", 2);
    let bob = session_of(&store, &"B".repeat(32), "bob", 2);
    let fallback = machine(&store);
    let mut ann_browser = Browser::holding(&ann);
    let mut bob_browser = Browser::holding(&bob);

    store.fail(Some(Failure::TimedOut));
    // A timeout right after an answer: still a logout (cookies cleared, delete deferred).
    ann_browser.logout(&fallback).await;
    store.fail(None);
    store.fail_restore(Some(Failure::Unavailable));
    bob_browser.read(&fallback).await.unwrap();
    assert!(
        store.stored(&ann.id).is_some(),
        "the Restore first: not yet"
    );
    store.fail_restore(None);
    bob_browser.read(&fallback).await.unwrap();
    assert!(store.stored(&ann.id).is_none());
    assert!(store.has_tombstone(&ann.id));
}

/// The record a layer keeps under [`EXPIRY_ATTRIBUTE`] for a persistent cookie sent at `sent`
/// that runs out at `until`.
fn cookie_record(sent: SystemTime, until: SystemTime) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "cookie_sent_ms": unix_ms(sent),
        "cookie_until_ms": unix_ms(until),
    }))
    .unwrap()
}

/// A session of the fake store with a 30-day ttl whose persistent cookie was sent at `sent`.
fn remembered_session(store: &FakeStore, sent: SystemTime) -> SessionData {
    let month = Duration::from_secs(30 * 24 * 3600);
    let mut session = stored_session(store, 1);
    session.ttl = month;
    session.expires_at = SystemTime::now() + month;
    session
        .attrs
        .insert(EXPIRY_ATTRIBUTE.into(), cookie_record(sent, sent + month));
    store.put(session.clone());
    session
}

#[tokio::test]
async fn a_persistent_cookie_is_sent_again_only_after_half_its_life() {
    let store = FakeStore::new();
    let month = Duration::from_secs(30 * 24 * 3600);
    let fallback = machine_with(
        &store,
        config(FallbackMode::Off).with_expiry(Expiry::OnInactivity(month)),
    );

    // Sent an hour ago: a read sends nothing and writes nothing.
    let fresh = remembered_session(&store, SystemTime::now() - Duration::from_secs(3600));
    let mut browser = Browser {
        id: Some(fresh.id.clone()),
        snapshot: None,
    };
    let (_, update) = browser.read(&fallback).await.unwrap();
    assert!(
        matches!(update, CookieUpdate::Write { id: None, .. }),
        "{update:?}"
    );
    assert_eq!(store.take_calls(), [Called::Get(fresh.id.clone())]);

    // Sent 20 days ago (past half of 30): sent again with the store's expiry, and the time
    // recorded in the session.
    let old = remembered_session(
        &store,
        SystemTime::now() - Duration::from_secs(20 * 24 * 3600),
    );
    let (_, update) = browser.read(&fallback).await.unwrap();
    let CookieUpdate::Write {
        id: Some(id),
        lifetime: IdLifetime::MaxAge(max_age),
        ..
    } = &update
    else {
        panic!("the cookie is due: {update:?}");
    };
    assert_eq!(id, &old.id);
    assert!(*max_age > month - Duration::from_secs(60), "{max_age:?}");
    assert_eq!(
        store.take_calls(),
        [Called::Get(old.id.clone()), Called::Update(old.id.clone())]
    );
    let record = store.stored(&old.id).unwrap().attrs[EXPIRY_ATTRIBUTE].clone();
    let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
    let sent = record["cookie_sent_ms"].as_u64().unwrap();
    assert!(sent + 60_000 > unix_ms(SystemTime::now()), "{record}");

    // And not again on the next request.
    let (_, update) = browser.read(&fallback).await.unwrap();
    assert!(
        matches!(update, CookieUpdate::Write { id: None, .. }),
        "{update:?}"
    );
    assert_eq!(store.take_calls(), [Called::Get(old.id.clone())]);
}

/// `set_ttl`, `clear` (which keeps the expiry record) and `set_expiry`, through the layer.
async fn remember_and_clear(session: Session) -> Result<(), SessionError> {
    session.insert("cart", &3).await?;
    session
        .set_expiry(Some(Expiry::OnInactivity(Duration::from_secs(7200))))
        .await?;
    session.clear().await?;
    assert!(session.is_modified().await);
    Ok(())
}

async fn set_short_ttl(session: Session) -> Result<(), SessionError> {
    session.set_ttl(Duration::from_secs(90)).await
}

#[tokio::test]
async fn clear_keeps_the_expiry_and_set_ttl_reaches_the_store() {
    let store = FakeStore::new();
    let session = stored_session(&store, 1);
    let layer = SessionLayer::with_backend(store.clone(), None, config(FallbackMode::Off));
    let app = Router::new()
        .route("/remember", post(remember_and_clear))
        .route("/short", post(set_short_ttl))
        .layer(layer);
    let send = |path: &'static str| {
        http::Request::post(path)
            .header(http::header::COOKIE, format!("sid={}", session.id))
            .body(Body::empty())
            .unwrap()
    };

    let response = app.clone().oneshot(send("/remember")).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    let set_cookie = response.headers()[http::header::SET_COOKIE]
        .to_str()
        .unwrap();
    assert!(set_cookie.contains("Max-Age=7200"), "{set_cookie}");
    let stored = store.stored(&session.id).unwrap();
    assert_eq!(
        stored.attrs.keys().collect::<Vec<_>>(),
        [EXPIRY_ATTRIBUTE],
        "every attribute cleared but the expiry"
    );
    assert_eq!(stored.ttl, Duration::from_secs(7200));

    let response = app.oneshot(send("/short")).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    assert_eq!(
        store.stored(&session.id).unwrap().ttl,
        Duration::from_secs(90)
    );
    let set_cookie = response.headers()[http::header::SET_COOKIE]
        .to_str()
        .unwrap();
    assert!(
        set_cookie.contains("Max-Age=9"),
        "the cookie follows: {set_cookie}"
    );
}

#[tokio::test]
async fn an_expiry_at_a_date_sends_a_lifetime_and_a_capped_ttl_to_the_store() {
    let store = FakeStore::new();
    let end = SystemTime::now() + Duration::from_secs(120);
    let fallback = machine_with(
        &store,
        config(FallbackMode::Off).with_expiry(Expiry::AtDateTime(end)),
    );
    let mut browser = Browser::default();
    let (state, update) = browser
        .send(&fallback, |state| insert(state, "cart", "1"))
        .await
        .unwrap();
    assert!(
        matches!(update, CookieUpdate::Write { id: Some(_), lifetime: IdLifetime::Until(t), .. } if t == end),
        "{update:?}"
    );
    let stored = store.stored(&state.current.id).unwrap();
    assert!(stored.ttl <= Duration::from_secs(120), "{:?}", stored.ttl);
    let ends_at = stored.ends_at.expect("an absolute end");
    let skew = ends_at.duration_since(end).unwrap_or_else(|e| e.duration());
    assert!(skew < Duration::from_secs(2), "{skew:?}");
}

#[test]
fn header_only_ids_turn_the_snapshot_fallback_off() {
    let store = FakeStore::new();
    let fallback = machine_with(
        &store,
        config(FallbackMode::Always).with_id_source(super::IdSource::header()),
    );
    assert_eq!(fallback.config().fallback, FallbackMode::Off);
    let fallback = machine_with(
        &store,
        config(FallbackMode::Always).with_id_source(super::IdSource::both()),
    );
    assert_eq!(fallback.config().fallback, FallbackMode::Always);
}

#[test]
fn every_error_answers_with_its_status() {
    use http::StatusCode;
    let cases = [
        (
            SessionError::Unavailable(ClientError::Unavailable("down".into())),
            StatusCode::SERVICE_UNAVAILABLE,
            None,
        ),
        (
            SessionError::TimedOut(ClientError::TimedOut("slow".into())),
            StatusCode::SERVICE_UNAVAILABLE,
            Some("1"),
        ),
        (
            SessionError::Value(serde_json::from_str::<u8>("x").unwrap_err()),
            StatusCode::INTERNAL_SERVER_ERROR,
            None,
        ),
        (
            SessionError::Store(ClientError::PermissionDenied("no".into())),
            StatusCode::INTERNAL_SERVER_ERROR,
            None,
        ),
        (
            SessionError::MissingLayer,
            StatusCode::INTERNAL_SERVER_ERROR,
            None,
        ),
    ];
    for (error, status, retry) in cases {
        let empty: http::Response<String> = error.empty_response();
        assert_eq!((empty.status(), empty.body().as_str()), (status, ""));
        let response = error.into_response();
        assert_eq!(response.status(), status);
        for headers in [empty.headers(), response.headers()] {
            assert_eq!(
                headers
                    .get(http::header::RETRY_AFTER)
                    .map(|v| v.to_str().unwrap()),
                retry
            );
        }
    }
}
