//! The building blocks of the fused kernels: `a * b + c` with or without FMA, lane-wise
//! reductions, a vectorisable `exp`, and the register-tiled GEMM of the attention kernels.
//!
//! Nothing here uses intrinsics. Every kernel is written once, generic over [`Isa`], and compiled
//! three times: for the baseline target (SSE2 on x86-64, `a * b + c`) and, behind runtime checks,
//! with AVX2 + FMA and with AVX-512 enabled (`mul_add`), so that LLVM's auto-vectoriser emits 8-
//! or 16-wide FMA code. The AVX2 and AVX-512 builds compute the same scalar program (the same
//! fused multiply-adds into the same partial sums, in the same order), so they give the same
//! bits; only the baseline (no FMA) differs. The choice depends only on the CPU, so results are
//! bit-identical from run to run on one machine.
//!
//! Rust never reassociates float sums, so a plain `iter().sum()` does not vectorise. Reductions
//! here keep [`LANES`] independent partial sums (one per SIMD lane) and combine them in a fixed
//! order at the end: vectorised, and still deterministic.

/// How `a * b + c` is computed inside a kernel compiled for one instruction set.
pub(crate) trait Isa: Copy + Send + Sync + 'static {
    /// Columns of C per register tile of the attention GEMM ([`gemm`]): two vectors wide.
    const NR: usize = 16;
    fn madd(a: f32, b: f32, c: f32) -> f32;
}

/// The baseline target: separate multiply and add (a `mul_add` would call libm's software fma).
#[derive(Clone, Copy)]
pub(crate) struct Plain;

impl Isa for Plain {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// A target with hardware FMA (x86-64 with AVX2 + FMA, aarch64): one rounding per `a * b + c`.
#[derive(Clone, Copy)]
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
pub(crate) struct Fused;

impl Isa for Fused {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// [`Fused`] on AVX-512: the same arithmetic, register tiles of 6 x 32 (twelve of the 32 zmm
/// registers; 6 x 16 left the FMAs waiting on each other's latency).
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Fused512;

impl Isa for Fused512 {
    const NR: usize = 32;
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// Whether the running CPU has AVX2 and FMA (std caches the answer).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// Set by tests to run the AVX2 builds on an AVX-512 machine (to check both give the same bits).
#[cfg(target_arch = "x86_64")]
static AVX2_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the running CPU has AVX-512 F and VL as well as AVX2 and FMA (std caches the answer).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx512() -> bool {
    !AVX2_ONLY.load(std::sync::atomic::Ordering::Relaxed)
        && has_avx2_fma()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512vl")
}

/// Tests only: with `on`, kernels take their AVX2 builds even where AVX-512 is present.
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) fn avx2_only(on: bool) {
    AVX2_ONLY.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Defines `fn $name(args)` that runs the generic kernel `$generic::<I>(args)` compiled for the
/// best instruction set of the running CPU. The kernel and everything it calls must be
/// `#[inline(always)]` (or generic and inlined) so that its body is compiled with those features.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident = $generic:ident($($arg:ident: $ty:ty),* $(,)?);) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx512($($arg: $ty),*) {
                    $generic::<$crate::fused::simd::Fused512>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2($($arg: $ty),*) {
                    $generic::<$crate::fused::simd::Fused>($($arg),*)
                }
                if $crate::fused::simd::has_avx512() {
                    // SAFETY: `avx512` only needs AVX-512 F/VL, AVX2 and FMA, which the running
                    // CPU was just checked to support.
                    unsafe { avx512($($arg),*) };
                    return;
                }
                if $crate::fused::simd::has_avx2_fma() {
                    // SAFETY: `avx2` only needs the AVX2 and FMA instructions, which the running
                    // CPU was just checked to support.
                    unsafe { avx2($($arg),*) };
                    return;
                }
            }
            #[cfg(target_arch = "aarch64")]
            {
                $generic::<$crate::fused::simd::Fused>($($arg),*)
            }
            #[cfg(not(target_arch = "aarch64"))]
            {
                $generic::<$crate::fused::simd::Plain>($($arg),*)
            }
        }
    };
}
pub(crate) use multiversion;

/// Independent partial sums per reduction: two AVX2 registers, so consecutive FMAs do not wait on
/// each other.
pub(crate) const LANES: usize = 16;

/// Sums the lanes in a fixed tree order.
#[inline(always)]
fn hsum(acc: [f32; LANES]) -> f32 {
    let mut h = [0f32; LANES / 2];
    for (k, h) in h.iter_mut().enumerate() {
        *h = acc[k] + acc[k + LANES / 2];
    }
    let q = [h[0] + h[4], h[1] + h[5], h[2] + h[6], h[3] + h[7]];
    (q[0] + q[2]) + (q[1] + q[3])
}

/// `sum(a * b)`.
#[inline(always)]
pub(crate) fn dot<I: Isa>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (ac, ar) = a[..n].as_chunks::<LANES>();
    let (bc, br) = b[..n].as_chunks::<LANES>();
    let mut acc = [0f32; LANES];
    for (x, y) in ac.iter().zip(bc) {
        for k in 0..LANES {
            acc[k] = I::madd(x[k], y[k], acc[k]);
        }
    }
    let mut tail = 0f32;
    for (&x, &y) in ar.iter().zip(br) {
        tail = I::madd(x, y, tail);
    }
    hsum(acc) + tail
}

/// `sum(a * b * c)`.
#[inline(always)]
pub(crate) fn dot3<I: Isa>(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let n = a.len().min(b.len()).min(c.len());
    let (ac, ar) = a[..n].as_chunks::<LANES>();
    let (bc, br) = b[..n].as_chunks::<LANES>();
    let (cc, cr) = c[..n].as_chunks::<LANES>();
    let mut acc = [0f32; LANES];
    for ((x, y), z) in ac.iter().zip(bc).zip(cc) {
        for k in 0..LANES {
            acc[k] = I::madd(x[k] * y[k], z[k], acc[k]);
        }
    }
    let mut tail = 0f32;
    for ((&x, &y), &z) in ar.iter().zip(br).zip(cr) {
        tail = I::madd(x * y, z, tail);
    }
    hsum(acc) + tail
}

/// `sum(a)`.
#[inline(always)]
pub(crate) fn sum(a: &[f32]) -> f32 {
    let (ac, ar) = a.as_chunks::<LANES>();
    let mut acc = [0f32; LANES];
    for x in ac {
        for k in 0..LANES {
            acc[k] += x[k];
        }
    }
    hsum(acc) + ar.iter().fold(0.0, |s, &x| s + x)
}

/// `max(a)`; NaNs are skipped (a NaN row still ends up NaN through the sum of exponentials), and
/// an empty slice gives `-inf`.
#[inline(always)]
pub(crate) fn max(a: &[f32]) -> f32 {
    let (ac, ar) = a.as_chunks::<LANES>();
    let mut acc = [f32::NEG_INFINITY; LANES];
    for x in ac {
        for k in 0..LANES {
            acc[k] = if x[k] > acc[k] { x[k] } else { acc[k] };
        }
    }
    let mut m = ar
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for a in acc {
        m = if a > m { a } else { m };
    }
    m
}

/// `e^x` for `x <= 88`, the only arguments the kernels pass (scores minus their running max or
/// their logsumexp, which are <= 0 up to rounding). Cephes' `expf`: `x = n ln 2 + r` with
/// `|r| <= ln 2 / 2`, a degree-5 polynomial for `e^r` (about 1 ulp), and `2^n` built from its
/// exponent bits. Written with plain arithmetic and selects so that loops over it vectorise,
/// unlike libm's `expf`. Arguments below -87 (and `-inf`) give 0; NaN gives NaN.
#[inline(always)]
pub(crate) fn exp<I: Isa>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that `n * LN2_HI` is exact for |n| < 2^9 (LN2_HI is 0.693359375 = 355/512).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds a float of magnitude < 2^22 to an integer, which then sits in the
    // low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const ROUND_BITS: u32 = 0x4B40_0000;
    let xc = if x > 88.0 { 88.0 } else { x };
    let xc = if xc < -87.0 { -87.0 } else { xc };
    let t = I::madd(xc, LOG2E, ROUND);
    let n = t - ROUND;
    let r = I::madd(n, -LN2_HI, xc);
    let r = I::madd(n, -LN2_LO, r);
    let mut y = 1.987_569_1e-4;
    y = I::madd(y, r, 1.398_199_9e-3);
    y = I::madd(y, r, 8.333_452e-3);
    y = I::madd(y, r, 4.166_579_6e-2);
    y = I::madd(y, r, 1.666_666_5e-1);
    y = I::madd(y, r, 0.5); // Cephes' 5.0000001201e-1, which rounds to 0.5 in f32
    y = I::madd(y, r * r, r) + 1.0;
    // n is in [-126, 127] here, so n + 127 is a valid biased exponent.
    let pow2 = f32::from_bits(t.to_bits().wrapping_sub(ROUND_BITS).wrapping_add(127) << 23);
    if x < -87.0 {
        0.0
    } else {
        y * pow2
    }
}

/// `a[k] = e^(a[k] - m)` and returns the sum of the new values.
#[inline(always)]
pub(crate) fn exp_sub_sum<I: Isa>(a: &mut [f32], m: f32) -> f32 {
    let (ac, ar) = a.as_chunks_mut::<LANES>();
    let mut acc = [0f32; LANES];
    for x in ac {
        for k in 0..LANES {
            x[k] = exp::<I>(x[k] - m);
            acc[k] += x[k];
        }
    }
    let mut tail = 0f32;
    for x in ar {
        *x = exp::<I>(*x - m);
        tail += *x;
    }
    hsum(acc) + tail
}

/// `sum(e^(a - m))` without writing anything.
#[inline(always)]
pub(crate) fn sum_exp_sub<I: Isa>(a: &[f32], m: f32) -> f32 {
    let (ac, ar) = a.as_chunks::<LANES>();
    let mut acc = [0f32; LANES];
    for x in ac {
        for k in 0..LANES {
            acc[k] += exp::<I>(x[k] - m);
        }
    }
    let mut tail = 0f32;
    for &x in ar {
        tail += exp::<I>(x - m);
    }
    hsum(acc) + tail
}

/// `dst += a * x`.
#[inline(always)]
pub(crate) fn axpy<I: Isa>(dst: &mut [f32], a: f32, x: &[f32]) {
    for (d, &x) in dst.iter_mut().zip(x) {
        *d = I::madd(a, x, *d);
    }
}

/// `dst *= a`.
#[inline(always)]
pub(crate) fn scale(dst: &mut [f32], a: f32) {
    for d in dst {
        *d *= a;
    }
}

/// Which part of a diagonal (query block == key block) product is needed, so [`gemm`] skips the
/// register tiles that only the causal mask would zero.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Causal {
    /// Everything (a block strictly below the diagonal).
    Full,
    /// `C[r][c]` (r: query, c: key) is needed only for `c <= r`: tiles wholly above the diagonal
    /// are skipped (left as they were, 0 in the callers) and masked afterwards anyway.
    Lower,
    /// `C[r] += sum_kk A[r][kk] B[kk]` with `A[r][kk] = 0` for key `kk > r`: `kk` stops at the
    /// tile's last row.
    KeysUpToRow,
    /// `C[c] += sum_kk A[c][kk] B[kk]` with `A[c][kk] = 0` for query `kk < c` (the transposed
    /// products dK, dV): `kk` starts at the tile's first row.
    QueriesFromRow,
}

/// Rows of C held in registers by one [`tile`]; its columns are `I::NR`. 6 x 16 floats is 12 of
/// the 16 AVX2 registers, and each step over `k` loads 2 vectors of B and 6 scalars of A for 12
/// FMAs (the classic sgemm micro-kernel shape). Measured on 64 x 64 x 64 blocks: 6 x 16 runs
/// about 20% faster than 4 x 16; the AVX-512 build takes 6 x 32 ([`Fused512`]).
const MR: usize = 6;

/// `C[..R][..N] += op(A)[..R][..k] * B[..k][..N]`, summed over `k` in order in registers and then
/// added to C. `op(A)[r][kk]` is `a[r * lda + kk]`, or `a[kk * lda + r]` with `TA` (A transposed).
#[inline(always)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn tile<I: Isa, const R: usize, const N: usize, const TA: bool>(
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    let mut acc = [[0f32; N]; R];
    if TA {
        for (a, b) in a.chunks(lda).zip(b.chunks(ldb)).take(k) {
            let (a, b) = (&a[..R], &b[..N]);
            for r in 0..R {
                for n in 0..N {
                    acc[r][n] = I::madd(a[r], b[n], acc[r][n]);
                }
            }
        }
    } else {
        let rows: [&[f32]; R] = std::array::from_fn(|r| &a[r * lda..r * lda + k]);
        for (kk, b) in b.chunks(ldb).take(k).enumerate() {
            let b = &b[..N];
            for r in 0..R {
                let a = rows[r][kk];
                for n in 0..N {
                    acc[r][n] = I::madd(a, b[n], acc[r][n]);
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (c, &x) in c[r * ldc..r * ldc + N].iter_mut().zip(acc) {
            *c += x;
        }
    }
}

/// `C (m, n) += op(A) (m, k) * B (k, n)`, row-major with leading dimensions `lda`, `ldb`, `ldc`
/// (see [`tile`] for `TA`), skipping what `causal` says is not needed. Register tiles of
/// [`MR`] x `I::NR`; edges use narrower tiles. Each element of C gets its sum over `k` in order,
/// the same for any caller, so the result is deterministic.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gemm<I: Isa, const TA: bool>(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    causal: Causal,
) {
    let mut i = 0;
    while i < m {
        let mr = MR.min(m - i);
        // The range of k this row tile needs.
        let (k0, k1) = match causal {
            Causal::KeysUpToRow => (0, k.min(i + mr)),
            Causal::QueriesFromRow => (i.min(k), k),
            Causal::Full | Causal::Lower => (0, k),
        };
        if k1 <= k0 {
            i += mr;
            continue;
        }
        let a_tile = if TA {
            &a[k0 * lda + i..]
        } else {
            &a[i * lda + k0..]
        };
        let b_tile = &b[k0 * ldb..];
        let c_tile = &mut c[i * ldc..];
        let mut j = 0;
        while j < n {
            if causal == Causal::Lower && j > i + mr - 1 {
                break;
            }
            let nr = match n - j {
                r if r >= I::NR => I::NR,
                r if r >= 16 => 16,
                r if r >= 8 => 8,
                _ => 1,
            };
            let (b, c) = (&b_tile[j..], &mut c_tile[j..]);
            let kk = k1 - k0;
            match (mr, nr) {
                (6, 32) => tile::<I, 6, 32, TA>(kk, a_tile, lda, b, ldb, c, ldc),
                (5, 32) => tile::<I, 5, 32, TA>(kk, a_tile, lda, b, ldb, c, ldc),
                (4, 32) => tile::<I, 4, 32, TA>(kk, a_tile, lda, b, ldb, c, ldc),
                (3, 32) => tile::<I, 3, 32, TA>(kk, a_tile, lda, b, ldb, c, ldc),
                (2, 32) => tile::<I, 2, 32, TA>(kk, a_tile, lda, b, ldb, c, ldc),
                (1, 32) => tile::<I, 1, 32, TA>(kk, a_tile, lda, b, ldb, c, ldc),
                (6, 16) => tile::<I, 6, 16, TA>(kk, a_tile, lda, b, ldb, c, ldc),
                (5, 16) => tile::<I, 5, 16, TA>(kk, a_tile, lda, b, ldb, c, ldc),
                (4, 16) => tile::<I, 4, 16, TA>(kk, a_tile, lda, b, ldb, c, ldc),
                (3, 16) => tile::<I, 3, 16, TA>(kk, a_tile, lda, b, ldb, c, ldc),
                (2, 16) => tile::<I, 2, 16, TA>(kk, a_tile, lda, b, ldb, c, ldc),
                (1, 16) => tile::<I, 1, 16, TA>(kk, a_tile, lda, b, ldb, c, ldc),
                (6, 8) => tile::<I, 6, 8, TA>(kk, a_tile, lda, b, ldb, c, ldc),
                (5, 8) => tile::<I, 5, 8, TA>(kk, a_tile, lda, b, ldb, c, ldc),
                (4, 8) => tile::<I, 4, 8, TA>(kk, a_tile, lda, b, ldb, c, ldc),
                (3, 8) => tile::<I, 3, 8, TA>(kk, a_tile, lda, b, ldb, c, ldc),
                (2, 8) => tile::<I, 2, 8, TA>(kk, a_tile, lda, b, ldb, c, ldc),
                (1, 8) => tile::<I, 1, 8, TA>(kk, a_tile, lda, b, ldb, c, ldc),
                (6, _) => tile::<I, 6, 1, TA>(kk, a_tile, lda, b, ldb, c, ldc),
                (5, _) => tile::<I, 5, 1, TA>(kk, a_tile, lda, b, ldb, c, ldc),
                (4, _) => tile::<I, 4, 1, TA>(kk, a_tile, lda, b, ldb, c, ldc),
                (3, _) => tile::<I, 3, 1, TA>(kk, a_tile, lda, b, ldb, c, ldc),
                (2, _) => tile::<I, 2, 1, TA>(kk, a_tile, lda, b, ldb, c, ldc),
                _ => tile::<I, 1, 1, TA>(kk, a_tile, lda, b, ldb, c, ldc),
            }
            j += nr;
        }
        i += mr;
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gemm_nn_generic<I: Isa>(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    causal: Causal,
) {
    gemm::<I, false>(m, n, k, a, lda, b, ldb, c, ldc, causal)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gemm_tn_generic<I: Isa>(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    causal: Causal,
) {
    gemm::<I, true>(m, n, k, a, lda, b, ldb, c, ldc, causal)
}

multiversion!(
    /// `C += A B` (see [`gemm`]).
    pub(crate) fn gemm_nn = gemm_nn_generic(
        m: usize, n: usize, k: usize, a: &[f32], lda: usize, b: &[f32], ldb: usize,
        c: &mut [f32], ldc: usize, causal: Causal,
    );
);
multiversion!(
    /// `C += A^T B` (see [`gemm`]).
    pub(crate) fn gemm_tn = gemm_tn_generic(
        m: usize, n: usize, k: usize, a: &[f32], lda: usize, b: &[f32], ldb: usize,
        c: &mut [f32], ldc: usize, causal: Causal,
    );
);
