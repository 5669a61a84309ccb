//! The OpenAI-compatible HTTP server and the web chat page (axum on tokio). It knows the engine,
//! never the models' insides. Filled in by the serving issue.

/// Errors from this crate.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Placeholder until the crate's issue adds real variants.
    #[error("{0}")]
    Other(String),
}
