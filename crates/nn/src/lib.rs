//! Tensor kernels and layers for kiln, built on `candle-core` / `candle-nn` (pinned `=0.11.1`).
//!
//! The shared layers every model composes (never copies):
//! - [`Linear`]: one projection type whose weight is dense (a candle `Tensor`) or quantized (a
//!   candle `QMatMul` over GGUF blocks); LoRA will wrap it later.
//! - [`Embedding`]: token embeddings, dense or quantized (rows dequantized on lookup).
//! - [`RmsNorm`], [`RotaryEmbedding`] (with the scaling variants of Hugging Face's
//!   `modeling_rope_utils.py`), [`KvCache`], [`causal_attention`] (multi-head, grouped-query and
//!   multi-query; optional sliding window), [`SwiGlu`].
//! - [`PagedKvCache`]: keys and values in fixed-size blocks shared by a continuous batch, with
//!   its own attention kernel over block tables ([`PagedSeq`]).
//! - [`Weights`]: the weight source (GGUF or safetensors) behind one interface, so a model's
//!   `load` names tensors and never cares about the file format.
//!
//! - [`qkernels`]: kiln's own quantized matmul for Q4_0/Q4_1/Q8_0 GGUF blocks (runtime-detected
//!   AVX2 / AVX-512 VNNI, with the scalar oracle), which `Linear` uses for those formats.
//!
//! Everything computes in f32 on the CPU; quantized weights stay quantized in memory.

pub use candle_core;
pub use candle_nn;

mod attention;
pub mod fused;
mod kv_cache;
mod linear;
mod mlp;
mod norm;
mod optim;
mod paged_kv;
pub mod qkernels;
mod rope;
pub mod team;
mod weights;

pub use attention::{
    cached_attention, causal_attention, causal_attention_padded, causal_attention_reference,
    repeat_kv, with_cached_kv, CachedKv,
};
pub use kv_cache::KvCache;
pub use linear::{Embedding, Linear};
pub use mlp::{GeluMlp, Mlp, SwiGlu};
pub use norm::{LayerNorm, Norm, RmsNorm};
pub use optim::{clip_grad_norm, AdamW, AdamWConfig, Muon, MuonConfig, OptimState, ParamState};
pub use paged_kv::{PagedKvCache, PagedSeq};
pub use rope::{RopeLayout, RopeScaling, RotaryEmbedding};
pub use weights::{GgufMetadata, MakeTensor, Weights};

use std::path::PathBuf;

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
    /// A weight file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A GGUF or safetensors file is malformed (truncated, corrupt, or an unknown tensor type).
    #[error("{path} is not a valid {format} file: {reason}")]
    BadFile {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    /// A tensor the model needs is not in the weight source.
    #[error("tensor `{name}` is missing from {path}")]
    MissingTensor { name: String, path: PathBuf },
    /// A tensor has a shape other than the one the config implies.
    #[error("tensor `{name}` in {path} has shape {got}, the config implies {expected}")]
    TensorShape {
        name: String,
        path: PathBuf,
        expected: String,
        got: String,
    },
    /// A tensor is stored in a type kiln cannot use.
    #[error("tensor `{name}` in {path} has unsupported type {dtype}")]
    UnsupportedDtype {
        name: String,
        path: PathBuf,
        dtype: String,
    },
    /// A metadata key is missing or has the wrong type.
    #[error("metadata key `{key}` in {path}: {reason}")]
    Metadata {
        key: String,
        path: PathBuf,
        reason: String,
    },
    /// A layer was configured with values it cannot work with.
    #[error("invalid {what}: {reason}")]
    Config { what: &'static str, reason: String },
    /// The running CPU lacks an instruction set a requested mode needs.
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T> = std::result::Result<T, NnError>;

/// Attaches the op name to a candle error: `t.matmul(&w).op("matmul")?`.
pub(crate) trait OpContext<T> {
    fn op(self, op: &'static str) -> Result<T>;
}

impl<T> OpContext<T> for candle_core::Result<T> {
    fn op(self, op: &'static str) -> Result<T> {
        self.map_err(|source| NnError::Candle { op, source })
    }
}
