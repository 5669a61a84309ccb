//! Fused CPU training kernels with a backward pass, as candle custom ops.
//!
//! candle's fused CPU ops (`candle_nn::ops::rms_norm`, `layer_norm`, `softmax_last_dim`,
//! `rotary_emb::rope`) have no backward pass, so training would otherwise compose these layers
//! from primitives: a dozen graph nodes and (N, D)-sized temporaries per norm, the full (T, T)
//! score and probability matrices per attention head, a log-softmax copy of the logits. Each op
//! here is one `CustomOp` whose forward is a hand-written f32 kernel (rayon over fixed chunks)
//! and whose `bwd` is another. f32 and CPU only; every op makes its inputs contiguous first and
//! returns an error, never panics, for a wrong dtype, device or shape (empty tensors included).
//!
//! - [`rms_norm`]: `y = x * r * w` with `r = 1 / sqrt(mean(x^2) + eps)` per row of D. Backward,
//!   with `gw = g * w`: `dx = r * gw - x * r^3 * sum(gw * x) / D`, `dw = sum_rows(g * x * r)`.
//! - [`layer_norm`]: `xh = (x - mean) * r`, `r = 1 / sqrt(var + eps)` (biased variance),
//!   `y = xh * w + b`. Backward: `dx = r * (gw - mean(gw) - xh * mean(gw * xh))`,
//!   `dw = sum_rows(g * xh)`, `db = sum_rows(g)`. Both norms recompute the row statistics in
//!   backward instead of saving them.
//! - [`rope`]: rotate-half RoPE, `y1 = x1 cos - x2 sin`, `y2 = x1 sin + x2 cos` (x1, x2 the two
//!   halves of a head). Backward is the inverse rotation: the same kernel with `-sin`.
//! - [`causal_attention`]: `O = softmax(scale * Q K^T + causal mask) V`, computed like
//!   FlashAttention-2: key blocks of 64 with an online softmax, never the (T, T) matrix; forward
//!   saves each query row's logsumexp `L`. Backward recomputes `P = e^(scale * Q K^T - L)` block
//!   by block: `dV = P^T dO`, `dP = dO V^T`, `dS = P * (dP - rowsum(dO * O))`,
//!   `dQ = scale * dS K`, `dK = scale * dS^T Q` (summed over the query heads sharing a kv head).
//! - [`cross_entropy`]: `mean_i (logsumexp(x_i) - x_i[t_i])` over rows whose target is not
//!   `ignore_index`. Forward saves each row's logsumexp; backward writes
//!   `(e^(x - lse) - onehot(t)) * g / count` in one pass over the logits.
//!
//! - [`linear`]: `y = x W^T + b` in one node, `dx = dy W`, `dW = dy^T x`, `db = sum_rows(dy)`
//!   on the `gemm` crate (see `fused/linear.rs`), or with bf16 operands on kiln's own AVX-512
//!   BF16 GEMM (`fused/bf16.rs`) inside [`with_matmul_precision`].
//! - [`linear_cross_entropy`]: an output head without bias and the loss in one node whose
//!   forward pass computes the gradients (no (N, V) tensor outlives it).
//! - [`gelu_tanh`], [`gelu_erf`] and [`swiglu`]: the MLP activations, elementwise with their
//!   derivatives (formulas in `fused/activation.rs`).
//! - [`encoder_attention`] (forward only, for inference): bidirectional attention over a packed
//!   batch of sequences straight from a fused QKV projection's (N, 3, H, D) output.
//!
//! **Determinism.** The same inputs give bit-identical outputs and gradients on every run and for
//! any rayon thread count: work is split into chunks fixed by the shapes alone (rows for norms and
//! cross-entropy, (batch, head, query block) for attention forward, (batch, kv head) or, with few
//! of those, key blocks for dK/dV and query blocks for dQ in attention backward), every output
//! element is written by exactly one task in a fixed order, and sums across chunks (the norms'
//! weight and bias gradients) are per-chunk partials added in chunk order. The two attention
//! backward schedules add the same blocks in the same order, so they give the same bits. The
//! instruction set (AVX-512 or AVX2 + FMA, which agree bit for bit, or the baseline without FMA,
//! see `simd.rs`) is picked from the CPU, so bits can differ between machines, never between
//! runs on one. bf16 matmuls ([`MatmulPrecision::Bf16`]) follow the same rules.

mod activation;
mod attention;
#[cfg(target_arch = "x86_64")]
mod bf16;
mod cross_entropy;
mod encoder_attention;
mod linear;
mod norm;
mod rope;
pub(crate) mod simd;

use crate::{NnError, OpContext, Result};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, StorageRef, Tensor,
};
use std::cell::Cell;
use std::sync::Mutex;

/// The arithmetic of [`linear`]'s three products (forward, `dx`, `dW`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatmulPrecision {
    /// f32 operands and sums (the `gemm` crate).
    #[default]
    F32,
    /// Operands rounded to bf16 (nearest even), products summed in f32, outputs f32: the
    /// mixed precision of `torch.autocast(dtype=bfloat16)` for matmuls, with f32 weights,
    /// gradients and optimizer state. Needs AVX-512 BF16 ([`bf16_available`]); see
    /// `fused/bf16.rs`.
    Bf16,
}

thread_local! {
    static PRECISION: Cell<MatmulPrecision> = const { Cell::new(MatmulPrecision::F32) };
}

/// Whether this CPU runs [`MatmulPrecision::Bf16`] (AVX-512 F, BW and BF16).
pub fn bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        bf16::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The precision [`linear`] uses on this thread now.
pub fn matmul_precision() -> MatmulPrecision {
    PRECISION.with(Cell::get)
}

/// Whether this CPU can run `precision`: an error naming what `Bf16` needs where it cannot.
pub fn check_matmul_precision(precision: MatmulPrecision) -> Result<()> {
    if precision == MatmulPrecision::Bf16 && !bf16_available() {
        return Err(NnError::Unsupported(
            "bf16 matmuls need a CPU with AVX-512 BF16 (avx512_bf16), which this one lacks; use f32".into(),
        ));
    }
    Ok(())
}

/// Runs `f` with [`linear`] on this thread in `precision` (restored afterwards, also when `f`
/// panics). An op keeps the precision it was built with, so its backward, run later, matches
/// its forward. Errors, without running `f`, where [`check_matmul_precision`] does.
pub fn with_matmul_precision<R>(precision: MatmulPrecision, f: impl FnOnce() -> R) -> Result<R> {
    check_matmul_precision(precision)?;
    struct Restore(MatmulPrecision);
    impl Drop for Restore {
        fn drop(&mut self) {
            PRECISION.with(|p| p.set(self.0));
        }
    }
    let _restore = Restore(PRECISION.with(|p| p.replace(precision)));
    Ok(f())
}

/// Row forms of the kernels below for callers that run their own threads (the one-token decode
/// step, `kiln_nn::team`): the same arithmetic as the tensor ops, so the same bits.
pub mod rows {
    /// One row of [`super::rms_norm`]: `y = x / sqrt(mean(x^2) + eps) * w`.
    ///
    /// # Panics
    /// If `x`, `w` and `y` differ in length.
    pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
        assert!(
            x.len() == w.len() && y.len() == w.len(),
            "rows::rms_norm lengths"
        );
        super::norm::rms_fwd_task(x, w, eps, y);
    }

    /// [`super::swiglu`] elementwise: `y = silu(gate) * up`.
    ///
    /// # Panics
    /// If the lengths differ.
    pub fn swiglu(gate: &[f32], up: &[f32], y: &mut [f32]) {
        assert!(
            gate.len() == up.len() && y.len() == up.len(),
            "rows::swiglu lengths"
        );
        super::activation::swiglu_task(gate, up, y);
    }

    /// One head of [`super::rope`] at one position (`cos`, `sin`: that position's `d / 2`
    /// values), half-split layout.
    ///
    /// # Panics
    /// If `x` and `y` are not `2 * cos.len()` long.
    pub fn rope_half_split(x: &[f32], cos: &[f32], sin: &[f32], y: &mut [f32]) {
        let d = x.len();
        assert!(
            d == 2 * cos.len() && sin.len() == cos.len() && y.len() == d,
            "rows::rope lengths"
        );
        super::rope::rope_task(x, cos, sin, 1.0, d, y);
    }
}

/// `x` (..., K), `weight` (N, K), optional `bias` (N): `x W^T + b` -> (..., N). Grads to all.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    const OP: &str = "fused::linear";
    check_input("fused::linear x", x, DType::F32)?;
    check_input("fused::linear weight", weight, DType::F32)?;
    let (n, k) = weight
        .dims2()
        .map_err(|_| shape_err(OP, "weight of rank 2 (N, K)", weight))?;
    let kx = last_dim(OP, x)?;
    if kx != k {
        return Err(NnError::Shape {
            op: OP,
            expected: format!("x ending in {k} (the weight's input size)"),
            got: format!("{:?}", x.dims()),
        });
    }
    let x = x.contiguous().op(OP)?;
    let w = weight.contiguous().op(OP)?;
    let prec = matmul_precision();
    match bias {
        None => x.apply_op2(&w, LinearOp { n, k, prec }).op(OP),
        Some(b) => {
            check_input("fused::linear bias", b, DType::F32)?;
            check_vector(OP, b, n)?;
            let b = b.contiguous().op(OP)?;
            x.apply_op3(&w, &b, LinearOp { n, k, prec }).op(OP)
        }
    }
}

/// GELU with the tanh approximation (GPT-2; torch `gelu(approximate="tanh")`), elementwise.
/// Grad to `x`.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "fused::gelu_tanh";
    check_input(OP, x, DType::F32)?;
    let x = x.contiguous().op(OP)?;
    x.apply_op1(GeluOp).op(OP)
}

/// GELU, exact (`x Phi(x)` with erf: BERT's `"gelu"`, torch's default), elementwise; erf to
/// within 1.5e-7 (see `fused/activation.rs`). Grad to `x`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "fused::gelu_erf";
    check_input(OP, x, DType::F32)?;
    let x = x.contiguous().op(OP)?;
    x.apply_op1(GeluErfOp).op(OP)
}

/// SwiGLU's gating: `silu(gate) * up`, elementwise over two tensors of one shape. Grads to both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    const OP: &str = "fused::swiglu";
    check_input("fused::swiglu gate", gate, DType::F32)?;
    check_input("fused::swiglu up", up, DType::F32)?;
    if gate.dims() != up.dims() {
        return Err(NnError::Shape {
            op: OP,
            expected: format!("up of the shape of gate {:?}", gate.dims()),
            got: format!("{:?}", up.dims()),
        });
    }
    let g = gate.contiguous().op(OP)?;
    let u = up.contiguous().op(OP)?;
    g.apply_op2(&u, SwiGluOp).op(OP)
}

/// `x` (..., D), `weight` (D): `x / sqrt(mean(x^2) + eps) * weight`. Grads to `x` and `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "fused::rms_norm";
    check_input("fused::rms_norm x", x, DType::F32)?;
    check_input("fused::rms_norm weight", weight, DType::F32)?;
    check_eps("fused::rms_norm eps", eps)?;
    let d = last_dim(OP, x)?;
    check_vector(OP, weight, d)?;
    let x = x.contiguous().op(OP)?;
    let w = weight.contiguous().op(OP)?;
    x.apply_op2(&w, RmsNormOp { eps }).op(OP)
}

/// `x` (..., D), `weight` (D), `bias` (D): `torch.nn.functional.layer_norm` over the last
/// dimension. Grads to `x`, `weight` and `bias`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "fused::layer_norm";
    check_input("fused::layer_norm x", x, DType::F32)?;
    check_input("fused::layer_norm weight", weight, DType::F32)?;
    check_input("fused::layer_norm bias", bias, DType::F32)?;
    check_eps("fused::layer_norm eps", eps)?;
    let d = last_dim(OP, x)?;
    check_vector(OP, weight, d)?;
    check_vector(OP, bias, d)?;
    let x = x.contiguous().op(OP)?;
    let w = weight.contiguous().op(OP)?;
    let b = bias.contiguous().op(OP)?;
    x.apply_op3(&w, &b, LayerNormOp { eps }).op(OP)
}

/// Rotary embedding in the Hugging Face "rotate half" layout (element `i` pairs with `i + D/2`):
/// `x` (B, H, T, D), `cos`/`sin` (T', D/2) or (B, T', D/2) with `T' >= T` (the first T rows are
/// used), as `candle_nn::rotary_emb::rope`. Grad to `x` only: cos and sin are constants.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    const OP: &str = "fused::rope";
    let (_, _, t, d) = x
        .dims4()
        .map_err(|_| shape_err(OP, "x of rank 4 (B, H, T, D)", x))?;
    rope_checked(OP, x, cos, sin, t, d, false, x)
}

/// The checks and the op of [`rope`] and [`rope_bthd`]: `heads` is `x` seen as (B, H, T, D),
/// `x` the tensor in its own layout (`packed`: (B, T, H, D)).
#[allow(clippy::too_many_arguments)]
fn rope_checked(
    op_name: &'static str,
    heads: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    t: usize,
    d: usize,
    packed: bool,
    x: &Tensor,
) -> Result<Tensor> {
    check_input(op_name, x, DType::F32)?;
    check_input("fused::rope cos", cos, DType::F32)?;
    check_input("fused::rope sin", sin, DType::F32)?;
    let (b, h, _, _) = heads.dims4().op(op_name)?;
    if !d.is_multiple_of(2) {
        return Err(shape_err(op_name, "x with an even head dim D", x));
    }
    let (rows, batched) = match *cos.dims() {
        [rows, half] if half == d / 2 && rows >= t => (rows, false),
        [cb, rows, half] if cb == b && half == d / 2 && rows >= t => (rows, true),
        _ => {
            let want = format!("cos (T' >= {t}, {}) or ({b}, T' >= {t}, {})", d / 2, d / 2);
            return Err(NnError::Shape {
                op: op_name,
                expected: want,
                got: format!("{:?}", cos.dims()),
            });
        }
    };
    if sin.dims() != cos.dims() {
        return Err(NnError::Shape {
            op: op_name,
            expected: format!("sin of the shape of cos {:?}", cos.dims()),
            got: format!("{:?}", sin.dims()),
        });
    }
    let x = x.contiguous().op(op_name)?;
    let cos = cos.contiguous().op(op_name)?;
    let sin = sin.contiguous().op(op_name)?;
    let dims = rope::RopeDims {
        h,
        t,
        d,
        rows,
        batched,
        packed,
    };
    x.apply_op3(&cos, &sin, RopeOp { dims }).op(op_name)
}

/// [`rope`] for `x` in the (B, T, H, D) layout (a projection's output split into heads, before
/// any transpose). Same tables and semantics.
pub fn rope_bthd(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    const OP: &str = "fused::rope_bthd";
    let (b, t, h, d) = x
        .dims4()
        .map_err(|_| shape_err(OP, "x of rank 4 (B, T, H, D)", x))?;
    let _ = (b, h);
    // The checks see the tensor as (B, H, T, D) through a transposed view (no copy).
    let view = x.transpose(1, 2).op(OP)?;
    rope_checked(OP, &view, cos, sin, t, d, true, x)
}

/// Causal attention computed blockwise like FlashAttention-2 (online softmax over key blocks; the
/// (T, T) score matrix never exists). `q` (B, H_q, T, D), `k`, `v` (B, H_kv, T, D) with H_q a
/// multiple of H_kv (query head `h` uses kv head `h / (H_q / H_kv)`); `scale` is usually
/// `1 / sqrt(D)`. Query `i` sees keys `0..=i`. Returns (B, H_q, T, D). Grads to q, k and v.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    const OP: &str = "fused::causal_attention";
    let dims = attention_dims(OP, q, k, v, scale)?;
    let q = q.contiguous().op(OP)?;
    let k = k.contiguous().op(OP)?;
    let v = v.contiguous().op(OP)?;
    let op = AttentionOp {
        dims,
        scale,
        lse: Mutex::new(Vec::new()),
        packed: false,
    };
    q.apply_op3(&k, &v, op).op(OP)
}

/// Bidirectional (encoder) attention over a packed batch, forward only (no backward: an
/// inference kernel). `qkv` (N, 3 * H * D) is a fused QKV projection's output for N tokens, read
/// as (N, 3, H, D): the sequences of `lengths` (each at least 1, summing to N) one after another,
/// with no padding, each attending to itself only. Returns `softmax(scale * Q K^T) V` per
/// sequence as (N, H * D).
pub fn encoder_attention(
    qkv: &Tensor,
    num_heads: usize,
    lengths: &[usize],
    scale: f32,
) -> Result<Tensor> {
    const OP: &str = "fused::encoder_attention";
    check_input(OP, qkv, DType::F32)?;
    let (n, three_hd) = qkv
        .dims2()
        .map_err(|_| shape_err(OP, "qkv of rank 2 (N, 3 * H * D)", qkv))?;
    if num_heads == 0 || three_hd == 0 || three_hd % (3 * num_heads) != 0 {
        return Err(shape_err(
            OP,
            &format!("a last dimension 3 * {num_heads} heads * D"),
            qkv,
        ));
    }
    if lengths.contains(&0) || lengths.iter().try_fold(0usize, |a, &l| a.checked_add(l)) != Some(n)
    {
        return Err(NnError::Shape {
            op: OP,
            expected: format!("positive lengths summing to {n}"),
            got: format!("{lengths:?}"),
        });
    }
    if !scale.is_finite() {
        return Err(NnError::Config {
            what: "fused::encoder_attention scale",
            reason: format!("{scale} is not finite"),
        });
    }
    let qkv = qkv.contiguous().op(OP)?;
    let op = EncoderAttentionOp {
        lengths: lengths.to_vec(),
        heads: num_heads,
        head_dim: three_hd / (3 * num_heads),
        scale,
    };
    qkv.apply_op1_no_bwd(&op).op(OP)
}

/// Checks q (B, H_q, T, D), k and v (B, H_kv, T, D) and the scale.
fn attention_dims(
    op: &'static str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
) -> Result<attention::AttnDims> {
    check_input("fused::causal_attention q", q, DType::F32)?;
    check_input("fused::causal_attention k", k, DType::F32)?;
    check_input("fused::causal_attention v", v, DType::F32)?;
    let (b, hq, t, d) = q
        .dims4()
        .map_err(|_| shape_err(op, "q of rank 4 (B, H_q, T, D)", q))?;
    let (kb, hkv, kt, kd) = k
        .dims4()
        .map_err(|_| shape_err(op, "k of rank 4 (B, H_kv, T, D)", k))?;
    if kb != b || kt != t || kd != d || hkv == 0 || hq % hkv != 0 {
        let want = format!("k ({b}, H_kv, {t}, {d}) with H_q = {hq} a multiple of H_kv");
        return Err(shape_err(op, &want, k));
    }
    if v.dims() != k.dims() {
        return Err(shape_err(
            op,
            &format!("v of the shape of k {:?}", k.dims()),
            v,
        ));
    }
    if !scale.is_finite() {
        return Err(NnError::Config {
            what: "fused::causal_attention scale",
            reason: format!("{scale} is not finite"),
        });
    }
    Ok(attention::AttnDims { b, hq, hkv, t, d })
}

/// [`causal_attention`] with every tensor in the (B, T, H, D) layout, a projection's output
/// split into heads: `q` (B, T, H_q, D), `k`, `v` (B, T, H_kv, D) -> (B, T, H_q, D). The op moves
/// heads to the front and back inside its kernels, so the graph has no transposes or copies.
pub fn causal_attention_bthd(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    const OP: &str = "fused::causal_attention_bthd";
    let views = [q, k, v].map(|t| t.transpose(1, 2));
    let [qv, kv, vv] = views;
    let (qv, kv, vv) = (qv.op(OP)?, kv.op(OP)?, vv.op(OP)?);
    let dims = attention_dims(OP, &qv, &kv, &vv, scale)?;
    let q = q.contiguous().op(OP)?;
    let k = k.contiguous().op(OP)?;
    let v = v.contiguous().op(OP)?;
    let op = AttentionOp {
        dims,
        scale,
        lse: Mutex::new(Vec::new()),
        packed: true,
    };
    q.apply_op3(&k, &v, op).op(OP)
}

/// Mean softmax cross-entropy: `logits` (N, V) f32, `targets` (N,) u32. Rows whose target equals
/// `ignore_index` (pass `u32::MAX` for none) are skipped and the mean is over the rest (NaN if
/// every row is skipped, as in PyTorch; their gradient is 0). Any other target must be `< V`.
/// Returns a rank-0 tensor. Grad to `logits` only.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, ignore_index: u32) -> Result<Tensor> {
    const OP: &str = "fused::cross_entropy";
    check_input("fused::cross_entropy logits", logits, DType::F32)?;
    check_input("fused::cross_entropy targets", targets, DType::U32)?;
    let (n, v) = logits
        .dims2()
        .map_err(|_| shape_err(OP, "logits of rank 2 (N, V)", logits))?;
    if targets.dims() != [n] {
        return Err(shape_err(OP, &format!("targets of shape ({n},)"), targets));
    }
    let targets: Vec<u32> = targets.to_vec1().op(OP)?;
    check_targets("fused::cross_entropy targets", &targets, ignore_index, v)?;
    let logits = logits.contiguous().op(OP)?;
    let op = CrossEntropyOp {
        targets,
        ignore_index,
        lse: Mutex::new(Vec::new()),
    };
    logits.apply_op1(op).op(OP)
}

/// `cross_entropy(x W^T, targets)` in one node, for an output head without bias: `x` (N, K),
/// `weight` (V, K), `targets` (N,) u32 -> the mean loss (scalar). Grads to `x` and `weight`.
///
/// The forward pass computes the gradients too (the logits' gradient is written over the
/// logits, then `dx = dlogits W`, `dW = dlogits^T x`), and backward only scales them by the
/// upstream gradient: no (N, V) tensor outlives the forward, where the two-node form keeps the
/// logits for the loss's backward and has candle zero-fill and add an (N, V) gradient. For the
/// loss of a training step, which is always differentiated; a forward-only caller pays for the
/// two gradient products. With an upstream gradient of 1 the loss and both gradients are the
/// bits of the two-node form (the same kernels on the same values).
pub fn linear_cross_entropy(
    x: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    ignore_index: u32,
) -> Result<Tensor> {
    const OP: &str = "fused::linear_cross_entropy";
    check_input("fused::linear_cross_entropy x", x, DType::F32)?;
    check_input("fused::linear_cross_entropy weight", weight, DType::F32)?;
    check_input("fused::linear_cross_entropy targets", targets, DType::U32)?;
    let (n, k) = x
        .dims2()
        .map_err(|_| shape_err(OP, "x of rank 2 (N, K)", x))?;
    let (v, kw) = weight
        .dims2()
        .map_err(|_| shape_err(OP, "weight of rank 2 (V, K)", weight))?;
    if kw != k {
        return Err(shape_err(OP, &format!("weight of shape (V, {k})"), weight));
    }
    if targets.dims() != [n] {
        return Err(shape_err(OP, &format!("targets of shape ({n},)"), targets));
    }
    let targets: Vec<u32> = targets.to_vec1().op(OP)?;
    check_targets(OP, &targets, ignore_index, v)?;
    let x = x.contiguous().op(OP)?;
    let w = weight.contiguous().op(OP)?;
    let op = LinearCrossEntropyOp {
        targets,
        ignore_index,
        n,
        k,
        v,
        prec: matmul_precision(),
        grads: Mutex::new(None),
    };
    x.apply_op2(&w, op).op(OP)
}

fn check_targets(what: &'static str, targets: &[u32], ignore: u32, v: usize) -> Result<()> {
    match targets
        .iter()
        .enumerate()
        .find(|&(_, &t)| t != ignore && t as usize >= v)
    {
        Some((row, &t)) => Err(NnError::Config {
            what,
            reason: format!("target {t} of row {row} is out of range for {v} classes"),
        }),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Argument checks.

fn check_input(what: &'static str, t: &Tensor, dtype: DType) -> Result<()> {
    if !t.device().is_cpu() {
        return Err(NnError::Config {
            what,
            reason: format!(
                "fused kernels run on the CPU, the tensor is on {:?}",
                t.device().location()
            ),
        });
    }
    if t.dtype() != dtype {
        return Err(NnError::Config {
            what,
            reason: format!("dtype must be {dtype:?}, got {:?}", t.dtype()),
        });
    }
    if t.elem_count() == 0 {
        return Err(NnError::Config {
            what,
            reason: format!("empty tensor of shape {:?}", t.dims()),
        });
    }
    Ok(())
}

fn check_eps(what: &'static str, eps: f32) -> Result<()> {
    if eps.is_finite() && eps >= 0.0 {
        return Ok(());
    }
    Err(NnError::Config {
        what,
        reason: format!("{eps} must be finite and >= 0"),
    })
}

fn shape_err(op: &'static str, expected: &str, t: &Tensor) -> NnError {
    NnError::Shape {
        op,
        expected: expected.to_string(),
        got: format!("{:?}", t.dims()),
    }
}

/// The last dimension of `x` (rank >= 1).
fn last_dim(op: &'static str, x: &Tensor) -> Result<usize> {
    x.dims()
        .last()
        .copied()
        .ok_or_else(|| shape_err(op, "x of rank >= 1", x))
}

/// `t` must be a vector of `d` elements.
fn check_vector(op: &'static str, t: &Tensor, d: usize) -> Result<()> {
    if t.dims() == [d] {
        return Ok(());
    }
    Err(shape_err(op, &format!("weight/bias of shape ({d},)"), t))
}

// ---------------------------------------------------------------------------------------------
// Reading and making tensors inside the ops.

/// The f32 elements of a contiguous CPU storage.
fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fused op: input is not contiguous"),
    }
}

/// A read lock on a contiguous f32 CPU tensor, for the backward passes.
struct F32Data<'a> {
    storage: StorageRef<'a>,
    start: usize,
    end: usize,
}

impl<'a> F32Data<'a> {
    fn new(t: &'a Tensor) -> candle_core::Result<Self> {
        let (storage, layout) = t.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("fused op backward: tensor is not contiguous")
        };
        if !matches!(&*storage, Storage::Cpu(CpuStorage::F32(_))) {
            candle_core::bail!("fused op backward: expected an f32 CPU tensor")
        }
        Ok(Self {
            storage,
            start,
            end,
        })
    }

    fn get(&self) -> &[f32] {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.start..self.end],
            // Checked in `new`.
            _ => &[],
        }
    }
}

/// A gradient tensor (no graph of its own) of `like`'s shape.
fn grad_tensor(data: Vec<f32>, like: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::from_vec(data, like.shape().clone(), like.device())
}

fn poisoned(op: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: saved forward state is unavailable"))
}

// ---------------------------------------------------------------------------------------------
// The custom ops.

struct RmsNormOp {
    eps: f32,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "kiln-fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = norm::rms_fwd(cpu_f32(s1, l1)?, cpu_f32(s2, l2)?, self.eps);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (dx, dw) = {
            let (xd, wd, gd) = (F32Data::new(x)?, F32Data::new(w)?, F32Data::new(&grad)?);
            norm::rms_bwd(xd.get(), wd.get(), gd.get(), self.eps)
        };
        Ok((Some(grad_tensor(dx, x)?), Some(grad_tensor(dw, w)?)))
    }
}

struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "kiln-fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, b) = (cpu_f32(s1, l1)?, cpu_f32(s2, l2)?, cpu_f32(s3, l3)?);
        Ok((
            CpuStorage::F32(norm::ln_fwd(x, w, b, self.eps)),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (dx, dw, db) = {
            let (xd, wd, gd) = (F32Data::new(x)?, F32Data::new(w)?, F32Data::new(&grad)?);
            norm::ln_bwd(xd.get(), wd.get(), gd.get(), self.eps)
        };
        Ok((
            Some(grad_tensor(dx, x)?),
            Some(grad_tensor(dw, w)?),
            Some(grad_tensor(db, b)?),
        ))
    }
}

struct RopeOp {
    dims: rope::RopeDims,
}

impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        "kiln-fused-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, cos, sin) = (cpu_f32(s1, l1)?, cpu_f32(s2, l2)?, cpu_f32(s3, l3)?);
        let y = rope::rope(x, cos, sin, self.dims, false);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = {
            let (gd, cd, sd) = (F32Data::new(&grad)?, F32Data::new(cos)?, F32Data::new(sin)?);
            rope::rope(gd.get(), cd.get(), sd.get(), self.dims, true)
        };
        Ok((Some(grad_tensor(dx, x)?), None, None))
    }
}

struct AttentionOp {
    dims: attention::AttnDims,
    scale: f32,
    /// The logsumexp of each query row (B, H_q, T), written by the forward pass.
    lse: Mutex<Vec<f32>>,
    /// Inputs, output and gradients are (B, T, H, D) (see [`causal_attention_bthd`]).
    packed: bool,
}

impl AttentionOp {
    /// (B, T, H, D) -> (B, H, T, D) when packed; borrowed as is otherwise.
    fn heads_first<'a>(&self, x: &'a [f32], h: usize) -> std::borrow::Cow<'a, [f32]> {
        let attention::AttnDims { b, t, d, .. } = self.dims;
        if self.packed {
            std::borrow::Cow::Owned(attention::bthd_to_bhtd(x, b, t, h, d))
        } else {
            std::borrow::Cow::Borrowed(x)
        }
    }

    /// (B, H, T, D) -> (B, T, H, D) when packed.
    fn heads_back(&self, x: Vec<f32>, h: usize) -> Vec<f32> {
        let attention::AttnDims { b, t, d, .. } = self.dims;
        if self.packed {
            attention::bhtd_to_bthd(&x, b, t, h, d)
        } else {
            x
        }
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "kiln-fused-causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (cpu_f32(s1, l1)?, cpu_f32(s2, l2)?, cpu_f32(s3, l3)?);
        let (hq, hkv) = (self.dims.hq, self.dims.hkv);
        let (q, k, v) = (
            self.heads_first(q, hq),
            self.heads_first(k, hkv),
            self.heads_first(v, hkv),
        );
        let (out, lse) = attention::forward(&q, &k, &v, self.dims, self.scale);
        *self.lse.lock().map_err(|_| poisoned(self.name()))? = lse;
        Ok((
            CpuStorage::F32(self.heads_back(out, hq)),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let lse = self.lse.lock().map_err(|_| poisoned(self.name()))?;
        let (hq, hkv) = (self.dims.hq, self.dims.hkv);
        let (dq, dk, dv) = {
            let (qd, kd, vd) = (F32Data::new(q)?, F32Data::new(k)?, F32Data::new(v)?);
            let (od, gd) = (F32Data::new(res)?, F32Data::new(&grad)?);
            let (dq, dk, dv) = attention::backward(
                &self.heads_first(qd.get(), hq),
                &self.heads_first(kd.get(), hkv),
                &self.heads_first(vd.get(), hkv),
                &self.heads_first(od.get(), hq),
                &self.heads_first(gd.get(), hq),
                &lse,
                self.dims,
                self.scale,
            );
            (
                self.heads_back(dq, hq),
                self.heads_back(dk, hkv),
                self.heads_back(dv, hkv),
            )
        };
        Ok((
            Some(grad_tensor(dq, q)?),
            Some(grad_tensor(dk, k)?),
            Some(grad_tensor(dv, v)?),
        ))
    }
}

struct CrossEntropyOp {
    targets: Vec<u32>,
    ignore_index: u32,
    /// The logsumexp of each row (N), written by the forward pass.
    lse: Mutex<Vec<f32>>,
}

impl CustomOp1 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "kiln-fused-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l)?;
        let v = x.len() / self.targets.len();
        let lse = cross_entropy::logsumexp(x, v, &self.targets, self.ignore_index);
        let loss = cross_entropy::mean_loss(x, v, &self.targets, self.ignore_index, &lse);
        *self.lse.lock().map_err(|_| poisoned(self.name()))? = lse;
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let coef = cross_entropy::coef(&self.targets, self.ignore_index, g);
        let lse = self.lse.lock().map_err(|_| poisoned(self.name()))?;
        let dx = {
            let xd = F32Data::new(logits)?;
            let v = xd.get().len() / self.targets.len();
            cross_entropy::grad(xd.get(), v, &self.targets, self.ignore_index, &lse, coef)
        };
        Ok(Some(grad_tensor(dx, logits)?))
    }
}

struct LinearCrossEntropyOp {
    targets: Vec<u32>,
    ignore_index: u32,
    n: usize,
    k: usize,
    v: usize,
    prec: MatmulPrecision,
    /// `dx` (N, K) and `dW` (V, K) for an upstream gradient of 1, written by the forward pass.
    grads: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl CustomOp2 for LinearCrossEntropyOp {
    fn name(&self) -> &'static str {
        "kiln-fused-linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (cpu_f32(s1, l1)?, cpu_f32(s2, l2)?);
        let (n, k, v) = (self.n, self.k, self.v);
        let (t, ignore) = (&self.targets, self.ignore_index);
        let mut logits = linear::forward(self.prec, x, w, None, n, v, k);
        let lse = cross_entropy::logsumexp(&logits, v, t, ignore);
        let loss = cross_entropy::mean_loss(&logits, v, t, ignore, &lse);
        let coef = cross_entropy::coef(t, ignore, 1.0);
        cross_entropy::grad_in_place(&mut logits, v, t, ignore, &lse, coef);
        let dx = linear::grad_x(self.prec, &logits, w, n, v, k);
        let dw = linear::grad_w(self.prec, &logits, x, n, v, k);
        *self.grads.lock().map_err(|_| poisoned(self.name()))? = Some((dx, dw));
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let saved = self.grads.lock().map_err(|_| poisoned(self.name()))?;
        let Some((dx, dw)) = saved.as_ref() else {
            return Err(poisoned(self.name()));
        };
        // `g * d` rounds as the two-node form's `coef = g / count` does only for g = 1.
        let scale = |d: &[f32]| -> Vec<f32> {
            if g == 1.0 {
                d.to_vec()
            } else {
                d.iter().map(|&d| d * g).collect()
            }
        };
        Ok((
            Some(grad_tensor(scale(dx), x)?),
            Some(grad_tensor(scale(dw), w)?),
        ))
    }
}

struct GeluOp;

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "kiln-fused-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = activation::gelu(cpu_f32(s, l)?);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let dx = {
            let (xd, gd) = (F32Data::new(x)?, F32Data::new(&grad)?);
            activation::gelu_bwd(xd.get(), gd.get())
        };
        Ok(Some(grad_tensor(dx, x)?))
    }
}

struct EncoderAttentionOp {
    lengths: Vec<usize>,
    heads: usize,
    head_dim: usize,
    scale: f32,
}

impl CustomOp1 for EncoderAttentionOp {
    fn name(&self) -> &'static str {
        "kiln-fused-encoder-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, _) = l.shape().dims2()?;
        let (h, d) = (self.heads, self.head_dim);
        let y = encoder_attention::forward(cpu_f32(s, l)?, &self.lengths, h, d, self.scale);
        Ok((CpuStorage::F32(y), Shape::from((n, h * d))))
    }
}

struct GeluErfOp;

impl CustomOp1 for GeluErfOp {
    fn name(&self) -> &'static str {
        "kiln-fused-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = activation::gelu_erf(cpu_f32(s, l)?);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let dx = {
            let (xd, gd) = (F32Data::new(x)?, F32Data::new(&grad)?);
            activation::gelu_erf_bwd(xd.get(), gd.get())
        };
        Ok(Some(grad_tensor(dx, x)?))
    }
}

struct SwiGluOp;

impl CustomOp2 for SwiGluOp {
    fn name(&self) -> &'static str {
        "kiln-fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = activation::swiglu(cpu_f32(s1, l1)?, cpu_f32(s2, l2)?);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (dg, du) = {
            let (g, u, d) = (F32Data::new(gate)?, F32Data::new(up)?, F32Data::new(&grad)?);
            activation::swiglu_bwd(g.get(), u.get(), d.get())
        };
        Ok((Some(grad_tensor(dg, gate)?), Some(grad_tensor(du, up)?)))
    }
}

struct LinearOp {
    n: usize,
    k: usize,
    prec: MatmulPrecision,
}

impl LinearOp {
    fn out_shape(&self, l: &Layout) -> Shape {
        let mut dims = l.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.n;
        }
        Shape::from(dims)
    }

    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Vec<f32>)> {
        let grad = grad.contiguous()?;
        let (dx, dw, db) = {
            let (xd, wd, gd) = (F32Data::new(x)?, F32Data::new(w)?, F32Data::new(&grad)?);
            let m = xd.get().len() / self.k;
            (
                linear::grad_x(self.prec, gd.get(), wd.get(), m, self.n, self.k),
                linear::grad_w(self.prec, gd.get(), xd.get(), m, self.n, self.k),
                linear::grad_b(gd.get(), self.n),
            )
        };
        Ok((grad_tensor(dx, x)?, grad_tensor(dw, w)?, db))
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "kiln-fused-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s1, l1)?;
        let y = linear::forward(
            self.prec,
            x,
            cpu_f32(s2, l2)?,
            None,
            x.len() / self.k,
            self.n,
            self.k,
        );
        Ok((CpuStorage::F32(y), self.out_shape(l1)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.grads(x, w, grad)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "kiln-fused-linear-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s1, l1)?;
        let b = cpu_f32(s3, l3)?;
        let y = linear::forward(
            self.prec,
            x,
            cpu_f32(s2, l2)?,
            Some(b),
            x.len() / self.k,
            self.n,
            self.k,
        );
        Ok((CpuStorage::F32(y), self.out_shape(l1)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.grads(x, w, grad)?;
        Ok((Some(dx), Some(dw), Some(grad_tensor(db, b)?)))
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod isa_tests {
    use super::*;
    use candle_core::{Device, Var};

    fn values(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    /// Forward outputs and input gradients of attention, LayerNorm + GELU and cross-entropy,
    /// as bits.
    fn run() -> Vec<Vec<u32>> {
        let dev = Device::Cpu;
        let t = |shape: &[usize], seed: u64| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|i| {
                    let z = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15 ^ seed);
                    ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
                })
                .collect();
            Var::from_vec(v, shape, &dev).unwrap()
        };
        let (q, k, v) = (
            t(&[2, 4, 75, 40], 1),
            t(&[2, 2, 75, 40], 2),
            t(&[2, 2, 75, 40], 3),
        );
        let x = t(&[67, 96], 4);
        let (w, b) = (t(&[96], 5), t(&[96], 6));
        let logits = t(&[67, 300], 7);
        let targets =
            Tensor::from_vec((0..67u32).map(|i| i * 7 % 300).collect(), 67, &dev).unwrap();
        let att = causal_attention(&q, &k, &v, 0.3).unwrap();
        let h = gelu_tanh(&layer_norm(&x, &w, &b, 1e-5).unwrap()).unwrap();
        let ce = cross_entropy(&logits, &targets, u32::MAX).unwrap();
        let loss = (att.sum_all().unwrap() + h.sqr().unwrap().sum_all().unwrap() + &ce).unwrap();
        let g = loss.backward().unwrap();
        let mut out = vec![values(&att), values(&h), values(&ce)];
        for var in [&q, &k, &v, &x, &w, &b, &logits] {
            out.push(values(g.get(var.as_tensor()).unwrap()));
        }
        out
    }

    /// The AVX-512 builds of the kernels compute the AVX2 builds' scalar program: same bits.
    #[test]
    fn avx512_and_avx2_builds_give_the_same_bits() {
        if !simd::has_avx512() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let wide = run();
        simd::avx2_only(true);
        let narrow = run();
        simd::avx2_only(false);
        assert_eq!(wide, narrow);
    }
}
