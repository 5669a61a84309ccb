//! Sentence embeddings with a BERT-style encoder, the way sentence-transformers computes them:
//! WordPiece ids truncated to the model's `max_seq_length`, the encoder's last hidden states,
//! mean pooling over the real (unpadded) positions, then L2 normalization.
//!
//! Unlike generation, an embedding request is text in and vectors out with nothing to stream or
//! sample in between, so the [`Embedder`] owns its tokenizer: callers (the CLI, the HTTP
//! server) never handle ids. The encoder itself still sees only ids.
//!
//! Texts run in batches of [`Embedder::batch_size`]. The encoder packs a batch without padding
//! (see `kiln_models::bert`), so unlike sentence-transformers' `encode` there is nothing to gain
//! from sorting texts by length, and a text's vector does not depend on its batch neighbours
//! beyond float rounding in the GEMMs, which `tests/embed_parity.rs` checks.

use kiln_models::bert::{self, Bert};
use kiln_models::ModelError;
use kiln_tokenizer::{TokenizerError, WordPiece};
use std::path::{Path, PathBuf};

/// Errors from loading an embedding model or embedding texts.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The model path is not a folder.
    #[error("{0} is not a model folder (expected config.json, model.safetensors and tokenizer.json or vocab.txt)")]
    NotAFolder(PathBuf),
    /// A file the model needs is not in the folder.
    #[error("{dir} has no {what}")]
    MissingFile { dir: PathBuf, what: &'static str },
    /// A sentence-transformers file of the folder could not be read or parsed.
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    /// The folder asks for something the embedder does not implement.
    #[error("{path}: unsupported: {what}")]
    Unsupported { path: PathBuf, what: String },
    /// `embed` was called without any text.
    #[error("no texts to embed")]
    NoTexts,
    /// The tokenizer failed to load.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The encoder failed to load or to run.
    #[error(transparent)]
    Model(#[from] ModelError),
}

pub type EmbedResult<T> = std::result::Result<T, EmbedError>;

/// The vectors of one [`Embedder::embed`] call, in the order of its texts.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// One vector of [`Embedder::dim`] floats per text (unit length when the model normalizes).
    pub vectors: Vec<Vec<f32>>,
    /// Input tokens over all texts, special tokens included, after truncation (API usage).
    pub tokens: usize,
}

/// A sentence-embedding model: a BERT encoder, its WordPiece tokenizer and its pooling.
/// Immutable once loaded, so it is `Send + Sync`: share one behind an `Arc`.
#[derive(Debug, Clone)]
pub struct Embedder {
    model: Bert,
    tokenizer: WordPiece,
    max_len: usize,
    normalize: bool,
    batch_size: usize,
    name: String,
}

impl Embedder {
    /// Loads a sentence-transformers folder: `config.json` + `model.safetensors` (the encoder),
    /// `tokenizer.json` or `vocab.txt`, and when present `sentence_bert_config.json`
    /// (`max_seq_length`), `modules.json` (whether a `Normalize` module follows the pooling) and
    /// the pooling module's `config.json`, which must ask for mean pooling. A bare BERT folder
    /// gets mean pooling, normalization and the model's full context.
    pub fn load(dir: &Path) -> EmbedResult<Self> {
        if !dir.is_dir() {
            return Err(EmbedError::NotAFolder(dir.to_path_buf()));
        }
        let missing = |what| EmbedError::MissingFile {
            dir: dir.to_path_buf(),
            what,
        };
        if !dir.join("config.json").is_file() {
            return Err(missing("config.json"));
        }
        if !dir.join("model.safetensors").is_file()
            && !dir.join("model.safetensors.index.json").is_file()
        {
            return Err(missing("model.safetensors"));
        }
        if !dir.join("tokenizer.json").is_file() && !dir.join("vocab.txt").is_file() {
            return Err(missing("tokenizer.json or vocab.txt"));
        }
        let model = Bert::load(dir)?;
        let tokenizer = WordPiece::load(dir)?;
        let context = model.config().max_position_embeddings;

        let st_config = read_json(&dir.join("sentence_bert_config.json"))?;
        let max_len = match st_config
            .as_ref()
            .map(|(p, v)| (p, v.get("max_seq_length")))
        {
            None | Some((_, None)) => context,
            Some((path, Some(v))) => match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
                Some(n) if n > tokenizer.num_special_tokens() => n.min(context),
                _ => {
                    return Err(EmbedError::BadFile {
                        path: path.clone(),
                        reason: format!("max_seq_length {v} is not a usable length"),
                    })
                }
            },
        };

        let mut normalize = true;
        let mut pooling_dir = dir.join("1_Pooling");
        if let Some((path, modules)) = read_json(&dir.join("modules.json"))? {
            let list = modules.as_array().ok_or_else(|| EmbedError::BadFile {
                path: path.clone(),
                reason: "expected a list of modules".into(),
            })?;
            let ty = |m: &serde_json::Value| {
                m.get("type")
                    .and_then(|t| t.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            normalize = list.iter().any(|m| ty(m).ends_with(".Normalize"));
            if let Some(p) = list.iter().find(|m| ty(m).ends_with(".Pooling")) {
                let sub = p
                    .get("path")
                    .and_then(|s| s.as_str())
                    .unwrap_or("1_Pooling");
                pooling_dir = dir.join(sub);
            }
            if let Some(m) = list.iter().map(ty).find(|t| {
                !t.ends_with(".Transformer")
                    && !t.ends_with(".Pooling")
                    && !t.ends_with(".Normalize")
            }) {
                return Err(EmbedError::Unsupported {
                    path,
                    what: format!("module {m} (kiln runs Transformer, Pooling, Normalize)"),
                });
            }
        }
        if let Some((path, pooling)) = read_json(&pooling_dir.join("config.json"))? {
            let on = |k: &str| pooling.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
            let others = [
                "pooling_mode_cls_token",
                "pooling_mode_max_tokens",
                "pooling_mode_mean_sqrt_len_tokens",
                "pooling_mode_weightedmean_tokens",
                "pooling_mode_lasttoken",
            ];
            let mode = pooling.get("pooling_mode").and_then(|v| v.as_str());
            let mean = match mode {
                Some(m) => m == "mean",
                None => on("pooling_mode_mean_tokens") && !others.iter().any(|k| on(k)),
            };
            if !mean {
                return Err(EmbedError::Unsupported {
                    path,
                    what: "a pooling mode other than mean pooling alone".into(),
                });
            }
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        Ok(Self {
            model,
            tokenizer,
            max_len,
            normalize,
            batch_size: 32,
            name,
        })
    }

    /// The vectors of `texts`, in order. Texts longer than [`Self::max_len`] tokens are
    /// truncated, as sentence-transformers does.
    pub fn embed(&self, texts: &[&str]) -> EmbedResult<Embeddings> {
        if texts.is_empty() {
            return Err(EmbedError::NoTexts);
        }
        let ids: Vec<Vec<u32>> = texts.iter().map(|t| self.tokenize(t)).collect();
        let tokens = ids.iter().map(Vec::len).sum();
        self.embed_ids(&ids)
            .map(|vectors| Embeddings { vectors, tokens })
    }

    /// The ids the encoder sees for `text`: `[CLS] ... [SEP]`, at most [`Self::max_len`].
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        self.tokenizer.encode_truncated(text, self.max_len)
    }

    /// Vectors of already tokenized texts (each at most [`Self::max_len`] ids), in order.
    pub fn embed_ids(&self, ids: &[Vec<u32>]) -> EmbedResult<Vec<Vec<f32>>> {
        if ids.is_empty() {
            return Err(EmbedError::NoTexts);
        }
        let mut vectors = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(self.batch_size) {
            let rows: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            let lengths: Vec<usize> = rows.iter().map(|r| r.len()).collect();
            let hidden = self.model.forward(&rows)?; // (tokens, dim), packed
            for mut v in bert::mean_pool(&hidden, &lengths)? {
                if self.normalize {
                    l2_normalize(&mut v);
                }
                vectors.push(v);
            }
        }
        Ok(vectors)
    }

    /// The length of every vector.
    pub fn dim(&self) -> usize {
        self.model.config().hidden_size
    }

    /// The most tokens of a text that reach the model (longer texts are truncated).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Texts per encoder call (default 32, as sentence-transformers).
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    pub fn set_batch_size(&mut self, batch_size: usize) {
        self.batch_size = batch_size.max(1);
    }

    /// The model folder's name (`minilm` for the asset), for API responses.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn set_name(&mut self, name: impl Into<String>) {
        self.name = name.into();
    }

    pub fn tokenizer(&self) -> &WordPiece {
        &self.tokenizer
    }
}

/// `v / max(|v|, 1e-12)`, torch's `F.normalize`.
fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

/// A JSON file that may be absent (`Ok(None)`); present but unreadable or malformed is an error.
fn read_json(path: &Path) -> EmbedResult<Option<(PathBuf, serde_json::Value)>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(EmbedError::BadFile {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        }
    };
    let v = serde_json::from_str(&text).map_err(|e| EmbedError::BadFile {
        path: path.to_path_buf(),
        reason: format!("invalid JSON: {e}"),
    })?;
    Ok(Some((path.to_path_buf(), v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedder_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Embedder>();
    }

    #[test]
    fn l2_normalize_handles_zero() {
        let mut v = vec![3.0, 4.0];
        l2_normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
        let mut z = vec![0.0; 3];
        l2_normalize(&mut z);
        assert_eq!(z, vec![0.0; 3]);
    }
}
