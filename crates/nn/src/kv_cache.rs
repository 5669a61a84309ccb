//! The key/value cache: per layer, keys and values of every position seen so far, (B, H_kv, S, D).
//!
//! Buffers grow by doubling and new positions are written in place (`slice_set`), so a decode step
//! copies only its own keys and values instead of the whole history (as `Tensor::cat` would).

use crate::{OpContext, Result};
use candle_core::Tensor;

#[derive(Debug, Clone)]
struct LayerCache {
    k: Tensor, // (B, H_kv, capacity, D)
    v: Tensor,
}

#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
        }
    }

    /// Positions cached so far (the same for every layer once a forward pass finished).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets positions from `len` on (for example to rewind a chat turn).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        if self.len == 0 {
            self.layers.iter_mut().for_each(|l| *l = None);
        }
    }

    /// Appends `k`, `v` (B, H_kv, T, D) to `layer` at position `self.len()` and returns the keys
    /// and values of all positions, (B, H_kv, len + T, D). Call [`Self::advance`] once per forward
    /// pass after the last layer.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, t, d) = k.dims4().op("kv cache dims")?;
        let start = self.len;
        let needed = start + t;
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| crate::NnError::Shape {
                op: "kv cache layer",
                expected: "a layer index below the cache's layer count".into(),
                got: layer.to_string(),
            })?;
        let grow = match slot {
            Some(c) => c.k.dim(2).op("kv capacity")? < needed,
            None => true,
        };
        if grow {
            let cap = needed.next_power_of_two().max(16);
            let nk = Tensor::zeros((b, h, cap, d), k.dtype(), k.device()).op("kv alloc")?;
            let nv = Tensor::zeros((b, h, cap, d), v.dtype(), v.device()).op("kv alloc")?;
            if let (Some(old), true) = (slot.as_ref(), start > 0) {
                nk.slice_set(
                    &old.k
                        .narrow(2, 0, start)
                        .op("kv narrow")?
                        .contiguous()
                        .op("kv copy")?,
                    2,
                    0,
                )
                .op("kv copy")?;
                nv.slice_set(
                    &old.v
                        .narrow(2, 0, start)
                        .op("kv narrow")?
                        .contiguous()
                        .op("kv copy")?,
                    2,
                    0,
                )
                .op("kv copy")?;
            }
            *slot = Some(LayerCache { k: nk, v: nv });
        }
        let c = slot.as_ref().ok_or_else(|| crate::NnError::Shape {
            op: "kv cache",
            expected: "an allocated layer".into(),
            got: "none".into(),
        })?;
        c.k.slice_set(&k.contiguous().op("kv k")?, 2, start)
            .op("kv write k")?;
        c.v.slice_set(&v.contiguous().op("kv v")?, 2, start)
            .op("kv write v")?;
        Ok((
            c.k.narrow(2, 0, needed).op("kv view")?,
            c.v.narrow(2, 0, needed).op("kv view")?,
        ))
    }

    /// Marks `t` more positions as cached (after every layer appended them).
    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
