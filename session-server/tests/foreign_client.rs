//! The .proto is the whole contract: a Python client generated from `proto/session.proto` alone
//! (grpcio-tools) talks to the server, in plaintext and over TLS (where a plaintext Python
//! channel is refused). Skipped (with a printed reason) when python3 with grpcio-tools is
//! missing, unless `STICKLESS_REQUIRE_SERVICES=1`; `.ci/run` installs them. The script runs
//! under `python3 -O`, so its checks cannot be bare asserts.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use session_server::config::Settings;
use session_server::store::memory::MemoryStore;
use support::harness::TestServer;
use support::services::{self, skip_or_fail};
use support::tls;
use test_pki::{Ca, PemDir};

fn grpc_tools_available() -> bool {
    Command::new("python3")
        .args(["-c", "import grpc, grpc_tools.protoc"])
        .output()
        .is_ok_and(|out| out.status.success())
}

/// The Python modules generated from the .proto, in a directory removed when dropped.
struct Generated(PathBuf);

impl Drop for Generated {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Compiles `proto/session.proto` for Python; `None` (skipped by the skip rule) when
/// grpcio-tools is missing.
fn generate(test: &str) -> Option<Generated> {
    if !grpc_tools_available() {
        return skip_or_fail(
            test,
            "python3 with grpcio and grpcio-tools is not installed",
        );
    }
    let proto_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let out = Generated(std::env::temp_dir().join(services::unique_prefix("stickless-py")));
    std::fs::create_dir_all(&out.0).unwrap();
    let generated = Command::new("python3")
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", proto_dir.display()))
        .arg(format!("--python_out={}", out.0.display()))
        .arg(format!("--grpc_python_out={}", out.0.display()))
        .arg(proto_dir.join("session.proto"))
        .output()
        .unwrap();
    assert!(
        generated.status.success(),
        "protoc: {}",
        String::from_utf8_lossy(&generated.stderr)
    );
    Some(out)
}

/// Runs `tests/foreign/python_client.py` with the `generated` modules and `args`, and fails
/// unless it succeeds and prints `expected`.
async fn run_script(generated: &Generated, args: Vec<String>, expected: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/foreign/python_client.py");
    let pythonpath = generated.0.clone();
    let run: Output = tokio::task::spawn_blocking(move || {
        // -O strips `assert`: the script's checks must hold without it.
        Command::new("python3")
            .arg("-O")
            .arg(script)
            .args(args)
            .env("PYTHONPATH", pythonpath)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains(expected), "{stdout}");
}

/// A server over a memory store with `settings`.
async fn start(settings: Settings) -> TestServer {
    let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
    TestServer::start(settings, store).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_generated_from_the_proto_alone_works() {
    let Some(generated) = generate("python_client_generated_from_the_proto_alone_works") else {
        return;
    };
    let server = start(Settings::default()).await;
    let args = vec![server.addr.to_string()];
    run_script(&generated, args, "python client OK").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_works_over_tls_and_its_plaintext_channel_is_refused() {
    let test = "python_client_works_over_tls_and_its_plaintext_channel_is_refused";
    let Some(generated) = generate(test) else {
        return;
    };
    let dir = PemDir::new(test);
    let ca = Ca::new("python ca");
    let server = start(tls::settings(&dir, &ca, None)).await;
    let ca_file = dir.write_ca(&ca);
    let args = vec![
        server.addr.to_string(),
        "--ca".to_owned(),
        ca_file.display().to_string(),
    ];
    run_script(&generated, args, "python client OK over TLS").await;
}
