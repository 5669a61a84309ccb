//! RMSNorm and LayerNorm kernels over rows of `d` contiguous f32s.
//!
//! Rows are independent, so the forward pass and `dx` parallelise over rows. The weight and bias
//! gradients are sums over all rows: each fixed chunk of rows ([`chunk_rows`], a function of the
//! row count only) writes its own partial sums, and the partials are added in chunk order, so the
//! result does not depend on how many threads ran the chunks.
//!
//! Backward recomputes each row's statistics from `x` rather than saving them: the row is read
//! anyway and stays in L1, so this costs one short extra pass and no memory.

use super::simd::{axpy, dot, dot3, multiversion, sum, Isa};
use rayon::prelude::*;

/// At most this many partial weight/bias gradients are kept (256 * d floats).
const MAX_CHUNKS: usize = 256;
/// Rows per task, at least, so tiny rows still make tasks worth scheduling.
const MIN_CHUNK_ROWS: usize = 16;

/// Rows per chunk for `n` rows: depends on `n` alone, which makes the gradient sums deterministic.
fn chunk_rows(n: usize) -> usize {
    n.div_ceil(MAX_CHUNKS).max(MIN_CHUNK_ROWS)
}

/// `1 / sqrt(mean(x^2) + eps)` from `sum(x^2)`; the forward and backward passes share it.
#[inline(always)]
fn rms_rstd(sum_sq: f32, d: usize, eps: f32) -> f32 {
    1.0 / (sum_sq / d as f32 + eps).sqrt()
}

/// The mean and `1 / sqrt(var + eps)` of a row (two passes: exact enough for any offset).
#[inline(always)]
fn ln_stats<I: Isa>(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mu = sum(x) / d;
    let (chunks, rest) = x.as_chunks::<16>();
    let mut acc = [0f32; 16];
    for c in chunks {
        for k in 0..16 {
            let e = c[k] - mu;
            acc[k] = I::madd(e, e, acc[k]);
        }
    }
    let mut tail = 0f32;
    for &v in rest {
        tail = I::madd(v - mu, v - mu, tail);
    }
    let var = (sum(&acc) + tail) / d;
    (mu, 1.0 / (var + eps).sqrt())
}

/// `sum(g * w * (x - mu))`, centred before multiplying so a large mean does not cancel digits.
#[inline(always)]
fn dot_centered<I: Isa>(g: &[f32], w: &[f32], x: &[f32], mu: f32) -> f32 {
    let (gc, gr) = g.as_chunks::<16>();
    let (wc, wr) = w.as_chunks::<16>();
    let (xc, xr) = x.as_chunks::<16>();
    let mut acc = [0f32; 16];
    for ((g, w), x) in gc.iter().zip(wc).zip(xc) {
        for k in 0..16 {
            acc[k] = I::madd(g[k] * w[k], x[k] - mu, acc[k]);
        }
    }
    let mut tail = 0f32;
    for ((&g, &w), &x) in gr.iter().zip(wr).zip(xr) {
        tail = I::madd(g * w, x - mu, tail);
    }
    sum(&acc) + tail
}

#[inline(always)]
fn rms_fwd_chunk<I: Isa>(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let d = w.len();
    for (x, y) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        let r = rms_rstd(dot::<I>(x, x), d, eps);
        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
            *y = x * r * w;
        }
    }
}
multiversion!(pub(super) fn rms_fwd_task = rms_fwd_chunk(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]););

/// RMSNorm forward: rows of `x` (len a multiple of `w.len()`).
pub(super) fn rms_fwd(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut y = vec![0f32; x.len()];
    let step = chunk_rows(x.len() / d) * d;
    y.par_chunks_mut(step)
        .zip(x.par_chunks(step))
        .for_each(|(y, x)| rms_fwd_task(x, w, eps, y));
    y
}

/// One chunk of RMSNorm backward. With `r = rstd`, `xh = x * r` and `gw = g * w`:
/// `dx = r * (gw - xh * mean(gw * xh)) = r * gw - x * r^3 * sum(gw * x) / d`, `dw += g * xh`.
#[inline(always)]
fn rms_bwd_chunk<I: Isa>(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f32,
    dx: &mut [f32],
    dw: &mut [f32],
) {
    let d = w.len();
    for ((x, g), dx) in x
        .chunks_exact(d)
        .zip(g.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
    {
        let r = rms_rstd(dot::<I>(x, x), d, eps);
        let c = r * r * r * dot3::<I>(g, w, x) / d as f32;
        for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(w) {
            *dx = I::madd(r * g, w, -(c * x));
        }
        for ((dw, &x), &g) in dw.iter_mut().zip(x).zip(g) {
            *dw = I::madd(g * x, r, *dw);
        }
    }
}
multiversion!(fn rms_bwd_task = rms_bwd_chunk(
    x: &[f32], w: &[f32], g: &[f32], eps: f32, dx: &mut [f32], dw: &mut [f32],
););

/// RMSNorm backward: `(dx, dw)` for upstream gradient `g` (same length as `x`).
pub(super) fn rms_bwd(x: &[f32], w: &[f32], g: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let step = chunk_rows(x.len() / d) * d;
    let chunks = x.len().div_ceil(step);
    let mut dx = vec![0f32; x.len()];
    let mut partial = vec![0f32; chunks * d];
    dx.par_chunks_mut(step)
        .zip(partial.par_chunks_mut(d))
        .zip(x.par_chunks(step).zip(g.par_chunks(step)))
        .for_each(|((dx, dw), (x, g))| rms_bwd_task(x, w, g, eps, dx, dw));
    (dx, sum_partials(&partial, d))
}

#[inline(always)]
fn ln_fwd_chunk<I: Isa>(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    let d = w.len();
    for (x, y) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        let (mu, r) = ln_stats::<I>(x, eps);
        for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
            *y = I::madd((x - mu) * r, w, b);
        }
    }
}
multiversion!(fn ln_fwd_task = ln_fwd_chunk(
    x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32],
););

/// LayerNorm forward.
pub(super) fn ln_fwd(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut y = vec![0f32; x.len()];
    let step = chunk_rows(x.len() / d) * d;
    y.par_chunks_mut(step)
        .zip(x.par_chunks(step))
        .for_each(|(y, x)| ln_fwd_task(x, w, b, eps, y));
    y
}

/// One chunk of LayerNorm backward. With `xh = (x - mean) * r` and `gw = g * w`:
/// `dx = r * (gw - mean(gw) - xh * mean(gw * xh))`, `dw += g * xh`, `db += g`.
/// `dwb` holds this chunk's `dw` then `db`.
#[inline(always)]
fn ln_bwd_chunk<I: Isa>(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f32,
    dx: &mut [f32],
    dwb: &mut [f32],
) {
    let d = w.len();
    let inv_d = 1.0 / d as f32;
    let (dw, db) = dwb.split_at_mut(d);
    for ((x, g), dx) in x
        .chunks_exact(d)
        .zip(g.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
    {
        let (mu, r) = ln_stats::<I>(x, eps);
        let sgw = dot::<I>(g, w);
        let sgwx = r * dot_centered::<I>(g, w, x, mu);
        let a = sgw * inv_d;
        let c = sgwx * inv_d;
        for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(w) {
            let xh = (x - mu) * r;
            *dx = r * I::madd(g, w, -I::madd(xh, c, a));
        }
        for ((dw, &x), &g) in dw.iter_mut().zip(x).zip(g) {
            *dw = I::madd(g, (x - mu) * r, *dw);
        }
        axpy::<I>(db, 1.0, g);
    }
}
multiversion!(fn ln_bwd_task = ln_bwd_chunk(
    x: &[f32], w: &[f32], g: &[f32], eps: f32, dx: &mut [f32], dwb: &mut [f32],
););

/// LayerNorm backward: `(dx, dw, db)`.
pub(super) fn ln_bwd(x: &[f32], w: &[f32], g: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = w.len();
    let step = chunk_rows(x.len() / d) * d;
    let chunks = x.len().div_ceil(step);
    let mut dx = vec![0f32; x.len()];
    let mut partial = vec![0f32; chunks * 2 * d];
    dx.par_chunks_mut(step)
        .zip(partial.par_chunks_mut(2 * d))
        .zip(x.par_chunks(step).zip(g.par_chunks(step)))
        .for_each(|((dx, dwb), (x, g))| ln_bwd_task(x, w, g, eps, dx, dwb));
    let dwb = sum_partials(&partial, 2 * d);
    let (dw, db) = dwb.split_at(d);
    (dx, dw.to_vec(), db.to_vec())
}

/// Adds the per-chunk partial sums (`len` floats each) in chunk order.
fn sum_partials(partial: &[f32], len: usize) -> Vec<f32> {
    let mut total = vec![0f32; len];
    for p in partial.chunks_exact(len) {
        for (t, &p) in total.iter_mut().zip(p) {
            *t += p;
        }
    }
    total
}
