//! The continuous-batching forward pass (`Llama::forward_paged`, ragged rows over a paged KV pool)
//! against the plain per-sequence forward with its own contiguous KV cache: the same logits for
//! every sequence, whatever else shares its step, however its prompt is chunked and wherever its
//! blocks lie in the pool.

mod common;

use common::tiny;
use kiln_models::{Llama, PagedStep};

fn solo_logits(model: &Llama, tokens: &[u32]) -> Vec<Vec<f32>> {
    // Logits after each prefix length from 3 on: prefill 3 tokens, then one at a time.
    let mut cache = model.new_cache();
    let mut out = vec![model.logits_last(&tokens[..3], 0, &mut cache).unwrap()];
    for (i, &t) in tokens.iter().enumerate().skip(3) {
        out.push(model.logits_last(&[t], i, &mut cache).unwrap());
    }
    out
}

fn close(a: &[f32], b: &[f32], what: &str) {
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "{what}: max abs diff {worst}");
}

fn check(model: &Llama) {
    let seqs: Vec<Vec<u32>> = vec![
        (0..20).map(|i| (i * 7 + 3) % 97).collect(),
        (0..13).map(|i| (i * 11 + 5) % 97).collect(),
        (0..17).map(|i| (i * 5 + 1) % 97).collect(),
    ];
    let want: Vec<Vec<Vec<f32>>> = seqs.iter().map(|s| solo_logits(model, s)).collect();
    let bs = 4;
    let mut cache = model.new_paged_cache(bs, 40).unwrap();
    // Scattered, interleaved block tables.
    let tables: Vec<Vec<u32>> = vec![
        vec![39, 0, 17, 5, 22],
        vec![3, 30, 8, 1],
        vec![12, 2, 33, 9, 25],
    ];
    // Sequence 0 and 1 prefill 3 tokens together; sequence 2 joins later with a chunked prefill
    // (5 then 4 tokens) while the others decode.
    let mut fed = [0usize; 3];
    let mut plan: Vec<Vec<(usize, usize)>> = vec![vec![(0, 3), (1, 3)]];
    plan.push(vec![(0, 1), (1, 1), (2, 5)]);
    plan.push(vec![(2, 4), (0, 1), (1, 1)]);
    for _ in 0..20 {
        plan.push(vec![(1, 1), (2, 1), (0, 1)]);
    }
    for step in plan {
        let steps: Vec<(usize, usize)> = step
            .into_iter()
            .filter(|&(s, n)| fed[s] + n <= seqs[s].len())
            .collect();
        if steps.is_empty() {
            continue;
        }
        let inputs: Vec<PagedStep> = steps
            .iter()
            .map(|&(s, n)| PagedStep {
                tokens: &seqs[s][fed[s]..fed[s] + n],
                start: fed[s],
                blocks: &tables[s],
            })
            .collect();
        let logits = model.forward_paged(&inputs, &mut cache).unwrap();
        let logits = logits.to_vec2::<f32>().unwrap();
        for (&(s, n), got) in steps.iter().zip(&logits) {
            fed[s] += n;
            if fed[s] >= 3 {
                close(
                    got,
                    &want[s][fed[s] - 3],
                    &format!("sequence {s} at length {}", fed[s]),
                );
            }
        }
    }
    assert!(fed.iter().zip(&seqs).all(|(&f, s)| f == s.len()), "{fed:?}");
}

#[test]
fn paged_forward_equals_per_sequence_forward_llama_gqa() {
    check(&tiny(kiln_models::llama::Style::Llama, None, false));
}

#[test]
fn paged_forward_equals_per_sequence_forward_sliding_window_and_bias() {
    check(&tiny(kiln_models::llama::Style::Llama, Some(5), true));
}

#[test]
fn paged_forward_equals_per_sequence_forward_gpt2() {
    check(&tiny(kiln_models::llama::Style::Gpt2, None, false));
}

#[test]
fn paged_forward_rejects_bad_steps() {
    let model = tiny(kiln_models::llama::Style::Llama, None, false);
    let mut cache = model.new_paged_cache(4, 4).unwrap();
    let err = |steps: &[PagedStep], cache: &mut _| {
        model.forward_paged(steps, cache).unwrap_err().to_string()
    };
    assert!(err(&[], &mut cache).contains("at least one token"));
    let e = err(
        &[PagedStep {
            tokens: &[1, 2, 3, 4, 5],
            start: 0,
            blocks: &[0],
        }],
        &mut cache,
    );
    assert!(e.contains("blocks"), "{e}");
    let e = err(
        &[PagedStep {
            tokens: &[500],
            start: 0,
            blocks: &[0],
        }],
        &mut cache,
    );
    assert!(e.contains("500"), "{e}");
    let e = err(
        &[PagedStep {
            tokens: &[1],
            start: 64,
            blocks: &[0],
        }],
        &mut cache,
    );
    assert!(e.contains("65"), "{e}");
    let mut wrong = kiln_nn::PagedKvCache::new(3, 2, 8, 4, 4).unwrap();
    let e = err(
        &[PagedStep {
            tokens: &[1],
            start: 0,
            blocks: &[0],
        }],
        &mut wrong,
    );
    assert!(e.contains("layers"), "{e}");
}
