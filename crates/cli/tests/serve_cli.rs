//! `kiln serve` as a real process on loopback, with SmolLM2 (the `smollm2` asset) and MiniLM
//! (`minilm`): greedy output equals `kiln generate`'s, also while other requests of different
//! lengths share the batch; streaming equals non-streaming; stop strings, `n`, usage counts;
//! embeddings against the sentence-transformers fixture; every kind of bad request gets an
//! OpenAI-shaped 4xx while the server keeps serving; a disconnected client frees its KV blocks;
//! the queue limit answers 429; and a soak of mixed good and bad requests.

mod common;

use common::start;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// One server for the tests that do not need special limits. It is started from a thread that
/// lives as long as the test process, so the parent-death signal fires only when the tests end.
fn shared() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let s = start(&["--embedding-model", "minilm"]);
            tx.send(s.url.clone()).unwrap();
            loop {
                std::thread::park();
            }
        });
        rx.recv().expect("the shared server starts")
    })
}

fn post(url: &str, path: &str, body: &Value) -> (u16, Value) {
    post_raw(url, path, body.to_string().as_bytes())
}

fn post_raw(url: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let r = ureq::post(&format!("{url}{path}"))
        .set("Content-Type", "application/json")
        .timeout(Duration::from_secs(120))
        .send_bytes(body);
    let (code, resp) = match r {
        Ok(r) => (r.status(), r),
        Err(ureq::Error::Status(code, r)) => (code, r),
        Err(e) => panic!("{path}: {e}"),
    };
    let text = resp.into_string().unwrap();
    (
        code,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")),
    )
}

fn get(url: &str, path: &str) -> String {
    ureq::get(&format!("{url}{path}"))
        .call()
        .unwrap()
        .into_string()
        .unwrap()
}

/// `kiln generate`'s greedy continuation.
fn generate(prompt: &str, max_tokens: usize, chat: bool) -> String {
    let mut args = vec![
        "generate",
        "-m",
        "smollm2",
        "-p",
        prompt,
        "--temperature",
        "0",
        "--json",
    ];
    let n = max_tokens.to_string();
    args.extend(["--max-tokens", &n]);
    if chat {
        args.push("--chat");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["text"].as_str().unwrap().to_string()
}

fn completion(url: &str, prompt: &str, max_tokens: usize) -> Value {
    let (code, v) = post(
        url,
        "/v1/completions",
        &json!({
            "model": "smollm2", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        }),
    );
    assert_eq!(code, 200, "{v}");
    v
}

/// Reads an SSE response: the `data:` payloads in order.
fn stream(url: &str, path: &str, body: &Value) -> Vec<String> {
    let r = ureq::post(&format!("{url}{path}"))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .unwrap();
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    BufReader::new(r.into_reader())
        .lines()
        .map(Result::unwrap)
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

fn assert_error(code: u16, v: &Value, want: u16, needle: &str) {
    assert_eq!(code, want, "{v}");
    let msg = v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.message in {v}"));
    assert!(v["error"]["type"].is_string(), "{v}");
    assert!(msg.contains(needle), "expected {needle:?} in {msg:?}");
}

const PROMPTS: [&str; 3] = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):",
];

#[test]
fn greedy_output_equals_kiln_generate_even_in_a_shared_batch() {
    let url = shared();
    let want: Vec<String> = PROMPTS.iter().map(|p| generate(p, 24, false)).collect();
    // Alone.
    for (p, w) in PROMPTS.iter().zip(&want) {
        let v = completion(url, p, 24);
        assert_eq!(v["choices"][0]["text"].as_str().unwrap(), w, "{p}");
    }
    // All at once, plus a long-running neighbour that joins in the middle.
    std::thread::scope(|s| {
        let noise = s.spawn(|| completion(url, "Write a long story about a dragon.", 60));
        let handles: Vec<_> = PROMPTS
            .iter()
            .map(|p| s.spawn(move || completion(url, p, 24)))
            .collect();
        for ((h, w), p) in handles.into_iter().zip(&want).zip(PROMPTS) {
            let v = h.join().unwrap();
            assert_eq!(
                v["choices"][0]["text"].as_str().unwrap(),
                w,
                "{p} in a batch"
            );
            assert_eq!(v["choices"][0]["finish_reason"], "length");
            assert_eq!(v["usage"]["completion_tokens"], 24);
        }
        noise.join().unwrap();
    });
    // Chat: the same template and stop tokens as `kiln generate --chat`.
    let q = "What is the capital of France?";
    let want = generate(q, 40, true);
    let (code, v) = post(
        url,
        "/v1/chat/completions",
        &json!({
            "model": "smollm2", "messages": [{"role": "user", "content": q}], "max_tokens": 40, "temperature": 0,
        }),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v["choices"][0]["message"]["content"].as_str().unwrap(),
        want
    );
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["object"], "chat.completion");
}

#[test]
fn streaming_equals_whole_and_ends_with_done() {
    let url = shared();
    let body = json!({
        "model": "smollm2", "messages": [{"role": "user", "content": "Name three colors."}],
        "max_tokens": 30, "temperature": 0,
    });
    let (code, whole) = post(url, "/v1/chat/completions", &body);
    assert_eq!(code, 200);
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let events = stream(url, "/v1/chat/completions", &sbody);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert!(chunks.len() > 5, "streamed in pieces");
    let finish: Vec<&Value> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finish.len(), 1);
    assert_eq!(
        finish[0]["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage, &whole["usage"]);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
}

#[test]
fn stop_strings_n_and_seeds() {
    let url = shared();
    let p = PROMPTS[1];
    let full = completion(url, p, 24)["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    // Stop at the third word of the greedy continuation.
    let word = full.split_whitespace().nth(2).unwrap().to_string();
    let cut = full.find(&word).unwrap();
    let (code, v) = post(
        url,
        "/v1/completions",
        &json!({
            "model": "smollm2", "prompt": p, "max_tokens": 24, "temperature": 0, "stop": [word],
        }),
    );
    assert_eq!(code, 200);
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), &full[..cut]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // n = 3 sampled choices with one seed: reproducible, numbered, counted.
    let body = json!({"model": "smollm2", "prompt": p, "max_tokens": 12, "temperature": 0.9, "n": 3, "seed": 42});
    let (_, a) = post(url, "/v1/completions", &body);
    let (_, b) = post(url, "/v1/completions", &body);
    assert_eq!(a["choices"], b["choices"]);
    let texts: Vec<&str> = a["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), 3);
    assert!(
        texts[0] != texts[1] || texts[1] != texts[2],
        "different seeds per choice: {texts:?}"
    );
    for (i, c) in a["choices"].as_array().unwrap().iter().enumerate() {
        assert_eq!(c["index"], i);
    }
    let prompt_tokens = a["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 0 && prompt_tokens % 3 == 0);
    assert_eq!(a["usage"]["completion_tokens"], 36);
}

#[test]
fn embeddings_match_sentence_transformers() {
    let url = shared();
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../engine/tests/fixtures/minilm/embeddings.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let cases = fx["cases"]
        .as_array()
        .unwrap_or_else(|| panic!("fixture layout: {}", &fx.to_string()[..200]));
    let texts: Vec<&str> = cases
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .filter(|t| !t.is_empty())
        .take(4)
        .collect();
    let (code, v) = post(
        url,
        "/v1/embeddings",
        &json!({"model": "minilm", "input": texts}),
    );
    assert_eq!(code, 200, "{v}");
    let (_, b64) = post(
        url,
        "/v1/embeddings",
        &json!({"model": "minilm", "input": texts, "encoding_format": "base64"}),
    );
    for (i, t) in texts.iter().enumerate() {
        let want: Vec<f64> = cases.iter().find(|c| c["text"] == *t).unwrap()["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let got: Vec<f64> = v["data"][i]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(got.len(), 384);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-5, "{t:?}: max abs diff {worst}");
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64["data"][i]["embedding"].as_str().unwrap())
            .unwrap();
        let floats: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        // The JSON floats are the same f32 values (serde_json may parse one ULP off in f64).
        assert_eq!(floats, got.iter().map(|&x| x as f32).collect::<Vec<_>>());
    }
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > texts.len() as u64);
}

#[test]
fn bad_requests_get_clear_openai_errors() {
    let url = shared();
    let chat = |extra: Value| {
        let mut b = json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        post(url, "/v1/chat/completions", &b)
    };
    let (c, v) = post_raw(
        url,
        "/v1/chat/completions",
        b"{\"model\": \"smollm2\", \"messages\": [",
    );
    assert_error(c, &v, 400, "not valid JSON");
    let (c, v) = post_raw(
        url,
        "/v1/chat/completions",
        b"{\"model\": \"smollm2\", \"messages\": \"\xff\xfe\"}",
    );
    assert_error(c, &v, 400, "UTF-8");
    let (c, v) = post_raw(url, "/v1/chat/completions", b"[1, 2]");
    assert_error(c, &v, 400, "JSON object");
    let (c, v) = chat(json!({"model": "gpt-4"}));
    assert_error(c, &v, 404, "gpt-4");
    assert_eq!(v["error"]["code"], "model_not_found");
    let (c, v) = chat(json!({"model": "minilm"}));
    assert_error(c, &v, 400, "embedding model");
    let (c, v) = chat(json!({"messages": []}));
    assert_error(c, &v, 400, "'messages' is empty");
    let (c, v) = chat(json!({"messages": [{"role": "user", "content": ""}]}));
    assert_error(c, &v, 400, "empty");
    let (c, v) = chat(json!({"messages": [{"role": "wizard", "content": "x"}]}));
    assert_error(c, &v, 400, "wizard");
    let (c, v) = chat(json!({"temperature": "hot"}));
    assert_error(c, &v, 400, "'temperature' must be a number");
    let (c, v) = chat(json!({"temperature": -1}));
    assert_error(c, &v, 400, "temperature");
    let (c, v) = chat(json!({"top_p": 7}));
    assert_error(c, &v, 400, "top_p");
    let (c, v) = chat(json!({"max_tokens": 100000000}));
    assert_error(c, &v, 400, "max_tokens");
    let (c, v) = chat(json!({"max_tokens": -5}));
    assert_error(c, &v, 400, "max_tokens");
    let (c, v) = chat(json!({"n": 1000}));
    assert_error(c, &v, 400, "'n'");
    let (c, v) = chat(json!({"stop": [1, 2]}));
    assert_error(c, &v, 400, "stop");
    let (c, v) = post(
        url,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": [1, 2, 3]}),
    );
    assert_error(c, &v, 400, "token ids");
    // A prompt over the server's prompt limit (4096 tokens by default).
    let long = "lorem ipsum ".repeat(5000);
    let (c, v) = post(
        url,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": long}),
    );
    assert_error(c, &v, 400, "tokens");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    // A body over the 1 MiB limit.
    let huge = json!({"model": "smollm2", "prompt": "x".repeat(2 << 20)});
    let (c, v) = post(url, "/v1/completions", &huge);
    assert_error(c, &v, 413, "limit");
    let (c, v) = post(
        url,
        "/v1/embeddings",
        &json!({"model": "minilm", "input": ["ok", ""]}),
    );
    assert_error(c, &v, 400, "input[1]");
    let (c, v) = post(
        url,
        "/v1/embeddings",
        &json!({"model": "smollm2", "input": "x"}),
    );
    assert_error(c, &v, 400, "generative");
    let r = ureq::get(&format!("{url}/v2/nothing")).call();
    assert!(matches!(r, Err(ureq::Error::Status(404, _))));
    // Still serving.
    assert_eq!(completion(url, "Hello", 3)["usage"]["completion_tokens"], 3);
}

#[test]
fn models_health_and_metrics() {
    let url = shared();
    let m: Value = serde_json::from_str(&get(url, "/v1/models")).unwrap();
    let ids: Vec<&str> = m["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["smollm2", "minilm"]);
    let h: Value = serde_json::from_str(&get(url, "/health")).unwrap();
    assert_eq!(h["status"], "ok");
    completion(url, "Hi", 2);
    let text = get(url, "/metrics");
    for name in [
        "kiln_requests_total{endpoint=\"/v1/completions\",status=\"200\"}",
        "kiln_queue_depth",
        "kiln_time_to_first_token_seconds_bucket",
        "kiln_time_to_first_token_seconds_count",
        "kiln_tokens_per_second",
        "kiln_completion_tokens_total",
        "kiln_kv_blocks_in_use",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
}

fn metric(url: &str, name: &str) -> f64 {
    get(url, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

#[test]
fn a_client_that_disconnects_frees_its_blocks() {
    let s = start(&["--no-prefix-cache"]);
    let r = ureq::post(&format!("{}/v1/completions", s.url))
        .set("Content-Type", "application/json")
        .send_string(&json!({"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 2000, "temperature": 0, "stream": true}).to_string())
        .unwrap();
    let mut reader = BufReader::new(r.into_reader());
    let mut line = String::new();
    for _ in 0..6 {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    assert!(metric(&s.url, "kiln_running_sequences ") >= 1.0);
    drop(reader); // the client goes away mid-stream
    let t0 = Instant::now();
    while metric(&s.url, "kiln_running_sequences ") > 0.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the request was not cancelled"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(metric(&s.url, "kiln_kv_blocks_in_use "), 0.0);
    assert!(metric(&s.url, "kiln_generated_tokens_total ") < 1000.0);
}

#[test]
fn a_full_queue_answers_429_and_everyone_else_completes() {
    let s = start(&["--max-running", "1", "--max-queued", "1"]);
    let url = s.url.as_str();
    let results: Vec<(u16, Value)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..5)
            .map(|i| {
                sc.spawn(move || {
                    post(url, "/v1/completions", &json!({"model": "smollm2", "prompt": format!("Count to {i}:"), "max_tokens": 20, "temperature": 0, "ignore_eos": true}))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let busy = results.iter().filter(|(c, _)| *c == 429).count();
    let ok = results.iter().filter(|(c, _)| *c == 200).count();
    assert!(busy >= 1, "{results:?}");
    assert_eq!(busy + ok, 5, "{results:?}");
    for (c, v) in &results {
        if *c == 429 {
            assert_eq!(v["error"]["type"], "rate_limit_error");
        } else {
            assert_eq!(v["usage"]["completion_tokens"], 20);
        }
    }
}

/// Good and bad requests from 8 clients for a bounded time: every good one completes.
#[test]
fn soak_mixed_good_and_bad_requests() {
    let url = shared();
    let deadline = Instant::now() + Duration::from_secs(12);
    let bad_bodies: Vec<Vec<u8>> = vec![
        b"{oops".to_vec(),
        b"\xff\xff".to_vec(),
        json!({"model": "nope", "prompt": "x"})
            .to_string()
            .into_bytes(),
        json!({"model": "smollm2", "prompt": "x", "temperature": 1e9})
            .to_string()
            .into_bytes(),
        json!({"model": "smollm2", "messages": [{"role": "user"}]})
            .to_string()
            .into_bytes(),
    ];
    let (good, bad) = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..8)
            .map(|c| {
                let bad_bodies = &bad_bodies;
                sc.spawn(move || {
                    let (mut good, mut bad) = (0, 0);
                    let mut k = c;
                    while Instant::now() < deadline {
                        k += 1;
                        if k % 2 == 0 {
                            let b = &bad_bodies[k % bad_bodies.len()];
                            let path = if k % 3 == 0 { "/v1/chat/completions" } else { "/v1/completions" };
                            let (code, v) = post_raw(url, path, b);
                            assert!((400..500).contains(&code), "{code} {v}");
                            assert!(v["error"]["message"].is_string());
                            bad += 1;
                        } else if k % 3 == 0 {
                            let events = stream(url, "/v1/chat/completions", &json!({"model": "smollm2", "messages": [{"role": "user", "content": format!("Say {k}")}], "max_tokens": 8, "stream": true}));
                            assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
                            good += 1;
                        } else {
                            let (code, v) = post(url, "/v1/completions", &json!({"model": "smollm2", "prompt": format!("Number {k}:"), "max_tokens": 6, "ignore_eos": true}));
                            assert_eq!(code, 200, "{v}");
                            assert_eq!(v["usage"]["completion_tokens"], 6);
                            good += 1;
                        }
                    }
                    (good, bad)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    });
    assert!(good >= 8 && bad >= 8, "good {good}, bad {bad}");
    let h: Value = serde_json::from_str(&get(url, "/health")).unwrap();
    assert_eq!(h["status"], "ok");
}

#[test]
fn a_request_past_the_timeout_gets_504_and_the_server_goes_on() {
    let s = start(&["--request-timeout", "1"]);
    let t0 = Instant::now();
    let (code, v) = post(
        &s.url,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": "Count:", "max_tokens": 2000, "ignore_eos": true}),
    );
    assert_error(code, &v, 504, "timeout");
    assert!(t0.elapsed() < Duration::from_secs(30));
    // Streaming: an error event, then [DONE].
    let events = stream(
        &s.url,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": "Count:", "max_tokens": 2000, "ignore_eos": true, "stream": true}),
    );
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let err: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(err["error"]["code"], "timeout", "{err}");
    assert_eq!(
        completion(&s.url, "Hello", 3)["usage"]["completion_tokens"],
        3
    );
}
