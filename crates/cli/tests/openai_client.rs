//! The official `openai` Python client (pinned, in a venv this test makes) against a running
//! `kiln serve`: it must work unchanged, streaming and not, for chat, completions, embeddings
//! (the client's default base64 encoding included) and its typed errors. What the client saw is
//! checked against the server's own raw HTTP answers.
//!
//! Needs python3 with venv and pip (PyPI reachable on first run; the venv is cached under
//! `$KILN_HOME/venvs`). Without them the test fails with the reason.

mod common;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

const OPENAI: &str = "openai==3.57.0";

fn venv() -> PathBuf {
    let home = std::env::var_os("KILN_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/kiln"));
    let dir = home.join("venvs").join(OPENAI.replace("==", "-"));
    let py = dir.join("bin/python");
    let ok = |p: &Path| {
        Command::new(p)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ok(&py) {
        let st = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&dir)
            .status()
            .expect("python3 is needed for this test");
        assert!(st.success(), "python3 -m venv {} failed", dir.display());
        let st = Command::new(dir.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", OPENAI])
            .status()
            .unwrap();
        assert!(st.success(), "pip install {OPENAI} failed");
        assert!(ok(&py), "the venv cannot import openai");
    }
    py
}

fn post(url: &str, path: &str, body: &Value) -> Value {
    let r = ureq::post(&format!("{url}{path}"))
        .send_string(&body.to_string())
        .unwrap();
    serde_json::from_str(&r.into_string().unwrap()).unwrap()
}

#[test]
fn the_openai_python_client_works_unchanged() {
    let py = venv();
    let server = common::start(&["--embedding-model", "minilm"]);
    let url = server.url.clone();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai/client_check.py");
    let out = Command::new(&py)
        .arg(&script)
        .arg(format!("{url}/v1"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "client script failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let saw: Value = serde_json::from_slice(&out.stdout).unwrap();

    assert_eq!(saw["models"], json!(["smollm2", "minilm"]));
    let q = json!([{"role": "user", "content": "What is the capital of France?"}]);
    let raw = post(
        &url,
        "/v1/chat/completions",
        &json!({"model": "smollm2", "messages": q, "max_tokens": 24, "temperature": 0}),
    );
    let want = raw["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(saw["chat"]["text"], want);
    assert_eq!(
        saw["chat"]["finish_reason"],
        raw["choices"][0]["finish_reason"]
    );
    let usage = &raw["usage"];
    assert_eq!(
        saw["chat"]["usage"],
        json!([
            usage["prompt_tokens"],
            usage["completion_tokens"],
            usage["total_tokens"]
        ])
    );
    assert_eq!(saw["chat_stream"]["text"], want);
    assert_eq!(saw["chat_stream"]["usage"], saw["chat"]["usage"]);
    assert!(saw["chat_stream"]["chunks"].as_u64().unwrap() > 3);
    let raw = post(
        &url,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(saw["completion"]["text"], raw["choices"][0]["text"]);
    assert_eq!(saw["completion_stream"], raw["choices"][0]["text"]);

    let raw = post(
        &url,
        "/v1/embeddings",
        &json!({"model": "minilm", "input": ["hello world", "kiln serves embeddings"]}),
    );
    for i in 0..2 {
        let a: Vec<f32> = saw["embeddings"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let b: Vec<f32> = raw["data"][i]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(a.len(), 384);
        assert_eq!(a, b, "embedding {i} through the client's base64 path");
    }
    assert_eq!(saw["embedding_float"], saw["embeddings"][0]);
    assert_eq!(saw["embedding_usage"], raw["usage"]["prompt_tokens"]);

    assert_eq!(saw["not_found"]["status"], 404, "{}", saw["not_found"]);
    assert!(saw["not_found"]["message"]
        .as_str()
        .unwrap()
        .contains("gpt-4o"));
    assert_eq!(saw["bad_request"]["status"], 400, "{}", saw["bad_request"]);
    assert!(saw["bad_request"]["message"]
        .as_str()
        .unwrap()
        .contains("temperature"));
}
