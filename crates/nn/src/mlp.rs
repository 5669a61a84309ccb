//! The SwiGLU feed-forward block (Shazeer 2020): `down(silu(gate(x)) * up(x))`.

use crate::{Linear, OpContext, Result};
use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct SwiGlu {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl SwiGlu {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = candle_nn::ops::silu(&self.gate.forward(x)?).op("silu")?;
        let h = (g * self.up.forward(x)?).op("swiglu mul")?;
        self.down.forward(&h)
    }
}
