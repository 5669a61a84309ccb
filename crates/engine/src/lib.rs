//! The inference engine: generation with a KV cache and sampling, batched decoding, chat
//! templates and stop strings; later batch scheduling over paged KV blocks.
//!
//! **Invariant:** generation knows only token ids; tokenizing and decoding are the caller's
//! business, through the tokenizer. The two text helpers here never see ids: [`ChatTemplate`]
//! turns messages into prompt text, [`StopStrings`] watches the text the caller decoded.
//!
//! Main types: [`LanguageModel`] (what the engine needs from a model; implemented for
//! [`kiln_models::Llama`] and by mock models in tests), [`SamplingParams`] / [`Sampler`] and
//! [`Session`] (a conversation's tokens and KV cache, which [`Session::generate`] extends and
//! [`Session::sync`] rewinds to the longest common prefix), [`generate_batch`] (several prompts
//! of different lengths decoded together), [`ChatTemplate`] (text in, text out) and
//! [`StopStrings`] (over the streamed text the caller decodes).

mod batch;
mod chat;
mod embed;
mod generate;
mod paged;
mod sampling;
mod scheduler;
mod stop;
mod text;

pub use batch::{generate_batch, BatchLanguageModel};
pub use chat::{ChatTemplate, Message};
pub use embed::{EmbedError, EmbedResult, Embedder, Embeddings};
pub use generate::{GenerateOptions, Generation, LanguageModel, Session, StopReason};
pub use sampling::{Sampler, SamplingParams};
pub use scheduler::{
    CancelToken, Event, Finish, OnEvent, PagedLanguageModel, Request, Scheduler, SchedulerConfig,
    Stats,
};
pub use stop::{Emit, StopStrings};
pub use text::TextStream;

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
    /// A chat template does not parse.
    #[error("chat template syntax error: {0}")]
    TemplateSyntax(String),
    /// A chat template failed while rendering (including its own `raise_exception`).
    #[error("chat template cannot render this conversation: {0}")]
    TemplateRender(String),
    /// The scheduler's queue is full.
    #[error("the server is busy: {queued} requests are already waiting")]
    Busy { queued: usize },
    /// The scheduler has stopped.
    #[error("the scheduler has shut down")]
    ShutDown,
    /// A batched forward step failed; every request in it is stopped.
    #[error("a batched step failed: {0}")]
    StepFailed(String),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] kiln_models::ModelError),
}

pub type Result<T> = std::result::Result<T, EngineError>;
