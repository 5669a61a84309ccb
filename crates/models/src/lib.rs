//! Model families, one file per family (the LLaMA-style decoder, BERT), built only from `kiln-nn` layers.
//!
//! Models do no I/O beyond reading their weight source and know nothing about HTTP or tokenizers.
//! Filled in by the inference and serving issues.

/// Errors from this crate.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Placeholder until the crate's issue adds real variants.
    #[error("{0}")]
    Other(String),
}
