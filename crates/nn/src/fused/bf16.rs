//! The bf16 GEMM of mixed-precision training: `C (m, n) = A (m, k) · B (k, n)` with both
//! operands rounded to bf16 (round to nearest even) and every product summed in f32, on
//! AVX-512 BF16's `vdpbf16ps`, which multiplies two pairs of bf16 and adds both products to an
//! f32 lane: twice the multiply-adds per instruction of an f32 FMA. The output stays f32.
//!
//! Written by hand because no crate on crates.io has a CPU bf16 x bf16 -> f32 GEMM (the `gemm`
//! crate's f16 path widens to f32 and runs the f32 kernel; candle's bf16 matmul does the same),
//! and because the rounding is folded into the packing that any GEMM does anyway, so the f32
//! activations and weights are read once and never stored as a bf16 copy of their own.
//!
//! Layout. `vdpbf16ps acc, a, b` computes `acc[j] += a[2j] b[2j] + a[2j+1] b[2j+1]`, so both
//! operands are packed as *pairs* along k (one u32 = two bf16, k even first, a zero pads odd k):
//! - B in panels of [`NR`] = 64 columns: `[panel][pair][64]` u32 (lanes past `n` feed only
//!   outputs that are not stored);
//! - A either as rows of pairs (`[row][pair]`, when A's rows are contiguous in k: a straight
//!   conversion) or in panels of [`MR`] = 6 rows (`[panel][pair][6]`, when A is a transpose); the
//!   kernel takes a row stride and a pair stride, so it reads both.
//!
//! The micro-kernel holds a 6 x 64 tile of C in 24 zmm registers; per pair it loads four B
//! vectors and broadcasts one u32 of each of the six A rows. k is cut in blocks of [`KC`] pairs
//! (a B micro-panel of 32 KiB stays in L1 while the A micro-panels of a tile stream past it); the
//! first block stores C, the others add to it. C is cut in tiles of `MC x NC` that rayon runs in
//! any order: each element of C is written by one task, its sum taken over k in one fixed order,
//! so the bits do not depend on the thread count.
//!
//! Rounding and denormals are the hardware's (`vcvtne2ps2bf16`: nearest even, denormal inputs
//! to zero; `vdpbf16ps`: denormals to zero); every path, the scalar fallback for odd strides
//! included, converts through the same instruction, so a value rounds the same way wherever it
//! sits. Test: `tests` below, against an f64 product of the rounded operands.

use super::linear::View;
use rayon::prelude::*;
use std::arch::x86_64::*;

/// Rows of the micro-kernel's tile of C.
const MR: usize = 6;
/// Columns of the micro-kernel's tile of C (four 16-lane vectors).
const NR: usize = 64;
/// Pairs of k per block (256 values of k).
const KC: usize = 128;
/// Rows of C per task (8 micro-panels).
const MC: usize = 8 * MR;
/// Columns of C per task (4 panels).
const NC: usize = 4 * NR;

/// Whether the running CPU can run this GEMM (AVX-512 F/BW and BF16; std caches the answer).
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512bf16")
}

/// `lhs (m, k) · rhs (k, n)` as a new row-major (m, n) f32 buffer, operands rounded to bf16.
///
/// # Panics
/// If the CPU lacks AVX-512 BF16 ([`available`]) or a view is too short for its shape.
pub(super) fn matmul_new(m: usize, n: usize, k: usize, lhs: View<'_>, rhs: View<'_>) -> Vec<f32> {
    assert!(available(), "bf16 matmul needs AVX-512 BF16");
    assert!(
        lhs.data.len() >= lhs.extent(m, k),
        "bf16 matmul: lhs too small"
    );
    assert!(
        rhs.data.len() >= rhs.extent(k, n),
        "bf16 matmul: rhs too small"
    );
    let len = m * n;
    if k == 0 || len == 0 {
        return vec![0f32; len];
    }
    let kp = k.div_ceil(2);
    let (buf_a, buf_b) = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let a = pack_a(m, k, lhs, buf_a);
    let b = pack_b(k, n, rhs, buf_b);
    // Not zero-filled: the first block of k stores every element of every tile (the memset and
    // the page faults of a fresh zeroed buffer were a tenth of the GEMM's time).
    let mut c: Vec<f32> = Vec::with_capacity(len);
    let c_ptr = SendPtr(c.spare_capacity_mut().as_mut_ptr().cast::<f32>());
    let m_tiles = m.div_ceil(MC);
    let n_tiles = n.div_ceil(NC);
    (0..m_tiles * n_tiles).into_par_iter().for_each(|t| {
        let (ti, tj) = (t / n_tiles, t % n_tiles);
        let rows = ti * MC..((ti + 1) * MC).min(m);
        let cols = tj * NC..((tj + 1) * NC).min(n);
        for k0 in (0..kp).step_by(KC) {
            let pairs = KC.min(kp - k0);
            for j0 in cols.clone().step_by(NR) {
                let nc = NR.min(n - j0);
                let bp = &b[(j0 / NR) * kp * NR + k0 * NR..][..pairs * NR];
                for i0 in rows.clone().step_by(MR) {
                    let mr = MR.min(m - i0);
                    let (ap, rs, ps) = a.micro(i0, k0, kp);
                    // SAFETY: `available()` was checked. The A reads stay inside `a`: rows
                    // i0..i0 + MR (A is padded to whole panels) at pairs k0..k0 + pairs; B's
                    // micro-panel is `bp`. The C writes are rows i0..i0 + mr, columns
                    // j0..j0 + nc of the (m, n) buffer, inside this task's tile: no other task
                    // touches them.
                    unsafe {
                        kernel(
                            pairs,
                            ap.as_ptr(),
                            rs,
                            ps,
                            bp.as_ptr(),
                            c_ptr.get().add(i0 * n + j0),
                            n,
                            mr,
                            nc,
                            k0 > 0,
                        )
                    };
                }
            }
        }
    });
    // SAFETY: the tasks above wrote all `len` elements (tiles cover C; the first block of k,
    // k0 = 0, stores rows i0..i0 + mr and columns j0..j0 + nc of each micro-tile).
    unsafe { c.set_len(len) };
    SCRATCH.with(|s| *s.borrow_mut() = (a.into_vec(), b));
    c
}

thread_local! {
    /// The packing buffers of the last GEMM on this thread, kept for the next: the packed
    /// operands of a training step's products are up to 16 MiB, and a fresh allocation of
    /// that size is a fresh mmap whose page faults cost more than the packing. Their old
    /// contents are never read: packing writes every lane the kernel's stored outputs depend
    /// on (padding rows and columns feed only outputs that are not stored; the odd-k pad is
    /// always written as zero).
    static SCRATCH: std::cell::RefCell<(Vec<u32>, Vec<u32>)> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new()))
    };
}

/// A pointer into a buffer whose disjoint parts rayon tasks write.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: the tasks write disjoint parts of the buffer behind the pointer: tiles of C in
// `matmul_new`, pairs of the panels in `pack_panels`.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// By value, so that a closure captures the wrapper (Send), not its raw field.
    fn get(self) -> *mut T {
        self.0
    }
}

/// A packed in one of its two layouts, rows padded to a whole number of micro-panels.
enum PackedA {
    /// `[row][pair]`, `kp` pairs per row.
    Rows(Vec<u32>),
    /// `[panel][pair][MR]`.
    Panels(Vec<u32>),
}

impl PackedA {
    fn into_vec(self) -> Vec<u32> {
        match self {
            PackedA::Rows(v) | PackedA::Panels(v) => v,
        }
    }

    /// The slice starting at row `i0`, pair `k0`, with its row and pair strides.
    fn micro(&self, i0: usize, k0: usize, kp: usize) -> (&[u32], usize, usize) {
        match self {
            PackedA::Rows(v) => (&v[i0 * kp + k0..], kp, 1),
            PackedA::Panels(v) => (&v[(i0 / MR) * kp * MR + k0 * MR..], 1, MR),
        }
    }
}

/// `buf`: a buffer to reuse (its contents are overwritten or never read, see `SCRATCH`).
fn pack_a(m: usize, k: usize, a: View<'_>, buf: Vec<u32>) -> PackedA {
    if a.cs == 1 {
        // Rows contiguous in k: each row converts straight to its pairs.
        let kp = k.div_ceil(2);
        let mut out = sized(buf, m.div_ceil(MR) * MR * kp);
        out.par_chunks_mut(kp)
            .take(m)
            .enumerate()
            .for_each(|(i, row)| {
                // SAFETY: available() was checked by the caller; the row holds k values.
                unsafe { convert_row(&a.data[i * a.rs..][..k], row) }
            });
        PackedA::Rows(out)
    } else {
        // A transpose (k is the slow index): pairs of A's "columns" interleave like B's.
        PackedA::Panels(pack_panels(k, m, a, MR, buf))
    }
}

/// B as `[panel][pair][NR]`: columns of the view become the 64 lanes of a panel.
fn pack_b(k: usize, n: usize, b: View<'_>, buf: Vec<u32>) -> Vec<u32> {
    // Transposed, so that B's columns are the "rows" that `pack_panels` deals into lanes.
    let t = View {
        data: b.data,
        rs: b.cs,
        cs: b.rs,
    };
    pack_panels(k, n, t, NR, buf)
}

/// Pairs of k, and rows (a whole number of 48- and 64-row steps), per task of
/// `interleave_rows`: the task reads 32 source rows for 384 values each and writes its panels'
/// slots for 16 pairs; tiles this size keep both the reads and the writes on few pages.
const PB: usize = 16;
const CB: usize = 384;

/// The `count` rows of `x` (element (r, kk) at `r * rs + kk * cs`) as `[panel][pair][width]`
/// u32, `width` rows per panel; what lanes past `count` hold is never read (see `SCRATCH`).
fn pack_panels(k: usize, count: usize, x: View<'_>, width: usize, buf: Vec<u32>) -> Vec<u32> {
    let kp = k.div_ceil(2);
    let mut out = sized(buf, count.div_ceil(width) * kp * width);
    if x.rs == 1 {
        // Each value of k is a contiguous source row: tasks take a tile of pairs x rows.
        // (Measured on the (2048, 4096) gradient of the output head: a task per panel, reading
        // its columns down all the rows, was 3x slower; a task per block of pairs that wrote
        // every panel, 1.5x.)
        let dst = SendPtr(out.as_mut_ptr());
        let row_blocks = count.div_ceil(CB);
        (0..kp.div_ceil(PB) * row_blocks)
            .into_par_iter()
            .for_each(|t| {
                let (pb, rb) = (t / row_blocks, t % row_blocks);
                let pairs = pb * PB..((pb + 1) * PB).min(kp);
                let rows = rb * CB..((rb + 1) * CB).min(count);
                // SAFETY: available() was checked by the caller; this task writes only pairs
                // `pairs` of the panels of rows `rows`, which no other task writes; the buffer
                // holds every panel.
                unsafe {
                    if width == MR {
                        interleave_rows::<MR>(k, count, x, pairs, rows, dst.get(), kp)
                    } else {
                        interleave_rows::<NR>(k, count, x, pairs, rows, dst.get(), kp)
                    }
                }
            });
    } else {
        out.par_chunks_mut(kp * width)
            .enumerate()
            .for_each(|(q, panel)| {
                let r0 = q * width;
                // SAFETY: available() was checked by the caller; rows r0.. of the view exist.
                unsafe { interleave(k, width.min(count - r0), x, r0, width, panel) }
            });
    }
    out
}

/// `buf` at length `len`, keeping (not clearing) what it held.
fn sized(mut buf: Vec<u32>, len: usize) -> Vec<u32> {
    buf.resize(len, 0);
    buf.truncate(len);
    buf
}

/// Pairs `pairs` of every panel (`[panel][pair][width]`, `kp` pairs, at `out`) from a source
/// whose rows of k are contiguous (`x.rs == 1`): per pair, the two source rows are converted
/// sixteen lanes at a time into a small buffer that is then dealt out `width` lanes per panel.
///
/// # Safety
/// AVX-512 BF16; `out` holds `count.div_ceil(W) * kp * W` u32; `W` is `MR` or `NR`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn interleave_rows<const W: usize>(
    k: usize,
    count: usize,
    x: View<'_>,
    pairs: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
    out: *mut u32,
    kp: usize,
) {
    // A whole number of both 16-lane vectors and panels: lcm(16, 6) or 64.
    let step = if W == NR { NR } else { 48 };
    debug_assert!(step % W == 0 && step % 16 == 0);
    let mut tmp = [0u32; NR];
    for p in pairs {
        let k0 = 2 * p;
        for r0 in rows.clone().step_by(step) {
            for v in 0..step / 16 {
                let c0 = r0 + 16 * v;
                let lanes = 16.min(count.saturating_sub(c0));
                let packed = if lanes == 0 {
                    _mm512_setzero_si512()
                } else {
                    let mask = mask16(lanes);
                    // SAFETY: masked loads read only the `lanes` valid rows at k0 and k0 + 1.
                    let even =
                        unsafe { _mm512_maskz_loadu_ps(mask, x.data[c0 + k0 * x.cs..].as_ptr()) };
                    let odd = if k0 + 1 < k {
                        unsafe {
                            _mm512_maskz_loadu_ps(mask, x.data[c0 + (k0 + 1) * x.cs..].as_ptr())
                        }
                    } else {
                        _mm512_setzero_ps()
                    };
                    pairs16(even, odd)
                };
                // SAFETY: `tmp` holds 64 u32 and 16 * v + 16 <= step <= 64.
                unsafe { _mm512_storeu_si512(tmp.as_mut_ptr().add(16 * v).cast(), packed) };
            }
            for q in 0..step / W {
                let rq = r0 + q * W;
                if rq >= count {
                    break;
                }
                // SAFETY: panel rq / W exists (rq < count); pair p < kp.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        tmp.as_ptr().add(q * W),
                        out.add(((rq / W) * kp + p) * W),
                        W,
                    );
                }
            }
        }
    }
}

/// Fills `out` (`[pair][width]`, `kp * width` u32) with pairs along k of the `count` rows
/// `r0..r0 + count` of `x` (element (r, kk) at `r * rs + kk * cs`); lanes past `count` are not
/// written (see `SCRATCH`). Each row's values go 32 at a time through one conversion, read
/// straight from the row when k is contiguous (`cs == 1`), else gathered into a small buffer,
/// and are stored one pair per lane. (Rows contiguous go to `interleave_rows`.)
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn interleave(
    k: usize,
    count: usize,
    x: View<'_>,
    r0: usize,
    width: usize,
    out: &mut [u32],
) {
    let kp = k.div_ceil(2);
    debug_assert!(out.len() >= kp * width && count <= width);
    let mut buf = [0f32; 32];
    let mut tmp = [0u32; 16];
    for r in 0..count {
        let base = (r0 + r) * x.rs;
        for p0 in (0..kp).step_by(16) {
            let np = 16.min(kp - p0);
            let vals = (k - 2 * p0).min(32);
            let src: &[f32] = if x.cs == 1 {
                &x.data[base + 2 * p0..][..vals]
            } else {
                for (e, slot) in buf[..vals].iter_mut().enumerate() {
                    *slot = x.data[base + (2 * p0 + e) * x.cs];
                }
                &buf[..vals]
            };
            // SAFETY: `src` holds `vals` values; `tmp` holds 16 pairs.
            unsafe { convert32(src, vals, tmp.as_mut_ptr()) };
            for (j, &v) in tmp[..np].iter().enumerate() {
                out[(p0 + j) * width + r] = v;
            }
        }
    }
}

/// One row of k values (contiguous) to `k.div_ceil(2)` pairs.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn convert_row(row: &[f32], out: &mut [u32]) {
    let k = row.len();
    let kp = k.div_ceil(2);
    debug_assert!(out.len() >= kp);
    let mut tmp = [0u32; 16];
    let mut p0 = 0;
    while p0 < kp {
        let vals = (k - 2 * p0).min(32);
        if vals == 32 {
            // SAFETY: 32 values from 2 * p0, 16 pairs into `out` from p0.
            unsafe { convert32(&row[2 * p0..], 32, out.as_mut_ptr().add(p0)) };
        } else {
            let np = vals.div_ceil(2);
            // SAFETY: `vals` values; `tmp` holds 16 pairs.
            unsafe { convert32(&row[2 * p0..], vals, tmp.as_mut_ptr()) };
            out[p0..p0 + np].copy_from_slice(&tmp[..np]);
        }
        p0 += 16;
    }
}

/// `vals <= 32` contiguous f32 to 16 pairs (the missing values zero) at `dst`.
///
/// # Safety
/// `src` holds at least `vals` values; `dst` is valid for 16 u32 writes.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn convert32(src: &[f32], vals: usize, dst: *mut u32) {
    debug_assert!(vals <= 32 && src.len() >= vals);
    let m_lo = mask16(vals.min(16));
    let m_hi = mask16(vals.saturating_sub(16));
    // SAFETY: the masks cover only the `vals` valid elements.
    let (lo, hi) = unsafe {
        (
            _mm512_maskz_loadu_ps(m_lo, src.as_ptr()),
            _mm512_maskz_loadu_ps(m_hi, src.as_ptr().add(16)),
        )
    };
    // Element order of the result: lo's 16 then hi's 16, i.e. the values in memory order.
    let v = as_si(_mm512_cvtne2ps_pbh(hi, lo));
    // SAFETY: the caller's contract.
    unsafe { _mm512_storeu_si512(dst.cast(), v) };
}

/// 32 bf16 as 512 bits and back (no instruction: both are the same register).
#[inline(always)]
fn as_si(v: __m512bh) -> __m512i {
    // SAFETY: both types are 64 bytes of plain bits.
    unsafe { std::mem::transmute::<__m512bh, __m512i>(v) }
}

#[inline(always)]
fn as_bh(v: __m512i) -> __m512bh {
    // SAFETY: as above.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

fn mask16(lanes: usize) -> __mmask16 {
    ((1u32 << lanes) - 1) as __mmask16
}

/// Sixteen pairs `(even[j], odd[j])` as u32 lanes: bf16 of `even` in the low half.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
fn pairs16(even: __m512, odd: __m512) -> __m512i {
    // cvtne2ps(odd, even) = [even'0..15, odd'0..15] as 32 u16; vpermw interleaves them.
    let both = as_si(_mm512_cvtne2ps_pbh(odd, even));
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    _mm512_permutexvar_epi16(idx, both)
}

/// C[0..mr][0..nc] (row stride `ldc`) = (or +=, with `accumulate`) the product of `pairs` pairs:
/// A's u32 for row r, pair p at `a[r * a_rs + p * a_ps]` (MR rows readable), B's 64 lanes of
/// pair p at `b[p * 64..]`.
///
/// # Safety
/// The CPU has AVX-512 BF16; the reads above are in bounds for r < MR, p < pairs; C's rows
/// `0..mr`, columns `0..nc` (`mr <= MR`, `nc <= NR`) are valid for reads and writes.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    pairs: usize,
    a: *const u32,
    a_rs: usize,
    a_ps: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nc: usize,
    accumulate: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 4]; MR];
    let rows: [*const u32; MR] = std::array::from_fn(|r| unsafe { a.add(r * a_rs) });
    for p in 0..pairs {
        // SAFETY: in bounds by the contract.
        let bv: [__m512bh; 4] = unsafe {
            let bp = b.add(p * NR);
            [
                as_bh(_mm512_loadu_si512(bp.cast())),
                as_bh(_mm512_loadu_si512(bp.add(16).cast())),
                as_bh(_mm512_loadu_si512(bp.add(32).cast())),
                as_bh(_mm512_loadu_si512(bp.add(48).cast())),
            ]
        };
        for r in 0..MR {
            // SAFETY: in bounds by the contract.
            let av: __m512bh = as_bh(_mm512_set1_epi32(unsafe { *rows[r].add(p * a_ps) } as i32));
            for j in 0..4 {
                acc[r][j] = _mm512_dpbf16_ps(acc[r][j], av, bv[j]);
            }
        }
    }
    for (r, row) in acc.iter().enumerate().take(mr) {
        for (j, &v) in row.iter().enumerate() {
            let c0 = j * 16;
            if c0 >= nc {
                break;
            }
            let mask = mask16((nc - c0).min(16));
            // SAFETY: columns c0..c0 + lanes of row r are inside C by the contract.
            unsafe {
                let dst = c.add(r * ldc + c0);
                let v = if accumulate {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst), v)
                } else {
                    v
                };
                _mm512_mask_storeu_ps(dst, mask, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Round to bf16 (nearest even, denormals to zero), written independently of the kernel.
    fn bf16(x: f32) -> f64 {
        let bits = x.to_bits();
        if x.is_nan() {
            return f64::NAN;
        }
        if (bits & 0x7f80_0000) == 0 {
            return 0.0; // zero or denormal
        }
        let round = 0x7fff + ((bits >> 16) & 1);
        f32::from_bits(bits.wrapping_add(round) & 0xffff_0000) as f64
    }

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// Checks `matmul_new` against f64 sums of the bf16-rounded operands for a view layout:
    /// `a_t` / `b_t` store the operand transposed.
    fn check(m: usize, n: usize, k: usize, a_t: bool, b_t: bool, seed: u64) {
        let mut g = Lcg(seed);
        let a: Vec<f32> = (0..m * k).map(|_| g.next() * 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|_| g.next()).collect();
        let av = if a_t {
            View {
                data: &a,
                rs: 1,
                cs: m,
            }
        } else {
            View {
                data: &a,
                rs: k,
                cs: 1,
            }
        };
        let bv = if b_t {
            View {
                data: &b,
                rs: 1,
                cs: k,
            }
        } else {
            View {
                data: &b,
                rs: n,
                cs: 1,
            }
        };
        let c = matmul_new(m, n, k, av, bv);
        for i in 0..m {
            for j in 0..n {
                let (mut want, mut mag) = (0f64, 0f64);
                for kk in 0..k {
                    let x = bf16(av.data[i * av.rs + kk * av.cs]);
                    let y = bf16(bv.data[kk * bv.rs + j * bv.cs]);
                    want += x * y;
                    mag += (x * y).abs();
                }
                let got = c[i * n + j] as f64;
                // f32 accumulation of k exact products: error below k ulps of the magnitude.
                let tol = (k as f64 + 2.0) * f32::EPSILON as f64 * mag + 1e-30;
                assert!(
                    (got - want).abs() <= tol,
                    "({m},{n},{k}) a_t={a_t} b_t={b_t} at ({i},{j}): {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn equals_f64_product_of_rounded_operands() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        // Edges in every dimension: m not a multiple of 6 or 48, n not of 16 or 64, odd k,
        // k past one block of 256, a single row and column.
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 17, 3),
            (50, 70, 33),
            (13, 300, 257),
            (49, 257, 600),
        ] {
            for (a_t, b_t) in [(false, false), (false, true), (true, false), (true, true)] {
                check(m, n, k, a_t, b_t, (m * 31 + n * 7 + k) as u64);
            }
        }
    }

    #[test]
    fn strided_views_take_the_gather_path() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        // A view with neither stride 1 (every other element of a wider buffer).
        let (m, n, k) = (9, 40, 21);
        let mut g = Lcg(5);
        let a: Vec<f32> = (0..2 * m * k).map(|_| g.next()).collect();
        let b: Vec<f32> = (0..k * n).map(|_| g.next()).collect();
        let av = View {
            data: &a,
            rs: 2 * k,
            cs: 2,
        };
        let bv = View {
            data: &b,
            rs: n,
            cs: 1,
        };
        let c = matmul_new(m, n, k, av, bv);
        let dense: Vec<f32> = (0..m * k)
            .map(|e| a[(e / k) * 2 * k + (e % k) * 2])
            .collect();
        let want = matmul_new(
            m,
            n,
            k,
            View {
                data: &dense,
                rs: k,
                cs: 1,
            },
            bv,
        );
        assert_eq!(c, want);
    }

    #[test]
    fn bits_do_not_depend_on_threads() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        let (m, n, k) = (100, 130, 700);
        let mut g = Lcg(9);
        let a: Vec<f32> = (0..m * k).map(|_| g.next()).collect();
        let b: Vec<f32> = (0..k * n).map(|_| g.next()).collect();
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| {
                    matmul_new(
                        m,
                        n,
                        k,
                        View {
                            data: &a,
                            rs: k,
                            cs: 1,
                        },
                        View {
                            data: &b,
                            rs: n,
                            cs: 1,
                        },
                    )
                })
        };
        assert_eq!(run(1), run(3));
    }
}
