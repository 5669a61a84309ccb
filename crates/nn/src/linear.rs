//! `Linear` and `Embedding`: dense or quantized weights behind one type.

use crate::qkernels::{QFormat, QWeight};
use crate::{OpContext, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Shape, Tensor, D};
use std::sync::Arc;

/// `y = x W^T + b` with `W` of shape (out, in). The weight is either dense (f32) or quantized:
/// Q4_0, Q4_1 and Q8_0 GGUF blocks on the CPU go through kiln's own SIMD kernels
/// ([`crate::qkernels`]); other block types (the K-quants) through candle's quantized kernels.
/// Both quantize the activations to 8 bits on the fly, as llama.cpp does.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    out_features: usize,
    in_features: usize,
}

#[derive(Debug, Clone)]
enum Weight {
    Dense(Tensor),
    Quantized(QMatMul),
    /// Q4_0 / Q4_1 / Q8_0 blocks multiplied by [`QWeight`]'s runtime-dispatched kernels. candle
    /// 0.11.1 has no SIMD path for Q4_1 and uses its Q8_0 one only when built with target
    /// features, so this is where decode time goes.
    Blocks(Arc<QWeight>),
}

/// `x (..., k) -> x W^T (..., n)` on a contiguous f32 CPU tensor, as a candle op so the result is
/// an ordinary tensor without copying the input.
struct BlockMatMul(Arc<QWeight>);

impl CustomOp1 for BlockMatMul {
    fn name(&self) -> &'static str {
        "kiln-block-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("kiln-block-matmul needs f32 input");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("kiln-block-matmul needs a contiguous input");
        };
        let (n, k) = self.0.dims();
        let mut dims = layout.shape().dims().to_vec();
        match dims.last_mut() {
            Some(last) if *last == k => *last = n,
            _ => candle_core::bail!(
                "kiln-block-matmul: input {:?} does not end in {k}",
                layout.shape()
            ),
        }
        let y = self
            .0
            .matmul(&data[start..end])
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }
}

impl Linear {
    /// A dense layer; `weight` is (out, in) and is converted to f32.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2().op("linear weight dims")?;
        let weight = weight.to_dtype(DType::F32).op("linear to f32")?;
        let bias = bias
            .map(|b| b.to_dtype(DType::F32))
            .transpose()
            .op("bias to f32")?;
        Ok(Self {
            weight: Weight::Dense(weight),
            bias,
            out_features,
            in_features,
        })
    }

    /// A layer over a GGUF tensor: block-quantized types stay quantized; F32/F16/BF16 become
    /// dense f32.
    pub fn from_qtensor(weight: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.shape().dims2().op("linear weight dims")?;
        let bias = bias
            .map(|b| b.to_dtype(DType::F32))
            .transpose()
            .op("bias to f32")?;
        let weight = match weight.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                Weight::Dense(weight.dequantize(&weight.device()).op("dequantize")?)
            }
            GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0 if weight.device().is_cpu() => {
                let format = match weight.dtype() {
                    GgmlDType::Q4_0 => QFormat::Q4_0,
                    GgmlDType::Q4_1 => QFormat::Q4_1,
                    _ => QFormat::Q8_0,
                };
                let bytes = weight.data().op("quantized weight bytes")?;
                let q = QWeight::from_gguf_bytes(format, out_features, in_features, &bytes)
                    .map_err(|e| crate::NnError::Config {
                        what: "quantized weight",
                        reason: e.to_string(),
                    })?;
                Weight::Blocks(Arc::new(q))
            }
            _ => Weight::Quantized(QMatMul::QTensor(weight)),
        };
        Ok(Self {
            weight,
            bias,
            out_features,
            in_features,
        })
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Whether the weight is kept in a block-quantized format.
    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, Weight::Quantized(_) | Weight::Blocks(_))
    }

    /// The weight when it is kept in kiln's own block format (Q4_0 / Q4_1 / Q8_0 on the CPU):
    /// what a caller that splits the rows among its own threads multiplies by.
    pub fn blocks(&self) -> Option<&QWeight> {
        match &self.weight {
            Weight::Blocks(q) => Some(q),
            _ => None,
        }
    }

    /// This layer with its weight quantized in memory to a GGUF block type (`Q8_0`, `Q4_1`, ...;
    /// the input size must be a multiple of the type's block). An already quantized layer is
    /// returned as it is.
    pub fn quantize(&self, dtype: GgmlDType) -> Result<Linear> {
        let Weight::Dense(w) = &self.weight else {
            return Ok(self.clone());
        };
        if !self.in_features.is_multiple_of(dtype.block_size()) {
            return Err(crate::NnError::Config {
                what: "quantize",
                reason: format!(
                    "{dtype:?} needs rows of whole {}-element blocks, the layer's are {}",
                    dtype.block_size(),
                    self.in_features
                ),
            });
        }
        let q = QTensor::quantize(w, dtype).op("quantize")?;
        Linear::from_qtensor(Arc::new(q), self.bias.clone())
    }

    /// The bias as f32 values, if the layer has one.
    pub fn bias_values(&self) -> Result<Option<Vec<f32>>> {
        self.bias
            .as_ref()
            .map(|b| b.flatten_all().and_then(|b| b.to_vec1::<f32>()))
            .transpose()
            .op("linear bias values")
    }

    /// The weight as a dense f32 tensor (dequantized if needed): the reference path for tests.
    pub fn dequantized_weight(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Quantized(QMatMul::QTensor(q)) => q.dequantize(&q.device()).op("dequantize"),
            Weight::Quantized(QMatMul::Tensor(w)) => Ok(w.clone()),
            Weight::Quantized(QMatMul::TensorF16(w)) => w.to_dtype(DType::F32).op("to f32"),
            Weight::Blocks(q) => {
                Tensor::from_vec(q.dequantize(), q.dims(), &candle_core::Device::Cpu)
                    .op("dequantize blocks")
            }
        }
    }

    /// `x` is (..., in); returns (..., out).
    /// `[l.forward(x) for l in parts]`, computed together when `x` is one token and every part
    /// is a block-quantized weight (see [`QWeight::matmul_row_many`]): one parallel region for
    /// q/k/v or gate/up at decode instead of three or two. The same values either way.
    pub fn forward_many(parts: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let blocks: Option<Vec<&QWeight>> = parts
            .iter()
            .map(|l| match &l.weight {
                Weight::Blocks(q) => Some(q.as_ref()),
                _ => None,
            })
            .collect();
        let one_row = x.elem_count() == x.dims().last().copied().unwrap_or(0);
        if let (Some(ws), true, DType::F32) = (blocks, one_row, x.dtype()) {
            let xv = x
                .flatten_all()
                .and_then(|x| x.to_vec1::<f32>())
                .op("linear input")?;
            if let Some(ys) = QWeight::matmul_row_many(&ws, &xv) {
                let mut dims = x.dims().to_vec();
                return parts
                    .iter()
                    .zip(ys)
                    .map(|(l, y)| {
                        if let Some(d) = dims.last_mut() {
                            *d = l.out_features;
                        }
                        let y =
                            Tensor::from_vec(y, dims.as_slice(), x.device()).op("linear output")?;
                        match &l.bias {
                            Some(b) => y.broadcast_add(b).op("linear bias"),
                            None => Ok(y),
                        }
                    })
                    .collect();
            }
        }
        parts.iter().map(|l| l.forward(x)).collect()
    }

    /// Mean cross-entropy (`fused::cross_entropy`) of `targets` (N,) u32 over this layer's
    /// outputs for `x` (N, in). A dense layer without bias (an output head) runs as the one
    /// node [`crate::fused::linear_cross_entropy`], which computes its gradients in the forward
    /// pass: for losses that are differentiated.
    pub fn cross_entropy(&self, x: &Tensor, targets: &Tensor, ignore_index: u32) -> Result<Tensor> {
        match (&self.weight, &self.bias) {
            (Weight::Dense(w), None) => {
                crate::fused::linear_cross_entropy(x, w, targets, ignore_index)
            }
            _ => crate::fused::cross_entropy(&self.forward(x)?, targets, ignore_index),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            // One fused node with its backward (kiln's GEMM call), bias included.
            Weight::Dense(w) => return crate::fused::linear(x, w, self.bias.as_ref()),
            Weight::Quantized(q) => {
                let x = x.contiguous().op("qmatmul contiguous")?;
                q.forward(&x).op("qmatmul")?
            }
            Weight::Blocks(q) => x
                .to_dtype(DType::F32)
                .and_then(|x| x.contiguous())
                .and_then(|x| x.apply_op1_no_bwd(&BlockMatMul(q.clone())))
                .op("block matmul")?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b).op("linear bias"),
            None => Ok(y),
        }
    }
}

/// Token embeddings (vocab, hidden), dense or quantized.
#[derive(Debug, Clone)]
pub enum Embedding {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

impl Embedding {
    /// Block-quantized GGUF embeddings stay quantized (rows are dequantized on lookup).
    pub fn from_qtensor(t: Arc<QTensor>) -> Result<Self> {
        Ok(match t.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                Embedding::Dense(t.dequantize(&t.device()).op("dequantize")?)
            }
            _ => Embedding::Quantized(t),
        })
    }

    pub fn dense(t: Tensor) -> Result<Self> {
        Ok(Embedding::Dense(
            t.to_dtype(DType::F32).op("embedding to f32")?,
        ))
    }

    /// (vocab, hidden).
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Embedding::Dense(t) => t.dims2().op("embedding dims"),
            Embedding::Quantized(q) => q.shape().dims2().op("embedding dims"),
        }
    }

    /// `ids` (B, T) u32 -> (B, T, hidden). Ids must be below the vocabulary size.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Embedding::Dense(w) => {
                let mut dims = ids.dims().to_vec();
                dims.push(w.dim(D::Minus1).op("embedding dim")?);
                let flat = ids.flatten_all().op("embedding flatten")?;
                w.index_select(&flat, 0)
                    .op("embedding lookup")?
                    .reshape(dims)
                    .op("embedding reshape")
            }
            Embedding::Quantized(q) => q.embedding(ids).op("quantized embedding lookup"),
        }
    }

    /// The same weights as an output projection (tied embeddings).
    pub fn as_linear(&self) -> Result<Linear> {
        match self {
            Embedding::Dense(w) => Linear::dense(w.clone(), None),
            Embedding::Quantized(q) => Linear::from_qtensor(q.clone(), None),
        }
    }
}
