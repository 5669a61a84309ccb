//! Causal attention computed blockwise (FlashAttention-2, Dao 2023) on the CPU.
//!
//! Per (batch, query head) the queries and keys are cut into blocks of [`BLOCK`] rows. A query
//! block visits the key blocks up to its own; each query row keeps a running max `m`, a running
//! sum `l` and an unnormalised output, rescaled by `e^(m_old - m_new)` when the max grows. The
//! (T, T) score matrix never exists: a task holds one (BLOCK, BLOCK) block of scores. Forward
//! saves the logsumexp `m + ln l` of each row for the backward pass.
//!
//! Every product is a small GEMM ([`gemm_nn`], [`gemm_tn`]: register tiles of 6 x 16) over one
//! pair of blocks: S = Q K^T and dP = dO V^T against K^T and V^T (built once per kv head), then
//! O += P V, dQ += dS K, dV += P^T dO, dK += dS^T Q. On the diagonal block pair the tiles that
//! the causal mask would zero are skipped.
//!
//! Parallelism and determinism: forward tasks are (batch, query head, query block), each writing
//! its own rows. Backward tasks are (batch, kv head): one task owns dK and dV of its kv head and
//! dQ of the `n_rep` query heads that share it, and accumulates every element in a fixed order
//! (key blocks in order, then query heads, then query blocks), so there are no atomics and no
//! cross-task reductions. When B * H_kv tasks would leave threads idle, backward instead runs
//! dK/dV per key block and dQ per query block as separate tasks (recomputing P and dS); see
//! [`backward`] for why both give the same bits.

use super::simd::{exp, exp_sub_sum, gemm_nn, gemm_tn, max, multiversion, scale, Causal, Isa};
use rayon::prelude::*;

/// Query rows and keys per block: a (BLOCK, BLOCK) block of scores and the (BLOCK, D) blocks of
/// Q, K, V it comes from stay in L1/L2.
const BLOCK: usize = 64;

/// q, out (B, H_q, T, D); k, v (B, H_kv, T, D).
#[derive(Clone, Copy, Debug)]
pub(super) struct AttnDims {
    pub b: usize,
    pub hq: usize,
    pub hkv: usize,
    pub t: usize,
    pub d: usize,
}

/// `dst` (cols, rows) = `src` (rows, cols) transposed. Measured on (128, 64) heads: this plain
/// loop (strided writes) at about 3.6 GB/s beat reading strided (5-10% slower) and 8 x 8 blocks
/// through a local array (60% slower); an intrinsics 8 x 8 shuffle transpose would be faster
/// still, but the three transposes are under a tenth of attention forward + backward.
fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    for (r, row) in src.chunks_exact(cols).enumerate() {
        for (c, &x) in row.iter().enumerate() {
            dst[c * rows + r] = x;
        }
    }
}

/// How the key block starting at `j0` meets the query block starting at `i0 >= j0`.
fn causal(i0: usize, j0: usize, diagonal: Causal) -> Causal {
    if i0 == j0 {
        diagonal
    } else {
        Causal::Full
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
    let mut s = vec![0f32; rows * BLOCK];
    let mut m = [f32::NEG_INFINITY; BLOCK];
    let mut l = [0f32; BLOCK];
    for j0 in (0..=i0).step_by(BLOCK) {
        let nk = BLOCK.min(t - j0);
        s.fill(0.0);
        let mode = causal(i0, j0, Causal::Lower);
        gemm_nn(rows, nk, d, q, d, &kt[j0..], t, &mut s, BLOCK, mode);
        for (r, s) in s.chunks_exact_mut(BLOCK).enumerate() {
            // Row i0 + r sees keys j0..=i0 + r.
            let (visible, hidden) = s[..nk].split_at_mut(nk.min(i0 + r - j0 + 1));
            scale(visible, sm_scale);
            let m_new = m[r].max(max(visible));
            let alpha = exp::<I>(m[r] - m_new);
            let p_sum = exp_sub_sum::<I>(visible, m_new);
            hidden.fill(0.0);
            l[r] = I::madd(l[r], alpha, p_sum);
            m[r] = m_new;
            scale(&mut o[r * d..(r + 1) * d], alpha);
        }
        let mode = causal(i0, j0, Causal::KeysUpToRow);
        gemm_nn(rows, d, nk, &s, BLOCK, &v[j0 * d..], d, o, d, mode);
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

/// (B, T, H, D) -> (B, H, T, D): one task per (batch, head) gathers its T rows of D.
pub(super) fn bthd_to_bhtd(x: &[f32], b: usize, t: usize, h: usize, d: usize) -> Vec<f32> {
    let mut y = vec![0f32; b * t * h * d];
    y.par_chunks_mut(t * d).enumerate().for_each(|(bh, dst)| {
        let (bi, hi) = (bh / h, bh % h);
        for (ti, row) in dst.chunks_exact_mut(d).enumerate() {
            let src = ((bi * t + ti) * h + hi) * d;
            row.copy_from_slice(&x[src..src + d]);
        }
    });
    y
}

/// (B, H, T, D) -> (B, T, H, D): one task per (batch, position) gathers its H rows of D.
pub(super) fn bhtd_to_bthd(x: &[f32], b: usize, t: usize, h: usize, d: usize) -> Vec<f32> {
    let mut y = vec![0f32; b * t * h * d];
    y.par_chunks_mut(h * d).enumerate().for_each(|(bt, dst)| {
        let (bi, ti) = (bt / t, bt % t);
        for (hi, row) in dst.chunks_exact_mut(d).enumerate() {
            let src = ((bi * h + hi) * t + ti) * d;
            row.copy_from_slice(&x[src..src + d]);
        }
    });
    y
}

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
            o.par_chunks_mut(BLOCK * d)
                .zip(lse.par_chunks_mut(BLOCK))
                .zip(q.par_chunks(BLOCK * d))
                .enumerate()
                .for_each(|(qb, ((o, lse), q))| {
                    fwd_task(q, kt, v, qb * BLOCK, t, d, sm_scale, o, lse)
                });
        });
    (out, lse)
}

/// What the backward pass reads for one (batch, kv head) group: its `n_rep` query heads stacked
/// into `n_rep * T` rows (`q`, `dout`: (n_rep * T, D); `lse`, `delta`: (n_rep * T)) and the kv
/// head they share (`k`: (T, D); `kt`, `vt`: (D, T)).
#[derive(Clone, Copy)]
struct Group<'a> {
    q: &'a [f32],
    dout: &'a [f32],
    lse: &'a [f32],
    /// `delta_i = dO_i . O_i` (= sum_j p_ij dp_ij).
    delta: &'a [f32],
    k: &'a [f32],
    kt: &'a [f32],
    vt: &'a [f32],
    t: usize,
    d: usize,
}

/// `p` and `ds` (rows, BLOCK) of the query block at group row `r0` (positions `i0..i0 + rows`)
/// against the `nk` keys from `j0`: `p = e^(scale * q.k - lse)`, `ds = p * (dO.v - delta)`, 0
/// where masked.
/// Every backward task computes a pair of blocks with this one function, so the values (and all
/// sums of them) do not depend on which task computed them.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block_grads<I: Isa>(
    g: Group<'_>,
    sm_scale: f32,
    r0: usize,
    i0: usize,
    rows: usize,
    j0: usize,
    nk: usize,
    p: &mut [f32],
    ds: &mut [f32],
) {
    let Group { t, d, .. } = g;
    let block = r0 * d..(r0 + rows) * d;
    let (p, ds) = (&mut p[..rows * BLOCK], &mut ds[..rows * BLOCK]);
    p.fill(0.0);
    ds.fill(0.0);
    let lower = causal(i0, j0, Causal::Lower);
    gemm_nn(
        rows,
        nk,
        d,
        &g.q[block.clone()],
        d,
        &g.kt[j0..],
        t,
        p,
        BLOCK,
        lower,
    );
    gemm_nn(
        rows,
        nk,
        d,
        &g.dout[block],
        d,
        &g.vt[j0..],
        t,
        ds,
        BLOCK,
        lower,
    );
    let rows_iter = p.chunks_exact_mut(BLOCK).zip(ds.chunks_exact_mut(BLOCK));
    for (r, (p, ds)) in rows_iter.enumerate() {
        let nc = nk.min(i0 + r - j0 + 1);
        let (lse_i, delta_i) = (g.lse[r0 + r], g.delta[r0 + r]);
        for (p, ds) in p[..nc].iter_mut().zip(&mut ds[..nc]) {
            // The same rounding steps as the forward pass: scale, then subtract.
            *p = exp::<I>(*p * sm_scale - lse_i);
            *ds = *p * (*ds - delta_i);
        }
        p[nc..nk].fill(0.0);
        ds[nc..nk].fill(0.0);
    }
}

/// `dv += p^T dO`, `dk += ds^T Q` for one pair of blocks (`dk`, `dv`: the key block's rows; dK is
/// scaled at the very end).
#[allow(clippy::too_many_arguments)]
fn add_kv_grads(
    g: Group<'_>,
    r0: usize,
    i0: usize,
    rows: usize,
    j0: usize,
    nk: usize,
    p: &[f32],
    ds: &[f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let d = g.d;
    let block = r0 * d..(r0 + rows) * d;
    let from_row = causal(i0, j0, Causal::QueriesFromRow);
    gemm_tn(
        nk,
        d,
        rows,
        p,
        BLOCK,
        &g.dout[block.clone()],
        d,
        dv,
        d,
        from_row,
    );
    gemm_tn(nk, d, rows, ds, BLOCK, &g.q[block], d, dk, d, from_row);
}

/// `dq += ds K` for one pair of blocks (`dq`: the query block's rows; scaled at the very end).
fn add_q_grads(
    g: Group<'_>,
    i0: usize,
    rows: usize,
    j0: usize,
    nk: usize,
    ds: &[f32],
    dq: &mut [f32],
) {
    let d = g.d;
    let up_to_row = causal(i0, j0, Causal::KeysUpToRow);
    let k = &g.k[j0 * d..(j0 + nk) * d];
    gemm_nn(rows, d, nk, ds, BLOCK, k, d, dq, d, up_to_row);
}

/// Backward of a whole group in one task: dK, dV of its kv head and dQ of its query heads, key
/// blocks in order, then query heads, then query blocks.
#[inline(always)]
fn bwd_group<I: Isa>(g: Group<'_>, sm_scale: f32, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
    let Group { t, d, .. } = g;
    let n_rep = g.lse.len() / t;
    let mut p = vec![0f32; BLOCK * BLOCK];
    let mut ds = vec![0f32; BLOCK * BLOCK];
    for j0 in (0..t).step_by(BLOCK) {
        let nk = BLOCK.min(t - j0);
        let keys = j0 * d..(j0 + nk) * d;
        for head in 0..n_rep {
            for i0 in (j0..t).step_by(BLOCK) {
                let rows = BLOCK.min(t - i0);
                let r0 = head * t + i0;
                block_grads::<I>(g, sm_scale, r0, i0, rows, j0, nk, &mut p, &mut ds);
                let (dk, dv) = (&mut dk[keys.clone()], &mut dv[keys.clone()]);
                add_kv_grads(g, r0, i0, rows, j0, nk, &p, &ds, dk, dv);
                add_q_grads(g, i0, rows, j0, nk, &ds, &mut dq[r0 * d..(r0 + rows) * d]);
            }
        }
    }
    scale(dq, sm_scale);
    scale(dk, sm_scale);
}
multiversion!(fn bwd_group_task = bwd_group(
    g: Group<'_>, sm_scale: f32, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32],
););

/// dK, dV of the key block at `j0` alone (the same sums in the same order as [`bwd_group`]).
#[inline(always)]
fn bwd_kv_block<I: Isa>(g: Group<'_>, sm_scale: f32, j0: usize, dk: &mut [f32], dv: &mut [f32]) {
    let t = g.t;
    let n_rep = g.lse.len() / t;
    let nk = BLOCK.min(t - j0);
    let mut p = vec![0f32; BLOCK * BLOCK];
    let mut ds = vec![0f32; BLOCK * BLOCK];
    for head in 0..n_rep {
        for i0 in (j0..t).step_by(BLOCK) {
            let rows = BLOCK.min(t - i0);
            let r0 = head * t + i0;
            block_grads::<I>(g, sm_scale, r0, i0, rows, j0, nk, &mut p, &mut ds);
            add_kv_grads(g, r0, i0, rows, j0, nk, &p, &ds, dk, dv);
        }
    }
    scale(dk, sm_scale);
}
multiversion!(fn bwd_kv_task = bwd_kv_block(
    g: Group<'_>, sm_scale: f32, j0: usize, dk: &mut [f32], dv: &mut [f32],
););

/// dQ of the query block at group row `r0` (position `i0`) alone (the same sums in the same
/// order as [`bwd_group`]).
#[inline(always)]
fn bwd_q_block<I: Isa>(g: Group<'_>, r0: usize, i0: usize, sm_scale: f32, dq: &mut [f32]) {
    let rows = dq.len() / g.d;
    let mut p = vec![0f32; BLOCK * BLOCK];
    let mut ds = vec![0f32; BLOCK * BLOCK];
    for j0 in (0..=i0).step_by(BLOCK) {
        let nk = BLOCK.min(g.t - j0);
        block_grads::<I>(g, sm_scale, r0, i0, rows, j0, nk, &mut p, &mut ds);
        add_q_grads(g, i0, rows, j0, nk, &ds, dq);
    }
    scale(dq, sm_scale);
}
multiversion!(fn bwd_q_task = bwd_q_block(
    g: Group<'_>, r0: usize, i0: usize, sm_scale: f32, dq: &mut [f32],
););

#[inline(always)]
fn delta_rows<I: Isa>(dout: &[f32], o: &[f32], delta: &mut [f32]) {
    const ROWS: usize = 8;
    let d = dout.len() / delta.len();
    // Summed in the order the GEMM sums dp_ij = dO_i . v_j (one chain over D): where one key takes
    // all the weight (query row 0, for one) O_i = v_j exactly, and then ds_ij = 0 exactly. Eight
    // rows at a time, so that eight independent chains hide the FMA latency.
    let rows = delta
        .chunks_mut(ROWS)
        .zip(dout.chunks(ROWS * d).zip(o.chunks(ROWS * d)));
    for (delta, (g, o)) in rows {
        let mut acc = [0f32; ROWS];
        for k in 0..d {
            for (r, acc) in acc.iter_mut().enumerate().take(delta.len()) {
                *acc = I::madd(g[r * d + k], o[r * d + k], *acc);
            }
        }
        delta.copy_from_slice(&acc[..delta.len()]);
    }
}
multiversion!(fn delta_task = delta_rows(dout: &[f32], o: &[f32], delta: &mut [f32]););

/// Backward: `(dq, dk, dv)` from the inputs, the forward output `o`, its gradient `dout` and the
/// saved logsumexp.
///
/// With many (batch, kv head) groups each group is one task ([`bwd_group`]: 5 block GEMMs per
/// pair of blocks). With fewer groups than the threads can use, dK/dV per key block and dQ per
/// query block become separate tasks, which recompute P and dS (7 GEMMs per pair) but give
/// B * H_kv * T / 64 tasks. Both compute every block with [`block_grads`] and add the blocks in
/// the same order, so they give the same bits and the choice (which looks at the thread count)
/// cannot break determinism; the thread-count test checks this.
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
    let AttnDims { b, hq, hkv, t, d } = dims;
    let n_rep = hq / hkv;
    let hd = t * d;
    let mut delta = vec![0f32; lse.len()];
    delta
        .par_chunks_mut(t)
        .zip(dout.par_chunks(hd).zip(o.par_chunks(hd)))
        .for_each(|(delta, (g, o))| delta_task(g, o, delta));
    let mut kt = vec![0f32; k.len()];
    let mut vt = vec![0f32; v.len()];
    kt.par_chunks_mut(hd)
        .zip(vt.par_chunks_mut(hd))
        .zip(k.par_chunks(hd).zip(v.par_chunks(hd)))
        .for_each(|((kt, vt), (k, v))| {
            transpose(k, t, d, kt);
            transpose(v, t, d, vt);
        });
    // The query heads of group (kv head) g, counting over batch rows too, are rows
    // g * n_rep * T .. (g + 1) * n_rep * T of q.
    let rows = n_rep * t;
    let group = |g: usize| Group {
        q: &q[g * rows * d..(g + 1) * rows * d],
        dout: &dout[g * rows * d..(g + 1) * rows * d],
        lse: &lse[g * rows..(g + 1) * rows],
        delta: &delta[g * rows..(g + 1) * rows],
        k: &k[g * hd..(g + 1) * hd],
        kt: &kt[g * hd..(g + 1) * hd],
        vt: &vt[g * hd..(g + 1) * hd],
        t,
        d,
    };
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    let groups = b * hkv;
    let threads = rayon::current_num_threads().max(1);
    let busy = groups as f64 / (groups.div_ceil(threads) * threads) as f64;
    if busy >= 0.7 {
        dq.par_chunks_mut(rows * d)
            .zip(dk.par_chunks_mut(hd).zip(dv.par_chunks_mut(hd)))
            .enumerate()
            .for_each(|(g, (dq, (dk, dv)))| bwd_group_task(group(g), sm_scale, dq, dk, dv));
    } else {
        dk.par_chunks_mut(hd)
            .zip(dv.par_chunks_mut(hd))
            .enumerate()
            .for_each(|(g, (dk, dv))| {
                dk.par_chunks_mut(BLOCK * d)
                    .zip(dv.par_chunks_mut(BLOCK * d))
                    .enumerate()
                    .for_each(|(kb, (dk, dv))| bwd_kv_task(group(g), sm_scale, kb * BLOCK, dk, dv));
            });
        // Query blocks never straddle heads: split per head (T rows), then per block.
        dq.par_chunks_mut(hd).enumerate().for_each(|(bh, dq)| {
            let (g, head) = (bh / n_rep, bh % n_rep);
            dq.par_chunks_mut(BLOCK * d)
                .enumerate()
                .for_each(|(qb, dq)| {
                    let i0 = qb * BLOCK;
                    bwd_q_task(group(g), head * t + i0, i0, sm_scale, dq)
                });
        });
    }
    (dq, dk, dv)
}
