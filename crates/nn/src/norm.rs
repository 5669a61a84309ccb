//! RMSNorm (Zhang & Sennrich 2019): `x / sqrt(mean(x^2) + eps) * weight`.

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
        let x = x.contiguous().op("rmsnorm contiguous")?;
        candle_nn::ops::rms_norm(&x, &self.weight, self.eps).op("rms_norm")
    }
}
