//! Quantized matrix-vector and matrix-matrix products for GGUF weights (Q4_0, Q4_1, Q8_0), with
//! SIMD paths chosen at run time and a scalar twin that is the oracle for them.
//!
//! `y = x W^T` where `W` (n, k) is block-quantized in blocks of 32 along `k`. As llama.cpp does,
//! the f32 activations are first quantized to 8 bits per block of 32 (`XBlock`: a scale `d`, the
//! int8 values and `s = d * sum(q)`), so each block's dot product is an exact integer sum scaled
//! by two floats:
//! - Q4_1 (`w = dw * q + mw`, `q` in 0..16): `dw * dx * sum(q * qx) + mw * s`.
//! - Q4_0 (`w = dw * (q - 8)`) is Q4_1 with `mw = -8 dw`, so it is repacked into Q4_1 blocks at
//!   load and shares that kernel (`-8 dw` is exact in f16: a power-of-two multiple).
//! - Q8_0 (`w = dw * q`, `q` int8): `dw * dx * sum(q * qx)`.
//!
//! Layout: the weights stay in the GGUF block layout (20 bytes per Q4_1 block, 34 per Q8_0),
//! because decode is close to memory-bound and any repack that widens the scales to f32 reads
//! 20% more bytes per token; the two f16 scales of a Q4_1 block sit side by side, so one F16C
//! instruction converts both. Activations use f32 scales (llama.cpp stores them in f16), which
//! only makes the result closer to the f32 matmul.
//!
//! Kernels: [`Kernel::Scalar`] (portable, the oracle), [`Kernel::Avx2`] (AVX2 + FMA + F16C:
//! `maddubs`/`madd`) and [`Kernel::Avx512Vnni`] (the same 256-bit loop with `vpdpbusd`, which fuses
//! the u8 x i8 multiply and the add into i32). [`Kernel::detect`] picks the best one the running
//! CPU has; nothing is assumed at compile time.
//!
//! Performance notes (SmolLM2-135M Q4_1, 2-core AVX-512 EPYC shared with other jobs, so numbers
//! move by about 10% between runs; `kiln bench generate` measures them):
//! - candle 0.11.1 (scalar `vec_dot_unopt` for Q4_1, and for Q8_0 without compile-time target
//!   features) decoded 13-14 tok/s on one thread; this module 93-112 tok/s (llama.cpp: ~80).
//! - Each micro-kernel computes one weight row against up to 4 activation rows (`TILE`), so a
//!   weight block is loaded and its nibbles unpacked once per 4 rows of a prefill batch.
//! - With one or two rows (decode), one accumulator made every block wait for the previous
//!   block's FMA (4 cycles); even and odd blocks now use separate accumulators (one-thread decode
//!   went from ~93 to ~100-112 tok/s).
//!   Three- and four-row tiles use the same split (measured ~5% slower prefill on AVX2 than one
//!   set) so that every row's result is the same whatever tile it lands in: a sequence decoded
//!   in a continuous batch gets bit-identical logits to the same sequence alone.
//! - The `mw * s` term of Q4_1 is summed in a scalar register per row.
//! - Threads: with many activation rows each task takes a tile of rows against all of W and
//!   writes (m, n) directly (an earlier version split W's rows and transposed the output at the
//!   end on one thread: slower prefill at 2 threads). With few rows (decode) tasks split W's rows,
//!   about 4 chunks per thread. Matmuls under `PAR_MIN_WORK` multiply-adds run on
//!   the calling thread: waking the pool for the q/k/v/o projections at decode cost more than
//!   it saved (this and 4 instead of 8 chunks per thread together: +14% decode at 2 threads). With one thread in the pool
//!   nothing is spawned, so `RAYON_NUM_THREADS=1` is one thread.
//! - `f32::round` is a libm call unless built for SSE4.1 (2% of decode); `round_half_away` is
//!   the same rounding in integer arithmetic.
//! - Done since: 512-bit kernels (`Kernel::Avx512Zmm`), q/k/v and gate/up in one parallel region
//!   (`matmul_row_many`), and [`QWeight::rows_into`] for callers with their own threads (the
//!   decode step's team), which picks the one-row micro-kernel once per call (per-row dispatch
//!   was 5% of a decode step; +11% decode at 1 thread).
//! - Tried and dropped (A/B on an AVX2 EPYC): four weight rows against one activation row per
//!   call (one load of each activation block for four rows) was 25-30% slower at decode, its 8
//!   vector and 8 scalar accumulators spilling out of AVX2's 16 registers; software prefetch 16
//!   blocks ahead was within noise.

use half::f16;

/// Elements per quantization block (all formats here).
pub const BLOCK: usize = 32;

/// Multiply-adds below which a matmul runs on the calling thread alone.
const PAR_MIN_WORK: usize = 1 << 19;

/// Activation rows computed together by one micro-kernel call.
const TILE: usize = 4;

/// Activation rows per micro-kernel call for the 512-bit kernels: 32 zmm registers hold eight
/// rows' accumulators, and each unpacked weight pair then serves twice as many rows.
const ZMM_TILE: usize = 8;

fn tile_rows(kernel: Kernel) -> usize {
    match kernel {
        Kernel::Avx512Zmm => ZMM_TILE,
        _ => TILE,
    }
}

/// One Q4_1 block exactly as GGUF stores it: scale and minimum (f16 bits), then 16 bytes holding
/// 32 nibbles (element `j` in the low nibble of byte `j`, element `j + 16` in the high nibble).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q4Block {
    dm: [u16; 2],
    qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<Q4Block>() == 20);

/// One Q8_0 block as GGUF stores it: scale (f16 bits), then 32 int8 values.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q8Block {
    d: u16,
    qs: [i8; 32],
}
const _: () = assert!(std::mem::size_of::<Q8Block>() == 34);

/// One block of quantized activations (llama.cpp's Q8_1 with f32 scales): `x ≈ d * qs`,
/// `s = d * sum(qs)`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct XBlock {
    d: f32,
    s: f32,
    qs: [i8; 32],
}

/// Two consecutive activation blocks repacked for [`Kernel::Avx512Zmm`]: the 64 int8 values in
/// one 512-bit load, each lane's scale (block `2p` in lanes 0..8, block `2p + 1` in 8..16, the
/// layout `vpdpbusd`'s 16 partial sums come out in) and the two `s` terms. A row with an odd
/// number of blocks ends in a pair whose second half is zeros.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct XPair {
    qs: [i8; 64],
    d: [f32; 16],
    s: [f32; 2],
}

/// One activation row quantized by [`QWeight::quantize_input`].
pub struct QInput {
    rows: XRows,
    cols: usize,
    kernel: Kernel,
}

/// Rows of activation blocks, pairs for the 512-bit kernel.
fn pack_pairs(xq: &[XBlock], nb: usize) -> Vec<XPair> {
    let np = nb.div_ceil(2);
    let mut out = Vec::with_capacity(xq.len() / nb.max(1) * np);
    for row in xq.chunks_exact(nb) {
        for pair in row.chunks(2) {
            let mut p = XPair {
                qs: [0; 64],
                d: [0.0; 16],
                s: [0.0; 2],
            };
            for (h, b) in pair.iter().enumerate() {
                p.qs[h * 32..(h + 1) * 32].copy_from_slice(&b.qs);
                p.d[h * 8..(h + 1) * 8].fill(b.d);
                p.s[h] = b.s;
            }
            out.push(p);
        }
    }
    out
}

/// Quantized activations in the layout the chosen kernel reads.
enum XRows {
    Blocks(Vec<XBlock>),
    Pairs(Vec<XPair>),
}

impl XRows {
    /// Rows of `nb` blocks, repacked into pairs for the 512-bit kernels.
    fn for_kernel(xq: Vec<XBlock>, nb: usize, kernel: Kernel) -> Self {
        match kernel {
            Kernel::Avx512Zmm => XRows::Pairs(pack_pairs(&xq, nb)),
            _ => XRows::Blocks(xq),
        }
    }
}

/// The GGUF block formats this module multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl QFormat {
    /// Bytes of one 32-element block in the GGUF file.
    pub fn block_bytes(self) -> usize {
        match self {
            QFormat::Q4_0 => 18,
            QFormat::Q4_1 => 20,
            QFormat::Q8_0 => 34,
        }
    }
}

/// Which implementation runs the dot products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Portable Rust; the oracle for the others.
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 VNNI (256-bit `vpdpbusd`, needs AVX512VL) plus AVX2 + FMA + F16C.
    Avx512Vnni,
    /// 512-bit `vpdpbusd` over pairs of blocks, with activations repacked per pair
    /// ([`XPair`]): AVX-512 F/BW/DQ/VNNI plus F16C.
    Avx512Zmm,
}

impl Kernel {
    /// The fastest kernel the running CPU supports, or the one `KILN_QKERNEL` names (`scalar`,
    /// `avx2`, `avx512vnni`, `avx512zmm`) if the CPU has it: for comparing kernels in benchmarks.
    pub fn detect() -> Kernel {
        static CHOSEN: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let available = Kernel::available();
            let asked = std::env::var("KILN_QKERNEL").ok().and_then(|v| {
                available
                    .iter()
                    .copied()
                    .find(|k| format!("{k:?}").eq_ignore_ascii_case(&v))
            });
            asked.unwrap_or(*available.last().unwrap_or(&Kernel::Scalar))
        })
    }

    /// Every kernel the running CPU supports, slowest first (always starts with `Scalar`).
    pub fn available() -> Vec<Kernel> {
        let mut v = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if avx2 {
                v.push(Kernel::Avx2);
                if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
                    v.push(Kernel::Avx512Vnni);
                    if is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512dq")
                    {
                        v.push(Kernel::Avx512Zmm);
                    }
                }
            }
        }
        v
    }

    /// Whether this kernel can run on the current CPU.
    pub fn is_available(self) -> bool {
        static AVAILABLE: std::sync::OnceLock<Vec<Kernel>> = std::sync::OnceLock::new();
        AVAILABLE.get_or_init(Kernel::available).contains(&self)
    }
}

#[derive(Debug, Clone)]
enum Blocks {
    Q4(Vec<Q4Block>),
    Q8(Vec<Q8Block>),
}

/// A block-quantized weight matrix (n, k) in GGUF block layout, row after row.
#[derive(Debug, Clone)]
pub struct QWeight {
    format: QFormat,
    rows: usize,
    cols: usize,
    blocks: Blocks,
}

/// Why a byte buffer cannot be a quantized matrix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QWeightError {
    #[error("row length {cols} is not a multiple of {BLOCK}")]
    Cols { cols: usize },
    #[error("{format:?} matrix ({rows}, {cols}) needs {expected} bytes, got {got}")]
    Bytes {
        format: QFormat,
        rows: usize,
        cols: usize,
        expected: usize,
        got: usize,
    },
    #[error("input has {got} elements, expected a multiple of the row length {cols}")]
    Input { cols: usize, got: usize },
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

impl QWeight {
    /// Parses GGUF bytes of a (rows, cols) matrix. Q4_0 is repacked into Q4_1 blocks.
    pub fn from_gguf_bytes(
        format: QFormat,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Self, QWeightError> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(QWeightError::Cols { cols });
        }
        let nblocks = rows * cols / BLOCK;
        let expected = nblocks * format.block_bytes();
        if bytes.len() != expected {
            return Err(QWeightError::Bytes {
                format,
                rows,
                cols,
                expected,
                got: bytes.len(),
            });
        }
        let chunks = bytes.chunks_exact(format.block_bytes());
        let blocks = match format {
            QFormat::Q4_1 => Blocks::Q4(
                chunks
                    .map(|c| {
                        let mut qs = [0u8; 16];
                        qs.copy_from_slice(&c[4..20]);
                        Q4Block {
                            dm: [u16_at(c, 0), u16_at(c, 2)],
                            qs,
                        }
                    })
                    .collect(),
            ),
            QFormat::Q4_0 => Blocks::Q4(
                chunks
                    .map(|c| {
                        let mut qs = [0u8; 16];
                        qs.copy_from_slice(&c[2..18]);
                        let d = f16::from_bits(u16_at(c, 0));
                        let m = f16::from_f32(-8.0 * d.to_f32());
                        Q4Block {
                            dm: [d.to_bits(), m.to_bits()],
                            qs,
                        }
                    })
                    .collect(),
            ),
            QFormat::Q8_0 => Blocks::Q8(
                chunks
                    .map(|c| {
                        let mut qs = [0i8; 32];
                        for (q, &b) in qs.iter_mut().zip(&c[2..34]) {
                            *q = b as i8;
                        }
                        Q8Block {
                            d: u16_at(c, 0),
                            qs,
                        }
                    })
                    .collect(),
            ),
        };
        Ok(Self {
            format,
            rows,
            cols,
            blocks,
        })
    }

    pub fn format(&self) -> QFormat {
        self.format
    }

    /// (n, k): output features, input features.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The weights as f32, (n, k) row-major: the reference for tests and the dense fallback.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        match &self.blocks {
            Blocks::Q4(bs) => {
                for b in bs {
                    let d = f16::from_bits(b.dm[0]).to_f32();
                    let m = f16::from_bits(b.dm[1]).to_f32();
                    let mut v = [0f32; 32];
                    for j in 0..16 {
                        v[j] = d * (b.qs[j] & 0x0F) as f32 + m;
                        v[j + 16] = d * (b.qs[j] >> 4) as f32 + m;
                    }
                    out.extend_from_slice(&v);
                }
            }
            Blocks::Q8(bs) => {
                for b in bs {
                    let d = f16::from_bits(b.d).to_f32();
                    out.extend(b.qs.iter().map(|&q| d * q as f32));
                }
            }
        }
        out
    }

    /// `x` is (m, k) row-major; returns `x W^T`, (m, n) row-major, with the fastest kernel.
    pub fn matmul(&self, x: &[f32]) -> Result<Vec<f32>, QWeightError> {
        self.matmul_with(x, Kernel::detect())
    }

    /// [`QWeight::matmul`] with a chosen kernel; one the CPU lacks falls back to the best it has.
    pub fn matmul_with(&self, x: &[f32], kernel: Kernel) -> Result<Vec<f32>, QWeightError> {
        let k = self.cols;
        if k == 0 || !x.len().is_multiple_of(k) {
            return Err(QWeightError::Input {
                cols: k,
                got: x.len(),
            });
        }
        let kernel = if kernel.is_available() {
            kernel
        } else {
            Kernel::detect()
        };
        let m = x.len() / k;
        let n = self.rows;
        let nb = k / BLOCK;
        let threads = rayon::current_num_threads();
        // Below about half a million multiply-adds (20-30 us on one core: the q/k/v/o projections
        // of a 135M model at decode) waking the pool costs more than it saves.
        let parallel = threads > 1 && n * m * k >= PAR_MIN_WORK;
        // Quantizing a prompt's activations is a few percent of prefill; on one thread it would
        // be the serial part that limits scaling.
        let xq = if parallel && m >= 2 * threads {
            quantize_rows_par(x, k)
        } else {
            quantize_rows(x, k)
        };
        let xq = XRows::for_kernel(xq, nb, kernel);
        use rayon::prelude::*;
        let tile = tile_rows(kernel);
        if m.div_ceil(tile) >= 2 * threads || (!parallel && m > 1) {
            // Many activation rows (prefill, batches): each task takes a tile of rows against all
            // of W, which writes (m, n) directly. A weight matrix (at most ~1 MB here) streams from
            // L2 while the tile's activations stay in L1.
            let mut out = vec![0f32; m * n];
            let run = |r0: usize, rows: &mut [f32]| {
                let t = rows.len() / n;
                let mut o = [0f32; ZMM_TILE];
                for j in 0..n {
                    self.dot_tile(j, nb, &xq, r0, &mut o[..t], kernel);
                    for (i, v) in o[..t].iter().enumerate() {
                        rows[i * n + j] = *v;
                    }
                }
            };
            if parallel {
                out.par_chunks_mut(tile * n)
                    .enumerate()
                    .for_each(|(c, rows)| run(c * tile, rows));
            } else {
                for (c, rows) in out.chunks_mut(tile * n).enumerate() {
                    run(c * tile, rows);
                }
            }
            return Ok(out);
        }
        // Few activation rows (decode): split W's rows instead. The output is built transposed,
        // (n, m), so each task's chunk is contiguous; for m == 1 that is already (1, n) and the
        // transpose below only touches a few rows.
        let mut out_t = vec![0f32; n * m];
        let run = |first_row: usize, out: &mut [f32]| {
            for (jj, o) in out.chunks_exact_mut(m).enumerate() {
                self.row_dot(first_row + jj, nb, &xq, m, o, kernel);
            }
        };
        if parallel {
            // About 4 chunks per thread balances uneven progress (a core shared with another
            // process) without much task overhead.
            let rows_per_task = n.div_ceil(threads * 4).max(8);
            out_t
                .par_chunks_mut(rows_per_task * m)
                .enumerate()
                .for_each(|(c, out)| run(c * rows_per_task, out));
        } else {
            run(0, &mut out_t);
        }
        if m == 1 {
            return Ok(out_t);
        }
        let mut out = vec![0f32; m * n];
        for j in 0..n {
            for r in 0..m {
                out[r * n + j] = out_t[j * m + r];
            }
        }
        Ok(out)
    }

    /// One activation row `x` against several matrices with its row length (q/k/v, gate/up):
    /// `x` is quantized once and all their rows are split over the pool in one parallel region,
    /// where separate calls would leave the small ones on one thread (under `PAR_MIN_WORK`) and
    /// wake the pool once per matrix. Each output equals [`QWeight::matmul`]'s bit for bit (the
    /// same dot product per element). Returns `None` unless every matrix has `x.len()` columns.
    pub fn matmul_row_many(ws: &[&QWeight], x: &[f32]) -> Option<Vec<Vec<f32>>> {
        let k = x.len();
        if k == 0 || ws.is_empty() || ws.iter().any(|w| w.cols != k) {
            return None;
        }
        let kernel = Kernel::detect();
        let nb = k / BLOCK;
        let xq = quantize_rows(x, k);
        let xq = XRows::for_kernel(xq, nb, kernel);
        // (matrix, first row, rows) chunks over all matrices.
        let threads = rayon::current_num_threads();
        let total: usize = ws.iter().map(|w| w.rows).sum();
        let per_task = total.div_ceil(threads * 4).max(8);
        let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; w.rows]).collect();
        let mut tasks: Vec<(usize, usize, &mut [f32])> = Vec::new();
        for (i, o) in outs.iter_mut().enumerate() {
            for (c, chunk) in o.chunks_mut(per_task).enumerate() {
                tasks.push((i, c * per_task, chunk));
            }
        }
        let run = |(i, first, out): (usize, usize, &mut [f32])| {
            for (jj, o) in out.iter_mut().enumerate() {
                ws[i].row_dot(first + jj, nb, &xq, 1, std::slice::from_mut(o), kernel);
            }
        };
        if threads > 1 && total * k >= PAR_MIN_WORK {
            use rayon::prelude::*;
            tasks.into_par_iter().for_each(run);
        } else {
            tasks.into_iter().for_each(run);
        }
        Some(outs)
    }

    /// One activation row quantized for this matrix's kernels (the blocks [`QWeight::matmul`]
    /// makes of it), to multiply by ranges of rows with [`QWeight::rows_into`]. `None` unless
    /// `x.len()` is the matrix's row length.
    pub fn quantize_input(&self, x: &[f32]) -> Option<QInput> {
        let k = self.cols;
        if k == 0 || x.len() != k {
            return None;
        }
        let kernel = Kernel::detect();
        let rows = XRows::for_kernel(quantize_rows(x, k), k / BLOCK, kernel);
        Some(QInput {
            rows,
            cols: k,
            kernel,
        })
    }

    /// Rows `rows` of `x W^T` for one quantized row `x` into `out` (`rows.len()` values), each
    /// bit-identical to the same element of [`QWeight::matmul`]. This is the unit of work a
    /// caller splits among its own threads.
    ///
    /// # Panics
    /// If `x` was quantized for a different row length, `rows` runs past the matrix or `out` is
    /// not `rows.len()` long (caller bugs, not data errors).
    pub fn rows_into(&self, x: &QInput, rows: std::ops::Range<usize>, out: &mut [f32]) {
        assert_eq!(
            x.cols, self.cols,
            "rows_into: input quantized for another width"
        );
        assert!(rows.end <= self.rows, "rows_into: rows past the matrix");
        assert_eq!(out.len(), rows.len(), "rows_into: output length");
        let nb = self.cols / BLOCK;
        // The format, the activation packing and the kernel are the same for every row: pick the
        // one-row micro-kernel once instead of per row (the per-row dispatch in `dot_tile` was
        // 5% of a decode step). The same kernel call, so the same bits.
        #[cfg(target_arch = "x86_64")]
        if let XRows::Blocks(xb) = &x.rows {
            let xb = &xb[..nb];
            macro_rules! each_row {
                ($bs:expr, $kernel:path) => {{
                    for (j, o) in rows.zip(out) {
                        let w = &$bs[j * nb..(j + 1) * nb];
                        // SAFETY: `Kernel::available` checked the kernel's CPU features when
                        // `x` was quantized for it; `w` and `xb` hold `nb` blocks, `o` one value.
                        unsafe { $kernel(w, xb, nb, std::slice::from_mut(o)) };
                    }
                    return;
                }};
            }
            match (&self.blocks, x.kernel) {
                (Blocks::Q4(bs), Kernel::Avx2) => each_row!(bs, x86::q4_avx2::<1>),
                (Blocks::Q8(bs), Kernel::Avx2) => each_row!(bs, x86::q8_avx2::<1>),
                (Blocks::Q4(bs), Kernel::Avx512Vnni) => each_row!(bs, x86::q4_vnni::<1>),
                (Blocks::Q8(bs), Kernel::Avx512Vnni) => each_row!(bs, x86::q8_vnni::<1>),
                _ => {}
            }
        }
        for (j, o) in rows.zip(out) {
            self.row_dot(j, nb, &x.rows, 1, std::slice::from_mut(o), x.kernel);
        }
    }

    /// Weight row `j` against the `out.len()` (1..=`tile_rows`) activation rows from row `r0` of
    /// `xq`.
    fn dot_tile(
        &self,
        j: usize,
        nb: usize,
        xq: &XRows,
        r0: usize,
        out: &mut [f32],
        kernel: Kernel,
    ) {
        let t = out.len();
        match xq {
            XRows::Blocks(xb) => {
                let x = &xb[r0 * nb..(r0 + t) * nb];
                match &self.blocks {
                    Blocks::Q4(bs) => q4_tile(&bs[j * nb..(j + 1) * nb], x, nb, out, kernel),
                    Blocks::Q8(bs) => q8_tile(&bs[j * nb..(j + 1) * nb], x, nb, out, kernel),
                }
            }
            XRows::Pairs(xp) => {
                let np = nb.div_ceil(2);
                let x = &xp[r0 * np..(r0 + t) * np];
                match &self.blocks {
                    Blocks::Q4(bs) => zmm_tile(ZmmW::Q4(&bs[j * nb..(j + 1) * nb]), x, nb, out),
                    Blocks::Q8(bs) => zmm_tile(ZmmW::Q8(&bs[j * nb..(j + 1) * nb]), x, nb, out),
                }
            }
        }
    }

    /// Weight row `j` against all `m` activation rows, `out[r]` for row `r`.
    fn row_dot(&self, j: usize, nb: usize, xq: &XRows, m: usize, out: &mut [f32], kernel: Kernel) {
        let mut r = 0;
        while r < m {
            let t = (m - r).min(tile_rows(kernel));
            self.dot_tile(j, nb, xq, r, &mut out[r..r + t], kernel);
            r += t;
        }
    }
}

/// Quantizes each row of `x` (rows of length `k`, a multiple of 32) to int8 blocks, rounding half
/// away from zero as llama.cpp's `quantize_row_q8_1_ref` does.
pub fn quantize_rows(x: &[f32], k: usize) -> Vec<XBlock> {
    debug_assert!(k.is_multiple_of(BLOCK));
    x.chunks_exact(BLOCK).map(quantize_block).collect()
}

/// [`quantize_rows`] with the rows spread over the current rayon pool (the same blocks).
fn quantize_rows_par(x: &[f32], k: usize) -> Vec<XBlock> {
    use rayon::prelude::*;
    x.par_chunks(k)
        .flat_map_iter(|row| row.chunks_exact(BLOCK).map(quantize_block))
        .collect()
}

fn quantize_block(c: &[f32]) -> XBlock {
    let amax = c.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let d = amax / 127.0;
    // Below the smallest normal float `1 / d` overflows to infinity and the rounding below
    // would overflow (found by the `gguf_model` fuzz target: norm weights of 3e-43); such a
    // block is zero to 8 bits anyway.
    let id = if d >= f32::MIN_POSITIVE { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; 32];
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(c) {
        *q = round_half_away(v * id) as i8;
        sum += *q as i32;
    }
    XBlock {
        d,
        s: d * sum as f32,
        qs,
    }
}

/// `f32::round` for |v| <= 127.5 without a call: Rust's `round` is a libm `roundf` call unless
/// the binary is built for SSE4.1, and it showed up at 2% of decode. `a - trunc(a)` is exact in
/// f32 here, so ties go away from zero exactly as `roundf` does.
#[inline]
fn round_half_away(v: f32) -> i32 {
    let a = v.abs();
    let t = a as i32;
    let r = if a - t as f32 >= 0.5 { t + 1 } else { t };
    if v < 0.0 {
        -r
    } else {
        r
    }
}

/// A weight row for the 512-bit kernels.
enum ZmmW<'a> {
    Q4(&'a [Q4Block]),
    Q8(&'a [Q8Block]),
}

/// One weight row against `out.len()` (1..=ZMM_TILE) rows of activation pairs.
fn zmm_tile(w: ZmmW, x: &[XPair], nb: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: only reached with `Kernel::Avx512Zmm`, which `Kernel::available` checked
    // (avx512f, avx512bw, avx512dq, avx512vnni, avx2, fma, f16c) at run time; the slices hold `nb` weight
    // blocks and `out.len()` rows of `nb.div_ceil(2)` pairs.
    unsafe {
        match (w, out.len()) {
            (ZmmW::Q4(w), 8) => x86::q4_zmm::<8>(w, x, nb, out),
            (ZmmW::Q4(w), 7) => x86::q4_zmm::<7>(w, x, nb, out),
            (ZmmW::Q4(w), 6) => x86::q4_zmm::<6>(w, x, nb, out),
            (ZmmW::Q4(w), 5) => x86::q4_zmm::<5>(w, x, nb, out),
            (ZmmW::Q4(w), 4) => x86::q4_zmm::<4>(w, x, nb, out),
            (ZmmW::Q4(w), 3) => x86::q4_zmm::<3>(w, x, nb, out),
            (ZmmW::Q4(w), 2) => x86::q4_zmm::<2>(w, x, nb, out),
            (ZmmW::Q4(w), _) => x86::q4_zmm::<1>(w, x, nb, out),
            (ZmmW::Q8(w), 8) => x86::q8_zmm::<8>(w, x, nb, out),
            (ZmmW::Q8(w), 7) => x86::q8_zmm::<7>(w, x, nb, out),
            (ZmmW::Q8(w), 6) => x86::q8_zmm::<6>(w, x, nb, out),
            (ZmmW::Q8(w), 5) => x86::q8_zmm::<5>(w, x, nb, out),
            (ZmmW::Q8(w), 4) => x86::q8_zmm::<4>(w, x, nb, out),
            (ZmmW::Q8(w), 3) => x86::q8_zmm::<3>(w, x, nb, out),
            (ZmmW::Q8(w), 2) => x86::q8_zmm::<2>(w, x, nb, out),
            (ZmmW::Q8(w), _) => x86::q8_zmm::<1>(w, x, nb, out),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, x, nb, out);
        unreachable!("Avx512Zmm is never available off x86_64");
    }
}

/// One Q4 weight row (`w`, `nb` blocks) against `out.len()` (1..=TILE) activation rows stored one
/// after another in `x`.
fn q4_tile(w: &[Q4Block], x: &[XBlock], nb: usize, out: &mut [f32], kernel: Kernel) {
    debug_assert!(w.len() == nb && x.len() == nb * out.len());
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => {
            // SAFETY: `Kernel::available` checked avx512vnni, avx512vl, avx2, fma and f16c at run
            // time, and the slice lengths were asserted above.
            unsafe {
                match out.len() {
                    4 => x86::q4_vnni::<4>(w, x, nb, out),
                    3 => x86::q4_vnni::<3>(w, x, nb, out),
                    2 => x86::q4_vnni::<2>(w, x, nb, out),
                    _ => x86::q4_vnni::<1>(w, x, nb, out),
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => {
            // SAFETY: as above, with avx2, fma and f16c.
            unsafe {
                match out.len() {
                    4 => x86::q4_avx2::<4>(w, x, nb, out),
                    3 => x86::q4_avx2::<3>(w, x, nb, out),
                    2 => x86::q4_avx2::<2>(w, x, nb, out),
                    _ => x86::q4_avx2::<1>(w, x, nb, out),
                }
            }
        }
        _ => {
            for (r, o) in out.iter_mut().enumerate() {
                *o = q4_dot_scalar(w, &x[r * nb..(r + 1) * nb]);
            }
        }
    }
}

fn q8_tile(w: &[Q8Block], x: &[XBlock], nb: usize, out: &mut [f32], kernel: Kernel) {
    debug_assert!(w.len() == nb && x.len() == nb * out.len());
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => {
            // SAFETY: see `q4_tile`.
            unsafe {
                match out.len() {
                    4 => x86::q8_vnni::<4>(w, x, nb, out),
                    3 => x86::q8_vnni::<3>(w, x, nb, out),
                    2 => x86::q8_vnni::<2>(w, x, nb, out),
                    _ => x86::q8_vnni::<1>(w, x, nb, out),
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => {
            // SAFETY: see `q4_tile`.
            unsafe {
                match out.len() {
                    4 => x86::q8_avx2::<4>(w, x, nb, out),
                    3 => x86::q8_avx2::<3>(w, x, nb, out),
                    2 => x86::q8_avx2::<2>(w, x, nb, out),
                    _ => x86::q8_avx2::<1>(w, x, nb, out),
                }
            }
        }
        _ => {
            for (r, o) in out.iter_mut().enumerate() {
                *o = q8_dot_scalar(w, &x[r * nb..(r + 1) * nb]);
            }
        }
    }
}

/// The scalar Q4 dot product: exact integer sums per block, then the two scale terms.
pub(crate) fn q4_dot_scalar(w: &[Q4Block], x: &[XBlock]) -> f32 {
    let mut acc = 0f32;
    for (b, xb) in w.iter().zip(x) {
        let mut isum = 0i32;
        for j in 0..16 {
            isum += (b.qs[j] & 0x0F) as i32 * xb.qs[j] as i32;
            isum += (b.qs[j] >> 4) as i32 * xb.qs[j + 16] as i32;
        }
        let d = f16::from_bits(b.dm[0]).to_f32();
        let m = f16::from_bits(b.dm[1]).to_f32();
        acc += d * xb.d * isum as f32 + m * xb.s;
    }
    acc
}

pub(crate) fn q8_dot_scalar(w: &[Q8Block], x: &[XBlock]) -> f32 {
    let mut acc = 0f32;
    for (b, xb) in w.iter().zip(x) {
        let isum: i32 =
            b.qs.iter()
                .zip(&xb.qs)
                .map(|(&a, &c)| a as i32 * c as i32)
                .sum();
        acc += f16::from_bits(b.d).to_f32() * xb.d * isum as f32;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The SIMD micro-kernels. Each is written once as a macro and instantiated per feature set,
    //! because `#[target_feature]` must sit on the function whose body the intrinsics inline into.

    use super::{Q4Block, Q8Block, XBlock, XPair};
    use std::arch::x86_64::*;

    /// One Q4 weight row against `R` rows of activation pairs, two blocks per 512-bit step: the
    /// nibbles of both blocks unpacked into one register, one `vpdpbusd` per row, and the
    /// per-lane scales (`dw * dx`, block by block) from the packed activations. Every `R` runs
    /// each row through the same instructions, so the kernel is batch-invariant.
    ///
    /// # Safety
    /// avx512f/bw/dq/vnni + avx2/fma/f16c; `w.len() >= nb`, `x.len() >= R * nb.div_ceil(2)`,
    /// `out.len() >= R`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni")]
    #[allow(clippy::needless_range_loop)] // `r` indexes `acc`, `macc` and the rows of `x`
    pub(super) unsafe fn q4_zmm<const R: usize>(
        w: &[Q4Block],
        x: &[XPair],
        nb: usize,
        out: &mut [f32],
    ) {
        let np = nb.div_ceil(2);
        let mask = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut macc = [_mm_setzero_ps(); R];
        let unpack = |blk: &Q4Block| -> (__m256i, f32, f32) {
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                blk.dm.as_ptr() as *const i32
            )));
            let q = _mm_loadu_si128(blk.qs.as_ptr() as *const __m128i);
            let v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), mask);
            (v, _mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)))
        };
        for p in 0..np {
            let b = 2 * p;
            let (v0, d0, m0) = unpack(w.get_unchecked(b));
            let (v1, d1, m1) = if b + 1 < nb {
                unpack(w.get_unchecked(b + 1))
            } else {
                (_mm256_setzero_si256(), 0.0, 0.0)
            };
            let wv = _mm512_inserti64x4(_mm512_castsi256_si512(v0), v1, 1);
            let wd = _mm512_insertf32x8(
                _mm512_castps256_ps512(_mm256_set1_ps(d0)),
                _mm256_set1_ps(d1),
                1,
            );
            let wm = _mm_set_ps(0.0, 0.0, m1, m0);
            for r in 0..R {
                let xp = x.get_unchecked(r * np + p);
                let xv = _mm512_loadu_si512(xp.qs.as_ptr() as *const __m512i);
                let isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv);
                let scale = _mm512_mul_ps(wd, _mm512_loadu_ps(xp.d.as_ptr()));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc[r]);
                let xs = _mm_castpd_ps(_mm_load_sd(xp.s.as_ptr() as *const f64));
                macc[r] = _mm_fmadd_ps(wm, xs, macc[r]);
            }
        }
        for r in 0..R {
            let m = macc[r];
            *out.get_unchecked_mut(r) = _mm512_reduce_add_ps(acc[r])
                + (_mm_cvtss_f32(m) + _mm_cvtss_f32(_mm_movehdup_ps(m)));
        }
    }

    /// The Q8_0 twin of [`q4_zmm`]: `vpdpbusd` needs an unsigned side, so the weights' absolute
    /// values multiply the activations with the weights' signs.
    ///
    /// # Safety
    /// As for [`q4_zmm`].
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni")]
    #[allow(clippy::needless_range_loop)] // `r` indexes `acc` and the packed rows of `x`
    pub(super) unsafe fn q8_zmm<const R: usize>(
        w: &[Q8Block],
        x: &[XPair],
        nb: usize,
        out: &mut [f32],
    ) {
        let np = nb.div_ceil(2);
        let mut acc = [_mm512_setzero_ps(); R];
        let half = |blk: &Q8Block| -> (__m256i, f32) {
            let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(blk.d as i32)));
            (_mm256_loadu_si256(blk.qs.as_ptr() as *const __m256i), d)
        };
        for p in 0..np {
            let b = 2 * p;
            let (v0, d0) = half(w.get_unchecked(b));
            let (v1, d1) = if b + 1 < nb {
                half(w.get_unchecked(b + 1))
            } else {
                (_mm256_setzero_si256(), 0.0)
            };
            let wv = _mm512_inserti64x4(_mm512_castsi256_si512(v0), v1, 1);
            let neg = _mm512_movepi8_mask(wv);
            let wabs = _mm512_abs_epi8(wv);
            let wd = _mm512_insertf32x8(
                _mm512_castps256_ps512(_mm256_set1_ps(d0)),
                _mm256_set1_ps(d1),
                1,
            );
            for r in 0..R {
                let xp = x.get_unchecked(r * np + p);
                let xv = _mm512_loadu_si512(xp.qs.as_ptr() as *const __m512i);
                let xs = _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv);
                let isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wabs, xs);
                let scale = _mm512_mul_ps(wd, _mm512_loadu_ps(xp.d.as_ptr()));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc[r]);
            }
        }
        for r in 0..R {
            *out.get_unchecked_mut(r) = _mm512_reduce_add_ps(acc[r]);
        }
    }

    /// Sum of the 8 lanes.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    macro_rules! q4_kernel {
        ($name:ident, $features:literal, |$w:ident, $x:ident| $dot:expr) => {
            /// One Q4 weight row against `R` activation rows (`x[r * nb..]`).
            ///
            /// # Safety
            /// The CPU must have the enabled features; `w.len() >= nb`, `x.len() >= R * nb`,
            /// `out.len() >= R`.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const R: usize>(
                w: &[Q4Block],
                x: &[XBlock],
                nb: usize,
                out: &mut [f32],
            ) {
                let mask = _mm256_set1_epi8(0x0F);
                // Block `b` of the row into accumulators `acc`/`macc` (named so the unrolled loop
                // below keeps two independent sets in registers).
                macro_rules! step {
                    ($b:expr, $acc:ident, $macc:ident) => {{
                        let blk = w.get_unchecked($b);
                        // d and m are adjacent f16s: one load and one conversion give both.
                        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                            blk.dm.as_ptr() as *const i32,
                        )));
                        let dw = _mm_cvtss_f32(dm);
                        let mw = _mm_cvtss_f32(_mm_movehdup_ps(dm));
                        let q = _mm_loadu_si128(blk.qs.as_ptr() as *const __m128i);
                        // Low nibbles are elements 0..16, high nibbles 16..32.
                        let $w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), mask);
                        for r in 0..R {
                            let xb = x.get_unchecked(r * nb + $b);
                            let $x = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                            let p: __m256i = $dot;
                            $acc[r] = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(p),
                                _mm256_set1_ps(dw * xb.d),
                                $acc[r],
                            );
                            $macc[r] += mw * xb.s;
                        }
                    }};
                }
                // Two accumulator sets, for even and odd blocks: with one, each block waits for
                // the previous block's FMA (4 cycles), which is what bounds decode (R = 1).
                let mut acc0 = [_mm256_setzero_ps(); R];
                let mut acc1 = [_mm256_setzero_ps(); R];
                let mut macc0 = [0f32; R];
                let mut macc1 = [0f32; R];
                // Every R uses the same two sets, so a row's result does not depend on how many
                // rows share its tile: a request's output in a continuous batch equals its output
                // alone (batch invariance). With three or four rows the rows were independent
                // chains already and the second set costs a little prefill speed on AVX2.
                let mut b = 0;
                while b + 1 < nb {
                    step!(b, acc0, macc0);
                    step!(b + 1, acc1, macc1);
                    b += 2;
                }
                while b < nb {
                    step!(b, acc0, macc0);
                    b += 1;
                }
                for r in 0..R {
                    *out.get_unchecked_mut(r) =
                        hsum(_mm256_add_ps(acc0[r], acc1[r])) + (macc0[r] + macc1[r]);
                }
            }
        };
    }

    macro_rules! q8_kernel {
        ($name:ident, $features:literal, |$w:ident, $x:ident| $dot:expr) => {
            /// One Q8_0 weight row against `R` activation rows (`x[r * nb..]`).
            ///
            /// # Safety
            /// As for the Q4 kernels.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const R: usize>(
                w: &[Q8Block],
                x: &[XBlock],
                nb: usize,
                out: &mut [f32],
            ) {
                macro_rules! step {
                    ($b:expr, $acc:ident) => {{
                        let blk = w.get_unchecked($b);
                        let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(blk.d as i32)));
                        let wv = _mm256_loadu_si256(blk.qs.as_ptr() as *const __m256i);
                        // u8 x i8 products need an unsigned side: |w| times x with w's sign.
                        let $w = _mm256_sign_epi8(wv, wv);
                        for r in 0..R {
                            let xb = x.get_unchecked(r * nb + $b);
                            let xv = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                            let $x = _mm256_sign_epi8(xv, wv);
                            let p: __m256i = $dot;
                            $acc[r] = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(p),
                                _mm256_set1_ps(dw * xb.d),
                                $acc[r],
                            );
                        }
                    }};
                }
                let mut acc0 = [_mm256_setzero_ps(); R];
                let mut acc1 = [_mm256_setzero_ps(); R];
                // The same split for every R (batch invariance, as in the Q4 kernel).
                let mut b = 0;
                while b + 1 < nb {
                    step!(b, acc0);
                    step!(b + 1, acc1);
                    b += 2;
                }
                while b < nb {
                    step!(b, acc0);
                    b += 1;
                }
                for r in 0..R {
                    *out.get_unchecked_mut(r) = hsum(_mm256_add_ps(acc0[r], acc1[r]));
                }
            }
        };
    }

    // AVX2: u8 x i8 pairs to i16 (at most 2 * 255 * 127, no saturation for these operands: the
    // Q4 side is below 16 and the Q8 side is |w| <= 128), then pairs of i16 to i32.
    q4_kernel!(q4_avx2, "avx2,fma,f16c", |w, x| _mm256_madd_epi16(
        _mm256_maddubs_epi16(w, x),
        _mm256_set1_epi16(1)
    ));
    q8_kernel!(q8_avx2, "avx2,fma,f16c", |w, x| _mm256_madd_epi16(
        _mm256_maddubs_epi16(w, x),
        _mm256_set1_epi16(1)
    ));
    // VNNI: `vpdpbusd` does u8 x i8 products summed in fours into i32 in one instruction.
    q4_kernel!(
        q4_vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        |w, x| _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x)
    );
    q8_kernel!(
        q8_vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        |w, x| _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x)
    );
}

#[cfg(test)]
mod tests {
    use super::round_half_away;

    #[test]
    fn tiny_and_huge_blocks_quantize_without_overflow() {
        for scale in [3e-43f32, 1e-40, f32::MIN_POSITIVE, 1e-30, 1.0, 1e30] {
            let c: Vec<f32> = (0..32).map(|i| (i as f32 - 15.5) * scale / 16.0).collect();
            let b = super::quantize_block(&c);
            assert!(b.d.is_finite() && b.s.is_finite(), "scale {scale}");
            assert!(
                b.qs.iter().all(|&q| (-127..=127).contains(&q)),
                "scale {scale}"
            );
        }
    }

    #[test]
    fn round_half_away_matches_f32_round() {
        let mut v = -127.5f32;
        while v <= 127.5 {
            for x in [
                v,
                f32::from_bits(v.to_bits() + 1),
                f32::from_bits(v.to_bits().wrapping_sub(1)),
            ] {
                if x.abs() <= 127.5 {
                    assert_eq!(round_half_away(x), x.round() as i32, "{x}");
                }
            }
            v += 0.25;
        }
        assert_eq!(round_half_away(0.49999997), 0);
        assert_eq!(round_half_away(-2.5), -3);
    }
}
