//! `kiln speedrun`: kiln's main job end to end on a default that needs no input. On the
//! `shakespeare` asset (or `--data`), it trains a byte-level BPE tokenizer, prepares token shards
//! with a held-out split, measures the step time and sizes the run to the time budget, pretrains,
//! evaluates (val loss and bits per byte), samples, and writes `DIR/report.md` with a loss-curve
//! PNG.

use crate::train_cmd::{self, ModelArgs, PrecisionArg, Progress};
use crate::{plot, resolve};
use anyhow::{bail, Context, Result};
use clap::Args;
use kiln_tokenizer::train::TrainerConfig;
use kiln_tokenizer::Tokenizer;
use kiln_train::data::{prepare, PrepareConfig};
use kiln_train::{
    init_model, model_config, train_step, Dataset, Loader, Optimizers, Split, StepMetrics,
};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args, Debug)]
pub struct SpeedrunArgs {
    /// The output folder (tokenizer, data, run, report.md, loss.png).
    #[arg(long, default_value = "speedrun")]
    out: PathBuf,
    /// The training time budget in minutes (the whole speedrun takes a little longer).
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Your own text instead of Shakespeare: files, folders or a corpus asset name.
    #[arg(long, num_args = 1..)]
    data: Vec<String>,
    /// Tokenizer vocabulary size (bytes and the <|endoftext|> token included).
    #[arg(long, default_value_t = 4096)]
    vocab_size: u32,
    /// Fix the number of steps instead of sizing the run to --minutes.
    #[arg(long)]
    steps: Option<u64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    model: ModelArgs,
}

const EOT: &str = "<|endoftext|>";

pub fn run(mut a: SpeedrunArgs) -> Result<()> {
    if !(a.minutes > 0.0 && a.minutes.is_finite()) {
        bail!("--minutes must be a positive number, got {}", a.minutes);
    }
    let started = Instant::now();
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let inputs = if a.data.is_empty() {
        vec!["shakespeare".to_string()]
    } else {
        a.data.clone()
    };
    // Folders give their files without hidden ones (an asset's manifest).
    let files = resolve::input_files(&inputs)?;

    // 1. Tokenizer.
    let t0 = Instant::now();
    let tok_path = a.out.join("tokenizer.json");
    let cfg = TrainerConfig {
        vocab_size: a.vocab_size,
        special_tokens: vec![EOT.to_string()],
        ..TrainerConfig::default()
    };
    let trained = kiln_tokenizer::train::train_from_files(&files, &cfg, &|_| {})
        .context("training the tokenizer")?;
    trained
        .save(&tok_path)
        .with_context(|| format!("writing {}", tok_path.display()))?;
    let tok_secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "[1/4] tokenizer: {} tokens from {} files in {tok_secs:.1}s",
        trained.vocab_size(),
        files.len()
    );

    // 2. Data.
    let t0 = Instant::now();
    let tok = Tokenizer::load(&tok_path).context("loading the trained tokenizer")?;
    let data_dir = a.out.join("data");
    let pcfg = PrepareConfig {
        seed: a.seed,
        force: true,
        ..PrepareConfig::default()
    };
    let meta = prepare(&tok, Some(&tok_path), &files, &data_dir, &pcfg, &|_| {})
        .context("preparing the data")?;
    let data_secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "[2/4] data: {} train / {} val tokens ({} / {} documents) in {data_secs:.1}s",
        meta.train.n_tokens, meta.val.n_tokens, meta.train.n_docs, meta.val.n_docs
    );

    // 3. Size the run to the budget from the measured step time, then train.
    let ds = Dataset::open(&data_dir)?;
    // The speedrun takes bf16 where the CPU has it: measured here, +19% tokens/s for the
    // default model (BENCHMARKS.md).
    a.model.precision.get_or_insert(PrecisionArg::Auto);
    let mut settings = a.model.settings(1, a.seed);
    settings.tokenizer_sha256 = ds.meta().tokenizer_sha256.clone();
    let steps = match a.steps {
        Some(s) => s,
        None => {
            let step_s = measure_step(&ds, &settings)?;
            // The measured steps run on a fresh model in a warm cache; over a whole run steps
            // took about 1.15x as long (Muon's momentum, evaluations, checkpoints): the default
            // run measured 0.54 s and averaged 0.64 s. Plan for 80% of the budget.
            let s = ((a.minutes * 60.0 * 0.8) / step_s).floor() as u64;
            eprintln!(
                "[3/4] one step of {} tokens takes {step_s:.3}s: {s} steps fit {:.1} minutes",
                settings.tokens_per_step(),
                a.minutes
            );
            s.max(1)
        }
    };
    let mut settings = a.model.settings(steps, a.seed);
    if settings.eval_every == 100 {
        // About ten evaluations, whatever the length.
        settings.eval_every = (steps / 10).max(1);
        settings.checkpoint_every = (steps / 4).max(1);
    }
    let run_dir = a.out.join("run");
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir)
            .with_context(|| format!("removing the old {}", run_dir.display()))?;
    }
    let t0 = Instant::now();
    let mut progress = Progress::new(true);
    let (_, val_loss, val_bpb) = train_cmd::train(
        &data_dir,
        &run_dir,
        settings.clone(),
        false,
        None,
        &mut progress,
    )?;
    let train_secs = t0.elapsed().as_secs_f64();
    let evals = std::mem::take(&mut progress.evals);
    let params = progress.params;
    drop(progress);

    // 4. Report.
    let metrics = read_metrics(&run_dir.join("metrics.jsonl"))?;
    let train_pts: Vec<(u64, f64)> = metrics.iter().map(|m| (m.step, m.loss as f64)).collect();
    let val_pts: Vec<(u64, f64)> = metrics
        .iter()
        .filter_map(|m| m.val_loss.map(|v| (m.step, v)))
        .collect();
    let png = a.out.join("loss.png");
    plot::loss_curve(&png, &train_pts, &val_pts, "kiln speedrun: loss")?;
    let tokens = settings.tokens_per_step() as f64 * steps as f64;
    let cfg = model_config(
        settings.depth,
        settings.style()?,
        ds.meta().vocab_size,
        settings.seq_len,
    );
    let mut r = String::new();
    writeln!(r, "# kiln speedrun report\n")?;
    writeln!(r, "Final validation: **{val_bpb:.4} bits per byte** (loss {val_loss:.4} nats per token) on {} held-out documents ({} tokens, {} bytes).\n", ds.meta().val.n_docs, ds.meta().val.n_tokens, ds.meta().val.n_bytes)?;
    writeln!(r, "![loss curve](loss.png)\n")?;
    writeln!(r, "## Settings\n")?;
    writeln!(r, "| setting | value |\n|---|---|")?;
    writeln!(
        r,
        "| corpus | {} ({} files) |",
        inputs.join(", "),
        files.len()
    )?;
    writeln!(
        r,
        "| tokenizer | byte-level BPE, {} tokens, trained in {tok_secs:.1}s |",
        tok.vocab_size()
    )?;
    writeln!(
        r,
        "| data | {} train tokens, {} val tokens, prepared in {data_secs:.1}s |",
        ds.meta().train.n_tokens,
        ds.meta().val.n_tokens
    )?;
    writeln!(
        r,
        "| model | {} style, depth {} (width {}, {} heads, {} layers), {:.2}M parameters |",
        settings.style,
        settings.depth,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_layers,
        params as f64 / 1e6
    )?;
    writeln!(
        r,
        "| optimization | {:?} (matrix lr {}), AdamW lr {:.2e}, {:?}, grad clip {} |",
        settings.optimizer, settings.matrix_lr, settings.lr, settings.schedule, settings.grad_clip
    )?;
    writeln!(
        r,
        "| precision | {} |",
        match settings.precision {
            kiln_train::Precision::F32 => "f32",
            kiln_train::Precision::Bf16 => "bf16 matmuls (f32 sums, weights and optimizer state)",
        }
    )?;
    writeln!(
        r,
        "| batch | {} x {} tokens x {} accumulation = {} tokens per step |",
        settings.batch,
        settings.seq_len,
        settings.grad_accum,
        settings.tokens_per_step()
    )?;
    writeln!(
        r,
        "| steps | {steps} ({:.2}M tokens, {:.2} epochs) |",
        tokens / 1e6,
        tokens / ds.meta().train.n_tokens as f64
    )?;
    writeln!(r, "| threads | {} |", rayon::current_num_threads())?;
    writeln!(r, "| seed | {} |", a.seed)?;
    writeln!(r, "\n## Throughput\n")?;
    let mean_tps =
        metrics.iter().map(|m| m.tokens_per_s).sum::<f64>() / metrics.len().max(1) as f64;
    writeln!(r, "Training took {train_secs:.0}s for {steps} steps: {:.0} tokens/s on average (mean of per-step rates {mean_tps:.0}); the whole speedrun took {:.0}s.\n", tokens / train_secs, started.elapsed().as_secs_f64())?;
    writeln!(r, "## Validation during training\n")?;
    writeln!(
        r,
        "| step | train loss | val loss | val bpb |\n|---|---|---|---|"
    )?;
    for m in &evals {
        writeln!(
            r,
            "| {} | {:.4} | {:.4} | {:.4} |",
            m.step,
            m.loss,
            m.val_loss.unwrap_or(f64::NAN),
            m.val_bpb.unwrap_or(f64::NAN)
        )?;
    }
    writeln!(
        r,
        "\n## Samples (temperature 0.8, top-k 50, from the start of a document)\n"
    )?;
    if let Some(last) = evals.last() {
        for s in &last.samples {
            writeln!(r, "```text\n{}\n```\n", s.trim_end())?;
        }
    }
    writeln!(r, "The model is in `run/model/` (try `kiln generate -m {} -p \"ROMEO:\"`); metrics in `run/metrics.jsonl`.", run_dir.join("model").display())?;
    let report = a.out.join("report.md");
    kiln_train::checkpoint::write_atomic(&report, r.as_bytes())?;
    eprintln!(
        "[4/4] val bpb {val_bpb:.4} after {steps} steps; report: {}, curve: {}",
        report.display(),
        png.display()
    );
    Ok(())
}

/// Seconds per optimizer step: the median of five timed steps after two warm-up steps, on a
/// throwaway model.
fn measure_step(ds: &Dataset, s: &kiln_train::TrainSettings) -> Result<f64> {
    let cfg = model_config(s.depth, s.style()?, ds.meta().vocab_size, s.seq_len);
    let (model, params) = init_model(&cfg, s.seed)?;
    let mut opt = Optimizers::new(&params, s)?;
    let mut loader = Loader::new(ds, Split::Train, s.seq_len, s.batch, s.seed)?;
    // In the run's matmul precision, like the run itself.
    kiln_nn::fused::with_matmul_precision(s.precision.matmul(), || -> Result<f64> {
        let mut step = |opt: &mut Optimizers| -> Result<()> {
            let micro: Vec<_> = (0..s.grad_accum).map(|_| loader.next_batch()).collect();
            train_step(&model, opt, &micro, s.batch, s.seq_len, s.grad_clip)?;
            Ok(())
        };
        // The first steps pay for page faults and growing buffers (measured: a step timed
        // right after one warm-up step was 1.4x the run's average, and the run used 57% of its
        // budget): two warm-up steps, then the median of five.
        for _ in 0..2 {
            step(&mut opt)?;
        }
        let mut times = Vec::with_capacity(5);
        for _ in 0..5 {
            let t0 = Instant::now();
            step(&mut opt)?;
            times.push(t0.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    })?
}

fn read_metrics(path: &Path) -> Result<Vec<StepMetrics>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("parsing {}", path.display())))
        .collect()
}
