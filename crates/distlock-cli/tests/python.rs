//! A client in another language works from the `.proto` alone: Python with
//! grpcio, its code generated at test time. `./scripts/test` installs
//! grpcio and grpcio-tools into `target/python` and names that Python in
//! `DISTLOCK_TEST_PYTHON`.

mod common;

use std::path::Path;
use std::process::Command;

use common::Server;

#[test]
fn a_python_client_made_from_the_proto_locks_and_releases() {
    let python = std::env::var("DISTLOCK_TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(dir.path(), &[]);
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(&python)
        .arg(manifest.join("tests/python/client.py"))
        .arg(&server.address)
        .arg(manifest.join("../distlock-proto/proto"))
        .output()
        .unwrap_or_else(|err| {
            panic!("cannot run {python}: {err}; run ./scripts/test, which installs it")
        });
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("No module named 'grpc"),
        "{python} has no grpcio; run ./scripts/test, which installs grpcio and grpcio-tools in target/python"
    );
    assert!(
        output.status.success(),
        "python client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("ok token "), "{stdout}");
    assert!(stdout.contains("garbled request refused"), "{stdout}");
}
