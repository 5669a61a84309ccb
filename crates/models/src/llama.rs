//! The LLaMA family of decoders, by config: Llama 1/2/3, Mistral, Qwen2, SmolLM.
//!
//! Paper: Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models" (pre-norm
//! RMSNorm, SwiGLU MLP, rotary embeddings, no biases); Llama 2 adds grouped-query attention,
//! Mistral a sliding attention window, Qwen2 q/k/v biases.
//! Reference implementation: Hugging Face transformers `models/llama/modeling_llama.py` (and its
//! `mistral`, `qwen2` siblings), against which `tests/parity.rs` checks logits.
//!
//! How we differ:
//! - One file covers the family; the differences are [`Config`] fields, never new model types.
//! - GGUF weights stay quantized: Q4_0/Q4_1/Q8_0 run on kiln-nn's own SIMD kernels, K-quants on
//!   candle's. Both quantize activations to 8 bits (as llama.cpp does), so logits differ slightly
//!   from f32 transformers.
//! - GGUF llama files store Q/K rows permuted to Meta's interleaved RoPE layout; instead of
//!   un-permuting them (as transformers' GGUF loader does) we rotate interleaved pairs, which
//!   gives the same attention scores (see `kiln_nn::RopeLayout`).
//! - The KV cache is kept whole even with a sliding window (the mask hides old positions).
//! - Computation is f32 on the CPU; F16/BF16 checkpoints are widened on load.

// `!(x > y)` is deliberate: it also rejects NaN (and mirrors torch's `~(a < b)` in rope).
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use crate::{ModelError, Result};
use kiln_nn::candle_core::{DType, Device, Tensor, D};
use kiln_nn::fused::rows;
use kiln_nn::qkernels::{QInput, QWeight};
use kiln_nn::team::{self, SharedBuf};
use kiln_nn::{
    causal_attention_padded, Embedding, GeluMlp, GgufMetadata, KvCache, LayerNorm, Linear,
    MakeTensor, Mlp, Norm, PagedKvCache, PagedSeq, RmsNorm, RopeLayout, RopeScaling,
    RotaryEmbedding, SwiGlu, Weights,
};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// The two layouts of the decoder family. Everything else (sizes, heads, biases, windows) is a
/// [`Config`] field of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Style {
    /// LLaMA: RMSNorm, rotary positions, SwiGLU.
    #[default]
    Llama,
    /// GPT-2 (Radford et al. 2019): LayerNorm with bias, learned absolute positions, a GELU MLP
    /// (tanh approximation); biases follow the bias flags. In `config.json` it is
    /// `"model_type": "kiln_gpt2"` with the llama keys and tensor names, plus
    /// `model.embed_positions.weight`.
    Gpt2,
}

/// The checked runtime configuration, built from a Hugging Face `config.json` ([`HfConfig`]) or
/// from GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// Key/value heads: `num_heads` for MHA, fewer for GQA, 1 for MQA.
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// The context window: the most positions one sequence may hold.
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on the q, k, v projections (Qwen2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Biases on the MLP projections (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// Keys older than this many positions are hidden (Mistral, Qwen2 with `use_sliding_window`).
    pub sliding_window: Option<usize>,
    /// The first layer that uses the sliding window (Qwen2's `max_window_layers`; 0 for Mistral).
    pub sliding_window_from_layer: usize,
    pub style: Style,
}

impl Config {
    /// SmolLM2-135M (the `smollm2` asset).
    pub fn smollm2_135m() -> Self {
        Self {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            sliding_window: None,
            sliding_window_from_layer: 0,
            style: Style::Llama,
        }
    }

    /// Rejects configs the model cannot run, with the offending values.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.vocab_size == 0
            || self.hidden_size == 0
            || self.intermediate_size == 0
            || self.num_layers == 0
        {
            return bad(format!(
                "vocab_size {}, hidden_size {}, intermediate_size {} and num_layers {} must all be positive",
                self.vocab_size, self.hidden_size, self.intermediate_size, self.num_layers
            ));
        }
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return bad(format!(
                "num_heads {} must be a positive multiple of num_kv_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even and positive",
                self.head_dim
            ));
        }
        // The projections are (num_heads * head_dim, hidden): values from a file whose product
        // overflows would wrap to a small width that some tensor could match.
        if self.num_heads.checked_mul(self.head_dim).is_none() {
            return bad(format!(
                "num_heads {} x head_dim {} overflows",
                self.num_heads, self.head_dim
            ));
        }
        if !(self.rms_norm_eps > 0.0) {
            return bad(format!(
                "rms_norm_eps {} must be positive",
                self.rms_norm_eps
            ));
        }
        if self.max_position_embeddings == 0 {
            return bad("max_position_embeddings must be positive".into());
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window must be positive".into());
        }
        Ok(())
    }

    /// The `config.json` that [`Llama::load`] reads back as this config (for models kiln trains:
    /// no rope scaling, no sliding window).
    pub fn to_hf_json(&self) -> Result<serde_json::Value> {
        if self.rope_scaling != RopeScaling::None || self.sliding_window.is_some() {
            return Err(ModelError::Config(
                "writing config.json supports neither rope scaling nor a sliding window".into(),
            ));
        }
        if self.qkv_bias != self.o_bias {
            return Err(ModelError::Config(
                "writing config.json needs the q/k/v and output biases to agree (attention_bias)"
                    .into(),
            ));
        }
        let (model_type, arch, act) = match self.style {
            Style::Llama => ("llama", "LlamaForCausalLM", "silu"),
            Style::Gpt2 => ("kiln_gpt2", "KilnGpt2ForCausalLM", "gelu_pytorch_tanh"),
        };
        Ok(serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": act,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.qkv_bias,
            "mlp_bias": self.mlp_bias,
            "torch_dtype": "float32",
        }))
    }

    fn window_for_layer(&self, i: usize) -> Option<usize> {
        self.sliding_window
            .filter(|_| i >= self.sliding_window_from_layer)
    }

    /// Reads `{arch}.*` keys of a GGUF file (llama.cpp's names). The vocabulary size and tied
    /// embeddings come from the tensors themselves.
    fn from_gguf(meta: &GgufMetadata<'_>, weights: &Weights) -> Result<(Self, RopeLayout)> {
        let arch = meta.string("general.architecture")?;
        // llama.cpp's converter permutes Q/K rows of `llama` models to the interleaved layout;
        // qwen2 is stored in the Hugging Face layout ("NEOX" rope in ggml's words).
        let layout = match arch {
            "llama" | "mistral" => RopeLayout::Interleaved,
            "qwen2" => RopeLayout::HalfSplit,
            other => {
                return Err(ModelError::Config(format!(
                "GGUF architecture `{other}` is not supported (kiln runs llama, mistral and qwen2)"
            )))
            }
        };
        let k = |s: &str| format!("{arch}.{s}");
        let hidden_size = meta.usize(&k("embedding_length"))?;
        let num_heads = meta.usize(&k("attention.head_count"))?;
        let num_kv_heads = meta
            .opt_usize(&k("attention.head_count_kv"))?
            .unwrap_or(num_heads);
        let head_dim = match meta.opt_usize(&k("attention.key_length"))? {
            Some(d) => d,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        let vocab_size = match weights.shape("token_embd.weight") {
            Some(s) if s.len() == 2 => s[0],
            _ => meta.usize(&k("vocab_size"))?,
        };
        let max_pos = meta.usize(&k("context_length"))?;
        let rope_scaling = match meta.opt_string(&k("rope.scaling.type"))? {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: meta.opt_f64(&k("rope.scaling.factor"))?.unwrap_or(1.0),
            },
            Some("yarn") => RopeScaling::Yarn {
                factor: meta.opt_f64(&k("rope.scaling.factor"))?.unwrap_or(1.0),
                original_max_position_embeddings: meta
                    .opt_usize(&k("rope.scaling.original_context_length"))?
                    .unwrap_or(max_pos),
                attention_factor: None,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: None,
                mscale_all_dim: None,
                truncate: true,
            },
            Some(other) => {
                return Err(ModelError::Config(format!(
                    "unsupported rope scaling `{other}` in GGUF"
                )))
            }
        };
        let num_layers = meta.usize(&k("block_count"))?;
        // Each layer is at least nine tensors (`blk.{i}.*`); a count the file cannot hold is
        // named here rather than as a missing tensor of some layer.
        let last = format!("blk.{}.attn_norm.weight", num_layers.saturating_sub(1));
        if num_layers > 0 && !weights.contains(&last) {
            return Err(ModelError::Config(format!(
                "{} is {num_layers}, but the file has no `{last}`",
                k("block_count")
            )));
        }
        let cfg = Self {
            vocab_size,
            hidden_size,
            intermediate_size: meta.usize(&k("feed_forward_length"))?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: meta
                .opt_f64(&k("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            rope_theta: meta.opt_f64(&k("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: max_pos,
            tie_word_embeddings: !weights.contains("output.weight"),
            qkv_bias: weights.contains("blk.0.attn_q.bias"),
            o_bias: weights.contains("blk.0.attn_output.bias"),
            mlp_bias: weights.contains("blk.0.ffn_up.bias"),
            sliding_window: meta
                .opt_usize(&k("attention.sliding_window"))?
                .filter(|&w| w > 0),
            sliding_window_from_layer: 0,
            style: Style::Llama,
        };
        Ok((cfg, layout))
    }
}

/// `config.json` as Hugging Face writes it for `llama`, `mistral` and `qwen2` models (both the
/// legacy `rope_theta` + `rope_scaling` keys and transformers 5's `rope_parameters`).
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub rms_norm_eps: Option<f64>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<HfRope>,
    #[serde(default)]
    pub rope_parameters: Option<HfRope>,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub max_window_layers: Option<usize>,
}

/// `rope_scaling` / `rope_parameters` of `config.json`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HfRope {
    #[serde(default)]
    pub rope_type: Option<String>,
    #[serde(default, rename = "type")]
    pub legacy_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub attention_factor: Option<f64>,
    #[serde(default)]
    pub beta_fast: Option<f64>,
    #[serde(default)]
    pub beta_slow: Option<f64>,
    #[serde(default)]
    pub mscale: Option<f64>,
    #[serde(default)]
    pub mscale_all_dim: Option<f64>,
    #[serde(default)]
    pub truncate: Option<bool>,
}

impl HfRope {
    fn scaling(&self, max_pos: usize) -> Result<RopeScaling> {
        let kind = self
            .rope_type
            .as_deref()
            .or(self.legacy_type.as_deref())
            .unwrap_or("default");
        let factor = || {
            self.factor.ok_or_else(|| {
                ModelError::Config(format!("rope scaling `{kind}` needs a `factor`"))
            })
        };
        Ok(match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: factor()? },
            "dynamic" => RopeScaling::DynamicNtk {
                factor: factor()?,
                max_position_embeddings: max_pos,
            },
            "yarn" => {
                let original = self.original_max_position_embeddings.unwrap_or(max_pos);
                RopeScaling::Yarn {
                    factor: self.factor.unwrap_or(max_pos as f64 / original as f64),
                    original_max_position_embeddings: original,
                    attention_factor: self.attention_factor,
                    beta_fast: self.beta_fast.unwrap_or(32.0),
                    beta_slow: self.beta_slow.unwrap_or(1.0),
                    mscale: self.mscale,
                    mscale_all_dim: self.mscale_all_dim,
                    truncate: self.truncate.unwrap_or(true),
                }
            }
            "llama3" => RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: self.low_freq_factor.unwrap_or(1.0),
                high_freq_factor: self.high_freq_factor.unwrap_or(4.0),
                original_max_position_embeddings: self
                    .original_max_position_embeddings
                    .ok_or_else(|| {
                        ModelError::Config(
                            "llama3 rope scaling needs `original_max_position_embeddings`".into(),
                        )
                    })?,
            },
            other => {
                return Err(ModelError::Config(format!(
                    "unsupported rope scaling `{other}`"
                )))
            }
        })
    }
}

impl TryFrom<&HfConfig> for Config {
    type Error = ModelError;

    fn try_from(c: &HfConfig) -> Result<Self> {
        let model_type = c.model_type.as_deref().unwrap_or("llama");
        if !matches!(model_type, "llama" | "mistral" | "qwen2" | "kiln_gpt2") {
            return Err(ModelError::Config(format!(
                "model_type `{model_type}` is not supported (kiln runs llama, mistral, qwen2 and kiln_gpt2)"
            )));
        }
        let style = if model_type == "kiln_gpt2" {
            Style::Gpt2
        } else {
            Style::Llama
        };
        let act_ok = match style {
            Style::Llama => "silu",
            Style::Gpt2 => "gelu_pytorch_tanh",
        };
        if let Some(act) = c.hidden_act.as_deref().filter(|a| *a != act_ok) {
            return Err(ModelError::Config(format!(
                "hidden_act `{act}` is not supported for {model_type} (only {act_ok})"
            )));
        }
        let max_pos = c.max_position_embeddings.unwrap_or(2048);
        let rope = c.rope_parameters.as_ref().or(c.rope_scaling.as_ref());
        let rope_theta = c
            .rope_theta
            .or(c.rope_parameters.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(10_000.0);
        let rope_scaling = match rope {
            Some(r) => r.scaling(max_pos)?,
            None => RopeScaling::None,
        };
        let attention_bias = c.attention_bias.unwrap_or(false);
        // transformers: Mistral windows every layer; Qwen2 only when `use_sliding_window`, from
        // layer `max_window_layers` on; Llama never.
        let (sliding_window, from_layer) = match model_type {
            "mistral" => (c.sliding_window, 0),
            "qwen2" if c.use_sliding_window == Some(true) => {
                (c.sliding_window, c.max_window_layers.unwrap_or(0))
            }
            _ => (None, 0),
        };
        let cfg = Config {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            head_dim: c.head_dim.unwrap_or(
                c.hidden_size
                    .checked_div(c.num_attention_heads)
                    .unwrap_or(0),
            ),
            rms_norm_eps: c.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: max_pos,
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
            qkv_bias: model_type == "qwen2" || attention_bias,
            o_bias: matches!(model_type, "llama" | "kiln_gpt2") && attention_bias,
            mlp_bias: matches!(model_type, "llama" | "kiln_gpt2") && c.mlp_bias.unwrap_or(false),
            sliding_window,
            sliding_window_from_layer: from_layer,
            style,
        };
        cfg.check()?;
        Ok(cfg)
    }
}

/// One decoder layer: pre-norm attention and a pre-norm MLP, each added to the residual stream.
#[derive(Debug, Clone)]
struct Block {
    attn_norm: Norm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    mlp_norm: Norm,
    mlp: Mlp,
    window: Option<usize>,
}

/// Where a layer's keys and values come from: the KV cache (inference), or only the current
/// tokens (training: causal attention on kiln's fused kernel, which has a backward pass).
enum Attend<'a> {
    Cache {
        cache: &'a mut KvCache,
        layer: usize,
        pad: &'a [usize],
    },
    Train,
    /// Continuous batching: the rows of `x` are the new tokens of several sequences, one after
    /// another (B = 1); keys and values live in the paged pool.
    Paged {
        cache: &'a mut PagedKvCache,
        layer: usize,
        seqs: &'a [PagedSeq<'a>],
    },
}

impl Block {
    fn forward(
        &self,
        x: &Tensor,
        cfg: &Config,
        rope: Option<(&RotaryEmbedding, &(Tensor, Tensor))>,
        attend: Attend<'_>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3().map_err(nn("block dims"))?;
        let h = self.attn_norm.forward(x)?;
        // (B, T, n * D) -> (B, T, n, D): a view, no copy.
        let qkv = Linear::forward_many(&[&self.q, &self.k, &self.v], &h)?;
        let split = |y: &Tensor, n: usize| -> Result<Tensor> {
            y.reshape((b, t, n, cfg.head_dim))
                .map_err(nn("split heads"))
        };
        let (q, k, v) = (
            split(&qkv[0], cfg.num_heads)?,
            split(&qkv[1], cfg.num_kv_heads)?,
            split(&qkv[2], cfg.num_kv_heads)?,
        );
        // Inference keeps (B, H, T, D) for the caches: heads to the front, then RoPE.
        let front = |y: Tensor| y.transpose(1, 2).map_err(nn("heads to front"));
        let rotate = |y: Tensor| -> Result<Tensor> {
            match rope {
                Some((rope, (cos, sin))) => Ok(rope.apply(&y, cos, sin)?),
                None => Ok(y),
            }
        };
        let att = match attend {
            Attend::Cache { cache, layer, pad } => {
                let q = rotate(front(q)?)?;
                let k = rotate(front(k)?)?;
                let (k, v) = cache.append(layer, &k, &front(v)?)?;
                let att = if b == 1 && pad.iter().all(|&p| p == 0) {
                    // In place over the cache, with the paged kernel's arithmetic.
                    kiln_nn::cached_attention(&q, &k, &v, self.window)?
                } else {
                    causal_attention_padded(&q, &k, &v, self.window, pad)?
                };
                att // (B, H, T, D)
                    .transpose(1, 2)
                    .map_err(nn("heads back"))?
            }
            Attend::Paged { cache, layer, seqs } => {
                let rows = t;
                let flat = |y: Tensor| -> Result<Vec<f32>> {
                    y.flatten_all()
                        .and_then(|y| y.to_vec1::<f32>())
                        .map_err(nn("paged rows"))
                };
                let q = flat(rotate(front(q)?)?)?; // [head][row][d]
                let k = flat(rotate(front(k)?)?)?;
                let v = flat(front(v)?.contiguous().map_err(nn("v contiguous"))?)?;
                cache.write(layer, &k, &v, rows, seqs)?;
                let scale = 1.0 / (cfg.head_dim as f32).sqrt();
                let o = cache.attend(layer, &q, cfg.num_heads, rows, seqs, self.window, scale)?;
                Tensor::from_vec(o, (1, cfg.num_heads, rows, cfg.head_dim), x.device())
                    .and_then(|o| o.transpose(1, 2))
                    .map_err(nn("paged heads back"))?
            }
            Attend::Train => {
                // Rotary embedding and attention on the (B, T, H, D) layout: no transposes or
                // copies in the graph.
                let (q, k) = match rope {
                    Some((rope, (cos, sin))) => {
                        if rope.layout() != RopeLayout::HalfSplit {
                            return Err(ModelError::Config(
                                "training needs the half-split rope layout (a Hugging Face folder or a new model), not a GGUF file's".into(),
                            ));
                        }
                        (
                            kiln_nn::fused::rope_bthd(&q, cos, sin)?,
                            kiln_nn::fused::rope_bthd(&k, cos, sin)?,
                        )
                    }
                    None => (q, k),
                };
                let scale = 1.0 / (cfg.head_dim as f32).sqrt();
                kiln_nn::fused::causal_attention_bthd(&q, &k, &v, scale)?
            }
        }; // (B, T, H, D)
        let att = att
            .reshape((b, t, cfg.num_heads * cfg.head_dim))
            .map_err(nn("merge heads"))?;
        let x = (x + self.o.forward(&att)?).map_err(nn("attention residual"))?;
        let m = self.mlp.forward(&self.mlp_norm.forward(&x)?)?;
        (x + m).map_err(nn("mlp residual"))
    }
}

fn nn(op: &'static str) -> impl Fn(kiln_nn::candle_core::Error) -> ModelError {
    move |source| ModelError::Nn(kiln_nn::NnError::Candle { op, source })
}

/// One sequence's part of [`Llama::forward_paged`].
#[derive(Debug, Clone, Copy)]
pub struct PagedStep<'a> {
    /// New tokens, at positions `start..start + tokens.len()`.
    pub tokens: &'a [u32],
    /// Positions already in the pool for this sequence.
    pub start: usize,
    /// Block table covering positions `0..start + tokens.len()`.
    pub blocks: &'a [u32],
}

/// A LLaMA-family decoder with its weights.
#[derive(Debug, Clone)]
pub struct Llama {
    cfg: Config,
    embed: Embedding,
    /// Learned absolute positions (GPT-2 style), (max_position_embeddings, hidden).
    pos_embed: Option<Embedding>,
    layers: Vec<Block>,
    norm: Norm,
    lm_head: Linear,
    rope: RotaryEmbedding,
    device: Device,
    /// What the one-token step needs beyond the layers, when it applies (see [`DecodePlan`]).
    decode: Option<DecodePlan>,
}

/// Which naming scheme the weight source uses.
#[derive(Clone, Copy)]
enum Naming {
    Hf,
    Gguf,
}

impl Llama {
    /// Loads a `.gguf` file or a Hugging Face folder (`config.json` + `*.safetensors`).
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Self::load_hf_dir(path);
        }
        let is_gguf = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
            || has_gguf_magic(path);
        if is_gguf {
            Self::load_gguf(path)
        } else if path.file_name().is_some_and(|n| n == "config.json") {
            Self::load_hf_dir(path.parent().unwrap_or(Path::new(".")))
        } else {
            Err(ModelError::UnknownFormat(path.to_path_buf()))
        }
    }

    /// Loads a GGUF file (v2 or v3), keeping quantized tensors quantized.
    pub fn load_gguf(path: &Path) -> Result<Self> {
        Self::load_gguf_with(path, false)
    }

    /// Loads a GGUF file; with `dequantize` every weight becomes dense f32 (the reference path
    /// that parity tests compare with transformers, which also dequantizes).
    pub fn load_gguf_with(path: &Path, dequantize: bool) -> Result<Self> {
        let mut w = Weights::open_gguf(path)?;
        w.set_dequantize(dequantize);
        let meta = w
            .gguf_metadata()
            .ok_or_else(|| ModelError::UnknownFormat(path.to_path_buf()))?;
        let (mut cfg, layout) = Config::from_gguf(&meta, &w)?;
        cfg.check()?;
        // llama.cpp stores Llama 3's rope scaling as per-frequency divisors.
        if w.contains("rope_freqs.weight") {
            let f = w.tensor("rope_freqs.weight", &[cfg.head_dim / 2])?;
            let f = f.to_vec1::<f32>().map_err(nn("rope_freqs"))?;
            cfg.rope_scaling = RopeScaling::FreqFactors(f);
        }
        Self::from_weights(&mut w, cfg, layout, Naming::Gguf)
    }

    /// Loads a Hugging Face folder: `config.json` and either `model.safetensors.index.json` with
    /// its shards or every `*.safetensors` file in the folder.
    pub fn load_hf_dir(dir: &Path) -> Result<Self> {
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
        let files = safetensors_files(dir)?;
        let mut w = Weights::open_safetensors(&files)?;
        Self::from_weights(&mut w, cfg, RopeLayout::HalfSplit, Naming::Hf)
    }

    /// Builds the model from a weight source; the only place checkpoint names appear.
    fn from_weights(
        w: &mut Weights,
        cfg: Config,
        layout: RopeLayout,
        naming: Naming,
    ) -> Result<Self> {
        let (h, d, ff) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (qn, kvn) = (cfg.num_heads * d, cfg.num_kv_heads * d);
        let names: fn(usize, &str) -> String = match naming {
            Naming::Hf => |i, part| {
                let p = match part {
                    "attn_norm" => "input_layernorm",
                    "q" => "self_attn.q_proj",
                    "k" => "self_attn.k_proj",
                    "v" => "self_attn.v_proj",
                    "o" => "self_attn.o_proj",
                    "mlp_norm" => "post_attention_layernorm",
                    "gate" => "mlp.gate_proj",
                    "up" => "mlp.up_proj",
                    _ => "mlp.down_proj",
                };
                format!("model.layers.{i}.{p}")
            },
            Naming::Gguf => |i, part| {
                let p = match part {
                    "attn_norm" => "attn_norm",
                    "q" => "attn_q",
                    "k" => "attn_k",
                    "v" => "attn_v",
                    "o" => "attn_output",
                    "mlp_norm" => "ffn_norm",
                    "gate" => "ffn_gate",
                    "up" => "ffn_up",
                    _ => "ffn_down",
                };
                format!("blk.{i}.{p}")
            },
        };
        let (embed_name, norm_name, head_name) = match naming {
            Naming::Hf => (
                "model.embed_tokens.weight",
                "model.norm.weight",
                "lm_head.weight",
            ),
            Naming::Gguf => ("token_embd.weight", "output_norm.weight", "output.weight"),
        };
        let linear = |w: &mut Weights,
                      i: usize,
                      part: &str,
                      bias: bool,
                      out_in: (usize, usize)|
         -> Result<Linear> {
            let base = names(i, part);
            let b = format!("{base}.bias");
            Ok(w.linear(
                &format!("{base}.weight"),
                bias.then_some(b.as_str()),
                out_in,
            )?)
        };
        let gpt2 = cfg.style == Style::Gpt2;
        if gpt2 && matches!(naming, Naming::Gguf) {
            return Err(ModelError::Config(
                "GPT-2 style models are read from safetensors folders, not GGUF".into(),
            ));
        }
        let norm = |w: &mut Weights, base: &str| -> Result<Norm> {
            let weight = w.tensor(&format!("{base}.weight"), &[h])?;
            Ok(if gpt2 {
                let bias = w.tensor(&format!("{base}.bias"), &[h])?;
                Norm::Layer(LayerNorm::new(weight, bias, cfg.rms_norm_eps)?)
            } else {
                Norm::Rms(RmsNorm::new(weight, cfg.rms_norm_eps)?)
            })
        };
        // Not `with_capacity(cfg.num_layers)`: the count comes from the file, and a corrupt one
        // (2^40 layers) would abort on the allocation before the first missing layer is noticed.
        let mut layers = Vec::new();
        for i in 0..cfg.num_layers {
            let attn_norm = norm(w, &names(i, "attn_norm"))?;
            let q = linear(w, i, "q", cfg.qkv_bias, (qn, h))?;
            let k = linear(w, i, "k", cfg.qkv_bias, (kvn, h))?;
            let v = linear(w, i, "v", cfg.qkv_bias, (kvn, h))?;
            let o = linear(w, i, "o", cfg.o_bias, (h, qn))?;
            let mlp_norm = norm(w, &names(i, "mlp_norm"))?;
            let mlp = if gpt2 {
                let up = linear(w, i, "up", cfg.mlp_bias, (ff, h))?;
                let down = linear(w, i, "down", cfg.mlp_bias, (h, ff))?;
                Mlp::Gelu(GeluMlp { up, down })
            } else {
                let gate = linear(w, i, "gate", cfg.mlp_bias, (ff, h))?;
                let up = linear(w, i, "up", cfg.mlp_bias, (ff, h))?;
                let down = linear(w, i, "down", cfg.mlp_bias, (h, ff))?;
                Mlp::SwiGlu(SwiGlu { gate, up, down })
            };
            layers.push(Block {
                attn_norm,
                q,
                k,
                v,
                o,
                mlp_norm,
                mlp,
                window: cfg.window_for_layer(i),
            });
        }
        let embed = w.embedding(embed_name, (cfg.vocab_size, h))?;
        let pos_embed = if gpt2 {
            Some(w.embedding(
                "model.embed_positions.weight",
                (cfg.max_position_embeddings, h),
            )?)
        } else {
            None
        };
        let norm = norm(w, norm_name.trim_end_matches(".weight"))?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.as_linear()?
        } else {
            w.linear(head_name, None, (cfg.vocab_size, h))?
        };
        let rope = RotaryEmbedding::new(d, cfg.rope_theta, cfg.rope_scaling.clone(), layout)?;
        let decode = DecodePlan::new(pos_embed.is_none(), w.device(), &layers, &norm, &lm_head)?;
        Ok(Self {
            cfg,
            embed,
            pos_embed,
            layers,
            norm,
            lm_head,
            rope,
            device: w.device().clone(),
            decode,
        })
    }

    /// This model with every projection (q, k, v, o, the MLP's and the output head) quantized in
    /// memory to `dtype` (for example `Q8_0`), as a GGUF file of that type would hold them; the
    /// embeddings and norms stay as they are.
    pub fn quantize(&self, dtype: kiln_nn::candle_core::quantized::GgmlDType) -> Result<Self> {
        let mut m = self.clone();
        for b in &mut m.layers {
            for l in [&mut b.q, &mut b.k, &mut b.v, &mut b.o] {
                *l = l.quantize(dtype)?;
            }
            match &mut b.mlp {
                Mlp::SwiGlu(s) => {
                    for l in [&mut s.gate, &mut s.up, &mut s.down] {
                        *l = l.quantize(dtype)?;
                    }
                }
                Mlp::Gelu(g) => {
                    for l in [&mut g.up, &mut g.down] {
                        *l = l.quantize(dtype)?;
                    }
                }
            }
        }
        m.lm_head = m.lm_head.quantize(dtype)?;
        m.decode = DecodePlan::new(m.uses_rope(), &m.device, &m.layers, &m.norm, &m.lm_head)?;
        Ok(m)
    }

    /// A new model whose every tensor comes from `make(name, shape)`, named as in a Hugging Face
    /// checkpoint ([`Config::to_hf_json`] writes the matching `config.json`): how training creates
    /// its variables through the same code that loads a checkpoint.
    pub fn init(cfg: Config, make: MakeTensor) -> Result<Self> {
        cfg.check()?;
        let mut w = Weights::generated(Path::new("<init>"), make);
        Self::from_weights(&mut w, cfg, RopeLayout::HalfSplit, Naming::Hf)
    }

    /// Logits at every position for training: `ids` (B, T) -> (B, T, vocab), without a KV cache,
    /// through ops that all have a backward pass.
    pub fn forward_train(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(&self.hidden_train(ids)?)?)
    }

    /// The final norm's output at every position (B, T, hidden), through ops with a backward.
    fn hidden_train(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, t) = ids.dims2().map_err(nn("input_ids must be (B, T)"))?;
        self.check_ids(ids, 0, t)?;
        let ids = ids.to_dtype(DType::U32).map_err(nn("ids to u32"))?;
        let mut x = self.embed_positions(&ids, 0, t)?;
        let cos_sin = match self.uses_rope() {
            true => Some(self.rope.cos_sin(0, t, &self.device)?),
            false => None,
        };
        let rope = cos_sin.as_ref().map(|cs| (&self.rope, cs));
        for layer in &self.layers {
            x = layer.forward(&x, &self.cfg, rope, Attend::Train)?;
        }
        Ok(self.norm.forward(&x)?)
    }

    /// Mean next-token cross-entropy (nats) of `targets` (B, T) given `ids` (B, T); targets equal
    /// to `u32::MAX` are ignored. The loss to call `backward` on: the output head and the loss
    /// are one node that computes its gradients in the forward pass
    /// (`Linear::cross_entropy`), so the (B T, vocab) logits never outlive it. Evaluation
    /// without a backward goes through [`Llama::forward_train`].
    pub fn loss(&self, ids: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let h = self.hidden_train(ids)?;
        let (b, t, d) = h.dims3().map_err(nn("hidden dims"))?;
        let h = h.reshape((b * t, d)).map_err(nn("flatten hidden"))?;
        let targets = targets
            .to_dtype(DType::U32)
            .and_then(|t| t.flatten_all())
            .map_err(nn("flatten targets"))?;
        Ok(self.lm_head.cross_entropy(&h, &targets, u32::MAX)?)
    }

    fn uses_rope(&self) -> bool {
        self.pos_embed.is_none()
    }

    /// Token embeddings plus, GPT-2 style, the learned embeddings of positions `start..start+t`.
    fn embed_positions(&self, ids: &Tensor, start: usize, t: usize) -> Result<Tensor> {
        let x = self.embed.forward(ids)?; // (B, T, hidden)
        match &self.pos_embed {
            None => Ok(x),
            Some(pe) => {
                let pos = Tensor::arange(start as u32, (start + t) as u32, &self.device)
                    .and_then(|p| p.unsqueeze(0))
                    .map_err(nn("positions"))?;
                let p = pe.forward(&pos)?; // (1, T, hidden)
                x.broadcast_add(&p).map_err(nn("add positions"))
            }
        }
    }

    fn check_ids(&self, ids: &Tensor, start_pos: usize, t: usize) -> Result<()> {
        if t == 0 {
            return Err(ModelError::Config(
                "forward needs at least one token".into(),
            ));
        }
        if start_pos + t > self.cfg.max_position_embeddings {
            return Err(ModelError::ContextOverflow {
                needed: start_pos + t,
                max: self.cfg.max_position_embeddings,
            });
        }
        let max_id = ids
            .to_dtype(DType::U32)
            .and_then(|f| f.flatten_all())
            .and_then(|f| f.max(D::Minus1))
            .and_then(|m| m.to_scalar::<u32>())
            .map_err(nn("max id"))?;
        if max_id as usize >= self.cfg.vocab_size {
            return Err(ModelError::TokenOutOfRange {
                id: max_id,
                vocab: self.cfg.vocab_size,
            });
        }
        Ok(())
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_layers)
    }

    /// Logits at the last position: `input_ids` (B, T) u32 at positions `start_pos..start_pos + T`
    /// (the cache must hold exactly `start_pos` positions) -> (B, vocab).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        start_pos: usize,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.forward_padded(input_ids, start_pos, cache, &[])
    }

    /// [`Self::forward`] for a left-padded batch of sequences of different lengths: row `b`'s
    /// first `pad[b]` positions are padding, hidden from its other positions here and in every
    /// later call on the same cache. Positions are shifted right by the padding; RoPE scores
    /// depend only on position differences, so each row's logits equal those of the row alone
    /// up to rounding.
    pub fn forward_padded(
        &self,
        input_ids: &Tensor,
        start_pos: usize,
        cache: &mut KvCache,
        pad: &[usize],
    ) -> Result<Tensor> {
        if input_ids.dims() == [1, 1]
            && pad.iter().all(|&p| p == 0)
            && self.decode.is_some()
            && decode_step_enabled()
        {
            let id = input_ids
                .to_dtype(DType::U32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<u32>())
                .map_err(nn("token id"))?[0];
            if cache.len() != start_pos {
                return Err(ModelError::CacheMismatch {
                    start_pos,
                    cached: cache.len(),
                });
            }
            if let Some(logits) = self.decode_token(id, cache)? {
                let v = logits.len();
                return Tensor::from_vec(logits, (1, v), &self.device).map_err(nn("logits"));
            }
        }
        self.forward_graph(input_ids, start_pos, cache, pad)
    }

    /// [`Self::forward_padded`] always through the tensor graph, never the one-token step
    /// ([`Self::decode_token`]): the reference that step is tested against.
    pub fn forward_graph(
        &self,
        input_ids: &Tensor,
        start_pos: usize,
        cache: &mut KvCache,
        pad: &[usize],
    ) -> Result<Tensor> {
        let x = self.hidden(input_ids, start_pos, cache, pad)?;
        let t = x.dim(1).map_err(nn("dims"))?;
        let last = x.narrow(1, t - 1, 1).map_err(nn("last position"))?;
        self.lm_head
            .forward(&last)?
            .squeeze(1)
            .map_err(nn("squeeze"))
    }

    /// Logits at every position: (B, T) -> (B, T, vocab).
    pub fn forward_all(
        &self,
        input_ids: &Tensor,
        start_pos: usize,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let x = self.hidden(input_ids, start_pos, cache, &[])?;
        Ok(self.lm_head.forward(&x)?)
    }

    /// Convenience for one sequence: ids at `start_pos..` -> last-position logits as a vector.
    pub fn logits_last(
        &self,
        ids: &[u32],
        start_pos: usize,
        cache: &mut KvCache,
    ) -> Result<Vec<f32>> {
        let t = Tensor::from_slice(ids, (1, ids.len()), &self.device).map_err(nn("ids"))?;
        self.forward(&t, start_pos, cache)?
            .squeeze(0)
            .and_then(|l| l.to_vec1::<f32>())
            .map_err(nn("logits"))
    }

    /// One step of continuous batching: each sequence's new tokens at its positions
    /// `start..start + len`, keys and values read from and written to the paged pool through its
    /// block table (which must cover `0..start + len`). Returns each sequence's logits for the
    /// position after its last new token, (sequences, vocab). Per sequence this computes what
    /// [`Self::forward`] computes on a private cache, up to rounding.
    pub fn forward_paged(
        &self,
        seqs: &[PagedStep<'_>],
        cache: &mut PagedKvCache,
    ) -> Result<Tensor> {
        if seqs.is_empty() || seqs.iter().any(|s| s.tokens.is_empty()) {
            return Err(ModelError::Config(
                "a paged step needs at least one token per sequence".into(),
            ));
        }
        if cache.num_layers() != self.cfg.num_layers {
            return Err(ModelError::Config(format!(
                "the paged cache has {} layers, the model {}",
                cache.num_layers(),
                self.cfg.num_layers
            )));
        }
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut views = Vec::with_capacity(seqs.len());
        let mut last = Vec::with_capacity(seqs.len());
        for s in seqs {
            let len = s.tokens.len();
            if s.start + len > self.cfg.max_position_embeddings {
                return Err(ModelError::ContextOverflow {
                    needed: s.start + len,
                    max: self.cfg.max_position_embeddings,
                });
            }
            if let Some(&id) = s
                .tokens
                .iter()
                .find(|&&id| id as usize >= self.cfg.vocab_size)
            {
                return Err(ModelError::TokenOutOfRange {
                    id,
                    vocab: self.cfg.vocab_size,
                });
            }
            views.push(PagedSeq {
                blocks: s.blocks,
                start: s.start,
                len,
                offset: ids.len(),
            });
            ids.extend_from_slice(s.tokens);
            positions.extend(s.start as u32..(s.start + len) as u32);
            last.push((ids.len() - 1) as u32);
        }
        let n = ids.len();
        let ids = Tensor::from_vec(ids, (1, n), &self.device).map_err(nn("ids"))?;
        let mut x = self.embed.forward(&ids)?; // (1, N, hidden)
        if let Some(pe) = &self.pos_embed {
            let pos = Tensor::from_vec(positions, (1, n), &self.device).map_err(nn("positions"))?;
            x = (x + pe.forward(&pos)?).map_err(nn("add positions"))?;
        }
        let cos_sin = match self.uses_rope() {
            true => {
                let (mut cos, mut sin) = (Vec::new(), Vec::new());
                for s in seqs {
                    let (c, si) = self.rope.cos_sin(s.start, s.tokens.len(), &self.device)?;
                    cos.push(c);
                    sin.push(si);
                }
                Some((
                    Tensor::cat(&cos, 0).map_err(nn("rope cos"))?,
                    Tensor::cat(&sin, 0).map_err(nn("rope sin"))?,
                ))
            }
            false => None,
        };
        let rope = cos_sin.as_ref().map(|cs| (&self.rope, cs));
        for (i, layer) in self.layers.iter().enumerate() {
            let attend = Attend::Paged {
                cache: &mut *cache,
                layer: i,
                seqs: &views,
            };
            x = layer.forward(&x, &self.cfg, rope, attend)?;
        }
        let last = Tensor::from_vec(last, seqs.len(), &self.device).map_err(nn("last rows"))?;
        let x = x
            .squeeze(0)
            .and_then(|x| x.index_select(&last, 0))
            .map_err(nn("last positions"))?; // (sequences, hidden)
        let x = self.norm.forward(&x)?;
        Ok(self.lm_head.forward(&x)?)
    }

    /// A paged pool shaped for this model: `num_blocks` blocks of `block_size` positions.
    pub fn new_paged_cache(&self, block_size: usize, num_blocks: usize) -> Result<PagedKvCache> {
        Ok(PagedKvCache::new(
            self.cfg.num_layers,
            self.cfg.num_kv_heads,
            self.cfg.head_dim,
            block_size,
            num_blocks,
        )?)
    }

    /// The final hidden states after the last norm, (B, T, hidden).
    fn hidden(
        &self,
        input_ids: &Tensor,
        start_pos: usize,
        cache: &mut KvCache,
        pad: &[usize],
    ) -> Result<Tensor> {
        let (_, t) = input_ids.dims2().map_err(nn("input_ids must be (B, T)"))?;
        if cache.len() != start_pos {
            return Err(ModelError::CacheMismatch {
                start_pos,
                cached: cache.len(),
            });
        }
        self.check_ids(input_ids, start_pos, t)?;
        let ids = input_ids.to_dtype(DType::U32).map_err(nn("ids to u32"))?;
        let mut x = self.embed_positions(&ids, start_pos, t)?; // (B, T, hidden)
        let cos_sin = match self.uses_rope() {
            true => Some(self.rope.cos_sin(start_pos, t, &self.device)?),
            false => None,
        };
        let rope = cos_sin.as_ref().map(|cs| (&self.rope, cs));
        // A failing layer leaves entries past `cache.len()` in the layers before it; they are
        // overwritten by the next forward pass because `len` only moves after the last layer.
        for (i, layer) in self.layers.iter().enumerate() {
            let attend = Attend::Cache {
                cache: &mut *cache,
                layer: i,
                pad,
            };
            x = layer.forward(&x, &self.cfg, rope, attend)?;
        }
        cache.advance(t);
        Ok(self.norm.forward(&x)?)
    }
}

/// What the one-token decode step ([`Llama::decode_token`]) needs besides the layers' weights:
/// the norms' and biases' values as plain vectors. Present only for LLaMA-style models (RMSNorm,
/// SwiGLU, rotary positions) whose every projection is in kiln's own block formats (Q4_0, Q4_1,
/// Q8_0), on the CPU; anything else decodes through the tensor graph.
#[derive(Debug, Clone)]
struct DecodePlan {
    layers: Vec<LayerPlan>,
    norm: (Vec<f32>, f32),
}

#[derive(Debug, Clone)]
struct LayerPlan {
    attn_norm: (Vec<f32>, f32),
    mlp_norm: (Vec<f32>, f32),
    /// q, k, v, o, gate, up, down.
    bias: [Option<Vec<f32>>; 7],
}

impl DecodePlan {
    fn new(
        rope: bool,
        device: &Device,
        layers: &[Block],
        norm: &Norm,
        lm_head: &Linear,
    ) -> Result<Option<Self>> {
        if !rope || !device.is_cpu() || lm_head.blocks().is_none() {
            return Ok(None);
        }
        let Some(norm) = norm.rms_values()? else {
            return Ok(None);
        };
        let mut plans = Vec::with_capacity(layers.len());
        for b in layers {
            let Mlp::SwiGlu(mlp) = &b.mlp else {
                return Ok(None);
            };
            let linears = [&b.q, &b.k, &b.v, &b.o, &mlp.gate, &mlp.up, &mlp.down];
            if linears.iter().any(|l| l.blocks().is_none()) {
                return Ok(None);
            }
            let (Some(attn_norm), Some(mlp_norm)) =
                (b.attn_norm.rms_values()?, b.mlp_norm.rms_values()?)
            else {
                return Ok(None);
            };
            let mut bias: [Option<Vec<f32>>; 7] = Default::default();
            for (slot, l) in bias.iter_mut().zip(linears) {
                *slot = l.bias_values()?;
            }
            plans.push(LayerPlan {
                attn_norm,
                mlp_norm,
                bias,
            });
        }
        Ok(Some(Self {
            layers: plans,
            norm,
        }))
    }
}

/// Rows `rows` of the outputs of several matrices stacked one after another (q/k/v, gate/up)
/// for the same quantized input, plus their biases, into `out`.
fn stacked_rows(
    parts: &[(&QWeight, Option<&[f32]>)],
    x: &QInput,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let mut first = 0;
    for &(w, bias) in parts {
        let n = w.dims().0;
        let (lo, hi) = (rows.start.max(first), rows.end.min(first + n));
        if lo < hi {
            let o = &mut out[lo - rows.start..hi - rows.start];
            w.rows_into(x, lo - first..hi - first, o);
            if let Some(b) = bias {
                for (o, &b) in o.iter_mut().zip(&b[lo - first..hi - first]) {
                    *o += b;
                }
            }
        }
        first += n;
    }
}

/// Rows per chunk of a split product: small enough that a member slowed by another process
/// leaves its share to the others, large enough that taking a chunk costs nothing.
fn chunk_rows(rows: usize, members: usize) -> usize {
    (rows / (members * 8)).clamp(8, 256)
}

impl Llama {
    /// One new token `id` at position `cache.len()` of a single sequence: its next-token logits,
    /// computed without the tensor graph by a team of `rayon::current_num_threads()` threads
    /// ([`kiln_nn::team`]) that run every layer together: each member normalizes and quantizes
    /// its own copy of the (576-float) activations, the projections' rows and the attention heads
    /// are split among the members, and member 0 appends the keys and values to the cache. The
    /// graph's kernels do the arithmetic (the same block dot products, norm, rotation, attention
    /// and SwiGLU rows), so the logits equal [`Self::forward_graph`]'s bit for bit.
    ///
    /// Returns `Ok(None)` for models the step does not cover (see [`DecodePlan`]).
    pub fn decode_token(&self, id: u32, cache: &mut KvCache) -> Result<Option<Vec<f32>>> {
        let Some(plan) = &self.decode else {
            return Ok(None);
        };
        let cfg = &self.cfg;
        let pos = cache.len();
        let ids = Tensor::from_slice(&[id], (1, 1), &self.device).map_err(nn("token id"))?;
        self.check_ids(&ids, pos, 1)?;
        let x0 = self
            .embed
            .forward(&ids)?
            .flatten_all()
            .and_then(|x| x.to_vec1::<f32>())
            .map_err(nn("embedding row"))?;
        let (cos, sin) = self.rope.cos_sin_values(pos, 1);
        let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let (qdim, kvdim, ff) = (nh * hd, nkv * hd, cfg.intermediate_size);
        let members = rayon::current_num_threads();
        let qkv = SharedBuf::<f32>::new(qdim + 2 * kvdim);
        let att = SharedBuf::<f32>::new(qdim);
        let proj = SharedBuf::<f32>::new(cfg.hidden_size);
        let gu = SharedBuf::<f32>::new(2 * ff);
        let logits = SharedBuf::<f32>::new(cfg.vocab_size);
        let kv: Vec<OnceLock<(Tensor, Tensor)>> =
            (0..cfg.num_layers).map(|_| OnceLock::new()).collect();
        let cache = Mutex::new(cache);
        let failure: Mutex<Option<ModelError>> = Mutex::new(None);
        let failed = AtomicBool::new(false);
        let fail = |e: ModelError| {
            failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(e);
            failed.store(true, Ordering::Relaxed);
        };
        team::run(members, |m| {
            let mut x = x0.clone();
            let mut h = vec![0f32; cfg.hidden_size];
            let mut q = vec![0f32; qdim];
            let mut act = vec![0f32; ff];
            // `input` times the matrices of `parts` stacked (plus biases) into `out`, its rows
            // split among the members.
            let project =
                |parts: &[(&QWeight, Option<&[f32]>)], input: &[f32], out: &SharedBuf<f32>| {
                    let xq = quant(parts[0].0, input);
                    let rows = out.len();
                    m.split(out, rows, chunk_rows(rows, members), |r, o| {
                        stacked_rows(parts, &xq, r, o)
                    });
                };
            for (l, (layer, lp)) in self.layers.iter().zip(&plan.layers).enumerate() {
                let Mlp::SwiGlu(mlp) = &layer.mlp else {
                    unreachable!("the decode plan checked the MLP")
                };
                let bias = |i: usize| lp.bias[i].as_deref();
                // Attention: q, k and v rows split among the members.
                rows::rms_norm(&x, &lp.attn_norm.0, lp.attn_norm.1, &mut h);
                let qkv_parts = [
                    (blocks(&layer.q), bias(0)),
                    (blocks(&layer.k), bias(1)),
                    (blocks(&layer.v), bias(2)),
                ];
                project(&qkv_parts, &h, &qkv);
                // SAFETY (each `get` below): read after the barrier that ended the phase writing
                // the buffer, and before the next phase writing it begins (every phase between
                // ends in a barrier).
                let y = unsafe { qkv.get() };
                m.single(|| {
                    let mut k = vec![0f32; kvdim];
                    for (src, dst) in y[qdim..qdim + kvdim]
                        .chunks_exact(hd)
                        .zip(k.chunks_exact_mut(hd))
                    {
                        self.rope.rotate_head(src, &cos, &sin, dst);
                    }
                    let v = y[qdim + kvdim..].to_vec();
                    let appended = Tensor::from_vec(k, (1, nkv, 1, hd), &self.device)
                        .and_then(|k| Ok((k, Tensor::from_vec(v, (1, nkv, 1, hd), &self.device)?)))
                        .map_err(nn("new keys and values"))
                        .and_then(|(k, v)| {
                            let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
                            Ok(c.append(l, &k, &v)?)
                        });
                    match appended {
                        Ok(kv_l) => {
                            let _ = kv[l].set(kv_l);
                        }
                        Err(e) => fail(e),
                    }
                });
                if failed.load(Ordering::Relaxed) {
                    return;
                }
                let Some((kl, vl)) = kv[l].get() else {
                    return;
                };
                for (src, dst) in y[..qdim].chunks_exact(hd).zip(q.chunks_exact_mut(hd)) {
                    self.rope.rotate_head(src, &cos, &sin, dst);
                }
                m.split(&att, nh, 1, |heads, o| {
                    let done = kiln_nn::with_cached_kv(kl, vl, |view| {
                        for (hh, o) in heads.zip(o.chunks_exact_mut(hd)) {
                            view.attend_head(&q, nh, hh, layer.window, o);
                        }
                    });
                    match done {
                        Ok(Some(())) => {}
                        Ok(None) => fail(ModelError::Config(
                            "the KV cache is not a single contiguous sequence".into(),
                        )),
                        Err(e) => fail(e.into()),
                    }
                });
                if failed.load(Ordering::Relaxed) {
                    return;
                }
                project(&[(blocks(&layer.o), bias(3))], unsafe { att.get() }, &proj);
                add(&mut x, unsafe { proj.get() });
                // MLP: gate and up rows split, then down's.
                rows::rms_norm(&x, &lp.mlp_norm.0, lp.mlp_norm.1, &mut h);
                let gate_up = [(blocks(&mlp.gate), bias(4)), (blocks(&mlp.up), bias(5))];
                project(&gate_up, &h, &gu);
                let g = unsafe { gu.get() };
                rows::swiglu(&g[..ff], &g[ff..], &mut act);
                project(&[(blocks(&mlp.down), bias(6))], &act, &proj);
                add(&mut x, unsafe { proj.get() });
            }
            rows::rms_norm(&x, &plan.norm.0, plan.norm.1, &mut h);
            project(&[(blocks(&self.lm_head), None)], &h, &logits);
        });
        if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        cache
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .advance(1);
        Ok(Some(logits.into_vec()))
    }
}

/// `KILN_DECODE_STEP=graph` sends one-token steps through the tensor graph too (for A/B runs).
fn decode_step_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("KILN_DECODE_STEP").map_or(true, |v| v != "graph"))
}

/// A projection's block weight (the decode plan checked every projection has one).
fn blocks(l: &Linear) -> &QWeight {
    l.blocks()
        .expect("the decode plan checked every projection")
}

/// `x` quantized for `w` (whose row length the plan checked equals `x.len()`).
fn quant(w: &QWeight, x: &[f32]) -> QInput {
    w.quantize_input(x)
        .expect("the decode plan checked every projection's width")
}

/// The residual add, `x += y`.
fn add(x: &mut [f32], y: &[f32]) {
    for (x, &y) in x.iter_mut().zip(y) {
        *x += y;
    }
}

/// The Jinja chat template a model carries, if any: GGUF metadata `tokenizer.chat_template`, or
/// in a Hugging Face folder `chat_template.jinja` or `tokenizer_config.json`'s `chat_template`
/// (a string, or a list of `{name, template}` from which `default` or the first is taken).
pub fn chat_template(path: &Path) -> Result<Option<String>> {
    let dir = if path.is_dir() {
        Some(path)
    } else if path.file_name().is_some_and(|n| n == "config.json") {
        path.parent()
    } else {
        None
    };
    let Some(dir) = dir else {
        let w = Weights::open_gguf(path)?;
        let meta = w
            .gguf_metadata()
            .ok_or_else(|| ModelError::UnknownFormat(path.to_path_buf()))?;
        return Ok(meta
            .opt_string("tokenizer.chat_template")?
            .map(str::to_string));
    };
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).map_err(|source| ModelError::Io { path: p, source })
    };
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return read(jinja).map(Some);
    }
    let cfg = dir.join("tokenizer_config.json");
    if !cfg.is_file() {
        return Ok(None);
    }
    let v: serde_json::Value = serde_json::from_str(&read(cfg.clone())?)
        .map_err(|source| ModelError::Json { path: cfg, source })?;
    Ok(match v.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(list)) => {
            let named = |want: Option<&str>| {
                list.iter().find_map(|t| {
                    let name = t.get("name").and_then(|n| n.as_str());
                    let tmpl = t.get("template").and_then(|n| n.as_str())?;
                    (want.is_none() || name == want).then(|| tmpl.to_string())
                })
            };
            named(Some("default")).or_else(|| named(None))
        }
        _ => None,
    })
}

fn has_gguf_magic(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

/// The safetensors files of a Hugging Face folder, sharded (via the index) or not.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if let Some(files) = crate::indexed_shards(dir)? {
        return Ok(files);
    }
    let rd = std::fs::read_dir(dir).map_err(|source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::UnknownFormat(dir.to_path_buf()));
    }
    Ok(files)
}
