//! The generation loop: prefill everything the model has not seen in one forward pass, then one
//! token per step through the KV cache, until a stop token, the token budget, the context window
//! or the caller says stop.

use crate::{EngineError, Result, Sampler, SamplingParams};
use kiln_models::{KvCache, Llama};
use std::time::{Duration, Instant};

/// What the engine needs from a model.
pub trait LanguageModel {
    type Cache;
    fn new_cache(&self) -> Self::Cache;
    /// The most positions one sequence may hold.
    fn context_len(&self) -> usize;
    /// Runs `tokens` at positions `start_pos..` (the cache holds exactly `start_pos` positions)
    /// and returns the logits for the position after the last one.
    fn next_logits(
        &self,
        tokens: &[u32],
        start_pos: usize,
        cache: &mut Self::Cache,
    ) -> Result<Vec<f32>>;
    /// Forgets cached positions from `len` on. Returns `false` if the cache cannot rewind, in
    /// which case the session starts over with a fresh cache.
    fn truncate_cache(&self, _cache: &mut Self::Cache, _len: usize) -> bool {
        false
    }
}

impl LanguageModel for Llama {
    type Cache = KvCache;

    fn new_cache(&self) -> KvCache {
        Llama::new_cache(self)
    }

    fn context_len(&self) -> usize {
        self.config().max_position_embeddings
    }

    fn next_logits(
        &self,
        tokens: &[u32],
        start_pos: usize,
        cache: &mut KvCache,
    ) -> Result<Vec<f32>> {
        Ok(self.logits_last(tokens, start_pos, cache)?)
    }

    fn truncate_cache(&self, cache: &mut KvCache, len: usize) -> bool {
        cache.truncate(len);
        true
    }
}

#[derive(Debug, Clone, Default)]
pub struct GenerateOptions {
    pub sampling: SamplingParams,
    /// Stop after this many new tokens.
    pub max_tokens: usize,
    /// Stop when one of these is sampled (it is returned and kept in the session).
    pub stop_ids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    MaxTokens,
    StopToken(u32),
    ContextFull,
    /// The token callback returned `false` (a stop string, Ctrl-C), or the caller cancelled.
    Cancelled,
    /// The request's deadline passed (the scheduler's per-request timeout).
    TimedOut,
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// The new tokens, including a final stop token if one ended the generation.
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    /// Tokens processed in the prefill pass.
    pub prefill_tokens: usize,
    pub prefill_time: Duration,
    /// Time spent in the decode steps after the first token.
    pub decode_time: Duration,
}

/// A sequence's tokens and KV cache. Tokens may run ahead of the cache (a sampled token is fed on
/// the next step or the next call), so a chat can keep its conversation across turns.
pub struct Session<'m, M: LanguageModel> {
    model: &'m M,
    cache: M::Cache,
    tokens: Vec<u32>,
    fed: usize,
}

impl<'m, M: LanguageModel> Session<'m, M> {
    pub fn new(model: &'m M) -> Self {
        Self {
            model,
            cache: model.new_cache(),
            tokens: Vec::new(),
            fed: 0,
        }
    }

    /// Every token of the sequence so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Positions the KV cache holds (the tokens after them are fed on the next call).
    pub fn cached(&self) -> usize {
        self.fed
    }

    /// Forgets the whole sequence.
    pub fn reset(&mut self) {
        self.tokens.clear();
        self.fed = 0;
        if !self.model.truncate_cache(&mut self.cache, 0) {
            self.cache = self.model.new_cache();
        }
    }

    /// Makes the session hold exactly `tokens`, keeping the cached positions of the longest
    /// common prefix, so that a chat re-rendered each turn prefills only what changed. At least
    /// one token is left unfed so that [`Self::generate`] with an empty prompt has logits to
    /// sample from. Returns how many cached positions were kept.
    pub fn sync(&mut self, tokens: &[u32]) -> usize {
        let common = self
            .tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count();
        let keep = common.min(self.fed).min(tokens.len().saturating_sub(1));
        if keep < self.fed {
            if self.model.truncate_cache(&mut self.cache, keep) {
                self.fed = keep;
            } else {
                self.cache = self.model.new_cache();
                self.fed = 0;
            }
        }
        self.tokens.clear();
        self.tokens.extend_from_slice(tokens);
        self.fed
    }

    /// Appends `prompt` and generates. `on_token` sees each new token as it is sampled and
    /// returns `false` to stop (the token stays in the result).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<Generation> {
        let mut sampler = Sampler::new(opts.sampling.clone())?;
        let context = self.model.context_len();
        let total = self.tokens.len() + prompt.len();
        if total == 0 {
            return Err(EngineError::EmptyPrompt);
        }
        if total > context {
            return Err(EngineError::PromptTooLong {
                tokens: total,
                context,
            });
        }
        self.tokens.extend_from_slice(prompt);
        let start = self.tokens.len();
        let mut out = Generation {
            tokens: Vec::new(),
            stop: StopReason::MaxTokens,
            prefill_tokens: self.tokens.len() - self.fed,
            prefill_time: Duration::ZERO,
            decode_time: Duration::ZERO,
        };
        if opts.max_tokens == 0 {
            return Ok(out);
        }
        let t0 = Instant::now();
        let mut first = true;
        loop {
            if self.tokens.len() >= context {
                out.stop = StopReason::ContextFull;
                break;
            }
            let step = Instant::now();
            let mut logits =
                self.model
                    .next_logits(&self.tokens[self.fed..], self.fed, &mut self.cache)?;
            self.fed = self.tokens.len();
            if first {
                out.prefill_time = step.elapsed();
                first = false;
            }
            let next = sampler.sample(&mut logits, &self.tokens, &self.tokens[start..])?;
            self.tokens.push(next);
            out.tokens.push(next);
            let keep_going = on_token(next);
            if opts.stop_ids.contains(&next) {
                out.stop = StopReason::StopToken(next);
                break;
            }
            if !keep_going {
                out.stop = StopReason::Cancelled;
                break;
            }
            if out.tokens.len() >= opts.max_tokens {
                out.stop = StopReason::MaxTokens;
                break;
            }
        }
        out.decode_time = t0.elapsed().saturating_sub(out.prefill_time);
        Ok(out)
    }
}
