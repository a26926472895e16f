//! Tokens, their scopes, and authentication by default. In-process servers: the scoped-token
//! matrix (`ro`/`rw` × in and out of the token's namespaces × every method, `*`, the empty
//! namespace as `default`), the `sha256:` form, UNAUTHENTICATED against PERMISSION_DENIED,
//! `--auth-token` alone as `* rw`, probes open. The real binary: a public listen address without
//! authentication is refused, and starts with a token, a token file or
//! `--allow-unauthenticated`; a malformed token file is refused naming its line, never the token.

mod support;

use std::process::Output;
use std::time::Duration;

use futures::StreamExt as _;
use session_proto::v1::session_store_client::SessionStoreClient;
use session_proto::v1::*;
use session_server::config::{Cli, Settings};
use session_server::store::memory::MemoryStore;
use support::harness::TestServer;
use support::process::ServerProcess;
use support::services;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Status};

const BINARY: &str = env!("CARGO_BIN_EXE_session-server");

/// The token file of the matrix; the server also gets `--auth-token root`. The last line is
/// `hashed-secret`, written as `printf %s hashed-secret | sha256sum` prints it.
const TOKENS: &str = "\
# scoped tokens of the matrix
demo-ro    demo       ro
app-rw     demo,shop  rw   # one application, two namespaces
any-ro     *          ro

default-rw default    rw
sha256:4e598f5daafc2fda61641ddbb5956deb23fde6616366dc9dd5a7c9f47da4d787 shop rw
";

/// The token of `--auth-token` in the matrix.
const ROOT: &str = "root";

/// Every token the matrix server accepts.
const MATRIX_TOKENS: [&str; 6] = [
    ROOT,
    "demo-ro",
    "app-rw",
    "any-ro",
    "default-rw",
    "hashed-secret",
];

/// Namespaces the matrix calls in: listed ones, the empty one (`default`), one nobody lists.
const NAMESPACES: [&str; 4] = ["demo", "shop", "", "other"];

/// What [`TOKENS`] says, written out: whether `token` may call a method that writes (or only
/// reads) in `namespace`.
fn allowed(token: &str, writes: bool, namespace: &str) -> bool {
    let namespace = if namespace.is_empty() {
        "default"
    } else {
        namespace
    };
    match token {
        ROOT => true,
        "demo-ro" => namespace == "demo" && !writes,
        "app-rw" => namespace == "demo" || namespace == "shop",
        "any-ro" => !writes,
        "default-rw" => namespace == "default",
        "hashed-secret" => namespace == "shop",
        other => unreachable!("no token {other:?} in the matrix"),
    }
}

/// Every method of the API; Get twice, since `ro` allows it with touch too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Create,
    Get,
    GetWithTouch,
    Update,
    Touch,
    Regenerate,
    Delete,
    ListByUser,
    DeleteByUser,
    Restore,
    Watch,
}

impl Method {
    const ALL: [Method; 11] = [
        Method::Create,
        Method::Get,
        Method::GetWithTouch,
        Method::Update,
        Method::Touch,
        Method::Regenerate,
        Method::Delete,
        Method::ListByUser,
        Method::DeleteByUser,
        Method::Restore,
        Method::Watch,
    ];

    /// Whether the README says it needs an `rw` token: all but Get, ListByUser and Watch.
    fn writes(self) -> bool {
        !matches!(
            self,
            Method::Get | Method::GetWithTouch | Method::ListByUser | Method::Watch
        )
    }

    /// Whether it acts on one existing session.
    fn needs_session(self) -> bool {
        matches!(
            self,
            Method::Get
                | Method::GetWithTouch
                | Method::Update
                | Method::Touch
                | Method::Regenerate
                | Method::Delete
        )
    }
}

type Client = SessionStoreClient<Channel>;

/// `message` with `authorization: <authorization>` when given.
fn with_auth<T>(authorization: Option<&str>, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = authorization {
        request.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(value).expect("ASCII header"),
        );
    }
    request
}

/// `Bearer <token>`.
fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A client of a server, and a token of that server that may do anything anywhere, to make
/// the sessions the calls under test act on.
struct Caller {
    /// The connection.
    client: Client,
    /// `Bearer <an unrestricted token>`.
    admin: String,
}

impl Caller {
    /// A client of `server`, making sessions with `admin_token`.
    async fn of(server: &TestServer, admin_token: &str) -> Caller {
        Caller {
            client: server.client().await,
            admin: bearer(admin_token),
        }
    }

    /// A fresh session in `namespace`, made with the admin token.
    async fn session_in(&mut self, namespace: &str) -> Session {
        self.client
            .create(with_auth(
                Some(&self.admin),
                CreateRequest {
                    namespace: namespace.into(),
                    user_id: "matrix-user".into(),
                    ..Default::default()
                },
            ))
            .await
            .expect("the admin token creates anywhere")
            .into_inner()
    }

    /// Calls `method` in `namespace` with `authorization`, on a fresh session of that
    /// namespace when it needs one, with a request that is otherwise valid: any error is the
    /// token's.
    async fn call(
        &mut self,
        authorization: Option<&str>,
        method: Method,
        namespace: &str,
    ) -> Result<(), Status> {
        let id = if method.needs_session() {
            self.session_in(namespace).await.id
        } else {
            String::new()
        };
        send(&mut self.client, authorization, method, namespace, id).await
    }
}

/// Sends `method` in `namespace` (on session `id` when it needs one) with `auth`.
async fn send(
    client: &mut Client,
    auth: Option<&str>,
    method: Method,
    namespace: &str,
    id: String,
) -> Result<(), Status> {
    let namespace = namespace.to_owned();
    let user_id = "matrix-user".to_owned();
    match method {
        Method::Create => client
            .create(with_auth(
                auth,
                CreateRequest {
                    namespace,
                    user_id,
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        Method::Get | Method::GetWithTouch => client
            .get(with_auth(
                auth,
                GetRequest {
                    namespace,
                    id,
                    touch: method == Method::GetWithTouch,
                    bypass_cache: false,
                },
            ))
            .await
            .map(drop),
        Method::Update => client
            .update(with_auth(
                auth,
                UpdateRequest {
                    namespace,
                    id,
                    set: [("cart".to_owned(), b"1".to_vec())].into(),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        Method::Touch => client
            .touch(with_auth(
                auth,
                TouchRequest {
                    namespace,
                    id,
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        Method::Regenerate => client
            .regenerate(with_auth(auth, RegenerateRequest { namespace, id }))
            .await
            .map(drop),
        Method::Delete => client
            .delete(with_auth(auth, DeleteRequest { namespace, id }))
            .await
            .map(|deleted| assert!(deleted.into_inner().deleted)),
        Method::ListByUser => client
            .list_by_user(with_auth(
                auth,
                ListByUserRequest {
                    namespace,
                    user_id,
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        Method::DeleteByUser => client
            .delete_by_user(with_auth(auth, DeleteByUserRequest { namespace, user_id }))
            .await
            .map(drop),
        Method::Restore => client
            .restore(with_auth(
                auth,
                RestoreRequest {
                    namespace,
                    session: Some(Session {
                        id: support::ids::new_id(),
                        user_id,
                        version: 1,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        // The stream is open once the call returns; dropping it ends the call.
        Method::Watch => client
            .watch(with_auth(auth, WatchRequest { namespace, user_id }))
            .await
            .map(drop),
    }
}

/// A server over the memory store with `cli`'s settings (its listen address ignored).
async fn server(cli: Cli) -> TestServer {
    let settings = Settings::resolve(cli, None).expect("valid settings");
    let store = std::sync::Arc::new(MemoryStore::new(settings.max_session_bytes));
    TestServer::start(settings, store).await
}

/// The matrix server: [`TOKENS`] in a file and `--auth-token root`. The file may go once the
/// server is built: it is read when the settings are resolved.
async fn matrix_server() -> (TestServer, Caller) {
    let file = TempFile::with("tokens", TOKENS);
    let server = server(Cli {
        auth_token: Some(ROOT.into()),
        auth_token_file: Some(file.0.clone()),
        ..Cli::default()
    })
    .await;
    let caller = Caller::of(&server, ROOT).await;
    (server, caller)
}

#[tokio::test]
async fn each_token_reaches_only_its_namespaces_with_its_rights() {
    let (_server, mut caller) = matrix_server().await;
    let mut wrong = Vec::new();
    let (mut admitted, mut denied) = (0, 0);
    for token in MATRIX_TOKENS {
        let authorization = bearer(token);
        for namespace in NAMESPACES {
            for method in Method::ALL {
                let expected = allowed(token, method.writes(), namespace);
                let got = caller.call(Some(&authorization), method, namespace).await;
                match (&got, expected) {
                    (Ok(()), true) => admitted += 1,
                    (Err(status), false) if status.code() == Code::PermissionDenied => denied += 1,
                    _ => wrong.push(format!(
                        "{token} {method:?} in {namespace:?}: expected {}, got {:?}",
                        if expected { "OK" } else { "PERMISSION_DENIED" },
                        got.map_err(|s| (s.code(), s.message().to_owned()))
                    )),
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    // Both outcomes were exercised, many times each.
    assert!(
        admitted > 50 && denied > 50,
        "{admitted} admitted, {denied} denied"
    );
}

#[tokio::test]
async fn no_token_or_an_unknown_one_is_unauthenticated_for_every_method() {
    let (_server, mut caller) = matrix_server().await;
    let digest_line = TOKENS.lines().last().unwrap().split(' ').next().unwrap();
    let refused = [
        None,
        Some("Bearer nobody".to_owned()),
        Some("Bearer demo-r".to_owned()),
        Some("Bearer demo-ro2".to_owned()),
        Some("bearer demo-ro".to_owned()),
        Some("demo-ro".to_owned()),
        // A `sha256:` line's text is not a token: only what hashes to it is.
        Some(bearer(digest_line)),
    ];
    for authorization in &refused {
        for method in Method::ALL {
            let status = caller
                .call(authorization.as_deref(), method, "demo")
                .await
                .unwrap_err();
            assert_eq!(
                status.code(),
                Code::Unauthenticated,
                "{authorization:?} {method:?}: {status:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_call_outside_the_scope_changes_nothing_and_learns_nothing() {
    let (_server, mut caller) = matrix_server().await;
    let demo = caller.session_in("demo").await;
    let ro = Some(bearer("demo-ro"));
    let ro = ro.as_deref();

    let denied = caller
        .client
        .delete(with_auth(
            ro,
            DeleteRequest {
                namespace: "demo".into(),
                id: demo.id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("read-only"), "{denied:?}");
    // Read-only Get with touch is allowed, and the session is still there, unchanged.
    let read = caller
        .client
        .get(with_auth(
            ro,
            GetRequest {
                namespace: "demo".into(),
                id: demo.id.clone(),
                touch: true,
                bypass_cache: false,
            },
        ))
        .await
        .expect("ro reads with touch")
        .into_inner();
    assert_eq!((read.id, read.version), (demo.id, 1));

    // Another application's session: PERMISSION_DENIED whether it exists or not, so the token
    // cannot probe for ids.
    let shop = caller.session_in("shop").await;
    for id in [shop.id, support::ids::new_id()] {
        let status = caller
            .client
            .get(with_auth(
                ro,
                GetRequest {
                    namespace: "shop".into(),
                    id,
                    touch: false,
                    bypass_cache: false,
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("\"shop\""), "{status:?}");
    }
    // Scope comes before validation: a read-only token's malformed Create is refused for the
    // scope, not for its empty attribute key.
    let status = caller
        .client
        .create(with_auth(
            ro,
            CreateRequest {
                namespace: "demo".into(),
                attrs: [(String::new(), vec![1])].into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
}

#[tokio::test]
async fn a_read_only_token_watches_what_a_writer_makes() {
    let (_server, mut caller) = matrix_server().await;
    // The stream is subscribed before the call returns: nothing made after it is missed.
    let mut events = caller
        .client
        .watch(with_auth(
            Some(&bearer("any-ro")),
            WatchRequest {
                namespace: "shop".into(),
                user_id: String::new(),
            },
        ))
        .await
        .expect("ro may watch")
        .into_inner();
    let made = caller
        .client
        .create(with_auth(
            Some(&bearer("hashed-secret")),
            CreateRequest {
                namespace: "shop".into(),
                user_id: "buyer".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("the sha256: token writes in shop")
        .into_inner();
    let event = tokio::time::timeout(Duration::from_secs(30), events.next())
        .await
        .expect("an event within 30s")
        .expect("the stream is open")
        .expect("an event, not an error");
    assert_eq!((event.id, event.user_id), (made.id, "buyer".to_owned()));
}

#[tokio::test]
async fn auth_token_alone_allows_every_method_in_every_namespace() {
    let server = server(Cli {
        auth_token: Some("solo".into()),
        ..Cli::default()
    })
    .await;
    let mut caller = Caller::of(&server, "solo").await;
    for namespace in ["demo", "", "other"] {
        for method in Method::ALL {
            let got = caller.call(Some(&bearer("solo")), method, namespace).await;
            assert!(got.is_ok(), "{method:?} in {namespace:?}: {got:?}");
            let status = caller.call(None, method, namespace).await.unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated, "{method:?}");
        }
    }
}

#[tokio::test]
async fn probes_and_reflection_stay_open_with_scoped_tokens() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let (server, _caller) = matrix_server().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: session_proto::SERVICE_NAME.into(),
        })
        .await
        .expect("health without a token")
        .into_inner();
    assert_eq!(status.status(), ServingStatus::Serving);

    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        message_request: Some(MessageRequest::ListServices(String::new())),
        ..Default::default()
    };
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("reflection without a token")
        .into_inner();
    let answer = answers.next().await.expect("an answer").expect("no error");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == session_proto::SERVICE_NAME),
        "{list:?}"
    );
}

/// Bound on the binary's start and on its exit after SIGTERM: generous, for a loaded machine.
const EXIT_WITHIN: Duration = Duration::from_secs(30);

/// Runs the binary with `args`, `env` and no other `STICKLESS_*` variables, bounded (a
/// binary that serves instead of refusing is killed and fails the test).
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    support::process::run_bounded(BINARY.as_ref(), args, env)
}

/// Fails unless `out` is a refusal of the configuration: exit status 2, nothing on stdout, one
/// line on stderr holding each of `expected` and none of `never`.
fn assert_refused(what: &str, out: &Output, expected: &[&str], never: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{what}: {}; {stderr}",
        out.status
    );
    assert!(
        out.stdout.is_empty(),
        "{what}: nothing listens, nothing is printed"
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{what}: one line: {stderr}"
    );
    for text in expected {
        assert!(stderr.contains(text), "{what}: no {text:?} in {stderr}");
    }
    for text in never {
        assert!(
            !stderr.contains(text),
            "{what}: {text:?} printed in {stderr}"
        );
    }
    stderr
}

#[test]
fn a_public_listen_address_without_authentication_is_refused_naming_the_fix() {
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let out = run(&["--listen", listen], &[]);
        assert_refused(
            listen,
            &out,
            &[
                &format!("refusing to serve on {listen} without authentication"),
                "--auth-token-file",
                "--allow-unauthenticated",
            ],
            &[],
        );
    }
    // A falsy opt-out is no opt-out; the environment twin says so as the flag would.
    let out = run(
        &["--listen", "0.0.0.0:0"],
        &[("STICKLESS_ALLOW_UNAUTHENTICATED", "false")],
    );
    assert_refused("opt-out false", &out, &["--allow-unauthenticated"], &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_listen_address_serves_with_a_token_a_token_file_or_the_opt_out() {
    let file = TempFile::with("tokens", "file-token * rw\n");
    let path = file.0.to_string_lossy().into_owned();
    let cases: [(&[&str], Option<&str>); 3] = [
        (&["--allow-unauthenticated"], None),
        (&["--auth-token", "flag-token"], Some("flag-token")),
        (&["--auth-token-file", &path], Some("file-token")),
    ];
    for (auth, token) in cases {
        let args = [&["--listen", "0.0.0.0:0"][..], auth].concat();
        let mut server = ServerProcess::start(BINARY.as_ref(), &args, &["grpc"]);
        let bound = server.address("grpc");
        assert!(bound.ip().is_unspecified(), "{args:?}: bound {bound}");
        let url = format!("http://127.0.0.1:{}", bound.port());
        let mut client = SessionStoreClient::connect(url).await.expect("connect");
        let create = |authorization: Option<String>| {
            with_auth(authorization.as_deref(), CreateRequest::default())
        };
        match token {
            None => {
                client.create(create(None)).await.expect("open server");
            }
            Some(token) => {
                let status = client.create(create(None)).await.unwrap_err();
                assert_eq!(status.code(), Code::Unauthenticated, "{args:?}");
                client
                    .create(create(Some(bearer(token))))
                    .await
                    .expect("the configured token");
            }
        }
        server.terminate();
        let status = tokio::task::block_in_place(|| server.wait_exit(EXIT_WITHIN));
        assert_eq!(status.code(), Some(0), "{args:?}: {status}");
    }
}

#[test]
fn a_malformed_token_file_is_refused_naming_the_line_never_the_token() {
    let file = TempFile::with(
        "tokens",
        "# tokens\n\nfine-token demo ro\nleaky-secret-42 demo,shop\n",
    );
    let path = file.0.to_string_lossy().into_owned();
    let never = ["leaky-secret-42", "fine-token", "demo,shop"];
    let expected = [
        format!("invalid auth token file {path}, line 4"),
        "expected `TOKEN NAMESPACES RIGHTS`, found 2 field(s)".to_owned(),
    ];
    let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    let flag = run(&["--auth-token-file", &path], &[]);
    assert_refused("flag", &flag, &expected, &never);
    let env = run(&[], &[("STICKLESS_AUTH_TOKEN_FILE", &path)]);
    assert_refused("environment", &env, &expected, &never);

    let bad_rights = TempFile::with("tokens", "leaky-secret-42 demo rx\n");
    let bad_rights_path = bad_rights.0.to_string_lossy().into_owned();
    let out = run(&["--auth-token-file", &bad_rights_path], &[]);
    assert_refused(
        "bad rights",
        &out,
        &["line 1: RIGHTS must be `rw` or `ro`"],
        &["leaky-secret-42", "rx"],
    );

    let empty = TempFile::with("tokens", "# nobody yet\n\n");
    let empty_path = empty.0.to_string_lossy().into_owned();
    let out = run(&["--auth-token-file", &empty_path], &[]);
    assert_refused(
        "empty",
        &out,
        &[&format!("{empty_path} holds no token")],
        &[],
    );

    let missing = format!("{path}.missing");
    let out = run(&["--auth-token-file", &missing], &[]);
    assert_refused(
        "missing",
        &out,
        &[&format!("cannot read auth token file {missing}")],
        &[],
    );
}

/// A file in the temp dir holding `text`, removed on drop; its name is unique by process id,
/// time and a counter ([`services::unique_prefix`]).
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn with(what: &str, text: &str) -> TempFile {
        let path = std::env::temp_dir().join(services::unique_prefix(what));
        std::fs::write(&path, text).expect("write the temp file");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn the_demo_clusters_token_file_gives_the_proxy_reads_and_the_apps_writes_in_demo() {
    // deploy/compose/session-tokens holds only SHA-256 digests; docker-compose.yml gives the
    // proxy and the apps these tokens by default.
    let file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/compose/session-tokens");
    let server = server(Cli {
        auth_token: Some(ROOT.into()),
        auth_token_file: Some(file),
        ..Cli::default()
    })
    .await;
    let mut caller = Caller::of(&server, ROOT).await;
    let (proxy, app) = (bearer("proxy-demo-token"), bearer("app-demo-token"));
    for method in Method::ALL {
        let got = caller.call(Some(&app), method, "demo").await;
        assert!(got.is_ok(), "app token, {method:?}: {got:?}");
        let got = caller.call(Some(&proxy), method, "demo").await;
        if method.writes() {
            assert_eq!(
                got.unwrap_err().code(),
                Code::PermissionDenied,
                "{method:?}"
            );
        } else {
            assert!(got.is_ok(), "proxy token, {method:?}: {got:?}");
        }
        for token in [&proxy, &app] {
            let got = caller.call(Some(token), method, "shop").await;
            assert_eq!(
                got.unwrap_err().code(),
                Code::PermissionDenied,
                "{method:?}"
            );
        }
    }
}
