//! The paged key/value store for continuous batching (Kwon et al. 2023, "PagedAttention").
//!
//! Memory is one pool of fixed-size blocks per layer, each holding `block_size` positions of
//! every kv head. A sequence owns a list of block ids (its block table); position `p` of the
//! sequence lives in block `table[p / block_size]` at offset `p % block_size`. Nothing is
//! reserved for a request's maximum length: a sequence takes a block only when its positions
//! reach it, and blocks of shared prefixes can be referenced by several sequences at once.
//! Which block belongs to whom is the scheduler's business (`kiln_engine`); this module only
//! stores keys and values and attends over block tables.
//!
//! Layout per layer: `[block][kv_head][offset][head_dim]`, so one head's keys within a block are
//! contiguous and a query's dot products stream through memory.
//!
//! The attention here is hand-written rather than candle's matmul + mask + softmax: gathering
//! each sequence's blocks into a contiguous tensor for candle would copy the whole history of
//! every sequence at every layer and step, while this kernel reads the blocks in place.

use crate::{NnError, Result};

/// One sequence's part of a ragged batch step.
#[derive(Debug, Clone, Copy)]
pub struct PagedSeq<'a> {
    /// The sequence's block table; it must cover positions `0..start + len`.
    pub blocks: &'a [u32],
    /// Positions already cached before this step.
    pub start: usize,
    /// New tokens of this sequence in this step (rows `offset..offset + len` of the batch).
    pub len: usize,
    /// Row of this sequence's first new token in the flattened batch.
    pub offset: usize,
}

#[derive(Debug)]
pub struct PagedKvCache {
    block_size: usize,
    num_blocks: usize,
    kv_heads: usize,
    head_dim: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl PagedKvCache {
    /// A pool of `num_blocks` blocks of `block_size` positions for each of `num_layers` layers.
    pub fn new(
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<Self> {
        if num_layers == 0 || kv_heads == 0 || head_dim == 0 || block_size == 0 || num_blocks == 0 {
            return Err(NnError::Config {
                what: "paged kv cache",
                reason: format!(
                    "every size must be positive (layers {num_layers}, kv heads {kv_heads}, head dim {head_dim}, block size {block_size}, blocks {num_blocks})"
                ),
            });
        }
        let per_layer = num_blocks
            .checked_mul(kv_heads * block_size * head_dim)
            .ok_or_else(|| NnError::Config {
                what: "paged kv cache",
                reason: format!("{num_blocks} blocks overflow the address space"),
            })?;
        Ok(Self {
            block_size,
            num_blocks,
            kv_heads,
            head_dim,
            k: (0..num_layers).map(|_| vec![0.0; per_layer]).collect(),
            v: (0..num_layers).map(|_| vec![0.0; per_layer]).collect(),
        })
    }

    /// Bytes of keys and values one position takes over all layers.
    pub fn bytes_per_position(num_layers: usize, kv_heads: usize, head_dim: usize) -> usize {
        2 * num_layers * kv_heads * head_dim * std::mem::size_of::<f32>()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn num_layers(&self) -> usize {
        self.k.len()
    }

    fn index(&self, block: u32, head: usize, offset: usize) -> usize {
        ((block as usize * self.kv_heads + head) * self.block_size + offset) * self.head_dim
    }

    fn check(&self, layer: usize, seqs: &[PagedSeq], rows: usize) -> Result<()> {
        let bad = |got: String| NnError::Shape {
            op: "paged kv",
            expected:
                "a layer of the pool, block tables covering every position, rows in the batch"
                    .into(),
            got,
        };
        if layer >= self.k.len() {
            return Err(bad(format!("layer {layer} of {}", self.k.len())));
        }
        for s in seqs {
            let needed = (s.start + s.len).div_ceil(self.block_size);
            if s.blocks.len() < needed {
                return Err(bad(format!(
                    "{} blocks for {} positions",
                    s.blocks.len(),
                    s.start + s.len
                )));
            }
            if let Some(b) = s.blocks[..needed]
                .iter()
                .find(|&&b| b as usize >= self.num_blocks)
            {
                return Err(bad(format!("block {b} of {}", self.num_blocks)));
            }
            if s.offset + s.len > rows {
                return Err(bad(format!(
                    "rows {}..{} of {rows}",
                    s.offset,
                    s.offset + s.len
                )));
            }
        }
        Ok(())
    }

    /// Stores the new keys and values of one layer. `k`, `v` are head-major, `[kv_head][row][d]`
    /// over the `rows` tokens of the step; row `offset + i` of `seq` goes to position `start + i`.
    pub fn write(
        &mut self,
        layer: usize,
        k: &[f32],
        v: &[f32],
        rows: usize,
        seqs: &[PagedSeq],
    ) -> Result<()> {
        self.check(layer, seqs, rows)?;
        let d = self.head_dim;
        if k.len() != self.kv_heads * rows * d || v.len() != k.len() {
            return Err(NnError::Shape {
                op: "paged kv write",
                expected: format!(
                    "{} values ({} heads x {rows} rows x {d})",
                    self.kv_heads * rows * d,
                    self.kv_heads
                ),
                got: format!("{} keys, {} values", k.len(), v.len()),
            });
        }
        for s in seqs {
            for i in 0..s.len {
                let pos = s.start + i;
                let block = s.blocks[pos / self.block_size];
                let row = s.offset + i;
                for h in 0..self.kv_heads {
                    let dst = self.index(block, h, pos % self.block_size);
                    let src = (h * rows + row) * d;
                    self.k[layer][dst..dst + d].copy_from_slice(&k[src..src + d]);
                    self.v[layer][dst..dst + d].copy_from_slice(&v[src..src + d]);
                }
            }
        }
        Ok(())
    }

    /// Causal attention of each sequence's new queries over its cached positions (including the
    /// ones just written). `q` is head-major, `[q_head][row][d]`; query head `h` reads kv head
    /// `h / (q_heads / kv_heads)`. A query at position `p` sees keys `0..=p`, or with a sliding
    /// `window` keys `p + 1 - window ..= p`. Returns `[q_head][row][d]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &self,
        layer: usize,
        q: &[f32],
        q_heads: usize,
        rows: usize,
        seqs: &[PagedSeq],
        window: Option<usize>,
        scale: f32,
    ) -> Result<Vec<f32>> {
        self.check(layer, seqs, rows)?;
        let d = self.head_dim;
        if q_heads == 0 || !q_heads.is_multiple_of(self.kv_heads) || q.len() != q_heads * rows * d {
            return Err(NnError::Shape {
                op: "paged attention",
                expected: format!(
                    "a multiple of {} query heads and heads x {rows} rows x {d} values",
                    self.kv_heads
                ),
                got: format!("{q_heads} heads, {} values", q.len()),
            });
        }
        Ok(attend_blocks(&Job {
            k: &self.k[layer],
            v: &self.v[layer],
            geometry: Geometry {
                kv_heads: self.kv_heads,
                head_dim: d,
                block_size: self.block_size,
            },
            q,
            q_heads,
            rows,
            seqs,
            window,
            scale,
        }))
    }
}

/// Where keys live in a key (or value) buffer: `[block][kv_head][offset][head_dim]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

/// One attention call: keys and values of one layer laid out by `geometry`, the queries
/// (`[q_head][row][d]` over `rows` rows) and the sequences they belong to.
pub(crate) struct Job<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub geometry: Geometry,
    pub q: &'a [f32],
    pub q_heads: usize,
    pub rows: usize,
    pub seqs: &'a [PagedSeq<'a>],
    pub window: Option<usize>,
    pub scale: f32,
}

/// The attention kernel shared by the paged pool and the contiguous [`crate::KvCache`] (which is
/// one block per sequence, of its capacity): the same arithmetic in the same order, so a sequence
/// gets bit-identical results from both. Arguments as in [`PagedKvCache::attend`] (checked by the
/// callers). Returns `[q_head][row][d]`.
pub(crate) fn attend_blocks(job: &Job) -> Vec<f32> {
    let d = job.geometry.head_dim;
    let mut out = vec![0f32; job.q.len()];
    let work: usize = job
        .seqs
        .iter()
        .map(|s| s.len * (s.start + s.len))
        .sum::<usize>()
        * job.q_heads
        * d;
    let chunk = job.rows * d;
    if work < 1 << 16 || rayon::current_num_threads() == 1 {
        for (h, o) in out.chunks_mut(chunk).enumerate() {
            head_task(job, h, o);
        }
    } else {
        use rayon::prelude::*;
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(h, o)| head_task(job, h, o));
    }
    out
}

crate::fused::simd::multiversion!(
    /// Query head `h` of every sequence, into `out` (`[row][d]` of that head), compiled for the
    /// best instruction set the CPU has (8-wide FMA and a vectorised `exp` on AVX2).
    pub(crate) fn head_task = head_generic(job: &Job, h: usize, out: &mut [f32]);
);

#[inline(always)]
fn head_generic<I: crate::fused::simd::Isa>(job: &Job, h: usize, out: &mut [f32]) {
    use crate::fused::simd;
    let Job {
        k: kl,
        v: vl,
        geometry: g,
        q,
        q_heads,
        rows,
        seqs,
        window,
        scale,
    } = *job;
    let d = g.head_dim;
    let kvh = h / (q_heads / g.kv_heads);
    let index = |block: u32, offset: usize| {
        ((block as usize * g.kv_heads + kvh) * g.block_size + offset) * d
    };
    let mut scores = Vec::new();
    for s in seqs {
        for i in 0..s.len {
            let qpos = s.start + i;
            let lo = window.map_or(0, |w| (qpos + 1).saturating_sub(w));
            let row = s.offset + i;
            let qv = &q[(h * rows + row) * d..][..d];
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for j in lo..=qpos {
                let at = index(s.blocks[j / g.block_size], j % g.block_size);
                let x = simd::dot::<I>(qv, &kl[at..at + d]) * scale;
                max = max.max(x);
                scores.push(x);
            }
            let sum = simd::exp_sub_sum::<I>(&mut scores, max);
            let o = &mut out[row * d..][..d];
            let inv = 1.0 / sum;
            for (j, &p) in (lo..=qpos).zip(scores.iter()) {
                let at = index(s.blocks[j / g.block_size], j % g.block_size);
                simd::axpy::<I>(o, p * inv, &vl[at..at + d]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paged kernel against a direct computation over contiguous keys (scattered blocks,
    /// GQA, a window, two sequences of different lengths in one step).
    #[test]
    fn paged_attention_matches_contiguous_attention() {
        let (layers, hkv, d, bs, nb) = (2, 2, 5, 3, 16);
        let hq = 4;
        let mut cache = PagedKvCache::new(layers, hkv, d, bs, nb).unwrap();
        let mut rng = 1u64;
        let mut rand = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    rng = rng
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((rng >> 33) as f32 / (1u64 << 31) as f32) - 0.5
                })
                .collect()
        };
        // Sequence a: 7 positions in blocks [9, 2, 5]; sequence b: 4 positions in [0, 11].
        let tables: [&[u32]; 2] = [&[9, 2, 5], &[0, 11]];
        let lens = [7usize, 4];
        let rows = 11;
        let seqs = [
            PagedSeq {
                blocks: tables[0],
                start: 0,
                len: 7,
                offset: 0,
            },
            PagedSeq {
                blocks: tables[1],
                start: 0,
                len: 4,
                offset: 7,
            },
        ];
        let k = rand(hkv * rows * d);
        let v = rand(hkv * rows * d);
        let q = rand(hq * rows * d);
        cache.write(1, &k, &v, rows, &seqs).unwrap();
        for window in [None, Some(3)] {
            let got = cache.attend(1, &q, hq, rows, &seqs, window, 0.7).unwrap();
            for (s, &len) in seqs.iter().zip(&lens) {
                for h in 0..hq {
                    let g = h / 2;
                    for i in 0..len {
                        let row = s.offset + i;
                        let lo = window.map_or(0, |w| (i + 1).saturating_sub(w));
                        let sc: Vec<f32> = (lo..=i)
                            .map(|j| {
                                (0..d)
                                    .map(|x| {
                                        q[(h * rows + row) * d + x]
                                            * k[(g * rows + s.offset + j) * d + x]
                                    })
                                    .sum::<f32>()
                                    * 0.7
                            })
                            .collect();
                        let m = sc.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                        let e: Vec<f32> = sc.iter().map(|x| (x - m).exp()).collect();
                        let z: f32 = e.iter().sum();
                        for x in 0..d {
                            let want: f32 = (lo..=i)
                                .zip(&e)
                                .map(|(j, p)| p / z * v[(g * rows + s.offset + j) * d + x])
                                .sum();
                            let g = got[(h * rows + row) * d + x];
                            assert!(
                                (g - want).abs() < 1e-5,
                                "h {h} row {row} x {x}: {g} vs {want}"
                            );
                        }
                    }
                }
            }
        }
        // Layer 0 was never written: it holds zeros, so its output is zero.
        let zero = cache.attend(0, &q, hq, rows, &seqs, None, 1.0).unwrap();
        assert!(zero.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn bad_tables_and_shapes_are_errors() {
        let mut cache = PagedKvCache::new(1, 1, 4, 2, 4).unwrap();
        let short = [PagedSeq {
            blocks: &[0],
            start: 1,
            len: 2,
            offset: 0,
        }];
        assert!(cache.write(0, &[0.0; 8], &[0.0; 8], 2, &short).is_err());
        let oob = [PagedSeq {
            blocks: &[7],
            start: 0,
            len: 1,
            offset: 0,
        }];
        assert!(cache.attend(0, &[0.0; 4], 1, 1, &oob, None, 1.0).is_err());
        let ok = [PagedSeq {
            blocks: &[1],
            start: 0,
            len: 1,
            offset: 0,
        }];
        assert!(cache.attend(0, &[0.0; 4], 3, 1, &ok, None, 1.0).is_err());
        assert!(cache.attend(5, &[0.0; 4], 1, 1, &ok, None, 1.0).is_err());
        assert!(PagedKvCache::new(1, 1, 4, 0, 4).is_err());
    }
}
