//! The one-token decode step (`Llama::decode_token`, a thread team over the block kernels)
//! against the tensor graph (`Llama::forward_graph`): bit-identical logits at every position,
//! for every team size, on quantized tiny models of each variant (grouped-query attention, q/k/v
//! biases, a sliding window shorter than the sequence, both rope layouts) and on SmolLM2's real
//! Q4_1 file; the caches the two paths leave behind are interchangeable; bad input gets the
//! graph's errors.

mod common;

use common::tiny;
use kiln_models::llama::Style;
use kiln_models::{Llama, ModelError};
use kiln_nn::candle_core::quantized::GgmlDType;
use kiln_nn::candle_core::{Device, Tensor};

fn graph_step(model: &Llama, id: u32, cache: &mut kiln_nn::KvCache) -> Vec<f32> {
    let pos = cache.len();
    let ids = Tensor::from_slice(&[id], (1, 1), &Device::Cpu).unwrap();
    let logits = model.forward_graph(&ids, pos, cache, &[]).unwrap();
    logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap()
}

fn in_team<R: Send>(members: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(members)
        .build()
        .unwrap()
        .install(f)
}

/// Asserts `got` and `want` are the same floats bit for bit, naming the first difference.
fn same_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!("{what}: logit {i} is {} instead of {}", got[i], want[i]);
    }
}

/// Prefills `prompt` on two caches through the graph, then decodes `tokens` one at a time: one
/// cache through the step (`forward`, which takes it for one token), one through the graph.
fn check_equal(model: &Llama, prompt: &[u32], tokens: &[u32], members: usize, what: &str) {
    in_team(members, || {
        let ids = Tensor::from_slice(prompt, (1, prompt.len()), &Device::Cpu).unwrap();
        let (mut fast, mut slow) = (model.new_cache(), model.new_cache());
        model.forward_graph(&ids, 0, &mut fast, &[]).unwrap();
        model.forward_graph(&ids, 0, &mut slow, &[]).unwrap();
        for (i, &t) in tokens.iter().enumerate() {
            let pos = fast.len();
            let got = model
                .decode_token(t, &mut fast)
                .unwrap()
                .expect("a quantized LLaMA-style model takes the one-token step");
            let want = graph_step(model, t, &mut slow);
            assert_eq!(fast.len(), pos + 1);
            same_bits(
                &got,
                &want,
                &format!("{what}: token {i} (position {pos}), team of {members}"),
            );
        }
    });
}

fn tokens(n: usize, mul: u32, add: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * mul + add) % 97).collect()
}

#[test]
fn the_step_equals_the_graph_on_every_variant_and_team_size() {
    let variants = [
        ("llama gqa", tiny(Style::Llama, None, false)),
        ("qwen2-style q/k/v bias", tiny(Style::Llama, None, true)),
        ("sliding window 5 + bias", tiny(Style::Llama, Some(5), true)),
    ];
    for (name, dense) in &variants {
        assert!(
            dense
                .decode_token(1, &mut dense.new_cache())
                .unwrap()
                .is_none(),
            "{name}: dense f32 weights decode through the graph"
        );
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::Q4_0] {
            let model = dense.quantize(dtype).unwrap();
            for members in [1, 2, 3] {
                check_equal(
                    &model,
                    &tokens(4, 7, 3),
                    &tokens(24, 11, 5),
                    members,
                    &format!("{name} {dtype:?}"),
                );
            }
        }
    }
}

#[test]
fn gpt2_style_models_decode_through_the_graph() {
    let model = tiny(Style::Gpt2, None, false)
        .quantize(GgmlDType::Q8_0)
        .unwrap();
    assert!(model
        .decode_token(1, &mut model.new_cache())
        .unwrap()
        .is_none());
}

#[test]
fn steps_and_graph_calls_share_one_cache() {
    // Alternating the two paths on one cache gives what the graph alone gives: each leaves the
    // cache exactly as the other expects it.
    let model = tiny(Style::Llama, Some(6), true)
        .quantize(GgmlDType::Q8_0)
        .unwrap();
    let seq = tokens(30, 5, 2);
    in_team(2, || {
        let (mut mixed, mut graph) = (model.new_cache(), model.new_cache());
        let prompt = Tensor::from_slice(&seq[..3], (1, 3), &Device::Cpu).unwrap();
        model.forward_graph(&prompt, 0, &mut mixed, &[]).unwrap();
        model.forward_graph(&prompt, 0, &mut graph, &[]).unwrap();
        for (i, &t) in seq.iter().enumerate().skip(3) {
            let want = graph_step(&model, t, &mut graph);
            let got = if i % 3 == 0 {
                graph_step(&model, t, &mut mixed)
            } else {
                let ids = Tensor::from_slice(&[t], (1, 1), &Device::Cpu).unwrap();
                let pos = mixed.len();
                model
                    .forward(&ids, pos, &mut mixed)
                    .unwrap()
                    .squeeze(0)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            same_bits(&got, &want, &format!("position {i}"));
        }
        // A chunk of several tokens after single steps (the graph reads what the steps wrote).
        let more = tokens(5, 3, 1);
        let ids = Tensor::from_slice(&more, (1, 5), &Device::Cpu).unwrap();
        let (pm, pg) = (mixed.len(), graph.len());
        let a = model.forward(&ids, pm, &mut mixed).unwrap();
        let b = model.forward(&ids, pg, &mut graph).unwrap();
        same_bits(
            &a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "a 5-token chunk after mixed steps",
        );
    });
}

#[test]
fn the_step_rejects_what_the_graph_rejects() {
    let model = tiny(Style::Llama, None, false)
        .quantize(GgmlDType::Q8_0)
        .unwrap();
    in_team(2, || {
        let mut cache = model.new_cache();
        match model.decode_token(97, &mut cache) {
            Err(ModelError::TokenOutOfRange { id: 97, vocab: 97 }) => {}
            other => panic!("token 97 of 97: {other:?}"),
        }
        assert_eq!(cache.len(), 0, "a refused token leaves the cache alone");
        for t in 0..64 {
            model.decode_token(t % 97, &mut cache).unwrap().unwrap();
        }
        match model.decode_token(1, &mut cache) {
            Err(ModelError::ContextOverflow {
                needed: 65,
                max: 64,
            }) => {}
            other => panic!("position 64 of 64: {other:?}"),
        }
        let ids = Tensor::from_slice(&[1u32], (1, 1), &Device::Cpu).unwrap();
        let e = model.forward(&ids, 3, &mut cache).unwrap_err();
        assert!(matches!(e, ModelError::CacheMismatch { .. }), "{e}");
    });
}

#[test]
fn smollm2_q4_1_step_equals_the_graph() {
    let path = kiln_assets::ensure("smollm2").unwrap();
    let model = Llama::load(&path).unwrap();
    // A chat-like prompt, then tokens of ordinary text.
    let prompt = [1u32, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365];
    let next = [
        504u32, 3458, 282, 4649, 314, 2114, 28, 357, 1186, 4326, 30, 216,
    ];
    for members in [1, 2] {
        check_equal(&model, &prompt, &next, members, "SmolLM2 Q4_1");
    }
}
