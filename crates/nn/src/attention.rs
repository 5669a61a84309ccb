//! Causal scaled-dot-product attention for multi-head, grouped-query and multi-query attention
//! (Ainslie et al. 2023), with an optional sliding window (Mistral).
//!
//! Grouped-query attention shares each key/value head among `n_rep = H_q / H_kv` query heads. The
//! textbook way copies K and V `n_rep` times (`repeat_kv`, kept below as the oracle); the fast path
//! instead folds the `n_rep` query heads of a group into the row axis, (B, H_kv, n_rep * T, D), so
//! one batched matmul per group reads K and V once.
//!
//! Batches of sequences of different lengths are left-padded: [`causal_attention_padded`] hides
//! row `b`'s first `pad[b]` key positions from its real queries. Padded queries still see
//! themselves, so their (unused) outputs and cached keys stay finite instead of NaN.

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

/// The additive mask (B, T, S) of [`mask_values`] plus, for row `b`, its first `pad[b]` keys
/// hidden from queries at positions `>= pad[b]`.
fn padded_mask_values(t: usize, s: usize, window: Option<usize>, pad: &[usize]) -> Vec<f32> {
    let base = mask_values(t, s, window);
    let past = s - t;
    let mut m = Vec::with_capacity(pad.len() * t * s);
    for &p in pad {
        let mut row = base.clone();
        for i in 0..t {
            if past + i >= p {
                row[i * s..i * s + p.min(s)].fill(f32::NEG_INFINITY);
            }
        }
        m.extend(row);
    }
    m
}

/// `q` (B, H_q, T, D) at positions `S - T ..S`; `k`, `v` (B, H_kv, S, D). Returns (B, H_q, T, D).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: Option<usize>,
) -> Result<Tensor> {
    causal_attention_padded(q, k, v, window, &[])
}

/// [`causal_attention`] for a left-padded batch: row `b`'s first `pad[b]` positions are padding
/// (`pad` empty or all zeros: no padding).
pub fn causal_attention_padded(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: Option<usize>,
    pad: &[usize],
) -> Result<Tensor> {
    let (b, hq, t, d) = q.dims4().op("attention q dims")?;
    let (_, hkv, s, _) = k.dims4().op("attention k dims")?;
    check_heads(hq, hkv, t, s)?;
    let padded = pad.iter().any(|&p| p > 0);
    if padded && pad.len() != b {
        return Err(NnError::Shape {
            op: "attention padding",
            expected: format!("one pad count per row ({b})"),
            got: pad.len().to_string(),
        });
    }
    let n_rep = hq / hkv;
    let scale = 1.0 / (d as f64).sqrt();
    // (B, H_kv, n_rep * T, D): query heads h*n_rep..(h+1)*n_rep share kv head h.
    let q = q
        .contiguous()
        .op("attention q contiguous")?
        .reshape((b, hkv, n_rep * t, d))
        .op("gqa fold")?;
    let scores = (q.matmul(&k.t().op("k^T")?).op("q k^T")? * scale).op("scale")?; // (B, H_kv, n_rep*T, S)
    let scores = if padded {
        // (B, 1, n_rep * T, S): each row's mask, repeated for the folded query heads.
        let m = Tensor::from_vec(
            padded_mask_values(t, s, window, pad),
            (b, 1, t, s),
            &Device::Cpu,
        )
        .op("mask")?
        .repeat((1, n_rep, 1, 1))
        .op("mask repeat")?
        .reshape((b, 1, n_rep * t, s))
        .op("mask reshape")?
        .to_device(q.device())
        .op("mask device")?;
        scores.broadcast_add(&m).op("apply mask")?
    } else if needs_mask(t, s, window) {
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

/// [`causal_attention`] for one sequence whose keys and values are views into a
/// [`crate::KvCache`] buffer, (1, H_kv, S, D) out of (1, H_kv, capacity, D): computed in place
/// by the paged pool's kernel (the buffer is one block of `capacity` positions), so generation
/// with the contiguous cache and continuous batching over the paged pool give a sequence
/// bit-identical logits. Anything else (a batch, other dtypes or devices) takes
/// [`causal_attention`].
pub fn cached_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: Option<usize>,
) -> Result<Tensor> {
    let (b, hq, t, d) = q.dims4().op("attention q dims")?;
    let (_, hkv, s, _) = k.dims4().op("attention k dims")?;
    check_heads(hq, hkv, t, s)?;
    if b != 1 {
        return causal_attention(q, k, v, window);
    }
    let qv = q
        .contiguous()
        .and_then(|q| q.flatten_all())
        .and_then(|q| q.to_vec1::<f32>())
        .op("attention q")?;
    let out = with_kv_slices(k, v, |kv| {
        let seq = [crate::PagedSeq {
            blocks: &[0],
            start: s - t,
            len: t,
            offset: 0,
        }];
        crate::paged_kv::attend_blocks(&kv.job(&qv, hq, t, &seq, window))
    })?;
    match out {
        Some(out) => Tensor::from_vec(out, (1, hq, t, d), q.device()).op("attention out"),
        None => causal_attention(q, k, v, window),
    }
}

/// One layer of a [`crate::KvCache`] for a single sequence, the key and value tensors
/// [`crate::KvCache::append`] returned, seen as slices: for callers that attend the query heads of
/// one new token on their own threads ([`CachedKv::attend_head`]). Calls `f` with the view while
/// the tensors' storage is borrowed; `Ok(None)` when they are not such a cache (another layout,
/// dtype or device).
pub fn with_cached_kv<R>(
    k: &Tensor,
    v: &Tensor,
    f: impl FnOnce(&CachedKv<'_>) -> R,
) -> Result<Option<R>> {
    with_kv_slices(k, v, f)
}

/// See [`with_cached_kv`].
pub struct CachedKv<'a> {
    k: &'a [f32],
    v: &'a [f32],
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
}

impl CachedKv<'_> {
    fn job<'j>(
        &'j self,
        q: &'j [f32],
        q_heads: usize,
        rows: usize,
        seqs: &'j [crate::PagedSeq<'j>],
        window: Option<usize>,
    ) -> crate::paged_kv::Job<'j> {
        crate::paged_kv::Job {
            k: self.k,
            v: self.v,
            geometry: crate::paged_kv::Geometry {
                kv_heads: self.kv_heads,
                head_dim: self.head_dim,
                block_size: self.capacity,
            },
            q,
            q_heads,
            rows,
            seqs,
            window,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
        }
    }

    /// Query head `h` of one token at the last cached position: `q` holds all `q_heads` heads
    /// (`[head][head_dim]`, rotated), the result goes to `out` (`head_dim`). Bit-identical to
    /// that head of [`cached_attention`].
    ///
    /// # Panics
    /// If `q` or `out` have the wrong length, `h >= q_heads` or the heads do not group evenly.
    pub fn attend_head(
        &self,
        q: &[f32],
        q_heads: usize,
        h: usize,
        window: Option<usize>,
        out: &mut [f32],
    ) {
        let d = self.head_dim;
        assert!(
            q.len() == q_heads * d
                && out.len() == d
                && h < q_heads
                && q_heads.is_multiple_of(self.kv_heads)
                && self.len > 0,
            "attend_head: shapes"
        );
        let seq = [crate::PagedSeq {
            blocks: &[0],
            start: self.len - 1,
            len: 1,
            offset: 0,
        }];
        // The kernel accumulates into its output.
        out.fill(0.0);
        crate::paged_kv::head_task(&self.job(q, q_heads, 1, &seq, window), h, out);
    }
}

/// `k`, `v` (1, H_kv, S, D) views of a (1, H_kv, capacity, D) f32 CPU buffer -> `f` over the
/// buffers, or `None` when they are not laid out like that.
fn with_kv_slices<R>(
    k: &Tensor,
    v: &Tensor,
    f: impl FnOnce(&CachedKv<'_>) -> R,
) -> Result<Option<R>> {
    let (b, hkv, s, d) = k.dims4().op("attention k dims")?;
    let fits = |x: &Tensor| {
        let l = x.layout();
        let st = l.stride();
        x.device().is_cpu()
            && x.dtype() == candle_core::DType::F32
            && l.start_offset() == 0
            && st.len() == 4
            && st[3] == 1
            && st[2] == d
            && st[1].is_multiple_of(d)
            && st[1] / d >= s
    };
    if b != 1
        || v.dims() != k.dims()
        || !fits(k)
        || !fits(v)
        || k.layout().stride() != v.layout().stride()
    {
        return Ok(None);
    }
    let capacity = k.layout().stride()[1] / d;
    let (ks, _) = k.storage_and_layout();
    let (vs, _) = v.storage_and_layout();
    let (candle_core::Storage::Cpu(kc), candle_core::Storage::Cpu(vc)) = (&*ks, &*vs) else {
        return Ok(None);
    };
    let (kd, vd) = (
        kc.as_slice::<f32>().op("kv cache keys")?,
        vc.as_slice::<f32>().op("kv cache values")?,
    );
    let view = CachedKv {
        k: &kd[..hkv * capacity * d],
        v: &vd[..hkv * capacity * d],
        kv_heads: hkv,
        head_dim: d,
        capacity,
        len: s,
    };
    Ok(Some(f(&view)))
}
