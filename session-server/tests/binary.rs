//! The `session-server` binary as an operator runs it: configuration errors, serving with no
//! setup on the memory store, and a clean exit on SIGTERM.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use session_proto::v1::CreateRequest;
use session_proto::v1::session_store_client::SessionStoreClient;
use support::services::free_port;
use support::wait::{eventually, eventually_ok};

const BINARY: &str = env!("CARGO_BIN_EXE_session-server");

#[test]
fn unknown_config_key_is_refused_with_its_name() {
    let file = TempFile::with("listen = \"127.0.0.1:0\"\nmax_sesion_bytes = 10\n");
    let out = Command::new(BINARY)
        .arg("--config")
        .arg(&file.0)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_sesion_bytes"), "{stderr}");
}

#[test]
fn bad_flag_values_are_refused() {
    for args in [
        &["--store", "mongo"][..],
        &["--default-ttl", "forever"][..],
        &["--max-ttl", "1s", "--default-ttl", "1m"][..],
    ] {
        let out = Command::new(BINARY)
            .args(args)
            .env_remove("STICKLESS_STORE")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(!out.stderr.is_empty(), "{args:?} refused silently");
    }
}

#[tokio::test]
async fn serves_memory_store_with_no_setup_and_stops_on_sigterm() {
    let port = free_port();
    let mut child = Command::new(BINARY)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--log-format",
            "json",
        ])
        .env_remove("STICKLESS_STORE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut client = eventually_ok("the server coming up", Duration::from_secs(20), || {
        SessionStoreClient::connect(format!("http://127.0.0.1:{port}"))
    })
    .await;
    let created = client
        .create(CreateRequest {
            user_id: "ops".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(created.into_inner().user_id, "ops");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = eventually("the exit after SIGTERM", Duration::from_secs(15), || {
        std::future::ready(child.try_wait().unwrap())
    })
    .await;
    assert!(status.success(), "{status}");
    let mut logs = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut logs).unwrap();
    assert!(logs.contains("SIGTERM received"), "{logs}");
    assert!(
        logs.lines().all(|l| l.starts_with('{')),
        "json log lines: {logs}"
    );
}

/// A file in the temp dir holding `text`, removed on drop.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn with(text: &str) -> TempFile {
        let name = format!("stickless-test-{}-{}.toml", std::process::id(), free_port());
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, text).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
