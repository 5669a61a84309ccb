//! `kiln bench train`: its help, its argument errors, and one tiny kiln-only run (`--no-peer`, so
//! no Python is needed). Timings are never asserted; only the shape of the output.

use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["bench", "train"])
        .args(args)
        .output()
        .expect("run kiln")
}

fn assert_clean_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure: {err}");
    assert!(
        err.starts_with("error: ") && err.contains(needle),
        "expected {needle:?} in {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "{err}"
    );
}

#[test]
fn help_lists_the_flags() {
    let out = kiln(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--threads",
        "--steps",
        "--warmup",
        "--batch",
        "--seq-len",
        "--depth",
        "--python",
        "--no-peer",
        "--json",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    assert!(!help.contains("--worker"), "the internal flag is hidden");
}

#[test]
fn bad_arguments_are_clear_errors() {
    assert_clean_error(&kiln(&["--no-peer", "--threads", "1,0"]), "--threads");
    assert_clean_error(&kiln(&["--no-peer", "--steps", "0"]), "--steps");
    assert_clean_error(&kiln(&["--no-peer", "--batch", "0"]), "--batch");
    assert_clean_error(&kiln(&["--no-peer", "--seq-len", "1"]), "--seq-len");
    assert_clean_error(&kiln(&["--no-peer", "--depth", "0"]), "--depth");
    // A Python that does not exist fails before any training starts.
    assert_clean_error(
        &kiln(&["--python", "/nonexistent/python", "--steps", "1"]),
        "/nonexistent/python",
    );
}

#[test]
fn tiny_kiln_only_run_prints_the_table_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("train.json");
    let out = kiln(&[
        "--no-peer",
        "--threads",
        "1",
        "--depth",
        "1",
        "--batch",
        "2",
        "--seq-len",
        "16",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--json",
        json.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("| threads | kiln tok/s | PyTorch tok/s | kiln / PyTorch |"),
        "{stdout}"
    );
    assert!(stdout.contains("| 1 | "), "{stdout}");
    assert!(!stderr.contains("WARNING"), "{stderr}");

    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["tokens_per_step"], 32);
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    let k = &rows[0]["kiln"];
    assert_eq!(k["step_s"].as_array().unwrap().len(), 2);
    assert!(k["tok_per_s"].as_f64().unwrap() > 0.0);
    assert!(k["peak_rss_bytes"].as_u64().unwrap() > 0);
    // Random weights and random targets: the first loss is about ln(4096) = 8.32.
    let loss = k["first_loss"].as_f64().unwrap();
    assert!((loss - 4096f64.ln()).abs() < 0.5, "first loss {loss}");
    assert!(rows[0]["pytorch"].is_null());
    assert_eq!(v["model"]["params"], {
        // embeddings (4096 + 16) x 64; one block: 2 LayerNorms, q/k/v/o with biases, 4x MLP;
        // the final LayerNorm.
        let d = 64;
        (4096 + 16) * d
            + 2 * 2 * d
            + 4 * (d * d + d)
            + (d * 4 * d + 4 * d)
            + (4 * d * d + d)
            + 2 * d
    });
}
