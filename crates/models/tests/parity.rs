//! Logits parity with Hugging Face transformers, from fixtures written by
//! `tests/fixtures/make_fixtures.py` (transformers 5.x, torch 2.x, f32 eager attention).
//!
//! Tolerances, per weight format:
//! - f32 compute over bf16/f16-stored random weights (exactly representable in f32):
//!   |kiln - hf| <= 1e-5 + 1e-5 * |hf| on every last-position logit (measured: 2e-7); greedy
//!   tokens all equal.
//! - SmolLM2 with Q4_1 weights dequantized to f32 (both sides): |diff| <= 2e-4 on the top-20
//!   logits (measured: 2.3e-5; 30 layers of f32 sums in a different order); top-20 ids equal;
//!   16 greedy tokens equal.
//! - SmolLM2 with Q4_1 weights kept quantized (activations quantized to 8 bits by the kernels):
//!   same top-1, top-5 sets sharing at least 4 ids, |diff| <= 0.75 on the reference top-20 logits
//!   (measured: 0.39 and 0.18), and the first 4 greedy tokens equal (measured: 5 and 12 of 16).
//!   The bound leaves room for candle's other SIMD paths on other CPUs.

use kiln_models::llama::Llama;
use kiln_nn::candle_core::{Device, Tensor};
use kiln_nn::{RopeLayout, RopeScaling, RotaryEmbedding};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Greedy decoding through the KV cache: prefill once, then one token per step.
fn greedy(model: &Llama, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = model.new_cache();
    let mut logits = model.logits_last(prompt, 0, &mut cache).unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let next = argmax(&logits);
        out.push(next);
        if out.len() == n {
            break;
        }
        logits = model.logits_last(&[next], cache.len(), &mut cache).unwrap();
    }
    out
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

fn check_random(name: &str) {
    let dir = fixtures().join("random").join(name);
    let exp = json(&dir.join("expected.json"));
    let model = Llama::load(&dir).unwrap();
    let prompt = ids(&exp["prompt"]);
    let want = floats(&exp["last_logits"]);
    let mut cache = model.new_cache();
    let got = model.logits_last(&prompt, 0, &mut cache).unwrap();
    assert_eq!(got.len(), want.len());
    let mut worst = 0f32;
    for (g, w) in got.iter().zip(&want) {
        let d = (g - w).abs();
        worst = worst.max(d);
        assert!(
            d <= 1e-5 + 1e-5 * w.abs(),
            "{name}: logit {g} vs transformers {w}"
        );
    }
    eprintln!("{name}: max |diff| {worst:e}");
    assert_eq!(
        greedy(&model, &prompt, 8),
        ids(&exp["greedy"]),
        "{name}: greedy continuation"
    );
}

#[test]
fn random_llama_gqa_llama3_rope_matches_transformers() {
    check_random("llama");
}

#[test]
fn random_qwen2_mqa_bias_tied_matches_transformers() {
    check_random("qwen2");
}

#[test]
fn random_mistral_sliding_window_matches_transformers() {
    check_random("mistral");
}

/// The whole prompt in one pass equals feeding it a few tokens at a time through the cache.
#[test]
fn chunked_prefill_equals_one_pass() {
    for name in ["llama", "qwen2", "mistral"] {
        let dir = fixtures().join("random").join(name);
        let model = Llama::load(&dir).unwrap();
        let prompt = ids(&json(&dir.join("expected.json"))["prompt"]);
        let all = Tensor::from_slice(&prompt, (1, prompt.len()), &Device::Cpu).unwrap();
        let full = model
            .forward_all(&all, 0, &mut model.new_cache())
            .unwrap()
            .squeeze(0)
            .unwrap();
        let full: Vec<Vec<f32>> = full.to_vec2().unwrap();
        let mut cache = model.new_cache();
        let mut pos = 0;
        for chunk in prompt.chunks(5) {
            let t = Tensor::from_slice(chunk, (1, chunk.len()), &Device::Cpu).unwrap();
            let part: Vec<Vec<f32>> = model
                .forward_all(&t, pos, &mut cache)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2()
                .unwrap();
            for (i, row) in part.iter().enumerate() {
                for (a, b) in row.iter().zip(&full[pos + i]) {
                    assert!(
                        (a - b).abs() <= 1e-4 + 1e-4 * b.abs(),
                        "{name} pos {}: {a} vs {b}",
                        pos + i
                    );
                }
            }
            pos += chunk.len();
        }
    }
}

/// Two identical sequences in one batch give the same logits as one alone.
#[test]
fn batch_rows_are_independent() {
    let dir = fixtures().join("random").join("llama");
    let model = Llama::load(&dir).unwrap();
    let a: Vec<u32> = vec![1, 17, 200, 45, 3];
    let b: Vec<u32> = vec![9, 8, 7, 6, 5];
    let both = Tensor::from_slice(&[a.clone(), b.clone()].concat(), (2, 5), &Device::Cpu).unwrap();
    let lb: Vec<Vec<f32>> = model
        .forward(&both, 0, &mut model.new_cache())
        .unwrap()
        .to_vec2()
        .unwrap();
    for (row, seq) in lb.iter().zip([&a, &b]) {
        let single = model.logits_last(seq, 0, &mut model.new_cache()).unwrap();
        for (x, y) in row.iter().zip(&single) {
            assert!((x - y).abs() <= 1e-5 + 1e-5 * y.abs());
        }
    }
}

#[test]
fn rope_scaling_matches_transformers() {
    let cases = json(&fixtures().join("rope_cases.json"));
    for c in cases.as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let hf: kiln_models::llama::HfConfig = serde_json::from_value(serde_json::json!({
            "model_type": "llama", "vocab_size": 8, "hidden_size": 128, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": c["max_position_embeddings"],
            "rope_theta": c["rope_theta"], "rope_scaling": c["rope_scaling"],
        }))
        .unwrap();
        let cfg = kiln_models::Config::try_from(&hf).unwrap();
        let rope = RotaryEmbedding::new(
            64,
            cfg.rope_theta,
            cfg.rope_scaling.clone(),
            RopeLayout::HalfSplit,
        )
        .unwrap();
        let want = floats(&c["inv_freq"]);
        let got: Vec<f32> = match (&cfg.rope_scaling, c["seq_len"].as_u64()) {
            // Dynamic NTK changes the frequencies once positions pass the window: recover them
            // from the angle table at position 1 of a call reaching `seq_len`.
            (RopeScaling::DynamicNtk { .. }, Some(seq_len)) => {
                let seq_len = seq_len as usize;
                let (cos, sin) = rope.cos_sin(seq_len - 2, 2, &Device::Cpu).unwrap();
                let (c1, s1): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
                    (cos.to_vec2().unwrap(), sin.to_vec2().unwrap());
                let (c0, s0) = (&c1[0], &s1[0]);
                (0..32)
                    .map(|i| {
                        // angle difference between consecutive positions = inv_freq
                        let a1 = s1[1][i].atan2(c1[1][i]);
                        let a0 = s0[i].atan2(c0[i]);
                        let mut d = a1 - a0;
                        while d < 0.0 {
                            d += 2.0 * std::f32::consts::PI;
                        }
                        d
                    })
                    .collect()
            }
            _ => rope.inv_freq().to_vec(),
        };
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 2e-6 + 2e-5 * w.abs(),
                "{name} inv_freq[{i}]: {g} vs {w}"
            );
        }
        let s = c["attention_scaling"].as_f64().unwrap() as f32;
        assert!(
            (rope.attention_scaling() - s).abs() < 1e-6,
            "{name}: attention scaling {} vs {s}",
            rope.attention_scaling()
        );
    }
}

fn smollm2() -> PathBuf {
    kiln_assets::ensure("smollm2").unwrap()
}

#[test]
fn smollm2_dequantized_matches_transformers() {
    let exp = json(&fixtures().join("smollm2.json"));
    let model = Llama::load_gguf_with(&smollm2(), true).unwrap();
    for case in exp["cases"].as_array().unwrap() {
        let prompt = ids(&case["prompt"]);
        let logits = model
            .logits_last(&prompt, 0, &mut model.new_cache())
            .unwrap();
        let top_ids = ids(&case["top_ids"]);
        let top = floats(&case["top_logits"]);
        let mut worst = 0f32;
        for (id, w) in top_ids.iter().zip(&top) {
            worst = worst.max((logits[*id as usize] - w).abs());
        }
        eprintln!("smollm2 f32: max |diff| on top-20 {worst:e}");
        assert!(worst <= 2e-4, "max |diff| {worst}");
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
        assert_eq!(&order[..20], &top_ids[..], "top-20 ids");
        assert_eq!(greedy(&model, &prompt, 16), ids(&case["greedy"]));
    }
}

#[test]
fn smollm2_quantized_is_close_to_transformers() {
    let exp = json(&fixtures().join("smollm2.json"));
    let model = Llama::load(&smollm2()).unwrap();
    for case in exp["cases"].as_array().unwrap() {
        let prompt = ids(&case["prompt"]);
        let logits = model
            .logits_last(&prompt, 0, &mut model.new_cache())
            .unwrap();
        let top_ids = ids(&case["top_ids"]);
        let top = floats(&case["top_logits"]);
        let mut worst = 0f32;
        for (id, w) in top_ids.iter().zip(&top) {
            worst = worst.max((logits[*id as usize] - w).abs());
        }
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
        let shared = order[..5]
            .iter()
            .filter(|i| top_ids[..5].contains(i))
            .count();
        let g = greedy(&model, &prompt, 16);
        let want = ids(&case["greedy"]);
        let same = g.iter().zip(&want).take_while(|(a, b)| a == b).count();
        eprintln!("smollm2 q4_1: max |diff| on top-20 {worst:.4}, top-5 shared {shared}, greedy prefix {same}/16");
        assert_eq!(order[0], top_ids[0], "top-1");
        assert!(shared >= 4, "top-5 shares only {shared}");
        assert!(worst <= 0.75, "max |diff| {worst}");
        assert!(same >= 4, "greedy prefix {same}: {g:?} vs {want:?}");
    }
}
