//! Normalisation layers: RMSNorm (Zhang & Sennrich 2019), `x / sqrt(mean(x^2) + eps) * weight`,
//! and LayerNorm (Ba et al. 2016), `(x - mean) / sqrt(var + eps) * weight + bias`.
//!
//! Both run on kiln's fused kernels ([`crate::fused`]), which have a backward pass, so the same
//! layer serves inference and training.

use crate::{OpContext, Result};
use candle_core::{DType, Tensor};

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: weight.to_dtype(DType::F32).op("rmsnorm to f32")?,
            eps: eps as f32,
        })
    }

    /// `x` is (..., hidden).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::fused::rms_norm(x, &self.weight, self.eps)
    }
}

#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: weight.to_dtype(DType::F32).op("layernorm to f32")?,
            bias: bias.to_dtype(DType::F32).op("layernorm bias to f32")?,
            eps: eps as f32,
        })
    }

    /// `x` is (..., hidden).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::fused::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// The norm a model family uses: RMSNorm (LLaMA) or LayerNorm with bias (GPT-2).
#[derive(Debug, Clone)]
pub enum Norm {
    Rms(RmsNorm),
    Layer(LayerNorm),
}

impl Norm {
    /// RMSNorm's weight values and epsilon (`None` for LayerNorm), for callers that normalize
    /// rows themselves with [`crate::fused::rms_norm_row`].
    pub fn rms_values(&self) -> Result<Option<(Vec<f32>, f32)>> {
        match self {
            Norm::Rms(n) => Ok(Some((
                n.weight.to_vec1::<f32>().op("rmsnorm weight values")?,
                n.eps,
            ))),
            Norm::Layer(_) => Ok(None),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Rms(n) => n.forward(x),
            Norm::Layer(n) => n.forward(x),
        }
    }
}
