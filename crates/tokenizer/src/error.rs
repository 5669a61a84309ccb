//! The crate's single error type, [`TokenizerError`].
//!
//! Every variant carries enough context (file, line, byte offset, token id) for a
//! user to find the problem without a debugger, because most of these errors come
//! from files downloaded from elsewhere or from user input.

use std::path::PathBuf;

/// Everything that can go wrong while loading a vocabulary, encoding or decoding.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A line-oriented file (tiktoken ranks, vocab.bpe) has a bad line.
    #[error("{path}:{line}: {message}")]
    BadLine {
        path: PathBuf,
        line: usize,
        message: String,
    },

    /// A structured file (tokenizer.json, encoder.json, GGUF, rank file as a whole) is
    /// malformed or inconsistent.
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },

    /// A GGUF file is malformed at a given byte offset.
    #[error("{path}: malformed GGUF at byte offset {offset}: {message}")]
    BadGguf {
        path: PathBuf,
        offset: u64,
        message: String,
    },

    /// The file is well formed but uses a feature this crate does not implement.
    #[error("{path}: unsupported: {what}")]
    Unsupported { path: PathBuf, what: String },

    /// The tiktoken encoding name is not one of the known OpenAI encodings.
    #[error("unknown tiktoken encoding {0:?} (expected r50k_base, p50k_base, p50k_edit, cl100k_base or o200k_base); a rank file carries no split pattern, so kiln takes the encoding from its file name: for a vocabulary kiln trained, load the tokenizer.json it wrote instead")]
    UnknownEncoding(String),

    /// The path given to [`crate::Tokenizer::load`] is not a recognised format.
    #[error("{path}: cannot detect the tokenizer format ({hint})")]
    UnknownFormat { path: PathBuf, hint: String },

    /// A split pattern failed to compile.
    #[error("invalid split regex {pattern:?}: {message}")]
    BadRegex { pattern: String, message: String },

    /// `decode` was given an id that is not in the vocabulary.
    #[error("unknown token id {id} (vocabulary size {vocab_size})")]
    UnknownId { id: u32, vocab_size: usize },

    /// The text contains a special token string that the caller did not allow.
    #[error("text contains the disallowed special token {token:?} at byte offset {offset}; allow it or use encode_ordinary to encode it as plain text")]
    DisallowedSpecial { token: String, offset: usize },

    /// A named special token is not in the vocabulary.
    #[error("unknown special token {0:?}")]
    UnknownSpecial(String),

    /// Input bytes are not valid UTF-8.
    #[error("input is not valid UTF-8: invalid byte 0x{byte:02x} at byte offset {offset}")]
    InvalidUtf8 { offset: usize, byte: u8 },

    /// Input bytes end in the middle of a UTF-8 sequence.
    #[error("input is not valid UTF-8: truncated sequence at byte offset {offset}")]
    TruncatedUtf8 { offset: usize },

    /// A training input file is not valid UTF-8.
    #[error("{path}: input is not valid UTF-8 at byte offset {offset}")]
    InvalidUtf8File { path: PathBuf, offset: u64 },

    /// `vocab_size` leaves no room for the 256 byte tokens and the special tokens.
    #[error("vocab_size {vocab_size} is too small: it must be at least 256 byte tokens + {specials} special tokens = {minimum}")]
    VocabTooSmall {
        vocab_size: u32,
        specials: usize,
        minimum: u64,
    },

    /// The special tokens given to the trainer are unusable (empty or repeated).
    #[error("invalid special tokens: {0}")]
    BadSpecialTokens(String),

    /// A rayon thread pool could not be created.
    #[error("cannot start {threads} threads: {message}")]
    ThreadPool { threads: usize, message: String },
}

/// Shorthand used throughout the crate.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;
