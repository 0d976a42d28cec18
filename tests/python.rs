//! The Python client (`clients/python`): its type check (`mypy --strict`) and its tests (pytest), which
//! start this build's `gpu-coordinator` against the suite's Postgres, Redis and NATS (private servers
//! started here, or those the `GPU_IT_*` variables name: `gpu_coordinator_test_support::suite`).
//!
//! They run in a virtual environment at `clients/python/.venv`, made on first use with
//! `pip install -e 'clients/python[test]'` (`.ci/run` makes it before the tests).

use std::path::{Path, PathBuf};
use std::process::Command;

fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/python")
}

/// The venv's `bin` directory, made (and the package installed in it) if missing, once.
fn venv() -> PathBuf {
    static VENV: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    VENV.get_or_init(make_venv).clone()
}

fn make_venv() -> PathBuf {
    let dir = python_dir();
    let bin = dir.join(".venv/bin");
    if !bin.join("pytest").exists() {
        let made = Command::new("python3")
            .args(["-m", "venv", ".venv"])
            .current_dir(&dir)
            .status()
            .expect("python3 (3.9 or later) to make a virtual environment");
        assert!(made.success(), "python3 -m venv failed");
        let installed = Command::new(bin.join("pip"))
            .args(["install", "--quiet", "-e", ".[test]"])
            .current_dir(&dir)
            .status()
            .expect("pip in the virtual environment");
        assert!(
            installed.success(),
            "pip install -e 'clients/python[test]' failed (PyPI must be reachable)"
        );
    }
    bin
}

/// Runs a tool of the venv in `clients/python`, printing its output, and fails on a non-zero exit.
fn run(tool: &str, args: &[&str]) {
    let output = Command::new(venv().join(tool))
        .args(args)
        .current_dir(python_dir())
        .env("COORDINATOR_BIN", env!("CARGO_BIN_EXE_gpu-coordinator"))
        .envs(gpu_coordinator_test_support::suite::servers().env())
        .output()
        .unwrap_or_else(|e| panic!("run {tool}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{text}");
    assert!(output.status.success(), "{tool} {args:?} failed:\n{text}");
}

#[test]
fn the_python_client_type_checks_strictly() {
    run("mypy", &[]);
}

#[test]
fn the_python_client_passes_its_tests_against_this_build() {
    run("python", &["-m", "pytest", "-q", "-p", "no:cacheprovider"]);
}
