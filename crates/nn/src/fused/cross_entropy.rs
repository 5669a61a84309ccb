//! Softmax cross-entropy over rows of `v` logits.
//!
//! Forward keeps one float per row, its logsumexp; backward recomputes `softmax = e^(x - lse)`
//! from the logits while writing the gradient, so no second (N, V) buffer outlives the forward.

use super::simd::{exp, max, multiversion, sum_exp_sub, Isa};
use rayon::prelude::*;

/// Rows per task: a row of a large vocabulary is already a lot of work.
const CHUNK_ROWS: usize = 8;

#[inline(always)]
fn lse_chunk<I: Isa>(x: &[f32], targets: &[u32], ignore: u32, lse: &mut [f32]) {
    let v = x.len() / lse.len();
    for ((x, &t), lse) in x.chunks_exact(v).zip(targets).zip(lse.iter_mut()) {
        *lse = if t == ignore {
            0.0
        } else {
            let m = max(x);
            m + sum_exp_sub::<I>(x, m).ln()
        };
    }
}
multiversion!(fn lse_task = lse_chunk(x: &[f32], targets: &[u32], ignore: u32, lse: &mut [f32]););

/// Per-row logsumexp of `x` (rows of `v`), 0 for ignored rows.
pub(super) fn logsumexp(x: &[f32], v: usize, targets: &[u32], ignore: u32) -> Vec<f32> {
    let mut lse = vec![0f32; targets.len()];
    lse.par_chunks_mut(CHUNK_ROWS)
        .zip(x.par_chunks(CHUNK_ROWS * v))
        .zip(targets.par_chunks(CHUNK_ROWS))
        .for_each(|((lse, x), t)| lse_task(x, t, ignore, lse));
    lse
}

/// The mean of `lse - x[target]` over rows not ignored, summed in row order in f64 (NaN when
/// every row is ignored, as in PyTorch).
pub(super) fn mean_loss(x: &[f32], v: usize, targets: &[u32], ignore: u32, lse: &[f32]) -> f32 {
    let mut total = 0f64;
    let mut count = 0usize;
    for (i, (&t, &l)) in targets.iter().zip(lse).enumerate() {
        if t != ignore {
            total += f64::from(l - x[i * v + t as usize]);
            count += 1;
        }
    }
    (total / count as f64) as f32
}

/// [`grad`] written over the logits themselves (the output head's fused loss needs them no
/// more): ignored rows become 0.
pub(super) fn grad_in_place(
    x: &mut [f32],
    v: usize,
    targets: &[u32],
    ignore: u32,
    lse: &[f32],
    coef: f32,
) {
    x.par_chunks_mut(CHUNK_ROWS * v)
        .zip(
            targets
                .par_chunks(CHUNK_ROWS)
                .zip(lse.par_chunks(CHUNK_ROWS)),
        )
        .for_each(|(x, (t, l))| grad_in_place_task(x, t, ignore, l, coef));
}

#[inline(always)]
fn grad_in_place_chunk<I: Isa>(
    x: &mut [f32],
    targets: &[u32],
    ignore: u32,
    lse: &[f32],
    coef: f32,
) {
    let v = x.len() / lse.len();
    for (x, (&t, &lse)) in x.chunks_exact_mut(v).zip(targets.iter().zip(lse)) {
        if t == ignore {
            x.fill(0.0);
            continue;
        }
        for x in x.iter_mut() {
            *x = exp::<I>(*x - lse) * coef;
        }
        if let Some(dt) = x.get_mut(t as usize) {
            *dt -= coef;
        }
    }
}
multiversion!(fn grad_in_place_task = grad_in_place_chunk(
    x: &mut [f32], targets: &[u32], ignore: u32, lse: &[f32], coef: f32,
););

/// `d loss / d x = (softmax(x) - onehot(target)) * coef` per row (`coef` = upstream gradient over
/// the number of rows counted); ignored rows get 0. A copy of `x` run through [`grad_in_place`].
pub(super) fn grad(
    x: &[f32],
    v: usize,
    targets: &[u32],
    ignore: u32,
    lse: &[f32],
    coef: f32,
) -> Vec<f32> {
    let mut dx = x.to_vec();
    grad_in_place(&mut dx, v, targets, ignore, lse, coef);
    dx
}

/// `g` over the number of rows whose target is not `ignore`, 0 when every row is ignored
/// (nothing to differentiate): the factor of [`grad`].
pub(super) fn coef(targets: &[u32], ignore: u32, g: f32) -> f32 {
    match targets.iter().filter(|&&t| t != ignore).count() {
        0 => 0.0,
        count => g / count as f32,
    }
}
