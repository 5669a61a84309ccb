//! The inference engine: generation with a KV cache, sampling, batch scheduling over paged KV blocks
//! and chat templates. The engine knows only token ids; text is the tokenizer's business.
//! Filled in by the inference issue.

/// Errors from this crate.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Placeholder until the crate's issue adds real variants.
    #[error("{0}")]
    Other(String),
}
