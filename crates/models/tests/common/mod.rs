//! Shared by the model tests: a tiny random-weight decoder of any style.

use kiln_models::{Config, Llama};
use kiln_nn::candle_core::{Device, Tensor};
use kiln_nn::RopeScaling;

/// A 2-layer decoder (hidden 32, 4 query heads and 2 kv heads of 8, MLP 64, vocab 97, context
/// 64) with weights from a fixed LCG: every row length is a multiple of 32, so it can also be
/// quantized to GGUF block types.
pub fn tiny(style: kiln_models::llama::Style, window: Option<usize>, bias: bool) -> Llama {
    let cfg = Config {
        vocab_size: 97,
        hidden_size: 32,
        intermediate_size: 64,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: 64,
        tie_word_embeddings: false,
        qkv_bias: bias,
        o_bias: false,
        mlp_bias: false,
        sliding_window: window,
        sliding_window_from_layer: 0,
        style,
    };
    let mut state = 7u64;
    let make: kiln_nn::MakeTensor = Box::new(move |name: &str, shape: &[usize]| {
        let n: usize = shape.iter().product();
        let norm = name.contains("norm") && !name.ends_with("bias");
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let r = ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5;
                if norm {
                    1.0 + 0.2 * r
                } else {
                    0.4 * r
                }
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .map_err(|source| kiln_nn::NnError::Candle { op: "init", source })
    });
    Llama::init(cfg, make).unwrap()
}
