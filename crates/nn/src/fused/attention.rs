//! Causal attention computed blockwise (FlashAttention-2, Dao 2023) on the CPU.
//!
//! Per (batch, query head) the keys are visited in blocks of [`BLOCK_K`]; each query row keeps a
//! running max `m`, a running sum `l` and an unnormalised output, rescaled by `e^(m_old - m_new)`
//! when the max grows. The (T, T) score matrix never exists: a forward task holds one block of
//! scores per query row. Forward saves the logsumexp `m + ln l` of each row for the backward pass.
//!
//! Parallelism and determinism: forward tasks are (batch, query head, block of [`BLOCK_Q`] query
//! rows), each writing its own rows. Backward tasks are (batch, kv head): one task owns dK and dV
//! of its kv head and dQ of the `n_rep` query heads that share it, and accumulates every element
//! in a fixed order (key blocks in order, then query heads, then query rows), so there are no
//! atomics and no cross-task reductions. The price is that backward has only B * H_kv tasks.
//!
//! Products run as [`axpy_rows`] over rows of K^T, V, Q or dO, which vectorise without
//! reductions; K^T (and V^T for backward) are built once per kv head.

use super::simd::{axpy_rows, exp, exp_sub_sum, max, multiversion, scale, Isa};
use rayon::prelude::*;

/// Query rows per forward task.
const BLOCK_Q: usize = 64;
/// Keys per block: one block of scores (and of K^T, V) stays in L1.
const BLOCK_K: usize = 64;
/// Query rows whose contributions to dK and dV are added together (one load/store of a dK row
/// per four query rows).
const ROW_GROUP: usize = 4;

/// q, out (B, H_q, T, D); k, v (B, H_kv, T, D).
#[derive(Clone, Copy, Debug)]
pub(super) struct AttnDims {
    pub b: usize,
    pub hq: usize,
    pub hkv: usize,
    pub t: usize,
    pub d: usize,
}

/// `dst` (cols, rows) = `src` (rows, cols) transposed.
fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    for (r, row) in src.chunks_exact(cols).enumerate() {
        for (c, &x) in row.iter().enumerate() {
            dst[c * rows + r] = x;
        }
    }
}

/// One forward task: query rows `i0..i0 + lse.len()` of one head. `q`, `o` (rows, D); `kt` (D, T);
/// `v` (T, D).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fwd_block<I: Isa>(
    q: &[f32],
    kt: &[f32],
    v: &[f32],
    i0: usize,
    t: usize,
    d: usize,
    sm_scale: f32,
    o: &mut [f32],
    lse: &mut [f32],
) {
    let rows = lse.len();
    let mut qs = q.to_vec();
    scale(&mut qs, sm_scale);
    let qs: &[f32] = &qs;
    let mut m = [f32::NEG_INFINITY; BLOCK_Q];
    let mut l = [0f32; BLOCK_Q];
    let mut s = [0f32; BLOCK_K];
    let mut j0 = 0;
    while j0 < i0 + rows {
        let n = BLOCK_K.min(t - j0);
        for r in 0..rows {
            let i = i0 + r;
            if i < j0 {
                continue;
            }
            // Scores of row i against keys j0..j0 + nc, the visible part of this block.
            let nc = n.min(i - j0 + 1);
            let s = &mut s[..nc];
            s.fill(0.0);
            axpy_rows::<I>(s, &qs[r * d..(r + 1) * d], move |dd| &kt[dd * t + j0..]);
            let m_new = m[r].max(max(s));
            let alpha = exp::<I>(m[r] - m_new);
            let p_sum = exp_sub_sum::<I>(s, m_new);
            l[r] = I::madd(l[r], alpha, p_sum);
            let o_row = &mut o[r * d..(r + 1) * d];
            scale(o_row, alpha);
            axpy_rows::<I>(o_row, s, move |c| &v[(j0 + c) * d..]);
            m[r] = m_new;
        }
        j0 += BLOCK_K;
    }
    for (r, lse) in lse.iter_mut().enumerate() {
        scale(&mut o[r * d..(r + 1) * d], 1.0 / l[r]);
        *lse = m[r] + l[r].ln();
    }
}
multiversion!(fn fwd_task = fwd_block(
    q: &[f32], kt: &[f32], v: &[f32], i0: usize, t: usize, d: usize, sm_scale: f32,
    o: &mut [f32], lse: &mut [f32],
););

/// Forward: `(out, lse)`, out (B, H_q, T, D) and the logsumexp of each query row (B, H_q, T).
pub(super) fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: AttnDims,
    sm_scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let AttnDims { b, hq, hkv, t, d } = dims;
    let n_rep = hq / hkv;
    let hd = t * d;
    let mut kt = vec![0f32; k.len()]; // (B, H_kv, D, T)
    kt.par_chunks_mut(hd)
        .zip(k.par_chunks(hd))
        .for_each(|(kt, k)| transpose(k, t, d, kt));
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![0f32; b * hq * t];
    out.par_chunks_mut(hd)
        .zip(lse.par_chunks_mut(t))
        .zip(q.par_chunks(hd))
        .enumerate()
        .for_each(|(bh, ((o, lse), q))| {
            // Query head h of batch row bi reads kv head h / n_rep.
            let kvh = (bh / hq) * hkv + (bh % hq) / n_rep;
            let kt = &kt[kvh * hd..(kvh + 1) * hd];
            let v = &v[kvh * hd..(kvh + 1) * hd];
            o.par_chunks_mut(BLOCK_Q * d)
                .zip(lse.par_chunks_mut(BLOCK_Q))
                .zip(q.par_chunks(BLOCK_Q * d))
                .enumerate()
                .for_each(|(qb, ((o, lse), q))| {
                    fwd_task(q, kt, v, qb * BLOCK_Q, t, d, sm_scale, o, lse)
                });
        });
    (out, lse)
}

/// One backward task: the `n_rep` query heads (q, o, dout, dq: (n_rep, T, D); lse (n_rep, T))
/// that share one kv head (k, v, dk, dv: (T, D)). With `s = scale * q.k`, `p = e^(s - lse)`,
/// `dp = dO.v` and `delta_i = dO_i . O_i` (= sum_j p_ij dp_ij):
/// `ds = p * (dp - delta)`, `dV += p^T dO`, `dK += scale * ds^T Q`, `dQ += scale * ds K`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn bwd_group<I: Isa>(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    dout: &[f32],
    lse: &[f32],
    t: usize,
    d: usize,
    sm_scale: f32,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let n_rep = lse.len() / t;
    let mut kt = vec![0f32; t * d];
    let mut vt = vec![0f32; t * d];
    transpose(k, t, d, &mut kt);
    transpose(v, t, d, &mut vt);
    let (kt, vt): (&[f32], &[f32]) = (&kt, &vt);
    // Scaled queries: the scores use them, and dK = ds^T (scale * Q) needs no extra multiply.
    let mut qs = q.to_vec();
    scale(&mut qs, sm_scale);
    let qs: &[f32] = &qs;
    // delta_i = dO_i . O_i, summed in the order `axpy_rows` sums dp_ij = dO_i . v_j: where one key
    // takes all the weight (query row 0, for one) O_i = v_j exactly, and then ds_ij = 0 exactly.
    // (A plain loop: an iterator chain ending in `collect` is compiled outside this function,
    // without its target features, and `mul_add` there becomes a libm call.)
    let mut delta = vec![0f32; lse.len()];
    for ((delta, g), o) in delta.iter_mut().zip(dout.chunks_exact(d)).zip(o.chunks_exact(d)) {
        for (&g, &o) in g.iter().zip(o) {
            *delta = I::madd(g, o, *delta);
        }
    }
    let mut p = [[0f32; BLOCK_K]; ROW_GROUP];
    let mut ds = [[0f32; BLOCK_K]; ROW_GROUP];
    let mut coef = [0f32; ROW_GROUP];
    for j0 in (0..t).step_by(BLOCK_K) {
        let n = BLOCK_K.min(t - j0);
        for head in 0..n_rep {
            let base = head * t;
            let mut i = j0;
            while i < t {
                let rows = ROW_GROUP.min(t - i);
                for r in 0..rows {
                    let row = base + i + r;
                    let nc = n.min(i + r - j0 + 1);
                    let (p, ds) = (&mut p[r][..n], &mut ds[r][..n]);
                    let (p_vis, p_hidden) = p.split_at_mut(nc);
                    p_vis.fill(0.0);
                    axpy_rows::<I>(p_vis, &qs[row * d..(row + 1) * d], move |dd| {
                        &kt[dd * t + j0..]
                    });
                    let lse_i = lse[row];
                    for x in p_vis.iter_mut() {
                        *x = exp::<I>(*x - lse_i);
                    }
                    p_hidden.fill(0.0);
                    let (ds_vis, ds_hidden) = ds.split_at_mut(nc);
                    ds_vis.fill(0.0);
                    axpy_rows::<I>(ds_vis, &dout[row * d..(row + 1) * d], move |dd| {
                        &vt[dd * t + j0..]
                    });
                    let delta_i = delta[row];
                    for (x, &p) in ds_vis.iter_mut().zip(p_vis.iter()) {
                        *x = p * (*x - delta_i);
                    }
                    ds_hidden.fill(0.0);
                    axpy_rows::<I>(&mut dq[row * d..(row + 1) * d], ds_vis, move |c| {
                        &k[(j0 + c) * d..]
                    });
                }
                // Keys of this block visible to at least the group's last row.
                let first = base + i;
                for c in 0..n.min(i + rows - j0) {
                    let key = (j0 + c) * d..(j0 + c + 1) * d;
                    for (coef, p) in coef.iter_mut().zip(&p[..rows]) {
                        *coef = p[c];
                    }
                    axpy_rows::<I>(&mut dv[key.clone()], &coef[..rows], move |r| {
                        &dout[(first + r) * d..]
                    });
                    for (coef, ds) in coef.iter_mut().zip(&ds[..rows]) {
                        *coef = ds[c];
                    }
                    axpy_rows::<I>(&mut dk[key], &coef[..rows], move |r| &qs[(first + r) * d..]);
                }
                i += rows;
            }
        }
    }
    scale(dq, sm_scale);
}
multiversion!(fn bwd_task = bwd_group(
    q: &[f32], k: &[f32], v: &[f32], o: &[f32], dout: &[f32], lse: &[f32], t: usize, d: usize,
    sm_scale: f32, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32],
););

/// Backward: `(dq, dk, dv)` from the inputs, the forward output `o`, its gradient `dout` and the
/// saved logsumexp.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    dout: &[f32],
    lse: &[f32],
    dims: AttnDims,
    sm_scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttnDims { hq, hkv, t, d, .. } = dims;
    let n_rep = hq / hkv;
    let hd = t * d;
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    // The query heads of kv head g (counting over batch rows too) are g * n_rep .. (g + 1) * n_rep.
    let group = n_rep * hd;
    dq.par_chunks_mut(group)
        .zip(dk.par_chunks_mut(hd).zip(dv.par_chunks_mut(hd)))
        .enumerate()
        .for_each(|(g, (dq, (dk, dv)))| {
            let qs = g * group..(g + 1) * group;
            let ks = g * hd..(g + 1) * hd;
            let lse = &lse[g * n_rep * t..(g + 1) * n_rep * t];
            bwd_task(
                &q[qs.clone()],
                &k[ks.clone()],
                &v[ks],
                &o[qs.clone()],
                &dout[qs],
                lse,
                t,
                d,
                sm_scale,
                dq,
                dk,
                dv,
            );
        });
    (dq, dk, dv)
}
