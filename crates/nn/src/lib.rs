//! Tensor kernels and layers for kiln, built on `candle-core` / `candle-nn` (pinned `=0.11.1`).
//!
//! This crate will hold the fused CPU kernels (each a candle `CustomOp` with a backward pass, each
//! tested against the naive composition it replaces) and the shared layers every model composes:
//! one `Linear` (dense, quantized or LoRA behind one type), norms, RoPE, attention, the KV cache and
//! the optimizers. It is filled in by the inference and pretraining issues; today it only fixes the
//! dependency on candle and the error type, so the crate boundaries exist from day one.

pub use candle_core;
pub use candle_nn;

/// Errors from kernels and layers. Carries the op and the shapes involved.
#[derive(Debug, thiserror::Error)]
pub enum NnError {
    /// A tensor operation failed inside candle.
    #[error("tensor op `{op}` failed: {source}")]
    Candle {
        op: &'static str,
        #[source]
        source: candle_core::Error,
    },
    /// Shapes did not line up.
    #[error("shape mismatch in `{op}`: expected {expected}, got {got}")]
    Shape {
        op: &'static str,
        expected: String,
        got: String,
    },
}

pub type Result<T> = std::result::Result<T, NnError>;
