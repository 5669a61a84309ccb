//! Rotary position embeddings (Su et al. 2021, "RoFormer") with the frequency-scaling variants of
//! Hugging Face transformers' `modeling_rope_utils.py`: linear (position interpolation), dynamic
//! NTK, YaRN and Llama 3; plus llama.cpp's per-frequency divisors (`rope_freqs.weight`).
//!
//! Two layouts rotate the same pairs of numbers stored in different places: Hugging Face
//! checkpoints pair dimension `i` with `i + D/2` ("half split", `rotate_half`); GGUF llama files
//! store Q/K rows permuted back to Meta's original layout, which pairs `2i` with `2i+1`
//! ("interleaved"). Because the same permutation is applied to Q and K, `q . k` is identical.

// `!(x > y)` is deliberate: it also rejects NaN (and mirrors torch's `~(a < b)` in rope).
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use crate::{NnError, OpContext, Result};
use candle_core::{Device, Tensor};

/// Frequency scaling, as in `config.json`'s `rope_scaling`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Dynamic NTK: the base grows once the sequence passes `max_position_embeddings`.
    DynamicNtk {
        factor: f64,
        max_position_embeddings: usize,
    },
    /// YaRN (Peng et al. 2023): interpolation blended with extrapolation per frequency band, and
    /// cos/sin scaled by an attention factor.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        attention_factor: Option<f64>,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: bool,
    },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// llama.cpp stores Llama 3's scaling as a tensor of per-frequency divisors.
    FreqFactors(Vec<f32>),
}

/// Which dimensions are rotated together (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs `(i, i + D/2)`: Hugging Face checkpoints.
    HalfSplit,
    /// Pairs `(2i, 2i + 1)`: GGUF llama files.
    Interleaved,
}

#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    head_dim: usize,
    base: f64,
    inv_freq: Vec<f32>,
    attention_scaling: f32,
    scaling: RopeScaling,
    layout: RopeLayout,
}

fn default_inv_freq(base: f64, dim: usize) -> Vec<f32> {
    // transformers: 1 / base ** (arange(0, dim, 2).float() / dim), in float32.
    (0..dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / dim as f32;
            1.0 / (base as f32).powf(e)
        })
        .collect()
}

impl RotaryEmbedding {
    pub fn new(
        head_dim: usize,
        base: f64,
        scaling: RopeScaling,
        layout: RopeLayout,
    ) -> Result<Self> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(NnError::Config {
                what: "rope",
                reason: format!("head_dim {head_dim} must be even"),
            });
        }
        if !(base > 1.0) {
            return Err(NnError::Config {
                what: "rope",
                reason: format!("rope_theta {base} must be > 1"),
            });
        }
        let dim = head_dim;
        let mut attention_scaling = 1.0f32;
        let inv_freq = match &scaling {
            RopeScaling::None | RopeScaling::DynamicNtk { .. } => default_inv_freq(base, dim),
            RopeScaling::Linear { factor } => {
                check_factor(*factor)?;
                default_inv_freq(base, dim)
                    .iter()
                    .map(|f| f / *factor as f32)
                    .collect()
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                check_factor(*factor)?;
                if !(high_freq_factor > low_freq_factor) {
                    return Err(NnError::Config {
                        what: "llama3 rope scaling",
                        reason: format!("high_freq_factor {high_freq_factor} must exceed low_freq_factor {low_freq_factor}"),
                    });
                }
                let (factor, lo, hi) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                );
                let old = *original_max_position_embeddings as f32;
                let low_freq_wavelen = old / lo;
                let high_freq_wavelen = old / hi;
                default_inv_freq(base, dim)
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            f
                        };
                        let medium =
                            !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
                        if medium {
                            let smooth = (old / wavelen - lo) / (hi - lo);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                check_factor(*factor)?;
                let get_mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                attention_scaling = match (attention_factor, mscale, mscale_all_dim) {
                    (Some(a), _, _) => *a,
                    (None, Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => {
                        get_mscale(*factor, *m) / get_mscale(*factor, *ma)
                    }
                    _ => get_mscale(*factor, 1.0),
                } as f32;
                let correction_dim = |rot: f64| {
                    (dim as f64
                        * (*original_max_position_embeddings as f64
                            / (rot * 2.0 * std::f64::consts::PI))
                            .ln())
                        / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0) as f32;
                let mut high = high.min(dim as f64 - 1.0) as f32;
                if low == high {
                    high += 0.001;
                }
                (0..dim / 2)
                    .map(|i| {
                        let pos_freq = (base as f32).powf((2 * i) as f32 / dim as f32);
                        let extrapolation = 1.0 / pos_freq;
                        let interpolation = 1.0 / (*factor as f32 * pos_freq);
                        let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation_factor = 1.0 - ramp;
                        interpolation * (1.0 - extrapolation_factor)
                            + extrapolation * extrapolation_factor
                    })
                    .collect()
            }
            RopeScaling::FreqFactors(f) => {
                if f.len() != dim / 2 {
                    return Err(NnError::Config {
                        what: "rope freq factors",
                        reason: format!(
                            "{} factors for head_dim {dim} (need {})",
                            f.len(),
                            dim / 2
                        ),
                    });
                }
                default_inv_freq(base, dim)
                    .iter()
                    .zip(f)
                    .map(|(a, b)| a / b)
                    .collect()
            }
        };
        Ok(Self {
            head_dim,
            base,
            inv_freq,
            attention_scaling,
            scaling,
            layout,
        })
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    pub fn attention_scaling(&self) -> f32 {
        self.attention_scaling
    }

    pub fn layout(&self) -> RopeLayout {
        self.layout
    }

    /// cos and sin tables for positions `start..start + len`, each (len, head_dim / 2).
    pub fn cos_sin(&self, start: usize, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.head_dim / 2;
        let (cos, sin) = self.cos_sin_values(start, len);
        let cos = Tensor::from_vec(cos, (len, half), device).op("rope cos")?;
        let sin = Tensor::from_vec(sin, (len, half), device).op("rope sin")?;
        Ok((cos, sin))
    }

    /// The values of [`Self::cos_sin`]: `len` rows of `head_dim / 2`.
    pub fn cos_sin_values(&self, start: usize, len: usize) -> (Vec<f32>, Vec<f32>) {
        let dynamic;
        let inv_freq: &[f32] = match self.scaling {
            RopeScaling::DynamicNtk {
                factor,
                max_position_embeddings,
            } if start + len > max_position_embeddings => {
                // transformers recomputes the base from the current length (max position + 1).
                let seq_len = (start + len) as f64;
                let mpe = max_position_embeddings as f64;
                let d = self.head_dim as f64;
                let base =
                    self.base * ((factor * seq_len / mpe) - (factor - 1.0)).powf(d / (d - 2.0));
                dynamic = default_inv_freq(base, self.head_dim);
                &dynamic
            }
            _ => &self.inv_freq,
        };
        let half = self.head_dim / 2;
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in start..start + len {
            for &f in inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos() * self.attention_scaling);
                sin.push(a.sin() * self.attention_scaling);
            }
        }
        (cos, sin)
    }

    /// One head `x` at one position rotated into `y`, with that position's row of
    /// [`Self::cos_sin_values`]: the arithmetic of [`Self::apply`] for either layout, so the same
    /// bits (for callers that run their own threads over heads).
    ///
    /// # Panics
    /// If `x` or `y` is not `head_dim` long or the tables not `head_dim / 2`.
    pub fn rotate_head(&self, x: &[f32], cos: &[f32], sin: &[f32], y: &mut [f32]) {
        match self.layout {
            RopeLayout::HalfSplit => crate::fused::rows::rope_half_split(x, cos, sin, y),
            RopeLayout::Interleaved => {
                // candle-nn's `rope_i` CPU kernel, element for element (no FMA there either).
                assert!(
                    x.len() == 2 * cos.len() && sin.len() == cos.len() && y.len() == x.len(),
                    "rotate_head lengths"
                );
                for (i, (&c, &s)) in cos.iter().zip(sin).enumerate() {
                    let (a, b) = (x[2 * i], x[2 * i + 1]);
                    y[2 * i] = a * c - b * s;
                    y[2 * i + 1] = a * s + b * c;
                }
            }
        }
    }

    /// Rotates `x` (B, H, T, D) with tables from [`Self::cos_sin`] covering its T positions.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x = x.contiguous().op("rope contiguous")?;
        match self.layout {
            // kiln's fused rope has a backward pass (candle's has none), so training uses it too.
            RopeLayout::HalfSplit => crate::fused::rope(&x, cos, sin),
            RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i(&x, cos, sin).op("rope_i"),
        }
    }
}

fn check_factor(factor: f64) -> Result<()> {
    if !(factor >= 1.0) || !factor.is_finite() {
        return Err(NnError::Config {
            what: "rope scaling",
            reason: format!("factor {factor} must be >= 1"),
        });
    }
    Ok(())
}
