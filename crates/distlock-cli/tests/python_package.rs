//! The Python package (`python/`) passes its pytest suite against real
//! stores: a distlock server, Redis, and PostgreSQL in both modes.
//! `./scripts/test` makes a virtual environment in `target/python` with
//! maturin and pytest, and names its Python in `DISTLOCK_TEST_PYTHON`; the
//! test builds the package from this tree into it (`maturin develop`), so it
//! never tests an older build.

mod common;

use std::path::Path;
use std::process::Command;

use common::Server;
use distlock_testkit::servers::{Postgres, Redis};

#[test]
fn the_python_package_passes_its_suite_on_real_stores() {
    let help = "run ./scripts/test, which makes target/python with maturin and pytest and \
                names its Python in DISTLOCK_TEST_PYTHON";
    let python = std::env::var("DISTLOCK_TEST_PYTHON")
        .unwrap_or_else(|_| panic!("DISTLOCK_TEST_PYTHON is not set; {help}"));
    // Absolute (the test runs in the crate's directory), not canonical: the
    // environment's python is a link out of it.
    let python = std::path::absolute(python).expect("an absolute path");
    let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../python");
    let bin = python.parent().expect("python is in a bin directory");
    assert!(
        bin.join("maturin").exists() && bin.join("activate").exists(),
        "{} is not a virtual environment with maturin; {help}",
        bin.display()
    );
    let built = Command::new(bin.join("maturin"))
        .args(["develop", "--quiet", "-m"])
        .arg(package.join("Cargo.toml"))
        .env("VIRTUAL_ENV", bin.parent().expect("a virtual environment"))
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        built,
        "maturin could not build python/ (its output is above)"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(dir.path(), &[]);
    let redis = Redis::start();
    let postgres = Postgres::start();
    let urls = [
        format!("distlock://{}", server.address),
        redis.url(),
        postgres.url(),
        format!("{}?mode=lease", postgres.url()),
    ];
    let output = Command::new(&python)
        .args([
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "tests",
        ])
        .current_dir(&package)
        .env("DISTLOCK_TEST_URLS", urls.join(" "))
        .output()
        .unwrap_or_else(|err| panic!("cannot run {}: {err}", python.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the Python suite failed:\n{stdout}\n{stderr}"
    );
    println!("{stdout}");
    assert!(stdout.contains(" passed"), "{stdout}");
}
