//! Pretraining: memory-mapped token shards, a resumable data loader, schedules, the trainer loop,
//! atomic checkpoints and evaluation.
//!
//! * [`data`]: `prepare` turns text files into `train.bin`/`val.bin` token shards plus
//!   `meta.json`; [`Dataset`] opens them (memory-mapped, checked once), [`Loader`] samples
//!   resumable training batches and [`eval_windows`] gives fixed evaluation windows.
//! * [`rng`]: the counter-based hash behind the loader and the seeded [`Rng`] for initialisation
//!   and sampling.

pub mod checkpoint;
pub mod data;
pub mod rng;
pub mod schedule;
pub mod trainer;

pub use data::{
    eval_windows, prepare, DataMeta, Dataset, DocSplit, Loader, LoaderState, PrepareConfig,
    PrepareProgress, Split, SplitMeta, TokenView,
};
pub use rng::Rng;
pub use schedule::Schedule;
pub use trainer::{
    init_model, model_config, model_from_tensors, train_step, MatrixOptimizer, Observer,
    Optimizers, Outcome, Params, Precision, StepMetrics, TrainSettings, Trainer,
};

use std::path::{Path, PathBuf};

/// Shorthand used throughout the crate.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

/// Errors from this crate.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    // data
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An input text file is not valid UTF-8.
    #[error("{path}: not valid UTF-8 at byte offset {offset}")]
    InvalidUtf8 { path: PathBuf, offset: u64 },
    /// `prepare` was given no input files.
    #[error("no input files")]
    NoInputs,
    /// The corpus has too few documents for a training and a validation split.
    #[error("the corpus has {}, the validation split needs at least one and training at least one{}", documents(*.n_docs), if *.n_docs == 1 { " (each input file is one document unless documents are split at blank lines)" } else { "" })]
    TooFewDocuments { n_docs: usize },
    /// The validation fraction is not strictly between 0 and 1.
    #[error("the validation fraction must be greater than 0 and less than 1, got {0}")]
    BadValFraction(f64),
    /// The tokenizer has no token to put between documents.
    #[error("tokenizer `{tokenizer}` has neither a `<|endoftext|>` special token nor an end-of-sequence id, so documents cannot be separated; train one with `kiln tokenizer train --special '<|endoftext|>'`")]
    NoEndOfText { tokenizer: String },
    /// The output folder already holds a complete dataset.
    #[error(
        "{dir} already holds a prepared dataset (it has meta.json); pass --force to overwrite it"
    )]
    AlreadyPrepared { dir: PathBuf },
    /// A folder is not a prepared dataset.
    #[error("{dir} is not a prepared dataset: it has no meta.json (prepare it with `kiln data prepare`)")]
    NotADataset { dir: PathBuf },
    /// `meta.json` is malformed or disagrees with the files beside it.
    #[error("{path}: {message}")]
    BadMeta { path: PathBuf, message: String },
    /// A token shard is truncated, corrupt or not a shard.
    #[error("{path}: {message}")]
    BadShard { path: PathBuf, message: String },
    /// A token shard holds an id outside the vocabulary.
    #[error("{path}: token {index} is id {id}, outside the vocabulary of {vocab_size}")]
    TokenOutOfRange {
        path: PathBuf,
        index: u64,
        id: u32,
        vocab_size: usize,
    },
    /// The tokenizer file is not the one the dataset was prepared with.
    #[error("{path}: sha256 is {found}, but meta.json records {expected}; the tokenizer was replaced after the data was prepared")]
    TokenizerChanged {
        path: PathBuf,
        expected: String,
        found: String,
    },
    /// The tokenizer written beside the shards does not encode like the one used.
    #[error("the tokenizer cannot be saved faithfully as tokenizer.json: {message}; prepare with a tokenizer.json instead")]
    TokenizerExport { message: String },
    /// Loading or exporting the tokenizer failed.
    #[error(transparent)]
    Tokenizer(#[from] kiln_tokenizer::TokenizerError),
    /// A split is too short for one window of `seq_len + 1` tokens.
    #[error("the {split} split has {n_tokens} tokens, fewer than the {needed} that one window of seq_len {seq_len} needs (seq_len + 1)", needed = *.seq_len as u64 + 1)]
    SplitTooShort {
        split: &'static str,
        n_tokens: u64,
        seq_len: usize,
    },
    /// The worker thread pool could not be started.
    #[error("cannot start {threads} worker threads: {message}")]
    ThreadPool { threads: usize, message: String },
    /// A loader was asked for empty windows or batches.
    #[error("seq_len and batch must both be at least 1 (got seq_len {seq_len}, batch {batch})")]
    BadLoaderShape { seq_len: usize, batch: usize },
    // training
    /// A checkpoint is damaged, incomplete or not a checkpoint.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    /// Training settings are invalid or disagree with the run being resumed.
    #[error("{0}")]
    Settings(String),
    /// The loss stopped being a finite number.
    #[error("training diverged at step {step}: the loss is {loss} (lower the learning rate or enable --grad-clip)")]
    Diverged { step: u64, loss: f32 },
    /// A JSON document could not be written or read.
    #[error("JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// A kernel or layer failed.
    #[error(transparent)]
    Nn(#[from] kiln_nn::NnError),
    /// The model could not be built.
    #[error(transparent)]
    Model(#[from] kiln_models::ModelError),
}

impl TrainError {
    pub fn json(e: serde_json::Error) -> TrainError {
        TrainError::Json(e)
    }

    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> TrainError {
        TrainError::Io {
            path: path.as_ref().to_owned(),
            source,
        }
    }
}

fn documents(n: usize) -> String {
    if n == 1 {
        "1 document".into()
    } else {
        format!("{n} documents")
    }
}
