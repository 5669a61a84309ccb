//! Causal scaled-dot-product attention for multi-head, grouped-query and multi-query attention
//! (Ainslie et al. 2023), with an optional sliding window (Mistral).
//!
//! Grouped-query attention shares each key/value head among `n_rep = H_q / H_kv` query heads. The
//! textbook way copies K and V `n_rep` times (`repeat_kv`, kept below as the oracle); the fast path
//! instead folds the `n_rep` query heads of a group into the row axis, (B, H_kv, n_rep * T, D), so
//! one batched matmul per group reads K and V once.

use crate::{NnError, OpContext, Result};
use candle_core::{Device, Tensor, D};

/// The additive mask (T, S) for queries at positions `past..past + t` over keys `0..past + t`.
fn mask_values(t: usize, s: usize, window: Option<usize>) -> Vec<f32> {
    let past = s - t;
    let mut m = vec![0f32; t * s];
    for i in 0..t {
        let qpos = past + i;
        for j in 0..s {
            let visible = j <= qpos && window.is_none_or(|w| qpos - j < w);
            if !visible {
                m[i * s + j] = f32::NEG_INFINITY;
            }
        }
    }
    m
}

fn needs_mask(t: usize, s: usize, window: Option<usize>) -> bool {
    t > 1 || window.is_some_and(|w| s > w)
}

/// `q` (B, H_q, T, D) at positions `S - T ..S`; `k`, `v` (B, H_kv, S, D). Returns (B, H_q, T, D).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: Option<usize>,
) -> Result<Tensor> {
    let (b, hq, t, d) = q.dims4().op("attention q dims")?;
    let (_, hkv, s, _) = k.dims4().op("attention k dims")?;
    check_heads(hq, hkv, t, s)?;
    let n_rep = hq / hkv;
    let scale = 1.0 / (d as f64).sqrt();
    // (B, H_kv, n_rep * T, D): query heads h*n_rep..(h+1)*n_rep share kv head h.
    let q = q
        .contiguous()
        .op("attention q contiguous")?
        .reshape((b, hkv, n_rep * t, d))
        .op("gqa fold")?;
    let scores = (q.matmul(&k.t().op("k^T")?).op("q k^T")? * scale).op("scale")?; // (B, H_kv, n_rep*T, S)
    let scores = if needs_mask(t, s, window) {
        let m = Tensor::from_vec(mask_values(t, s, window), (1, t, s), &Device::Cpu)
            .op("mask")?
            .repeat((n_rep, 1, 1))
            .op("mask repeat")?
            .reshape((n_rep * t, s))
            .op("mask reshape")?
            .to_device(q.device())
            .op("mask device")?;
        scores.broadcast_add(&m).op("apply mask")?
    } else {
        scores
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores.contiguous().op("scores contiguous")?)
        .op("softmax")?;
    let out = probs
        .matmul(&v.contiguous().op("v contiguous")?)
        .op("probs v")?; // (B, H_kv, n_rep*T, D)
    out.reshape((b, hq, t, d)).op("gqa unfold")
}

fn check_heads(hq: usize, hkv: usize, t: usize, s: usize) -> Result<()> {
    if hkv == 0 || !hq.is_multiple_of(hkv) || s < t {
        return Err(NnError::Shape {
            op: "attention",
            expected: "H_q a multiple of H_kv and S >= T".into(),
            got: format!("H_q {hq}, H_kv {hkv}, T {t}, S {s}"),
        });
    }
    Ok(())
}

/// `x` (B, H_kv, S, D) -> (B, H_kv * n_rep, S, D), kv head `h` serving query heads
/// `h * n_rep .. (h + 1) * n_rep` (transformers' `repeat_kv`).
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, h, s, d) = x.dims4().op("repeat_kv dims")?;
    x.unsqueeze(2)
        .op("repeat_kv")?
        .expand((b, h, n_rep, s, d))
        .op("repeat_kv expand")?
        .contiguous()
        .op("repeat_kv copy")?
        .reshape((b, h * n_rep, s, d))
        .op("repeat_kv reshape")
}

/// The textbook composition, kept as the oracle for [`causal_attention`]: repeat K/V, full
/// scores, mask, softmax, weighted sum.
pub fn causal_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: Option<usize>,
) -> Result<Tensor> {
    let (_, hq, t, d) = q.dims4().op("attention q dims")?;
    let (_, hkv, s, _) = k.dims4().op("attention k dims")?;
    check_heads(hq, hkv, t, s)?;
    let k = repeat_kv(&k.contiguous().op("k")?, hq / hkv)?;
    let v = repeat_kv(&v.contiguous().op("v")?, hq / hkv)?;
    let scores = (q
        .contiguous()
        .op("q")?
        .matmul(&k.t().op("k^T")?)
        .op("q k^T")?
        / (d as f64).sqrt())
    .op("scale")?;
    let mask = Tensor::from_vec(mask_values(t, s, window), (t, s), q.device()).op("mask")?;
    let scores = scores.broadcast_add(&mask).op("mask")?;
    let probs = candle_nn::ops::softmax(&scores, D::Minus1).op("softmax")?;
    probs.matmul(&v).op("probs v")
}
