//! The dense projection `y = x W^T + b` as one op with its backward, on the `gemm` crate (the
//! same GEMM candle's CPU matmul uses, with its AVX-512 kernels on): `dx = dy W`,
//! `dW = dy^T x`, `db = sum_rows(dy)`.
//!
//! Composed from candle ops the layer is a reshape, a transpose, a matmul and a broadcast add,
//! and candle's backward gives each node a zero-filled gradient buffer and an add, then sums the
//! bias gradient with a strided reduction: measured as a quarter of a GPT-2-style training step.
//! Here the three products go straight into fresh buffers and the bias gradient is a
//! vectorised column sum.

use super::MatmulPrecision;
use gemm::Parallelism;
use rayon::prelude::*;

fn parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// A row-major or transposed view of a matrix: element (i, j) is at `i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(super) struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl View<'_> {
    /// The largest offset an (rows, cols) view reads, plus one.
    pub(super) fn extent(&self, rows: usize, cols: usize) -> usize {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * self.rs + (cols - 1) * self.cs + 1
        }
    }
}

/// `lhs (m, k) · rhs (k, n)` as a new row-major (m, n) buffer. The GEMM writes every element
/// (it does not read `dst`), so the buffer is not zero-filled first: for these outputs the
/// memset cost as much as a tenth of the matmul.
pub(super) fn matmul_new(m: usize, n: usize, k: usize, lhs: View<'_>, rhs: View<'_>) -> Vec<f32> {
    let len = m * n;
    if k == 0 || len == 0 {
        return vec![0f32; len];
    }
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let spare = &mut out.spare_capacity_mut()[..len];
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`; `raw_matmul` only writes through the
    // pointer (read_dst = false), every one of the `len` elements, before `set_len` below.
    unsafe {
        raw_matmul(m, n, k, lhs, rhs, spare.as_mut_ptr().cast::<f32>(), len);
        out.set_len(len);
    }
    out
}

/// [`matmul_new`] in `prec`: f32 on `gemm`, or bf16 operands on kiln's own kernel.
fn matmul(
    prec: MatmulPrecision,
    m: usize,
    n: usize,
    k: usize,
    lhs: View<'_>,
    rhs: View<'_>,
) -> Vec<f32> {
    match prec {
        MatmulPrecision::F32 => matmul_new(m, n, k, lhs, rhs),
        // `with_matmul_precision` refuses Bf16 where the kernel cannot run.
        #[cfg(target_arch = "x86_64")]
        MatmulPrecision::Bf16 => super::bf16::matmul_new(m, n, k, lhs, rhs),
        #[cfg(not(target_arch = "x86_64"))]
        MatmulPrecision::Bf16 => unreachable!("bf16 matmuls are refused on this target"),
    }
}

/// # Safety
/// `dst` must be valid for writes of `dst_len >= m * n` f32s and not overlap the inputs; `k > 0`.
unsafe fn raw_matmul(
    m: usize,
    n: usize,
    k: usize,
    lhs: View<'_>,
    rhs: View<'_>,
    dst: *mut f32,
    dst_len: usize,
) {
    assert!(dst_len >= m * n, "matmul: dst too small");
    assert!(lhs.data.len() >= lhs.extent(m, k), "matmul: lhs too small");
    assert!(rhs.data.len() >= rhs.extent(k, n), "matmul: rhs too small");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: every index the GEMM touches, `i * rs + j * cs` for i, j inside the stated shape,
    // lies inside the slices, as the assertions above check; `dst` is valid for m * n writes and
    // does not overlap the inputs (the caller's contract). With `read_dst = false` the old
    // contents of `dst` are never read (`alpha` unused).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            false,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(),
        );
    }
}

/// `y (m, n) = x (m, k) W^T + b` with `W` (n, k) row-major.
pub(super) fn forward(
    prec: MatmulPrecision,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    let mut y = matmul(
        prec,
        m,
        n,
        k,
        View {
            data: x,
            rs: k,
            cs: 1,
        },
        View {
            data: w,
            rs: 1,
            cs: k,
        },
    );
    if let Some(b) = b {
        y.par_chunks_mut(n).for_each(|row| {
            for (y, &b) in row.iter_mut().zip(b) {
                *y += b;
            }
        });
    }
    y
}

/// `dx = dy W` (m, k).
pub(super) fn grad_x(
    prec: MatmulPrecision,
    dy: &[f32],
    w: &[f32],
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    matmul(
        prec,
        m,
        k,
        n,
        View {
            data: dy,
            rs: n,
            cs: 1,
        },
        View {
            data: w,
            rs: k,
            cs: 1,
        },
    )
}

/// `dW = dy^T x` (n, k).
pub(super) fn grad_w(
    prec: MatmulPrecision,
    dy: &[f32],
    x: &[f32],
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    matmul(
        prec,
        n,
        k,
        m,
        View {
            data: dy,
            rs: 1,
            cs: n,
        },
        View {
            data: x,
            rs: k,
            cs: 1,
        },
    )
}

/// Rows per partial sum of the bias gradient: fixed, so the bits do not depend on threads.
const ROWS: usize = 256;

/// `db = sum_rows(dy)` (n): partial column sums over fixed blocks of rows, added in block order.
pub(super) fn grad_b(dy: &[f32], n: usize) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = dy
        .par_chunks(ROWS * n)
        .map(|block| {
            let mut acc = vec![0f32; n];
            for row in block.chunks_exact(n) {
                for (a, &g) in acc.iter_mut().zip(row) {
                    *a += g;
                }
            }
            acc
        })
        .collect();
    let mut db = vec![0f32; n];
    for p in partials {
        for (d, v) in db.iter_mut().zip(p) {
            *d += v;
        }
    }
    db
}
