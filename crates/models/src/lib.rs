//! Model families, one file per family (`llama.rs`: the LLaMA-style decoder; `bert.rs`: BERT-style
//! encoders), built only from `kiln-nn` layers.
//!
//! Models do no I/O beyond reading their weight source and know nothing about HTTP or tokenizers.

pub mod bert;
pub mod llama;

pub use bert::Bert;
pub use kiln_nn::{KvCache, PagedKvCache};
pub use llama::{chat_template, Config, HfConfig, Llama, PagedStep};

use std::path::{Path, PathBuf};

/// Errors from this crate.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A layer or weight-source error (bad file, missing tensor, shape mismatch, tensor op).
    #[error(transparent)]
    Nn(#[from] kiln_nn::NnError),
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `config.json` or an index file could not be parsed.
    #[error("cannot parse {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The configuration is inconsistent or asks for something kiln does not support.
    #[error("invalid model config: {0}")]
    Config(String),
    /// The input does not fit the model's context window.
    #[error("{needed} positions do not fit the context window of {max} tokens")]
    ContextOverflow { needed: usize, max: usize },
    /// A token id is outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { id: u32, vocab: usize },
    /// The KV cache does not hold the positions before `start_pos`.
    #[error("start position {start_pos} does not match the {cached} positions in the KV cache")]
    CacheMismatch { start_pos: usize, cached: usize },
    /// The path is neither a GGUF file nor a model folder.
    #[error("{0} is neither a .gguf file nor a folder with config.json and *.safetensors")]
    UnknownFormat(PathBuf),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// The shard files named by a Hugging Face folder's `model.safetensors.index.json` (sorted,
/// each once), or `None` if the folder has no index.
pub(crate) fn indexed_shards(dir: &Path) -> Result<Option<Vec<PathBuf>>> {
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return Ok(None);
    }
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
        path: index.clone(),
        source,
    })?;
    let idx: Index = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: index.clone(),
        source,
    })?;
    let mut files: Vec<PathBuf> = idx.weight_map.values().map(|f| dir.join(f)).collect();
    files.sort();
    files.dedup();
    Ok(Some(files))
}
