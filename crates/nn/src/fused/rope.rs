//! Rotary embedding in the "rotate half" layout: element `k` of a head pairs with `k + d/2`.
//!
//! Forward: `y1 = x1 cos - x2 sin`, `y2 = x1 sin + x2 cos`. The rotation is orthogonal, so the
//! backward pass is the inverse rotation, the same kernel with `sin` negated:
//! `dx1 = g1 cos + g2 sin`, `dx2 = g2 cos - g1 sin`.

use super::simd::{multiversion, Isa};
use rayon::prelude::*;

/// The shape of a rope problem: `x` is (B, H, T, D); cos/sin hold `rows >= T` positions of
/// `D / 2` values, once for all batch rows or (`batched`) once per batch row.
#[derive(Clone, Copy)]
pub(super) struct RopeDims {
    pub h: usize,
    pub t: usize,
    pub d: usize,
    pub rows: usize,
    pub batched: bool,
    /// `x` is (B, T, H, D) instead of (B, H, T, D): the layout a projection's output has
    /// before its heads are moved to the front, so training skips that transpose and its copy.
    pub packed: bool,
}

/// One (batch, head): `x`, `y` are (T, D), `cos`, `sin` (T, D/2). `sign` is 1 forward, -1 backward.
/// No FMA here (the products are not summed), but the AVX2 build still vectorises twice as wide.
#[inline(always)]
fn rope_head<I: Isa>(x: &[f32], cos: &[f32], sin: &[f32], sign: f32, d: usize, y: &mut [f32]) {
    let half = d / 2;
    let rows = x.chunks_exact(d).zip(y.chunks_exact_mut(d));
    for ((x, y), (c, s)) in rows.zip(cos.chunks_exact(half).zip(sin.chunks_exact(half))) {
        let (x1, x2) = x.split_at(half);
        let (y1, y2) = y.split_at_mut(half);
        for ((((y1, y2), &x1), &x2), (&c, &s)) in
            y1.iter_mut().zip(y2).zip(x1).zip(x2).zip(c.iter().zip(s))
        {
            let s = sign * s;
            *y1 = x1 * c - x2 * s;
            *y2 = x1 * s + x2 * c;
        }
    }
}
multiversion!(pub(super) fn rope_task = rope_head(
    x: &[f32], cos: &[f32], sin: &[f32], sign: f32, d: usize, y: &mut [f32],
););

/// Rotates `x` (B, H, T, D), or un-rotates it with `inverse` (the backward pass).
pub(super) fn rope(x: &[f32], cos: &[f32], sin: &[f32], dims: RopeDims, inverse: bool) -> Vec<f32> {
    let RopeDims {
        h,
        t,
        d,
        rows,
        batched,
        packed,
    } = dims;
    let half = d / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    let mut y = vec![0f32; x.len()];
    if packed {
        // One task per (batch, position): its H heads share one row of the tables.
        y.par_chunks_mut(h * d)
            .zip(x.par_chunks(h * d))
            .enumerate()
            .for_each(|(bt, (y, x))| {
                let (bi, ti) = (bt / t, bt % t);
                let row = if batched { bi * rows + ti } else { ti } * half;
                let (cos, sin) = (&cos[row..row + half], &sin[row..row + half]);
                for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                    rope_task(x, cos, sin, sign, d, y);
                }
            });
        return y;
    }
    y.par_chunks_mut(t * d)
        .zip(x.par_chunks(t * d))
        .enumerate()
        .for_each(|(bh, (y, x))| {
            let start = if batched { bh / h * rows * half } else { 0 };
            let cos = &cos[start..start + t * half];
            let sin = &sin[start..start + t * half];
            rope_task(x, cos, sin, sign, d, y);
        });
    y
}
