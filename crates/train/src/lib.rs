//! Pretraining: memory-mapped token shards, a resumable data loader, schedules, the trainer loop,
//! atomic checkpoints and evaluation. Filled in by the pretraining issue.

/// Errors from this crate.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Placeholder until the crate's issue adds real variants.
    #[error("{0}")]
    Other(String),
}
