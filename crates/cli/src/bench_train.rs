//! `kiln bench train`: training tokens/s and peak memory of kiln and of PyTorch eager on the CPU,
//! for the same GPT-2-style model, at each thread count, in one run.
//!
//! The model is `kiln_train::model_config(depth, Style::Gpt2, vocab, seq_len)`: width 64 x depth,
//! depth layers of depth 64-wide heads, learned positions, LayerNorm, a 4x GELU(tanh) MLP, biases,
//! tied embeddings, f32. Both sides train it with AdamW (lr 1e-3, betas 0.9/0.95, weight decay
//! 0.1 on the block matrices and 0 elsewhere, gradient clipping at 1.0) on random token ids from a
//! fixed seed. The PyTorch side is `crates/cli/bench/train_peer.py`, written the way a PyTorch user
//! would (separate q/k/v Linears as in kiln, `scaled_dot_product_attention(is_causal=True)`,
//! `F.cross_entropy`, `torch.optim.AdamW` with its default CPU implementation).
//!
//! What is measured, the same rule on both sides: one optimizer step (forward, backward, clip,
//! update, and reading the loss) is timed from start to end; model creation and `--warmup` steps
//! are excluded and tok/s is `batch * seq_len / median step time` over `--steps` timed steps.
//! Each measurement runs in its own child process (kiln with `RAYON_NUM_THREADS`, which candle's
//! kernels and kiln's fused ops obey; PyTorch with `torch.set_num_threads` plus `OMP_NUM_THREADS`
//! and `MKL_NUM_THREADS`), so its peak RSS is that of one training run: `VmHWM` for kiln,
//! `ru_maxrss` for Python. A Python process that only imports torch is measured too, and the
//! table shows PyTorch's total and its excess over that idle process; kiln's idle process is a
//! few MB, so its total is its working set and is compared with PyTorch's excess.
//! kiln and PyTorch alternate per thread count so that both see the same background load.
//!
//! The first step's loss on each side is printed as a sanity check: both start from random
//! weights (different draws), so each should be close to ln(vocab).
//!
//! PyTorch comes from a venv the bench makes under `$KILN_HOME/bench-venv-torch` with the pinned
//! version (PyPI's Linux wheel, which carries CUDA libraries of several GB; only its CPU path
//! runs), or from `--python`.

use anyhow::{bail, Context, Result};
use clap::Args;
use kiln_models::llama::Style;
use kiln_train::{MatrixOptimizer, Optimizers, Rng, TrainSettings};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const PEER_PY: &str = include_str!("../bench/train_peer.py");
/// The PyTorch the bench installs; `--python` may bring another (its version is printed).
const TORCH: &str = "torch==2.15.0";
const PEER_PACKAGES: &[&str] = &[TORCH, "numpy==2.4.6"];

// The optimizer settings both sides use.
const LR: f64 = 1e-3;
const BETA1: f64 = 0.9;
const BETA2: f64 = 0.95;
const WEIGHT_DECAY: f64 = 0.1;
const GRAD_CLIP: f64 = 1.0;
const SEED: u64 = 1234;

#[derive(Args, Debug)]
pub struct BenchTrainArgs {
    /// Thread counts; each runs in its own child process on both sides.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Timed optimizer steps per measurement (tok/s comes from the median step).
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Untimed steps before the timed ones.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Model size dial: width 64 x depth, depth layers, depth heads.
    #[arg(long, default_value_t = 4)]
    depth: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 4096)]
    vocab: usize,
    /// Matmul precision on both sides: f32, or bf16 mixed precision (kiln's bf16 projections;
    /// PyTorch's `torch.autocast("cpu", dtype=torch.bfloat16)` around the forward pass).
    #[arg(long, value_enum, default_value = "f32")]
    precision: crate::train_cmd::PrecisionArg,
    /// A Python interpreter that already has torch, instead of the bench's own venv.
    #[arg(long)]
    python: Option<PathBuf>,
    /// Measure kiln only (no Python, no venv).
    #[arg(long)]
    no_peer: bool,
    /// Write the results as JSON to this file as well.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal: measure kiln once, in this process, and print one JSON line.
    #[arg(long, hide = true)]
    worker: bool,
}

/// One side's measurement at one thread count.
#[derive(Debug, Clone)]
struct Measured {
    params: u64,
    step_s: Vec<f64>,
    first_loss: f64,
    peak_bytes: u64,
    /// kiln: resident memory when the worker started; PyTorch: peak of an idle `import torch`.
    idle_bytes: u64,
}

impl Measured {
    fn median_s(&self) -> f64 {
        median(&self.step_s)
    }

    fn to_json(&self, tokens_per_step: usize) -> Value {
        json!({
            "tok_per_s": tokens_per_step as f64 / self.median_s(),
            "median_step_s": self.median_s(),
            "step_s": self.step_s,
            "first_loss": self.first_loss,
            "peak_rss_bytes": self.peak_bytes,
            "idle_rss_bytes": self.idle_bytes,
        })
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn check(a: &BenchTrainArgs) -> Result<()> {
    if a.threads.is_empty() || a.threads.contains(&0) {
        bail!(
            "--threads must list thread counts of at least 1 (got {:?})",
            a.threads
        );
    }
    if a.steps == 0 {
        bail!("--steps must be at least 1 (the timed steps)");
    }
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if a.seq_len < 2 {
        bail!("--seq-len must be at least 2 (got {})", a.seq_len);
    }
    if a.depth == 0 || a.depth > 64 {
        bail!("--depth must be between 1 and 64 (got {})", a.depth);
    }
    if a.vocab < 2 || a.vocab > u32::MAX as usize {
        bail!("--vocab must be between 2 and 2^32 - 1 (got {})", a.vocab);
    }
    kiln_nn::fused::check_matmul_precision(a.precision.get().matmul())
        .context("--precision bf16")?;
    Ok(())
}

pub fn run(a: BenchTrainArgs) -> Result<()> {
    check(&a)?;
    if a.worker {
        return worker(&a);
    }
    let tokens = a.batch * a.seq_len;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if let Some(&t) = a.threads.iter().find(|&&t| t > cores) {
        eprintln!("note: {t} threads on a machine with {cores} cores oversubscribes it");
    }
    let peer = if a.no_peer {
        None
    } else {
        Some(peer_env(a.python.as_deref()).context("setting up the PyTorch peer")?)
    };
    eprintln!(
        "model: GPT-2 style, depth {} (width {}, {} heads), vocab {}; \
         batch {} x {} = {tokens} tokens per step, {} warm-up + {} timed steps",
        a.depth,
        64 * a.depth,
        a.depth,
        a.vocab,
        a.batch,
        a.seq_len,
        a.warmup,
        a.steps
    );

    let mut rows = Vec::new();
    for &threads in &a.threads {
        let kiln = kiln_in_child(&a, threads)?;
        eprintln!(
            "kiln     {threads} thread(s): {:.0} tok/s (median step {:.3} s), first loss {:.3}, peak {:.0} MB",
            tokens as f64 / kiln.median_s(),
            kiln.median_s(),
            kiln.first_loss,
            mb(kiln.peak_bytes)
        );
        let torch = match &peer {
            None => None,
            Some(p) => {
                let m = run_peer(p, &a, threads)?;
                eprintln!(
                    "PyTorch  {threads} thread(s): {:.0} tok/s (median step {:.3} s), first loss {:.3}, peak {:.0} MB ({:.0} over import)",
                    tokens as f64 / m.median_s(),
                    m.median_s(),
                    m.first_loss,
                    mb(m.peak_bytes),
                    mb(m.peak_bytes.saturating_sub(m.idle_bytes))
                );
                Some(m)
            }
        };
        rows.push((threads, kiln, torch));
    }

    let params = rows.first().map_or(0, |r| r.1.params);
    print!(
        "GPT-2 style, depth {}, vocab {}, {:.2} M parameters, batch {} x {} tokens, {}, AdamW",
        a.depth,
        a.vocab,
        params as f64 / 1e6,
        a.batch,
        a.seq_len,
        match a.precision.get() {
            kiln_train::Precision::F32 => "fp32",
            kiln_train::Precision::Bf16 =>
                "bf16 mixed precision (kiln: bf16 projections; PyTorch: CPU autocast bf16)",
        }
    );
    if let Some(p) = &peer {
        print!("; PyTorch {} ({})", p.torch_version, p.python.display());
    }
    println!("\n");
    println!(
        "| threads | kiln tok/s | PyTorch tok/s | kiln / PyTorch | kiln peak MB | PyTorch peak MB (total / over import) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for (threads, kiln, torch) in &rows {
        let k = tokens as f64 / kiln.median_s();
        let (p, ratio, mem) = match torch {
            Some(m) => {
                let p = tokens as f64 / m.median_s();
                (
                    format!("{p:.0}"),
                    format!("{:.2}", k / p),
                    format!(
                        "{:.0} / {:.0}",
                        mb(m.peak_bytes),
                        mb(m.peak_bytes.saturating_sub(m.idle_bytes))
                    ),
                )
            }
            None => ("n/a".into(), "-".into(), "n/a".into()),
        };
        println!(
            "| {threads} | {k:.0} | {p} | {ratio} | {:.0} | {mem} |",
            mb(kiln.peak_bytes)
        );
    }

    let ln_v = (a.vocab as f64).ln();
    println!();
    if let Some(m) = rows.iter().find_map(|r| r.2.as_ref()) {
        if m.params != params {
            eprintln!(
                "WARNING: kiln's model has {params} parameters and PyTorch's {}: not the same model",
                m.params
            );
        }
    }
    for (threads, kiln, torch) in &rows {
        let t = torch
            .as_ref()
            .map_or("n/a".to_string(), |m| format!("{:.3}", m.first_loss));
        println!(
            "first-step loss at {threads} thread(s): kiln {:.3}, PyTorch {t} (ln {} = {ln_v:.3})",
            kiln.first_loss, a.vocab
        );
        for (side, m) in std::iter::once(("kiln", kiln)).chain(torch.iter().map(|m| ("PyTorch", m)))
        {
            let off = (m.first_loss - ln_v).abs();
            if off.is_nan() || off >= 0.5 {
                eprintln!(
                    "WARNING: {side}'s first loss {:.3} is far from ln({}) = {ln_v:.3}: the model is not what it should be",
                    m.first_loss, a.vocab
                );
            }
        }
    }
    if let Some(kiln) = rows.first().map(|r| &r.1) {
        let idle_torch = rows
            .iter()
            .find_map(|r| r.2.as_ref())
            .map_or("n/a".to_string(), |m| format!("{:.0} MB", mb(m.idle_bytes)));
        println!(
            "memory: peak RSS of each run's own process; an idle kiln process holds {:.0} MB and an \
             idle `import torch` process {idle_torch}, so kiln's total compares with PyTorch's \
             \"over import\" figure",
            mb(kiln.idle_bytes)
        );
    }

    if let Some(out) = &a.json {
        let v = json!({
            "model": {"style": "gpt2", "depth": a.depth, "width": 64 * a.depth, "heads": a.depth,
                      "vocab": a.vocab, "params": params},
            "batch": a.batch, "seq_len": a.seq_len, "tokens_per_step": tokens,
            "warmup": a.warmup, "steps": a.steps, "timing": "median step",
            "precision": a.precision.name(),
            "optimizer": {"name": "adamw", "lr": LR, "beta1": BETA1, "beta2": BETA2,
                          "weight_decay_matrices": WEIGHT_DECAY, "grad_clip": GRAD_CLIP},
            "torch_version": peer.as_ref().map(|p| p.torch_version.clone()),
            "python": peer.as_ref().map(|p| p.python.clone()),
            "rows": rows.iter().map(|(threads, kiln, torch)| json!({
                "threads": threads,
                "kiln": kiln.to_json(tokens),
                "pytorch": torch.as_ref().map(|m| m.to_json(tokens)),
            })).collect::<Vec<_>>(),
        });
        std::fs::write(out, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn model_cfg(a: &BenchTrainArgs) -> kiln_models::Config {
    kiln_train::model_config(a.depth, Style::Gpt2, a.vocab, a.seq_len)
}

/// Runs [`worker`] in a child `kiln` (see [`crate::worker`]).
fn kiln_in_child(a: &BenchTrainArgs, threads: usize) -> Result<Measured> {
    let args = [
        "bench",
        "train",
        "--worker",
        "--threads",
        &threads.to_string(),
        "--steps",
        &a.steps.to_string(),
        "--warmup",
        &a.warmup.to_string(),
        "--batch",
        &a.batch.to_string(),
        "--seq-len",
        &a.seq_len.to_string(),
        "--depth",
        &a.depth.to_string(),
        "--vocab",
        &a.vocab.to_string(),
        "--precision",
        a.precision.name(),
    ];
    let v = crate::worker::run_kiln_json(&args, threads)?;
    parse_measured(&v, "kiln worker")
}

fn parse_measured(v: &Value, who: &str) -> Result<Measured> {
    let step_s: Vec<f64> = v["step_s"]
        .as_array()
        .with_context(|| format!("{who}: no step_s in {v}"))?
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    let first_loss = v["losses"][0]
        .as_f64()
        .with_context(|| format!("{who}: no losses in {v}"))?;
    let kib = |k: &str| v[k].as_u64().unwrap_or(0) * 1024;
    Ok(Measured {
        params: v["params"].as_u64().unwrap_or(0),
        step_s,
        first_loss,
        peak_bytes: kib("peak_rss_kib"),
        idle_bytes: kib("idle_rss_kib"),
    })
}

/// A line of `/proc/self/status` (`VmHWM`, `VmRSS`) in KiB; 0 where there is no procfs.
fn proc_status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':').map(str::to_owned))
        })
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The child side of [`kiln_in_child`]: build, warm up, time, print one JSON object.
fn worker(a: &BenchTrainArgs) -> Result<()> {
    let idle_kib = proc_status_kib("VmRSS");
    let (b, t) = (a.batch, a.seq_len);
    let cfg = model_cfg(a);
    let (model, params) = kiln_train::init_model(&cfg, SEED)?;
    let mut settings = TrainSettings::for_depth(a.depth);
    settings.style = "gpt2".into();
    settings.optimizer = MatrixOptimizer::Adamw;
    settings.seq_len = t;
    settings.batch = b;
    settings.lr = LR;
    settings.beta1 = BETA1;
    settings.beta2 = BETA2;
    settings.weight_decay = WEIGHT_DECAY;
    settings.grad_clip = GRAD_CLIP;
    settings.precision = a.precision.get();
    settings.check()?;
    let mut opt = Optimizers::new(&params, &settings)?;

    // Random windows of t + 1 ids; inputs and targets are the window shifted by one.
    let mut rng = Rng::new(SEED);
    let batches: Vec<(Vec<u32>, Vec<u32>)> = (0..a.warmup + a.steps)
        .map(|_| {
            let mut x = Vec::with_capacity(b * t);
            let mut y = Vec::with_capacity(b * t);
            for _ in 0..b {
                let w: Vec<u32> = (0..=t).map(|_| rng.below(a.vocab as u64) as u32).collect();
                x.extend_from_slice(&w[..t]);
                y.extend_from_slice(&w[1..]);
            }
            (x, y)
        })
        .collect();

    let mut step_s = Vec::with_capacity(a.steps);
    let mut losses = Vec::with_capacity(batches.len());
    kiln_nn::fused::with_matmul_precision(settings.precision.matmul(), || -> Result<()> {
        for (i, micro) in batches.into_iter().enumerate() {
            let t0 = Instant::now();
            let (loss, _norm) = kiln_train::train_step(
                &model,
                &mut opt,
                std::slice::from_ref(&micro),
                b,
                t,
                GRAD_CLIP,
            )?;
            let dt = t0.elapsed().as_secs_f64();
            losses.push(loss as f64);
            if i >= a.warmup {
                step_s.push(dt);
            }
        }
        Ok(())
    })??;
    println!(
        "{}",
        json!({
            "threads": rayon::current_num_threads(),
            "params": params.count(),
            "step_s": step_s,
            "losses": losses,
            "peak_rss_kib": proc_status_kib("VmHWM"),
            "idle_rss_kib": idle_kib,
        })
    );
    Ok(())
}

/// The interpreter and script of the PyTorch side.
struct Peer {
    python: PathBuf,
    script: PathBuf,
    torch_version: String,
}

/// `--python` as given, or the bench's own venv, made (once) with the pinned packages.
fn peer_env(python: Option<&Path>) -> Result<Peer> {
    let store = kiln_assets::Store::from_env()?;
    let python = match python {
        Some(p) => p.to_path_buf(),
        // Not quiet: pip's own progress is the progress bar of this long step.
        None => {
            crate::venv::ensure(
                "bench-venv-torch",
                PEER_PACKAGES,
                "; PyPI's Linux torch wheel brings several GB of CUDA libraries, so this takes a while once",
                false,
            )?
            .1
        }
    };
    let out = Command::new(&python)
        .args(["-c", "import torch; print(torch.__version__)"])
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "{} cannot import torch: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let torch_version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let pinned = TORCH.trim_start_matches("torch==");
    if torch_version.split('+').next() != Some(pinned) {
        eprintln!(
            "note: {} has torch {torch_version}; the bench pins {pinned}",
            python.display()
        );
    }
    let dir = store.home().join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let script = dir.join("train_peer.py");
    std::fs::write(&script, PEER_PY).with_context(|| format!("writing {}", script.display()))?;
    Ok(Peer {
        python,
        script,
        torch_version,
    })
}

/// One Python child per measurement: the idle `import torch` process, then the training run.
fn run_peer(p: &Peer, a: &BenchTrainArgs, threads: usize) -> Result<Measured> {
    let call = |args: Value| -> Result<Value> {
        let out = Command::new(&p.python)
            .arg(&p.script)
            .arg(args.to_string())
            .env("OMP_NUM_THREADS", threads.to_string())
            .env("MKL_NUM_THREADS", threads.to_string())
            .output()
            .with_context(|| format!("running {}", p.python.display()))?;
        if !out.status.success() {
            bail!(
                "the PyTorch peer ({threads} threads) failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).context("reading the PyTorch peer's JSON")
    };
    let idle = call(json!({"mode": "idle", "threads": threads}))?;
    let v = call(json!({
        "mode": "train", "threads": threads, "seed": SEED, "vocab": a.vocab,
        "seq_len": a.seq_len, "batch": a.batch, "depth": a.depth,
        "warmup": a.warmup, "steps": a.steps, "lr": LR, "beta1": BETA1, "beta2": BETA2,
        "weight_decay": WEIGHT_DECAY, "grad_clip": GRAD_CLIP,
        "precision": a.precision.name(),
    }))?;
    let mut m = parse_measured(&v, "PyTorch peer")?;
    m.idle_bytes = idle["peak_rss_kib"].as_u64().unwrap_or(0) * 1024;
    Ok(m)
}
