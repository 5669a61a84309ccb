//! `kiln embed` on all-MiniLM-L6-v2 (the `minilm` asset) against the sentence-transformers
//! fixture in `crates/engine/tests/fixtures/minilm/embeddings.json`, and its bad-input errors.
//! Tolerance as in `crates/engine/tests/embed_parity.rs`: components within 2e-6.

use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("run kiln")
}

fn fixture() -> serde_json::Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../engine/tests/fixtures/minilm/embeddings.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("fixture")).expect("fixture json")
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("float"))
        .collect()
}

fn assert_clean_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure: {err}");
    assert!(err.contains(needle), "expected {needle:?} in {err}");
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "{err}"
    );
}

#[test]
fn embed_json_matches_sentence_transformers() {
    let fx = fixture();
    let cases = fx["cases"].as_array().expect("cases");
    let (a, b) = (&cases[0], &cases[2]);
    let (ta, tb) = (
        a["text"].as_str().expect("text"),
        b["text"].as_str().expect("text"),
    );
    let out = kiln(&["embed", "--model", "minilm", "--text", ta, tb, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["model"], "minilm");
    assert_eq!(v["dim"], 384);
    let tokens = a["ids"].as_array().expect("ids").len() + b["ids"].as_array().expect("ids").len();
    assert_eq!(v["tokens"].as_u64(), Some(tokens as u64));
    let got = v["embeddings"].as_array().expect("embeddings");
    assert_eq!(got.len(), 2);
    for (g, want) in got.iter().zip([a, b]) {
        let (g, w) = (floats(g), floats(&want["embedding"]));
        assert_eq!(g.len(), 384);
        let diff = g
            .iter()
            .zip(&w)
            .map(|(x, y)| (x - y).abs())
            .fold(0f64, f64::max);
        assert!(diff < 2e-6, "max abs diff {diff:e}");
    }
}

#[test]
fn embed_plain_prints_one_line_per_text() {
    let out = kiln(&[
        "embed", "-m", "minilm", "--text", "first", "--text", "second",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].starts_with("dim 384 [") && lines[0].ends_with("\"first\""),
        "{stdout}"
    );
    assert!(lines[1].ends_with("\"second\""), "{stdout}");
}

#[test]
fn embed_bad_input_is_a_clean_error() {
    // No texts at all.
    assert_clean_error(&kiln(&["embed", "--model", "minilm"]), "--text");
    // A model that does not exist, a folder that is not a model, a file that is not a folder.
    assert_clean_error(
        &kiln(&["embed", "--model", "/no/such/model", "--text", "x"]),
        "neither a file or folder nor an asset name",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8");
    assert_clean_error(
        &kiln(&["embed", "--model", d, "--text", "x"]),
        "has no config.json",
    );
    let f = dir.path().join("file.txt");
    std::fs::write(&f, "x").expect("write");
    assert_clean_error(
        &kiln(&[
            "embed",
            "--model",
            f.to_str().expect("utf-8"),
            "--text",
            "x",
        ]),
        "not a model folder",
    );
    assert_clean_error(
        &kiln(&[
            "embed",
            "--model",
            "minilm",
            "--text",
            "x",
            "--batch-size",
            "0",
        ]),
        "--batch-size",
    );
}

#[test]
fn embed_truncates_long_text() {
    let long = "word ".repeat(2000);
    let out = kiln(&["embed", "--model", "minilm", "--text", &long, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["tokens"], 256);
}
