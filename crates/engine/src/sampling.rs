//! Turning logits into the next token: penalties, then greedy or temperature sampling with top-k,
//! top-p (nucleus) and min-p filters, from a seeded RNG.
//!
//! Order, as in transformers' logits processors: repetition penalty (over the whole context),
//! frequency and presence penalties (OpenAI's, over generated tokens), temperature, top-k, top-p,
//! min-p. Temperature 0 means greedy (ties go to the lowest id).

// `!(x > y)` is deliberate: it also rejects NaN (and mirrors torch's `~(a < b)` in rope).
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use crate::{EngineError, Result};

/// Sampling parameters; `Default` is greedy decoding with no penalties.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy; otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 keeps all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1 keeps all).
    pub top_p: f32,
    /// Keep tokens at least `min_p` times as likely as the most likely one (0 keeps all).
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of tokens already in the context (1 is off).
    pub repetition_penalty: f32,
    /// Subtract `frequency_penalty * count` from the logits of generated tokens (0 is off).
    pub frequency_penalty: f32,
    /// Subtract `presence_penalty` from the logits of tokens generated at least once (0 is off).
    pub presence_penalty: f32,
    /// The RNG seed: the same seed, model and prompt give the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |name, value: f32, expected| {
            Err(EngineError::InvalidParam {
                name,
                value: value.to_string(),
                expected,
            })
        };
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature", self.temperature, "a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p, "in (0, 1]");
        }
        if !(self.min_p >= 0.0 && self.min_p <= 1.0) {
            return bad("min_p", self.min_p, "in [0, 1]");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(
                "repetition_penalty",
                self.repetition_penalty,
                "a finite number > 0",
            );
        }
        if !(self.frequency_penalty >= -2.0 && self.frequency_penalty <= 2.0) {
            return bad("frequency_penalty", self.frequency_penalty, "in [-2, 2]");
        }
        if !(self.presence_penalty >= -2.0 && self.presence_penalty <= 2.0) {
            return bad("presence_penalty", self.presence_penalty, "in [-2, 2]");
        }
        Ok(())
    }
}

/// SplitMix64 (Steele et al. 2014): tiny, fast, and ours, so a seed gives the same tokens across
/// dependency upgrades (a `rand` major version may change its streams).
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Samples tokens with fixed parameters and its own RNG stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = SplitMix64(params.seed);
        Ok(Self { params, rng })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. `context` is every token so far (prompt and generated), `generated`
    /// the generated suffix of it. `logits` is modified in place by the penalties.
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        context: &[u32],
        generated: &[u32],
    ) -> Result<u32> {
        if logits.is_empty() {
            return Err(EngineError::BadLogits("no"));
        }
        if logits.iter().any(|x| x.is_nan()) {
            return Err(EngineError::BadLogits("NaN"));
        }
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in context {
                if let Some(s) = seen.get_mut(t as usize) {
                    if !*s {
                        *s = true;
                        let l = &mut logits[t as usize];
                        *l = if *l > 0.0 {
                            *l / p.repetition_penalty
                        } else {
                            *l * p.repetition_penalty
                        };
                    }
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &t in generated {
                *counts.entry(t).or_default() += 1;
            }
            for (t, c) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.frequency_penalty * c as f32 + p.presence_penalty;
                }
            }
        }
        if p.temperature == 0.0 {
            return Ok(argmax(logits));
        }
        if p.top_k == 0 && p.top_p >= 1.0 {
            return self.sample_unordered(logits);
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, l)| (i as u32, *l / p.temperature))
            .collect();
        // Descending logit, ties by id (deterministic).
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_logit);
            cand.truncate(p.top_k);
        }
        // Only top-p needs the candidates in probability order; sorting the whole vocabulary
        // for every token was 15% of a 16-sequence serving step, so the other filters work on
        // the candidates in a fixed (sorted by logit, or by id) order without it.
        if p.top_p < 1.0 || p.top_k > 0 {
            cand.sort_unstable_by(by_logit);
        }
        let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return Err(EngineError::BadLogits("only -inf"));
        }
        let mut probs: Vec<f64> = cand.iter().map(|(_, l)| ((l - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, q) in probs.iter().enumerate() {
                cum += q;
                if cum >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            cand.truncate(keep);
        }
        if p.min_p > 0.0 {
            // The most likely candidate has probability exp(0) / total before top-p's cut.
            let floor = probs.iter().cloned().fold(0.0, f64::max) * p.min_p as f64;
            let mut w = 0;
            for r in 0..probs.len() {
                if probs[r] >= floor {
                    probs[w] = probs[r];
                    cand[w] = cand[r];
                    w += 1;
                }
            }
            probs.truncate(w.max(1));
            cand.truncate(w.max(1));
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.next_f64() * total;
        for (i, q) in probs.iter().enumerate() {
            if u < *q {
                return Ok(cand[i].0);
            }
            u -= q;
        }
        Ok(cand[probs.len() - 1].0)
    }
}

impl Sampler {
    /// Temperature and min-p need no candidate order: the probabilities stay in id order, in
    /// one f32 buffer (no (id, logit) list, no sort), which matters when a server samples 16
    /// sequences per step from a 49k vocabulary.
    fn sample_unordered(&mut self, logits: &[f32]) -> Result<u32> {
        let p = &self.params;
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return Err(EngineError::BadLogits("only -inf"));
        }
        let inv_t = 1.0 / p.temperature;
        // The most likely token has weight e^0 = 1, so min-p keeps weights >= min_p.
        let floor = p.min_p;
        let mut total = 0f64;
        let weights: Vec<f32> = logits
            .iter()
            .map(|&l| {
                let w = ((l - max) * inv_t).exp();
                let w = if w >= floor { w } else { 0.0 };
                total += w as f64;
                w
            })
            .collect();
        let mut u = self.rng.next_f64() * total;
        let mut last = 0;
        for (i, &w) in weights.iter().enumerate() {
            if w > 0.0 {
                if u < w as f64 {
                    return Ok(i as u32);
                }
                u -= w as f64;
                last = i;
            }
        }
        Ok(last as u32)
    }
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}
