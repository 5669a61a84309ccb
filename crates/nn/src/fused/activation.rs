//! Elementwise activations with their derivatives, vectorised (candle's GELU and SiLU call libm's
//! `tanhf`, `expm1f` and `powf` per element, forward and backward: measured as about 40% of a
//! GPT-2-style training step before these kernels).
//!
//! - GELU, tanh approximation (GPT-2's `gelu_new`, torch's `approximate="tanh"`):
//!   `y = x/2 (1 + tanh(u))`, `u = c (x + a x^3)`, `c = sqrt(2/pi)`, `a = 0.044715`;
//!   `dy/dx = (1 + t)/2 + x/2 (1 - t^2) c (1 + 3 a x^2)` with `t = tanh(u)`.
//! - GELU, exact (BERT's `gelu`, torch's default `approximate="none"`): `y = x Phi(x)`,
//!   `Phi(x) = (1 + erf(x / sqrt 2)) / 2`; `dy/dx = Phi(x) + x phi(x)`, `phi(x) = e^(-x^2/2) /
//!   sqrt(2 pi)`. `erf` is Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), the
//!   formula of PyTorch's own vectorised `erf`, so that it vectorises like the rest (candle's
//!   `gelu_erf` calls a scalar libm `erf` per element: about 20% of a MiniLM forward).
//! - SwiGLU's gate: `y = silu(g) u`, `silu(g) = g s`, `s = 1 / (1 + e^-g)`;
//!   `dg = dy u s (1 + g (1 - s))`, `du = dy silu(g)`.
//!
//! `tanh(u) = 1 - 2 / (1 + e^(2u))` through the vectorisable `exp` of `simd.rs` (clamped there,
//! so the extremes give exactly -1 and 1).

use super::simd::{exp, multiversion, Isa};
use rayon::prelude::*;

const C: f32 = 0.797_884_6; // sqrt(2 / pi)
const A: f32 = 0.044_715;

/// Elements per parallel task: fixed, so results do not depend on the thread count (they could
/// not anyway: every element is computed alone).
const CHUNK: usize = 1 << 14;

#[inline(always)]
fn tanh<I: Isa>(u: f32) -> f32 {
    1.0 - 2.0 / (1.0 + exp::<I>(2.0 * u))
}

/// `erf(x)` to within 1.5e-7 (Abramowitz & Stegun 7.1.26).
#[inline(always)]
fn erf<I: Isa>(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_8;
    const A4: f32 = -1.453_152;
    const A5: f32 = 1.061_405_4;
    let a = x.abs();
    let t = 1.0 / I::madd(P, a, 1.0);
    let mut r = A5;
    r = I::madd(r, t, A4);
    r = I::madd(r, t, A3);
    r = I::madd(r, t, A2);
    r = I::madd(r, t, A1);
    let y = 1.0 - r * t * exp::<I>(-a * a);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1 / sqrt(2 pi)`.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

#[inline(always)]
fn gelu_erf_chunk<I: Isa>(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = 0.5 * x * (1.0 + erf::<I>(x * FRAC_1_SQRT_2));
    }
}
multiversion!(fn gelu_erf_task = gelu_erf_chunk(x: &[f32], y: &mut [f32]););

#[inline(always)]
fn gelu_erf_bwd_chunk<I: Isa>(x: &[f32], g: &[f32], dx: &mut [f32]) {
    for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
        let cdf = 0.5 * (1.0 + erf::<I>(x * FRAC_1_SQRT_2));
        let pdf = FRAC_1_SQRT_2PI * exp::<I>(-0.5 * x * x);
        *dx = g * I::madd(x, pdf, cdf);
    }
}
multiversion!(fn gelu_erf_bwd_task = gelu_erf_bwd_chunk(x: &[f32], g: &[f32], dx: &mut [f32]););

#[inline(always)]
fn gelu_chunk<I: Isa>(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        let u = C * I::madd(A * x, x * x, x);
        *y = 0.5 * x * (1.0 + tanh::<I>(u));
    }
}
multiversion!(fn gelu_task = gelu_chunk(x: &[f32], y: &mut [f32]););

#[inline(always)]
fn gelu_bwd_chunk<I: Isa>(x: &[f32], g: &[f32], dx: &mut [f32]) {
    for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
        let x2 = x * x;
        let t = tanh::<I>(C * I::madd(A * x, x2, x));
        let d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C * I::madd(3.0 * A, x2, 1.0);
        *dx = g * d;
    }
}
multiversion!(fn gelu_bwd_task = gelu_bwd_chunk(x: &[f32], g: &[f32], dx: &mut [f32]););

#[inline(always)]
fn swiglu_chunk<I: Isa>(gate: &[f32], up: &[f32], y: &mut [f32]) {
    for ((y, &g), &u) in y.iter_mut().zip(gate).zip(up) {
        let s = 1.0 / (1.0 + exp::<I>(-g));
        *y = g * s * u;
    }
}
multiversion!(pub(super) fn swiglu_task = swiglu_chunk(gate: &[f32], up: &[f32], y: &mut [f32]););

#[inline(always)]
fn swiglu_bwd_chunk<I: Isa>(gate: &[f32], up: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    for ((((dg, du), &g), &u), &d) in dg.iter_mut().zip(du.iter_mut()).zip(gate).zip(up).zip(dy) {
        let s = 1.0 / (1.0 + exp::<I>(-g));
        let silu = g * s;
        *du = d * silu;
        *dg = d * u * s * I::madd(g, 1.0 - s, 1.0);
    }
}
multiversion!(fn swiglu_bwd_task = swiglu_bwd_chunk(
    gate: &[f32], up: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32],
););

pub(super) fn gelu(x: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| gelu_task(x, y));
    y
}

pub(super) fn gelu_bwd(x: &[f32], g: &[f32]) -> Vec<f32> {
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
        .for_each(|(dx, (x, g))| gelu_bwd_task(x, g, dx));
    dx
}

pub(super) fn gelu_erf(x: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| gelu_erf_task(x, y));
    y
}

pub(super) fn gelu_erf_bwd(x: &[f32], g: &[f32]) -> Vec<f32> {
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
        .for_each(|(dx, (x, g))| gelu_erf_bwd_task(x, g, dx));
    dx
}

pub(super) fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; gate.len()];
    y.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(y, (g, u))| swiglu_task(g, u, y));
    y
}

pub(super) fn swiglu_bwd(gate: &[f32], up: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = vec![0f32; gate.len()];
    let mut du = vec![0f32; gate.len()];
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(
            gate.par_chunks(CHUNK)
                .zip(up.par_chunks(CHUNK))
                .zip(dy.par_chunks(CHUNK)),
        )
        .for_each(|((dg, du), ((g, u), d))| swiglu_bwd_task(g, u, d, dg, du));
    (dg, du)
}
