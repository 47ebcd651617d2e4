//! Helpers shared by the `tern` binary's integration tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs the `tern` binary built for these tests.
pub fn tern(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .output()
        .expect("run tern")
}

/// A fresh, empty directory for one test.
pub fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tern-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `tern model init --preset tiny --seed SEED` into `dir/name`.
pub fn init(dir: &Path, name: &str, seed: &str) -> PathBuf {
    init_with(dir, name, seed, &[])
}

/// [`init`] with more arguments (`--format gguf-i2s`, say).
pub fn init_with(dir: &Path, name: &str, seed: &str, extra: &[&str]) -> PathBuf {
    let m = dir.join(name);
    let mut args = vec![
        "model",
        "init",
        "--preset",
        "tiny",
        "--seed",
        seed,
        "--out",
        m.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    ok(&tern(&args));
    m
}

/// Succeeds; returns stdout.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails with a message containing `needle`, and never panics.
pub fn fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}
