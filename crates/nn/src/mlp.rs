//! Feed-forward blocks: SwiGLU (Shazeer 2020), `down(silu(gate(x)) * up(x))` (LLaMA), and the
//! GELU MLP of GPT-2, `down(gelu_tanh(up(x)))`.

use crate::{Linear, Result};
use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct SwiGlu {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl SwiGlu {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = Linear::forward_many(&[&self.gate, &self.up], x)?;
        let h = crate::fused::swiglu(&gu[0], &gu[1])?;
        self.down.forward(&h)
    }
}

/// GPT-2's MLP (`c_fc`, GELU with the tanh approximation, `c_proj`).
#[derive(Debug, Clone)]
pub struct GeluMlp {
    pub up: Linear,
    pub down: Linear,
}

impl GeluMlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = crate::fused::gelu_tanh(&self.up.forward(x)?)?;
        self.down.forward(&h)
    }
}

/// The feed-forward block a model family uses.
#[derive(Debug, Clone)]
pub enum Mlp {
    SwiGlu(SwiGlu),
    Gelu(GeluMlp),
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Mlp::SwiGlu(m) => m.forward(x),
            Mlp::Gelu(m) => m.forward(x),
        }
    }
}
