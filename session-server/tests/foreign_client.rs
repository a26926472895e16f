//! The .proto is the whole contract: a Python client generated from `proto/session.proto` alone
//! (grpcio-tools) talks to the server. Skipped (with a printed reason) when python3 with
//! grpcio-tools is missing, unless `STICKLESS_REQUIRE_SERVICES=1`; `.ci/run` installs them. The
//! script runs under `python3 -O`, so its checks cannot be bare asserts.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use session_server::config::Settings;
use session_server::store::memory::MemoryStore;
use support::harness::TestServer;
use support::services::{self, skip_or_fail};

fn grpc_tools_available() -> bool {
    Command::new("python3")
        .args(["-c", "import grpc, grpc_tools.protoc"])
        .output()
        .is_ok_and(|out| out.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_generated_from_the_proto_alone_works() {
    let test = "python_client_generated_from_the_proto_alone_works";
    if !grpc_tools_available() {
        skip_or_fail::<()>(
            test,
            "python3 with grpcio and grpcio-tools is not installed",
        );
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let proto_dir = root.join("../proto");
    let out = std::env::temp_dir().join(services::unique_prefix("stickless-py"));
    std::fs::create_dir_all(&out).unwrap();
    let generated = Command::new("python3")
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", proto_dir.display()))
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .arg(proto_dir.join("session.proto"))
        .output()
        .unwrap();
    assert!(
        generated.status.success(),
        "protoc: {}",
        String::from_utf8_lossy(&generated.stderr)
    );

    let settings = Settings::default();
    let server = TestServer::start(
        settings.clone(),
        Arc::new(MemoryStore::new(settings.max_session_bytes)),
    )
    .await;
    let script = root.join("tests/foreign/python_client.py");
    let addr = server.addr.to_string();
    let run = tokio::task::spawn_blocking({
        let out = out.clone();
        move || {
            // -O strips `assert`: the script's checks must hold without it.
            Command::new("python3")
                .arg("-O")
                .arg(script)
                .arg(addr)
                .env("PYTHONPATH", &out)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let _ = std::fs::remove_dir_all(&out);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("python client OK"), "{stdout}");
}
