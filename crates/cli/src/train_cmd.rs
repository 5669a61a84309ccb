//! `kiln train`: pretraining on a prepared dataset, with a progress bar, periodic evaluation and
//! samples, checkpoints, `--until-step`, Ctrl-C and `--resume`.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_engine::{GenerateOptions, SamplingParams, Session};
use kiln_models::Llama;
use kiln_tokenizer::Tokenizer;
use kiln_train::{
    Dataset, MatrixOptimizer, Observer, Outcome, Precision, Schedule, StepMetrics, TrainSettings,
    Trainer,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum StyleArg {
    /// RMSNorm, rotary positions, SwiGLU.
    Llama,
    /// LayerNorm, learned positions, GELU MLP, biases.
    Gpt2,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum OptimizerArg {
    /// Muon for the block matrices, AdamW for embeddings, norms and biases.
    Muon,
    /// AdamW for every parameter.
    Adamw,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum PrecisionArg {
    /// f32 everywhere.
    F32,
    /// bf16 operands for the projections' products (summed in f32); f32 weights, gradients and
    /// optimizer state. Needs AVX-512 BF16.
    Bf16,
    /// bf16 where the CPU has AVX-512 BF16, else f32 (the run records which).
    Auto,
}

impl PrecisionArg {
    /// The precision this stands for on the running CPU.
    pub fn get(self) -> Precision {
        match self {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Bf16 => Precision::Bf16,
            PrecisionArg::Auto if kiln_nn::fused::bf16_available() => Precision::Bf16,
            PrecisionArg::Auto => Precision::F32,
        }
    }

    /// The name of [`PrecisionArg::get`] (never "auto").
    pub fn name(self) -> &'static str {
        match self.get() {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ScheduleArg {
    /// Linear warmup, flat, linear decay over the last --decay-fraction of the run.
    Wsd,
    /// Linear warmup, then a cosine down to --min-lr-ratio.
    Cosine,
    Constant,
}

/// The model and optimization settings shared by `kiln train` and `kiln speedrun`.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// The one size dial: width 64 x depth, depth layers, depth heads of 64; learning rates follow.
    #[arg(long, default_value_t = 4)]
    pub depth: usize,
    #[arg(long, value_enum, default_value = "llama")]
    pub style: StyleArg,
    /// Tokens per training sequence (also the model's context window).
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, value_enum, default_value = "muon")]
    pub optimizer: OptimizerArg,
    /// AdamW learning rate (default: 3e-3 x sqrt(256 / width)).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Muon learning rate for the block matrices.
    #[arg(long, default_value_t = 0.02)]
    pub matrix_lr: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, value_enum, default_value = "wsd")]
    pub schedule: ScheduleArg,
    /// Warmup steps.
    #[arg(long, default_value_t = 20)]
    pub warmup: u64,
    /// WSD: the fraction of the run spent decaying.
    #[arg(long, default_value_t = 0.3)]
    pub decay_fraction: f64,
    /// The final learning rate as a fraction of the peak.
    #[arg(long, default_value_t = 0.0)]
    pub min_lr_ratio: f64,
    /// Clip the global gradient norm to this (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// Evaluate every this many steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    pub eval_every: u64,
    /// Validation windows of seq_len tokens per evaluation.
    #[arg(long, default_value_t = 64)]
    pub eval_windows: usize,
    /// Checkpoint every this many steps (0: only at the end or when stopped).
    #[arg(long, default_value_t = 200)]
    pub checkpoint_every: u64,
    /// Matmul precision of the projections, forward and backward [default: f32 for `kiln
    /// train`, auto for `kiln speedrun`].
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionArg>,
}

impl ModelArgs {
    pub fn settings(&self, steps: u64, seed: u64) -> TrainSettings {
        let mut s = TrainSettings::for_depth(self.depth);
        s.style = match self.style {
            StyleArg::Llama => "llama",
            StyleArg::Gpt2 => "gpt2",
        }
        .into();
        s.seq_len = self.seq_len;
        s.batch = self.batch;
        s.grad_accum = self.grad_accum;
        s.steps = steps;
        s.seed = seed;
        s.optimizer = match self.optimizer {
            OptimizerArg::Muon => MatrixOptimizer::Muon,
            OptimizerArg::Adamw => MatrixOptimizer::Adamw,
        };
        if let Some(lr) = self.lr {
            s.lr = lr;
        }
        s.matrix_lr = self.matrix_lr;
        s.weight_decay = self.weight_decay;
        s.schedule = match self.schedule {
            ScheduleArg::Wsd => Schedule::Wsd {
                warmup: self.warmup,
                decay_fraction: self.decay_fraction,
                min_ratio: self.min_lr_ratio,
            },
            ScheduleArg::Cosine => Schedule::Cosine {
                warmup: self.warmup,
                min_ratio: self.min_lr_ratio,
            },
            ScheduleArg::Constant => Schedule::Constant,
        };
        s.grad_clip = self.grad_clip;
        s.eval_every = self.eval_every;
        s.eval_windows = self.eval_windows;
        s.checkpoint_every = self.checkpoint_every;
        s.precision = self.precision.unwrap_or(PrecisionArg::F32).get();
        s
    }
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A dataset folder made by `kiln data prepare`.
    #[arg(long)]
    pub data: PathBuf,
    /// The run folder: run.json, metrics.jsonl, checkpoints/, model/.
    #[arg(long)]
    pub out: PathBuf,
    /// The length of the whole run in optimizer steps (the schedule depends on it).
    #[arg(long, default_value_t = 1000)]
    pub steps: u64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop after this step with a checkpoint, as a job with a time limit would.
    #[arg(long)]
    pub until_step: Option<u64>,
    /// Continue the run in --out from its last checkpoint (same settings required).
    #[arg(long)]
    pub resume: bool,
    /// No progress bar (one line per eval instead).
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Bytes of text per token id: 0 for special tokens, which stand for no text.
pub fn token_bytes(tok: &Tokenizer) -> Vec<u32> {
    let specials: std::collections::HashSet<u32> =
        tok.special_tokens().into_iter().map(|(_, id)| id).collect();
    (0..tok.vocab_size() as u32)
        .map(|id| {
            if specials.contains(&id) {
                0
            } else {
                tok.token_bytes(id).map_or(0, |b| b.len() as u32)
            }
        })
        .collect()
}

/// Two short samples from the start of a document (after the end-of-text token), seeded.
pub fn sampler(tok: Tokenizer, eot: u32) -> impl FnMut(&Llama) -> Vec<String> {
    move |model: &Llama| {
        (0..2u64)
            .map(|seed| {
                let opts = GenerateOptions {
                    sampling: SamplingParams {
                        temperature: 0.8,
                        top_k: 50,
                        seed,
                        ..SamplingParams::default()
                    },
                    max_tokens: 48.min(model.config().max_position_embeddings - 1),
                    stop_ids: vec![eot],
                };
                let mut session = Session::new(model);
                match session.generate(&[eot], &opts, |_| true) {
                    Ok(g) => {
                        let ids: Vec<u32> = g.tokens.into_iter().filter(|&t| t != eot).collect();
                        let bytes = tok.decode_bytes(&ids).unwrap_or_default();
                        String::from_utf8_lossy(&bytes).into_owned()
                    }
                    Err(e) => format!("(sampling failed: {e})"),
                }
            })
            .collect()
    }
}

/// Progress on stderr: a bar with loss and speed, and a line per evaluation.
pub struct Progress {
    bar: Option<ProgressBar>,
    /// The model's parameter count, from the trainer.
    pub params: usize,
    pub last: Option<StepMetrics>,
    pub evals: Vec<StepMetrics>,
}

impl Progress {
    pub fn new(show_bar: bool) -> Self {
        Self {
            bar: show_bar.then(ProgressBar::hidden),
            params: 0,
            last: None,
            evals: Vec::new(),
        }
    }

    fn say(&self, line: String) {
        // A bar that is not drawn (stderr is no terminal) would swallow its println.
        match &self.bar {
            Some(b) if !b.is_hidden() => b.println(line),
            _ => eprintln!("{line}"),
        }
    }
}

impl Observer for Progress {
    fn on_start(&mut self, first: u64, total: u64, params: usize) {
        self.params = params;
        if let Some(b) = &mut self.bar {
            *b = ProgressBar::new(total);
            b.set_position(first);
            b.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] step {pos}/{len} {msg} (eta {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
        }
        self.say(format!(
            "training {:.2}M parameters from step {first} to {total}",
            params as f64 / 1e6
        ));
    }

    fn on_step(&mut self, m: &StepMetrics) {
        if let Some(b) = &self.bar {
            b.set_position(m.step);
            b.set_message(format!("loss {:.3} | {:.0} tok/s", m.loss, m.tokens_per_s));
        }
        if let (Some(vl), Some(bpb)) = (m.val_loss, m.val_bpb) {
            self.say(format!(
                "step {:>6} | train loss {:.4} | val loss {:.4} | val bpb {:.4} | {:.0} tok/s",
                m.step, m.loss, vl, bpb, m.tokens_per_s
            ));
            for s in &m.samples {
                self.say(format!("  sample: {}", s.replace('\n', " / ")));
            }
            self.evals.push(m.clone());
        }
        self.last = Some(m.clone());
    }

    fn on_checkpoint(&mut self, step: u64, path: &Path) {
        tracing::info!("checkpoint at step {step}: {}", path.display());
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Ctrl-C sets the flag; the trainer checkpoints and stops after the current step.
pub fn stop_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    // A second handler cannot be installed (chat installs one too); training then simply
    // cannot be interrupted gracefully, which is reported but not fatal.
    if let Err(e) = ctrlc::set_handler(move || {
        if s.swap(true, Ordering::SeqCst) {
            // The second Ctrl-C stops at once; the last checkpoint is intact.
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step (Ctrl-C again to quit now)...");
    }) {
        tracing::warn!("cannot install the Ctrl-C handler: {e}");
    }
    Ok(stop)
}

/// Opens the dataset and the run, trains, and returns how it ended with the last metrics.
pub fn train(
    data: &Path,
    out: &Path,
    settings: TrainSettings,
    resume: bool,
    until: Option<u64>,
    progress: &mut Progress,
) -> Result<(Outcome, f64, f64)> {
    let ds = Dataset::open(data).with_context(|| format!("opening dataset {}", data.display()))?;
    let tok = Tokenizer::load(&ds.tokenizer_path())
        .with_context(|| format!("loading {}", ds.tokenizer_path().display()))?;
    if tok.vocab_size() != ds.meta().vocab_size {
        bail!(
            "the dataset's tokenizer has {} tokens but meta.json records {}",
            tok.vocab_size(),
            ds.meta().vocab_size
        );
    }
    let mut trainer = Trainer::open(&ds, settings, out, resume, token_bytes(&tok))
        .with_context(|| format!("opening run {}", out.display()))?;
    let stop = stop_flag()?;
    let mut sample = sampler(tok, ds.meta().eot_id);
    let outcome = trainer
        .run(until, &stop, progress, &mut sample)
        .context("training")?;
    let (vl, bpb) = match progress
        .last
        .as_ref()
        .and_then(|m| m.val_loss.zip(m.val_bpb))
    {
        Some(v) => v,
        None => trainer.evaluate()?,
    };
    Ok((outcome, vl, bpb))
}

pub fn run(a: TrainArgs) -> Result<()> {
    let settings = a.model.settings(a.steps, a.seed);
    let mut progress = Progress::new(!a.quiet);
    let (outcome, vl, bpb) = train(
        &a.data,
        &a.out,
        settings,
        a.resume,
        a.until_step,
        &mut progress,
    )?;
    drop(progress);
    match outcome {
        Outcome::Finished => eprintln!(
            "done: val loss {vl:.4}, val bpb {bpb:.4}; model in {}",
            a.out.join("model").display()
        ),
        Outcome::Stopped { step } => eprintln!(
            "stopped after step {step} with a checkpoint (val loss {vl:.4}, bpb {bpb:.4}); continue with --resume"
        ),
    }
    Ok(())
}
