//! Batched decoding: several prompts of different lengths generated together, one forward pass
//! per step for the whole batch.
//!
//! Prompts are left-padded to the longest one so that every row's next token sits in the same
//! column; the model hides each row's padding (see [`kiln_models::Llama::forward_padded`]). A row
//! that has stopped keeps being fed its last token (its logits are ignored) until every row is
//! done: simple, and the step's cost hardly depends on B at these sizes.

use crate::{EngineError, GenerateOptions, Generation, LanguageModel, Result, Sampler, StopReason};
use kiln_models::{KvCache, Llama};
use kiln_nn::candle_core::Tensor;
use std::time::{Duration, Instant};

/// A model that runs a left-padded batch.
pub trait BatchLanguageModel: LanguageModel {
    /// Runs `tokens` (B rows of equal length T) at positions `start_pos..` and returns each row's
    /// logits for the next position; row `b`'s first `pad[b]` positions (counted from 0 over the
    /// whole cache) are padding.
    fn next_logits_batch(
        &self,
        tokens: &[Vec<u32>],
        start_pos: usize,
        pad: &[usize],
        cache: &mut Self::Cache,
    ) -> Result<Vec<Vec<f32>>>;
}

impl BatchLanguageModel for Llama {
    fn next_logits_batch(
        &self,
        tokens: &[Vec<u32>],
        start_pos: usize,
        pad: &[usize],
        cache: &mut KvCache,
    ) -> Result<Vec<Vec<f32>>> {
        let b = tokens.len();
        let t = tokens.first().map_or(0, Vec::len);
        let flat: Vec<u32> = tokens.concat();
        let bad = |e| {
            EngineError::Model(kiln_models::ModelError::Nn(kiln_nn::NnError::Candle {
                op: "batch logits",
                source: e,
            }))
        };
        let ids = Tensor::from_vec(flat, (b, t), self.device()).map_err(bad)?;
        let logits = self.forward_padded(&ids, start_pos, cache, pad)?; // (B, vocab)
        logits.to_vec2::<f32>().map_err(bad)
    }
}

/// Generates a continuation for each prompt with the same options; row `i` of the result is what
/// [`crate::Session::generate`] gives for `prompts[i]` alone (up to rounding in the logits).
pub fn generate_batch<M: BatchLanguageModel>(
    model: &M,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
) -> Result<Vec<Generation>> {
    let rows = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if prompts.iter().any(Vec::is_empty) {
        return Err(EngineError::EmptyPrompt);
    }
    let context = model.context_len();
    if longest > context {
        return Err(EngineError::PromptTooLong {
            tokens: longest,
            context,
        });
    }
    let mut samplers = (0..rows)
        .map(|_| Sampler::new(opts.sampling.clone()))
        .collect::<Result<Vec<_>>>()?;
    let pad: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    let mut out: Vec<Generation> = prompts
        .iter()
        .map(|p| Generation {
            tokens: Vec::new(),
            stop: StopReason::MaxTokens,
            prefill_tokens: p.len(),
            prefill_time: Duration::ZERO,
            decode_time: Duration::ZERO,
        })
        .collect();
    if rows == 0 || opts.max_tokens == 0 {
        return Ok(out);
    }
    // Padding is token 0; the model never lets a real position see it.
    let mut step: Vec<Vec<u32>> = prompts
        .iter()
        .zip(&pad)
        .map(|(p, &n)| std::iter::repeat_n(0, n).chain(p.iter().copied()).collect())
        .collect();
    let mut history: Vec<Vec<u32>> = prompts.to_vec();
    let mut done = vec![false; rows];
    let mut cache = model.new_cache();
    let mut pos = 0;
    let t0 = Instant::now();
    let mut prefill_time = None;
    while done.iter().any(|d| !d) {
        // As in `Session::generate`: no step whose next position would be past the window.
        if pos + step[0].len() >= context {
            for (g, d) in out.iter_mut().zip(&mut done) {
                if !*d {
                    g.stop = StopReason::ContextFull;
                    *d = true;
                }
            }
            break;
        }
        let logits = model.next_logits_batch(&step, pos, &pad, &mut cache)?;
        pos += step[0].len();
        prefill_time.get_or_insert_with(|| t0.elapsed());
        for r in 0..rows {
            if done[r] {
                continue;
            }
            let mut l = logits[r].clone();
            let start = prompts[r].len();
            let next = samplers[r].sample(&mut l, &history[r], &history[r][start..])?;
            history[r].push(next);
            out[r].tokens.push(next);
            step[r] = vec![next];
            if opts.stop_ids.contains(&next) {
                out[r].stop = StopReason::StopToken(next);
                done[r] = true;
            } else if out[r].tokens.len() >= opts.max_tokens {
                out[r].stop = StopReason::MaxTokens;
                done[r] = true;
            }
        }
    }
    let prefill_time = prefill_time.unwrap_or_default();
    for g in &mut out {
        g.prefill_time = prefill_time;
        g.decode_time = t0.elapsed().saturating_sub(prefill_time);
    }
    Ok(out)
}
