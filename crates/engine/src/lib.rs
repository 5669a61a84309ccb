//! The inference engine: generation with a KV cache and sampling; later batch scheduling over
//! paged KV blocks and chat templates.
//!
//! **Invariant:** the engine knows only token ids; text (prompts, stop strings, streaming decode)
//! is the caller's business, through the tokenizer.
//!
//! Main types: [`LanguageModel`] (what the engine needs from a model; implemented for
//! [`kiln_models::Llama`] and by mock models in tests), [`SamplingParams`] / [`Sampler`] and
//! [`Session`] (a conversation's tokens and KV cache, which [`Session::generate`] extends).

mod generate;
mod sampling;

pub use generate::{GenerateOptions, Generation, LanguageModel, Session, StopReason};
pub use sampling::{Sampler, SamplingParams};

/// Errors from this crate.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A sampling parameter is out of range.
    #[error("invalid sampling parameter {name} = {value}: {expected}")]
    InvalidParam {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    /// The prompt (with the conversation so far) does not fit the context window.
    #[error("the prompt has {tokens} tokens but the context window holds {context}")]
    PromptTooLong { tokens: usize, context: usize },
    /// Nothing to run the model on.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The model produced logits that cannot be sampled from.
    #[error("the model produced {0} logits")]
    BadLogits(&'static str),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] kiln_models::ModelError),
}

pub type Result<T> = std::result::Result<T, EngineError>;
