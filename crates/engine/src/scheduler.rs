//! Continuous batching: one thread owns the model's paged KV pool and runs one forward pass per
//! step over every running sequence. At each step it
//! 1. takes new requests and drops cancelled or timed-out ones (their blocks go back at once);
//! 2. admits queued requests in arrival order while there is room in the batch and in the pool,
//!    reusing cached blocks of a shared prompt prefix ([`crate::paged::BlockManager`]);
//! 3. gives every decoding sequence its one token and fills the rest of the step's token budget
//!    with prompt chunks (chunked prefill: a long prompt never stalls the decodes for long);
//! 4. samples each sequence whose fed tokens reached its end, reports the token, and retires
//!    sequences that finished.
//!
//! A sequence takes a new block only when its positions reach it. If the pool runs dry, the
//! most recently admitted sequence is preempted: its blocks are freed and it goes back to the
//! front of the queue keeping its tokens and its sampler, to be recomputed when there is room
//! (vLLM's "recompute" preemption), so a request's output does not depend on the load.
//!
//! The scheduler knows token ids only; the caller decodes text and stops a request (a stop
//! string, a disconnected client) by returning `false` from its event callback or through its
//! [`CancelToken`].

use crate::paged::{chain_hash, BlockManager};
use crate::{EngineError, GenerateOptions, Result, Sampler, StopReason};
use kiln_models::{Llama, PagedKvCache, PagedStep};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the scheduler needs from a model.
pub trait PagedLanguageModel: Send + Sync + 'static {
    /// The most positions one sequence may hold.
    fn context_len(&self) -> usize;
    /// A pool of `num_blocks` blocks of `block_size` positions shaped for this model.
    fn new_pool(&self, block_size: usize, num_blocks: usize) -> Result<PagedKvCache>;
    /// Bytes one cached position takes.
    fn bytes_per_position(&self) -> usize;
    /// One ragged step; row `i` of the result is the next-token logits of `seqs[i]`.
    fn step(&self, seqs: &[PagedStep<'_>], pool: &mut PagedKvCache) -> Result<Vec<Vec<f32>>>;
}

impl PagedLanguageModel for Llama {
    fn context_len(&self) -> usize {
        self.config().max_position_embeddings
    }

    fn new_pool(&self, block_size: usize, num_blocks: usize) -> Result<PagedKvCache> {
        Ok(self.new_paged_cache(block_size, num_blocks)?)
    }

    fn bytes_per_position(&self) -> usize {
        let c = self.config();
        PagedKvCache::bytes_per_position(c.num_layers, c.num_kv_heads, c.head_dim)
    }

    fn step(&self, seqs: &[PagedStep<'_>], pool: &mut PagedKvCache) -> Result<Vec<Vec<f32>>> {
        let logits = self.forward_paged(seqs, pool)?;
        logits.to_vec2::<f32>().map_err(|source| {
            EngineError::Model(kiln_models::ModelError::Nn(kiln_nn::NnError::Candle {
                op: "paged logits",
                source,
            }))
        })
    }
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Sequences decoded together at most.
    pub max_running: usize,
    /// Requests waiting for a place at most; beyond it [`Scheduler::submit`] says busy.
    pub max_queued: usize,
    /// Positions per KV block.
    pub block_size: usize,
    /// Blocks in the pool (the KV memory is `num_blocks * block_size` positions).
    pub num_blocks: usize,
    /// Tokens one step processes at most (decodes first, then prompt chunks).
    pub max_step_tokens: usize,
    /// Share whole blocks of identical prompt prefixes between requests.
    pub prefix_cache: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_running: 16,
            max_queued: 64,
            block_size: 16,
            num_blocks: 1024,
            max_step_tokens: 256,
            prefix_cache: true,
        }
    }
}

impl SchedulerConfig {
    /// A pool of about `bytes` of KV memory for `model`.
    pub fn with_kv_bytes(mut self, model: &dyn PagedLanguageModel, bytes: usize) -> Self {
        let per_block = model.bytes_per_position() * self.block_size;
        self.num_blocks = (bytes / per_block.max(1)).max(1);
        self
    }
}

/// Set it to stop a request (queued or running); the scheduler frees its blocks at its next step.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// What a request reports, in order: its tokens, then exactly one `Finished` or `Failed`.
#[derive(Debug)]
pub enum Event {
    Token(u32),
    Finished(Finish),
    Failed(EngineError),
}

#[derive(Debug, Clone)]
pub struct Finish {
    pub stop: StopReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
    /// From submission to the first token (None if there was none).
    pub time_to_first_token: Option<Duration>,
}

/// The callback sees each event on the scheduler thread; returning `false` cancels the request.
pub type OnEvent = Box<dyn FnMut(Event) -> bool + Send>;

pub struct Request {
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
    /// The request is stopped (as [`StopReason::TimedOut`]) once this passes.
    pub deadline: Option<Instant>,
    pub cancel: CancelToken,
    pub on_event: OnEvent,
}

/// A point-in-time view of the scheduler, for metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub running: usize,
    pub queued: usize,
    pub blocks_total: usize,
    pub blocks_in_use: usize,
    pub steps: u64,
    pub prompt_tokens_computed: u64,
    pub prompt_tokens_cached: u64,
    pub generated_tokens: u64,
    pub preemptions: u64,
    /// Time spent in the model's forward steps.
    pub busy: Duration,
}

enum Msg {
    Submit(Box<Request>),
    Shutdown,
}

pub struct Scheduler {
    tx: Sender<Msg>,
    queued: Arc<AtomicUsize>,
    stats: Arc<Mutex<Stats>>,
    cfg: SchedulerConfig,
    context: usize,
    thread: Option<JoinHandle<()>>,
}

impl Scheduler {
    /// Starts the scheduler thread with its KV pool.
    pub fn start<M: PagedLanguageModel>(model: Arc<M>, cfg: SchedulerConfig) -> Result<Self> {
        if cfg.max_running == 0
            || cfg.block_size == 0
            || cfg.num_blocks == 0
            || cfg.max_step_tokens == 0
        {
            return Err(EngineError::InvalidParam {
                name: "scheduler",
                value: format!("{cfg:?}"),
                expected: "positive max_running, block_size, num_blocks and max_step_tokens",
            });
        }
        let pool = model.new_pool(cfg.block_size, cfg.num_blocks)?;
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(Mutex::new(Stats {
            blocks_total: cfg.num_blocks,
            ..Stats::default()
        }));
        let context = model.context_len();
        let mut worker = Worker {
            model,
            pool,
            blocks: BlockManager::new(cfg.num_blocks, cfg.block_size, cfg.prefix_cache),
            cfg: cfg.clone(),
            rx,
            queue: VecDeque::new(),
            running: Vec::new(),
            queued: queued.clone(),
            stats: stats.clone(),
            totals: Stats::default(),
            next_id: 0,
        };
        let thread = std::thread::Builder::new()
            .name("kiln-scheduler".into())
            .spawn(move || worker.run())
            .map_err(|e| EngineError::InvalidParam {
                name: "scheduler thread",
                value: e.to_string(),
                expected: "a thread the OS can start",
            })?;
        Ok(Self {
            tx,
            queued,
            stats,
            cfg,
            context,
            thread: Some(thread),
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn context_len(&self) -> usize {
        self.context
    }

    /// Queues a request. Bad requests (empty or oversized prompt, invalid sampling values) and a
    /// full queue are refused here, before anything runs.
    pub fn submit(&self, req: Request) -> Result<()> {
        if req.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if req.prompt.len() >= self.context {
            return Err(EngineError::PromptTooLong {
                tokens: req.prompt.len(),
                context: self.context,
            });
        }
        let pool_positions = self.cfg.num_blocks * self.cfg.block_size;
        if req.prompt.len() + 1 > pool_positions {
            return Err(EngineError::PromptTooLong {
                tokens: req.prompt.len(),
                context: pool_positions - 1,
            });
        }
        req.opts.sampling.validate()?;
        // Reserve a queue place; give it back if the queue was full.
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.cfg.max_queued {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Busy {
                queued: self.cfg.max_queued,
            });
        }
        self.tx.send(Msg::Submit(Box::new(req))).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            EngineError::ShutDown
        })
    }

    pub fn stats(&self) -> Stats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Seq {
    id: u64,
    req: Box<Request>,
    sampler: Sampler,
    /// Every token so far: the prompt, then the generated ones.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Positions in the KV pool.
    fed: usize,
    blocks: Vec<u32>,
    /// Prefix hash after each whole block of `blocks` (for registering them in the cache).
    hashes: Vec<u64>,
    /// Blocks of `blocks` already registered in the prefix cache (or taken from it).
    registered: usize,
    cached_tokens: usize,
    submitted: Instant,
    first_token: Option<Duration>,
}

impl Seq {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Why the caller wants this request stopped, if it does: its cancel token or its deadline.
    fn caller_stop(&self, now: Instant) -> Option<StopReason> {
        if self.req.cancel.is_cancelled() {
            Some(StopReason::Cancelled)
        } else if self.req.deadline.is_some_and(|d| now >= d) {
            Some(StopReason::TimedOut)
        } else {
            None
        }
    }
}

struct Worker<M: PagedLanguageModel> {
    model: Arc<M>,
    pool: PagedKvCache,
    blocks: BlockManager,
    cfg: SchedulerConfig,
    rx: Receiver<Msg>,
    queue: VecDeque<Seq>,
    running: Vec<Seq>,
    queued: Arc<AtomicUsize>,
    stats: Arc<Mutex<Stats>>,
    totals: Stats,
    next_id: u64,
}

enum Grow {
    Grown,
    Preempted,
    Impossible,
}

impl<M: PagedLanguageModel> Worker<M> {
    fn run(&mut self) {
        loop {
            // Idle: wait for work (waking now and then to expire queued deadlines).
            if self.running.is_empty() && self.queue.is_empty() {
                match self.rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(m) => {
                        if !self.take(m) {
                            return;
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(m) => {
                        if !self.take(m) {
                            return;
                        }
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
            self.drop_cancelled();
            self.admit();
            if let Err(e) = self.step() {
                // A failed step leaves the pool's contents for this step undefined: fail
                // every running request (their callers get the error) and carry on.
                for s in std::mem::take(&mut self.running) {
                    self.fail(s, EngineError::StepFailed(e.to_string()));
                }
            }
            self.publish();
        }
    }

    /// Returns `false` on shutdown.
    fn take(&mut self, m: Msg) -> bool {
        match m {
            Msg::Submit(req) => {
                let sampler = match Sampler::new(req.opts.sampling.clone()) {
                    Ok(s) => s,
                    Err(e) => {
                        self.queued.fetch_sub(1, Ordering::SeqCst);
                        let mut req = req;
                        (req.on_event)(Event::Failed(e));
                        return true;
                    }
                };
                let prompt_len = req.prompt.len();
                self.next_id += 1;
                self.queue.push_back(Seq {
                    id: self.next_id,
                    tokens: req.prompt.clone(),
                    req,
                    sampler,
                    prompt_len,
                    fed: 0,
                    blocks: Vec::new(),
                    hashes: Vec::new(),
                    registered: 0,
                    cached_tokens: 0,
                    submitted: Instant::now(),
                    first_token: None,
                });
                true
            }
            Msg::Shutdown => {
                for s in std::mem::take(&mut self.running) {
                    self.fail(s, EngineError::ShutDown);
                }
                while let Some(s) = self.queue.pop_front() {
                    self.queued.fetch_sub(1, Ordering::SeqCst);
                    self.fail(s, EngineError::ShutDown);
                }
                false
            }
        }
    }

    fn drop_cancelled(&mut self) {
        let now = Instant::now();
        let (gone, kept): (VecDeque<Seq>, VecDeque<Seq>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|s| s.caller_stop(now).is_some());
        self.queue = kept;
        self.queued.fetch_sub(gone.len(), Ordering::SeqCst);
        let (gone_running, kept): (Vec<Seq>, Vec<Seq>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|s| s.caller_stop(now).is_some());
        self.running = kept;
        for s in gone.into_iter().chain(gone_running) {
            let stop = s.caller_stop(now).unwrap_or(StopReason::Cancelled);
            self.finish(s, stop);
        }
    }

    /// Queued requests join the batch in order while there is room in the batch and enough
    /// blocks for all their known tokens (beyond the ones the prefix cache already holds).
    fn admit(&mut self) {
        let bs = self.cfg.block_size;
        while self.running.len() < self.cfg.max_running {
            let Some(front) = self.queue.front_mut() else {
                break;
            };
            // Whole blocks of the known tokens, keeping at least one token to feed.
            let shareable = (front.tokens.len() - 1) / bs;
            let (shared, prefix) = self.blocks.take_prefix(&front.tokens, shareable);
            let needed = (front.tokens.len() + 1).div_ceil(bs) - shared.len();
            if needed + shared.len() > self.blocks.num_blocks() {
                // A preempted sequence that has outgrown the whole pool.
                self.blocks.release(&shared);
                let s = self.queue.pop_front().expect("front exists");
                self.queued.fetch_sub(1, Ordering::SeqCst);
                self.finish(s, StopReason::ContextFull);
                continue;
            }
            // Leave every running sequence a block to grow into.
            let reserve = self.running.len().min(self.blocks.available());
            if self.blocks.available() < needed + reserve {
                self.blocks.release(&shared);
                break;
            }
            let mut s = self.queue.pop_front().expect("front exists");
            self.queued.fetch_sub(1, Ordering::SeqCst);
            s.fed = shared.len() * bs;
            s.cached_tokens = s.fed.min(s.prompt_len);
            s.registered = shared.len();
            s.hashes.clear();
            let mut h = 0u64;
            for chunk in s.tokens.chunks_exact(bs).take(shared.len()) {
                h = chain_hash(h, chunk);
                s.hashes.push(h);
            }
            debug_assert_eq!(s.hashes.last().copied().unwrap_or(0), prefix);
            s.blocks = shared;
            self.totals.prompt_tokens_cached += s.cached_tokens as u64;
            self.running.push(s);
        }
    }

    /// Gives `running[i]` blocks for positions `0..upto`. When the pool is dry the newest
    /// sequence is preempted (possibly `i` itself).
    fn grow(&mut self, i: usize, upto: usize) -> Grow {
        let bs = self.cfg.block_size;
        while self.running[i].blocks.len() * bs < upto {
            if let Some(b) = self.blocks.allocate() {
                self.running[i].blocks.push(b);
                continue;
            }
            if self.running.len() == 1 {
                return Grow::Impossible;
            }
            let victim = self.running.len() - 1;
            let mut v = self.running.remove(victim);
            self.blocks.release(&v.blocks);
            v.blocks.clear();
            v.hashes.clear();
            v.registered = 0;
            v.fed = 0;
            self.totals.preemptions += 1;
            self.queued.fetch_add(1, Ordering::SeqCst);
            self.queue.push_front(v);
            if victim == i {
                return Grow::Preempted;
            }
        }
        Grow::Grown
    }

    fn index_of(&self, id: u64) -> Option<usize> {
        self.running.iter().position(|s| s.id == id)
    }

    fn step(&mut self) -> Result<()> {
        if self.running.is_empty() {
            return Ok(());
        }
        // Decodes (one token each) first, then prompt chunks in admission order.
        let mut budget = self.cfg.max_step_tokens;
        let mut wanted: Vec<(u64, usize)> = Vec::new(); // (sequence id, tokens to feed)
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| self.running[i].tokens.len() - self.running[i].fed != 1);
        for i in order {
            if budget == 0 {
                break;
            }
            let s = &self.running[i];
            let n = (s.tokens.len() - s.fed).min(budget);
            budget -= n;
            wanted.push((s.id, n));
        }
        // Blocks for this step's positions; growing may preempt sequences.
        let mut granted = Vec::with_capacity(wanted.len());
        for (id, n) in wanted {
            let Some(i) = self.index_of(id) else { continue };
            let upto = self.running[i].fed + n;
            match self.grow(i, upto) {
                Grow::Grown => granted.push((id, n)),
                Grow::Preempted => {}
                Grow::Impossible => {
                    // Alone and still too big for the pool: a long generation filled it.
                    let s = self.running.remove(i);
                    self.finish(s, StopReason::ContextFull);
                }
            }
        }
        let plan: Vec<(usize, usize)> = granted
            .iter()
            .filter_map(|&(id, n)| self.index_of(id).map(|i| (i, n)))
            .collect();
        if plan.is_empty() {
            return Ok(());
        }
        let inputs: Vec<PagedStep> = plan
            .iter()
            .map(|&(i, n)| {
                let s = &self.running[i];
                PagedStep {
                    tokens: &s.tokens[s.fed..s.fed + n],
                    start: s.fed,
                    blocks: &s.blocks,
                }
            })
            .collect();
        let t0 = Instant::now();
        let logits = self.model.step(&inputs, &mut self.pool);
        self.totals.busy += t0.elapsed();
        let logits = logits?;
        drop(inputs);
        self.totals.steps += 1;
        let bs = self.cfg.block_size;
        let mut done = Vec::new();
        let mut todo: Vec<(usize, Vec<f32>)> = Vec::new();
        for (&(i, n), l) in plan.iter().zip(logits) {
            let s = &mut self.running[i];
            let prompt_part = s.prompt_len.saturating_sub(s.fed).min(n);
            self.totals.prompt_tokens_computed += prompt_part as u64;
            s.fed += n;
            // Register blocks that just became whole.
            while s.registered < s.fed / bs {
                let b = s.registered;
                let chunk = &s.tokens[b * bs..(b + 1) * bs];
                let prev = if b == 0 { 0 } else { s.hashes[b - 1] };
                let h = chain_hash(prev, chunk);
                if s.hashes.len() == b {
                    s.hashes.push(h);
                }
                self.blocks.register(s.blocks[b], prev, chunk);
                s.registered += 1;
            }
            if s.fed < s.tokens.len() {
                continue; // mid-prompt chunk: these logits are not needed
            }
            todo.push((i, l));
        }
        // Sampling is per sequence (own logits, own RNG), so the sequences sample in parallel:
        // serially, softmax over a 49k vocabulary for 16 sequences was ~8% of a step. The
        // results do not depend on the thread count.
        todo.sort_by_key(|&(i, _)| i);
        let mut refs: Vec<(usize, &mut Seq, Vec<f32>)> = Vec::with_capacity(todo.len());
        let mut todo = todo.into_iter().peekable();
        for (i, s) in self.running.iter_mut().enumerate() {
            if todo.peek().is_some_and(|(j, _)| *j == i) {
                let (_, l) = todo.next().expect("peeked");
                refs.push((i, s, l));
            }
        }
        let sampled: Vec<(usize, Result<u32>)> = {
            use rayon::prelude::*;
            refs.into_par_iter()
                .map(|(i, s, mut l)| {
                    let r = s
                        .sampler
                        .sample(&mut l, &s.tokens, &s.tokens[s.prompt_len..]);
                    (i, r)
                })
                .collect()
        };
        for (i, next) in sampled {
            let s = &mut self.running[i];
            let next = match next {
                Ok(t) => t,
                Err(e) => {
                    done.push((i, Err(e)));
                    continue;
                }
            };
            s.tokens.push(next);
            self.totals.generated_tokens += 1;
            s.first_token.get_or_insert_with(|| s.submitted.elapsed());
            let keep = (s.req.on_event)(Event::Token(next));
            let stop = if s.req.opts.stop_ids.contains(&next) {
                Some(StopReason::StopToken(next))
            } else if !keep {
                Some(StopReason::Cancelled)
            } else if s.generated() >= s.req.opts.max_tokens {
                Some(StopReason::MaxTokens)
            } else if s.tokens.len() >= self.model.context_len() {
                Some(StopReason::ContextFull)
            } else {
                None
            };
            if let Some(stop) = stop {
                done.push((i, Ok(stop)));
            }
        }
        // Retire from the back so indices stay valid.
        done.sort_by_key(|&(i, _)| std::cmp::Reverse(i));
        for (i, r) in done {
            let s = self.running.remove(i);
            match r {
                Ok(stop) => self.finish(s, stop),
                Err(e) => self.fail(s, e),
            }
        }
        Ok(())
    }

    fn finish(&mut self, mut s: Seq, stop: StopReason) {
        self.blocks.release(&s.blocks);
        let f = Finish {
            stop,
            prompt_tokens: s.prompt_len,
            completion_tokens: s.generated(),
            cached_tokens: s.cached_tokens,
            time_to_first_token: s.first_token,
        };
        (s.req.on_event)(Event::Finished(f));
    }

    fn fail(&mut self, mut s: Seq, e: EngineError) {
        self.blocks.release(&s.blocks);
        (s.req.on_event)(Event::Failed(e));
    }

    fn publish(&mut self) {
        let mut st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        *st = Stats {
            running: self.running.len(),
            queued: self.queue.len(),
            blocks_total: self.blocks.num_blocks(),
            blocks_in_use: self.blocks.in_use(),
            ..self.totals
        };
    }
}
