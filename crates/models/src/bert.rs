//! BERT-style encoders: BERT, MiniLM, all-MiniLM-L6-v2 and the other sentence-transformers
//! models built on `BertModel`.
//!
//! Paper: Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language
//! Understanding" (learned absolute positions and token types, post-LayerNorm residual blocks,
//! bidirectional self-attention with biases, GELU feed-forward).
//! Reference implementation: Hugging Face transformers `models/bert/modeling_bert.py`
//! (`BertModel`), against which `crates/engine/tests/embed_parity.rs` checks sentence
//! embeddings through sentence-transformers.
//!
//! How we differ:
//! - Only the encoder: no pooler (sentence-transformers pools the last hidden states itself),
//!   no masked-LM or classification heads, no dropout (inference only).
//! - Q, K and V are one (3 * hidden, hidden) projection, concatenated at load time, so a layer
//!   makes one GEMM call for them instead of three.
//! - A batch is packed, not padded: the sequences' tokens one after another, (N, hidden) for N
//!   tokens in all, described by their lengths rather than by a 0/1 mask. Every layer but
//!   attention works per token, so nothing is spent on padding, and attention is kiln-nn's
//!   `fused::encoder_attention`, which keeps each sequence to itself. A text's hidden states
//!   therefore do not depend on what else is in its batch.
//! - Computation is f32 on the CPU; F16/BF16 checkpoints are widened on load.

use crate::{ModelError, Result};
use kiln_nn::candle_core::{DType, Device, Tensor};
use kiln_nn::{Embedding, LayerNorm, Linear, NnError, Weights};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The feed-forward activation (`hidden_act` in `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// BERT's `"gelu"`: the exact `x * Phi(x)` with erf.
    Gelu,
    /// `"gelu_new"` / `"gelu_pytorch_tanh"`: the tanh approximation.
    GeluTanh,
}

/// The checked runtime configuration of a BERT encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    /// The most positions one sequence may hold.
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub activation: Activation,
}

impl Config {
    /// all-MiniLM-L6-v2 (the `minilm` asset).
    pub fn minilm_l6() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 384,
            num_layers: 6,
            num_heads: 12,
            intermediate_size: 1536,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            activation: Activation::Gelu,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Rejects configs the model cannot run, with the offending values.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} must be positive"));
        }
        // Sizes from a file are multiplied into tensor shapes; keep them far from overflow.
        if let Some((name, v)) = sizes.iter().find(|(_, v)| *v > 1 << 24) {
            return bad(format!("{name} = {v} is implausibly large"));
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_heads
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return bad(format!(
                "layer_norm_eps {} must be positive",
                self.layer_norm_eps
            ));
        }
        Ok(())
    }
}

/// The fields of a Hugging Face BERT `config.json` that the model reads.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    pub hidden_act: Option<String>,
    pub position_embedding_type: Option<String>,
}

fn two() -> usize {
    2
}

fn default_eps() -> f64 {
    1e-12
}

impl TryFrom<&HfConfig> for Config {
    type Error = ModelError;

    fn try_from(c: &HfConfig) -> Result<Self> {
        let model_type = c.model_type.as_deref().unwrap_or("bert");
        if model_type != "bert" {
            return Err(ModelError::Config(format!(
                "model_type `{model_type}` is not a BERT encoder (expected \"bert\")"
            )));
        }
        if let Some(p) = c
            .position_embedding_type
            .as_deref()
            .filter(|p| *p != "absolute")
        {
            return Err(ModelError::Config(format!(
                "position_embedding_type `{p}` is not supported (only absolute)"
            )));
        }
        let activation = match c.hidden_act.as_deref().unwrap_or("gelu") {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            other => {
                return Err(ModelError::Config(format!(
                    "hidden_act `{other}` is not supported (gelu, gelu_new, gelu_pytorch_tanh)"
                )))
            }
        };
        let cfg = Config {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            intermediate_size: c.intermediate_size,
            max_position_embeddings: c.max_position_embeddings,
            type_vocab_size: c.type_vocab_size,
            layer_norm_eps: c.layer_norm_eps,
            activation,
        };
        cfg.check()?;
        Ok(cfg)
    }
}

/// Word + position + token-type embeddings, then LayerNorm.
#[derive(Debug, Clone)]
struct Embeddings {
    word: Embedding,
    /// (max_positions, hidden)
    position: Tensor,
    /// (type_vocab, hidden)
    token_type: Tensor,
    norm: LayerNorm,
}

/// Bidirectional multi-head self-attention with biases; Q, K and V in one projection.
#[derive(Debug, Clone)]
struct SelfAttention {
    qkv: Linear,
    out: Linear,
    num_heads: usize,
    head_dim: usize,
}

/// One post-LN encoder layer: `x = LN(x + attn(x)); x = LN(x + down(gelu(up(x))))`.
#[derive(Debug, Clone)]
struct Layer {
    attention: SelfAttention,
    attention_norm: LayerNorm,
    up: Linear,
    down: Linear,
    output_norm: LayerNorm,
    activation: Activation,
}

/// A BERT encoder with its weights. Immutable after loading, so it is `Send + Sync` and one
/// model can serve many threads.
#[derive(Debug, Clone)]
pub struct Bert {
    cfg: Config,
    embeddings: Embeddings,
    layers: Vec<Layer>,
}

/// A packed batch: the ids (N,) and positions (N,) of the sequences one after another.
struct Batch {
    ids: Tensor,
    positions: Tensor,
    lengths: Vec<usize>,
}

fn nn(op: &'static str) -> impl Fn(kiln_nn::candle_core::Error) -> ModelError {
    move |source| ModelError::Nn(NnError::Candle { op, source })
}

impl Embeddings {
    /// `ids`, `positions` (N,) -> (N, hidden); token type 0 everywhere (single sentences).
    fn forward(&self, ids: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let words = self.word.forward(ids)?;
        let pos = self
            .position
            .index_select(positions, 0)
            .map_err(nn("positions"))?;
        let typ = self.token_type.narrow(0, 0, 1).map_err(nn("token types"))?;
        let x = (words + pos)
            .and_then(|x| x.broadcast_add(&typ))
            .map_err(nn("embeddings sum"))?;
        Ok(self.norm.forward(&x)?)
    }
}

impl SelfAttention {
    /// `x` (N, hidden), the sequences of `lengths` packed. Returns (N, hidden).
    fn forward(&self, x: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let qkv = self.qkv.forward(x)?; // (N, 3 * hidden), read as (N, 3, nh, hd)
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        let ctx = kiln_nn::fused::encoder_attention(&qkv, self.num_heads, lengths, scale)?;
        Ok(self.out.forward(&ctx)?)
    }
}

impl Layer {
    fn forward(&self, x: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let a = self.attention.forward(x, lengths)?;
        let x = self
            .attention_norm
            .forward(&(x + a).map_err(nn("attention residual"))?)?;
        let h = self.up.forward(&x)?;
        let h = match self.activation {
            Activation::Gelu => kiln_nn::fused::gelu_erf(&h)?,
            Activation::GeluTanh => kiln_nn::fused::gelu_tanh(&h)?,
        };
        let y = self.down.forward(&h)?;
        Ok(self
            .output_norm
            .forward(&(x + y).map_err(nn("output residual"))?)?)
    }
}

impl Bert {
    /// A Hugging Face folder: `config.json` and `model.safetensors` (or the shards of
    /// `model.safetensors.index.json`).
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not a folder (expected config.json and model.safetensors)",
                ),
            });
        }
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|source| ModelError::Io {
            path: cfg_path.clone(),
            source,
        })?;
        let hf: HfConfig = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: cfg_path,
            source,
        })?;
        let cfg = Config::try_from(&hf)?;
        let mut w = Weights::open_safetensors(&safetensors_files(dir)?)?;
        Self::from_weights(&mut w, cfg)
    }

    /// Builds the model from a weight source; the only place checkpoint names appear. Accepts
    /// `BertModel` names (`embeddings.*`, `encoder.layer.*`) with or without the `bert.` prefix
    /// of the task heads' checkpoints.
    pub fn from_weights(w: &mut Weights, cfg: Config) -> Result<Self> {
        cfg.check()?;
        let p = if w.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let (h, ff) = (cfg.hidden_size, cfg.intermediate_size);
        let eps = cfg.layer_norm_eps;
        let norm = |w: &mut Weights, name: &str| -> Result<LayerNorm> {
            let weight = w.tensor(&format!("{p}{name}.weight"), &[h])?;
            let bias = w.tensor(&format!("{p}{name}.bias"), &[h])?;
            Ok(LayerNorm::new(weight, bias, eps)?)
        };
        let embeddings = Embeddings {
            word: w.embedding(
                &format!("{p}embeddings.word_embeddings.weight"),
                (cfg.vocab_size, h),
            )?,
            position: w.tensor(
                &format!("{p}embeddings.position_embeddings.weight"),
                &[cfg.max_position_embeddings, h],
            )?,
            token_type: w.tensor(
                &format!("{p}embeddings.token_type_embeddings.weight"),
                &[cfg.type_vocab_size, h],
            )?,
            norm: norm(w, "embeddings.LayerNorm")?,
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let l = format!("encoder.layer.{i}");
            let part = |w: &mut Weights, name: &str, out_in: (usize, usize)| {
                let weight = w.tensor(&format!("{p}{l}.{name}.weight"), &[out_in.0, out_in.1])?;
                let bias = w.tensor(&format!("{p}{l}.{name}.bias"), &[out_in.0])?;
                Ok::<_, ModelError>((weight, bias))
            };
            let (qw, qb) = part(w, "attention.self.query", (h, h))?;
            let (kw, kb) = part(w, "attention.self.key", (h, h))?;
            let (vw, vb) = part(w, "attention.self.value", (h, h))?;
            let qkv_w = Tensor::cat(&[qw, kw, vw], 0).map_err(nn("concat qkv"))?;
            let qkv_b = Tensor::cat(&[qb, kb, vb], 0).map_err(nn("concat qkv bias"))?;
            let (ow, ob) = part(w, "attention.output.dense", (h, h))?;
            let (uw, ub) = part(w, "intermediate.dense", (ff, h))?;
            let (dw, db) = part(w, "output.dense", (h, ff))?;
            layers.push(Layer {
                attention: SelfAttention {
                    qkv: Linear::dense(qkv_w, Some(qkv_b))?,
                    out: Linear::dense(ow, Some(ob))?,
                    num_heads: cfg.num_heads,
                    head_dim: cfg.head_dim(),
                },
                attention_norm: norm(w, &format!("{l}.attention.output.LayerNorm"))?,
                up: Linear::dense(uw, Some(ub))?,
                down: Linear::dense(dw, Some(db))?,
                output_norm: norm(w, &format!("{l}.output.LayerNorm"))?,
                activation: cfg.activation,
            });
        }
        Ok(Self {
            cfg,
            embeddings,
            layers,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The last hidden states of a batch of id sequences, packed: (N, hidden) with the
    /// sequences' tokens one after another (N = the sum of their lengths). Token type 0
    /// throughout (single sentences).
    pub fn forward(&self, rows: &[&[u32]]) -> Result<Tensor> {
        let batch = self.batch(rows)?;
        let mut x = self.embeddings.forward(&batch.ids, &batch.positions)?;
        for layer in &self.layers {
            x = layer.forward(&x, &batch.lengths)?;
        }
        Ok(x)
    }

    fn batch(&self, rows: &[&[u32]]) -> Result<Batch> {
        if rows.is_empty() || rows.iter().any(|r| r.is_empty()) {
            return Err(ModelError::Config(
                "an encoder batch needs at least one sequence, none of them empty".into(),
            ));
        }
        let max = self.cfg.max_position_embeddings;
        if let Some(r) = rows.iter().find(|r| r.len() > max) {
            return Err(ModelError::ContextOverflow {
                needed: r.len(),
                max,
            });
        }
        let n: usize = rows.iter().map(|r| r.len()).sum();
        let mut ids = Vec::with_capacity(n);
        let mut positions = Vec::with_capacity(n);
        for r in rows {
            if let Some(&id) = r.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
                return Err(ModelError::TokenOutOfRange {
                    id,
                    vocab: self.cfg.vocab_size,
                });
            }
            ids.extend_from_slice(r);
            positions.extend(0..r.len() as u32);
        }
        let tensor = |v: Vec<u32>| Tensor::from_vec(v, n, &Device::Cpu).map_err(nn("batch ids"));
        Ok(Batch {
            ids: tensor(ids)?,
            positions: tensor(positions)?,
            lengths: rows.iter().map(|r| r.len()).collect(),
        })
    }
}

/// The mean of each sequence's hidden states: sentence-transformers' mean pooling over the
/// attention mask. `hidden` is (N, H), the sequences of `lengths` packed as [`Bert::forward`]
/// returns them; gives one vector of H per sequence.
pub fn mean_pool(hidden: &Tensor, lengths: &[usize]) -> Result<Vec<Vec<f32>>> {
    let (n, h) = hidden.dims2().map_err(nn("pool dims"))?;
    if lengths.iter().sum::<usize>() != n {
        return Err(ModelError::Nn(NnError::Shape {
            op: "mean pool",
            expected: format!("lengths summing to {n}"),
            got: format!("{lengths:?}"),
        }));
    }
    let data = hidden
        .to_dtype(DType::F32)
        .and_then(|x| x.flatten_all())
        .and_then(|x| x.to_vec1::<f32>())
        .map_err(nn("pool read"))?;
    let mut out = Vec::with_capacity(lengths.len());
    let mut rows = data.chunks_exact(h);
    for &len in lengths {
        let mut acc = vec![0f32; h];
        for tok in rows.by_ref().take(len) {
            for (a, &v) in acc.iter_mut().zip(tok) {
                *a += v;
            }
        }
        // sentence-transformers divides by max(count, 1e-9).
        let count = (len as f32).max(1e-9);
        acc.iter_mut().for_each(|a| *a /= count);
        out.push(acc);
    }
    Ok(out)
}

/// The safetensors files of a folder: the shards of `model.safetensors.index.json`, else
/// `model.safetensors`.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if let Some(files) = crate::indexed_shards(dir)? {
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(ModelError::Io {
        path: single,
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_checks_sizes() {
        let mut c = Config::minilm_l6();
        assert!(c.check().is_ok());
        c.num_heads = 5;
        assert!(c.check().unwrap_err().to_string().contains("multiple"));
        c = Config::minilm_l6();
        c.layer_norm_eps = 0.0;
        assert!(c.check().is_err());
    }

    #[test]
    fn mean_pool_averages_each_sequence() {
        let x = Tensor::from_vec(
            vec![1f32, 2., 3., 4., 5., 6., 7., 8., 9., 10.],
            (5, 2),
            &Device::Cpu,
        )
        .unwrap();
        let p = mean_pool(&x, &[2, 3]).unwrap();
        assert_eq!(p, vec![vec![2., 3.], vec![7., 8.]]);
        assert!(mean_pool(&x, &[4, 2]).is_err());
    }
}
