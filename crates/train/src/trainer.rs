//! The pretraining loop: model sizing by one dial, parameter groups and optimizers, gradient
//! accumulation and clipping, schedules, evaluation (loss and bits per byte), metrics and
//! resumable checkpoints.
//!
//! **Determinism:** with the same settings, data and thread count a run gives bit-identical
//! losses: the data loader is a counter-based RNG, initialisation a seeded xoshiro stream in the
//! model's parameter order, and every kernel splits its reductions the same way each time.
//! **Exact resume:** a checkpoint holds everything that affects later steps (weights, optimizer
//! buffers and step counts, the loader's counter); nothing else carries state between steps, so
//! a run stopped and resumed any number of times computes the same losses as one done in one go.

use crate::checkpoint::{self, FileSum};
use crate::data::{eval_windows, Dataset, Loader, LoaderState, Split};
use crate::rng::Rng;
use crate::schedule::Schedule;
use crate::{Result, TrainError};
use kiln_models::llama::Style;
use kiln_models::{Config, Llama};
use kiln_nn::candle_core::backprop::GradStore;
use kiln_nn::candle_core::{DType, Device, Tensor, Var};
use kiln_nn::RopeScaling;
use kiln_nn::{AdamW, AdamWConfig, Muon, MuonConfig, OptimState};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Which optimizer updates the weight matrices of the blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatrixOptimizer {
    /// Muon for the block matrices, AdamW for embeddings, norms and biases (nanochat, modded-nanogpt).
    Muon,
    /// AdamW for everything (weight decay on matrices only).
    Adamw,
}

/// The arithmetic of the dense projections' products (forward and backward).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// f32 everywhere.
    #[default]
    F32,
    /// Mixed precision: the projections' operands rounded to bf16, products summed in f32;
    /// weights, gradients, optimizer state, norms, attention and the loss stay f32. Needs
    /// AVX-512 BF16 (`kiln_nn::fused::bf16_available`).
    Bf16,
}

impl Precision {
    pub fn matmul(self) -> kiln_nn::fused::MatmulPrecision {
        match self {
            Precision::F32 => kiln_nn::fused::MatmulPrecision::F32,
            Precision::Bf16 => kiln_nn::fused::MatmulPrecision::Bf16,
        }
    }

    /// Runs `f` with the model's projections in this precision (an error if the CPU lacks it).
    pub fn scope<R>(self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        kiln_nn::fused::with_matmul_precision(self.matmul(), f)?
    }
}

/// Everything that defines a run. A resumed run must be given the same settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    pub depth: usize,
    pub style: String,
    pub seq_len: usize,
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// The length of the whole run; the schedule depends on it.
    pub steps: u64,
    pub seed: u64,
    pub optimizer: MatrixOptimizer,
    /// AdamW's learning rate (embeddings, norms, biases; and matrices with `adamw`).
    pub lr: f64,
    /// Muon's learning rate for the matrices.
    pub matrix_lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub schedule: Schedule,
    /// Global gradient-norm clip; 0 turns it off.
    pub grad_clip: f64,
    /// Evaluate (val loss, bpb, samples) every this many steps and at the end; 0: only at the end.
    pub eval_every: u64,
    /// Validation windows per evaluation.
    pub eval_windows: usize,
    /// Checkpoint every this many steps (and always at the end or when stopped); 0: only then.
    pub checkpoint_every: u64,
    /// The sha256 of the tokenizer the data was prepared with.
    pub tokenizer_sha256: String,
    /// Matmul precision (runs written before this field existed are f32).
    #[serde(default)]
    pub precision: Precision,
}

impl TrainSettings {
    /// Defaults for a model of `depth`, nanochat style: one dial sets width, heads and the
    /// learning rates.
    pub fn for_depth(depth: usize) -> Self {
        Self {
            depth,
            style: "llama".into(),
            seq_len: 128,
            batch: 16,
            grad_accum: 1,
            steps: 1000,
            seed: 0,
            optimizer: MatrixOptimizer::Muon,
            // AdamW steps shrink with width (muP-like 1/sqrt(d) scaling around d = 256).
            lr: 3e-3 * (256.0 / (64.0 * depth.max(1) as f64)).sqrt(),
            matrix_lr: 0.02,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.95,
            schedule: Schedule::Wsd {
                warmup: 20,
                decay_fraction: 0.3,
                min_ratio: 0.0,
            },
            grad_clip: 1.0,
            eval_every: 100,
            eval_windows: 64,
            checkpoint_every: 200,
            tokenizer_sha256: String::new(),
            precision: Precision::F32,
        }
    }

    pub fn style(&self) -> Result<Style> {
        match self.style.as_str() {
            "llama" => Ok(Style::Llama),
            "gpt2" => Ok(Style::Gpt2),
            other => Err(TrainError::Settings(format!(
                "style `{other}` is unknown (llama or gpt2)"
            ))),
        }
    }

    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Settings(m));
        if self.depth == 0 || self.depth > 64 {
            return bad(format!("depth {} must be between 1 and 64", self.depth));
        }
        if self.seq_len < 2 || self.batch == 0 || self.grad_accum == 0 || self.steps == 0 {
            return bad(format!(
                "seq_len {} (>= 2), batch {}, grad_accum {} and steps {} must be positive",
                self.seq_len, self.batch, self.grad_accum, self.steps
            ));
        }
        for (name, v) in [
            ("lr", self.lr),
            ("matrix_lr", self.matrix_lr),
            ("weight_decay", self.weight_decay),
            ("grad_clip", self.grad_clip),
        ] {
            if !v.is_finite() || v < 0.0 {
                return bad(format!("{name} {v} must be finite and >= 0"));
            }
        }
        for (name, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(format!("{name} {v} must be in [0, 1)"));
            }
        }
        self.style()?;
        kiln_nn::fused::check_matmul_precision(self.precision.matmul())?;
        Ok(())
    }

    pub fn tokens_per_step(&self) -> usize {
        self.batch * self.grad_accum * self.seq_len
    }
}

/// The model config a depth implies: width 64 x depth, 64-wide heads, as many layers as the
/// depth, a 4x GELU MLP (GPT-2) or an 8/3x SwiGLU rounded to 64 (LLaMA), tied embeddings.
pub fn model_config(depth: usize, style: Style, vocab_size: usize, seq_len: usize) -> Config {
    let hidden = 64 * depth;
    let intermediate = match style {
        Style::Gpt2 => 4 * hidden,
        Style::Llama => (8 * hidden / 3).div_ceil(64) * 64,
    };
    let gpt2 = style == Style::Gpt2;
    Config {
        vocab_size,
        hidden_size: hidden,
        intermediate_size: intermediate,
        num_layers: depth,
        num_heads: depth,
        num_kv_heads: depth,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: seq_len,
        tie_word_embeddings: true,
        qkv_bias: gpt2,
        o_bias: gpt2,
        mlp_bias: gpt2,
        sliding_window: None,
        sliding_window_from_layer: 0,
        style,
    }
}

/// The model's parameters as variables, under their checkpoint names, in creation order.
pub struct Params {
    pub names: Vec<String>,
    pub vars: Vec<Var>,
}

impl Params {
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.names
            .iter()
            .cloned()
            .zip(self.vars.iter().map(|v| v.as_tensor().clone()))
            .collect()
    }

    pub fn count(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }
}

/// Builds the model through `Llama::init`, giving each tensor it names (in the model's creation
/// order) a variable with the values `data(name, shape)` returns.
fn build_with_vars(
    cfg: &Config,
    mut data: impl FnMut(&str, &[usize]) -> kiln_nn::Result<Vec<f32>> + 'static,
) -> Result<(Llama, Params)> {
    let made: Rc<RefCell<Vec<(String, Var)>>> = Rc::default();
    let sink = made.clone();
    let make: kiln_nn::MakeTensor = Box::new(move |name: &str, shape: &[usize]| {
        let var = Var::from_vec(data(name, shape)?, shape, &Device::Cpu).map_err(|source| {
            kiln_nn::NnError::Candle {
                op: "model variable",
                source,
            }
        })?;
        let t = var.as_tensor().clone();
        sink.borrow_mut().push((name.to_string(), var));
        Ok(t)
    });
    let model = Llama::init(cfg.clone(), make)?;
    let made = std::mem::take(&mut *made.borrow_mut());
    let (names, vars) = made.into_iter().unzip();
    Ok((model, Params { names, vars }))
}

/// A freshly initialised model: N(0, 0.02) for matrices and embeddings, the residual output
/// projections (`o_proj`, `down_proj`) scaled by 1/sqrt(2 x layers) (GPT-2), norm weights 1,
/// biases 0. The draws follow the model's parameter order from one seeded stream.
pub fn init_model(cfg: &Config, seed: u64) -> Result<(Llama, Params)> {
    let mut rng = Rng::new(seed);
    let layers = cfg.num_layers;
    build_with_vars(cfg, move |name, shape| {
        let n: usize = shape.iter().product();
        Ok(if name.ends_with(".bias") {
            vec![0.0; n]
        } else if name.contains("norm") {
            vec![1.0; n]
        } else {
            let std = if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
                0.02 / ((2 * layers) as f32).sqrt()
            } else {
                0.02
            };
            (0..n).map(|_| rng.normal_f32() * std).collect()
        })
    })
}

/// A model whose variables start from `tensors` (checkpoint names): for resuming and for tests
/// against a reference implementation's initial weights. Every tensor the config implies must be
/// there with its shape, and nothing else; the parameters come in creation order, as from
/// [`init_model`], so optimizer state lines up with a fresh run's.
pub fn model_from_tensors(
    cfg: &Config,
    tensors: &HashMap<String, Tensor>,
) -> Result<(Llama, Params)> {
    let source = tensors.clone();
    let out = build_with_vars(cfg, move |name, shape| {
        let t = source
            .get(name)
            .ok_or_else(|| kiln_nn::NnError::MissingTensor {
                name: name.into(),
                path: "<checkpoint>".into(),
            })?;
        if t.dims() != shape {
            return Err(kiln_nn::NnError::TensorShape {
                name: name.into(),
                path: "<checkpoint>".into(),
                expected: format!("{shape:?}"),
                got: format!("{:?}", t.dims()),
            });
        }
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|source| kiln_nn::NnError::Candle {
                op: "checkpoint tensor to f32",
                source,
            })
    })?;
    if let Some(extra) = tensors.keys().find(|k| !out.1.names.contains(k)) {
        return Err(TrainError::Settings(format!(
            "the checkpoint has parameter `{extra}` that the model config does not"
        )));
    }
    Ok(out)
}

/// Is this parameter a matrix of a block (Muon's share)?
fn is_block_matrix(name: &str) -> bool {
    name.starts_with("model.layers.") && name.ends_with("_proj.weight")
}

/// One optimizer and the base learning rate the schedule multiplies.
enum Group {
    AdamW(AdamW, f64),
    Muon(Muon, f64),
}

/// The optimizers of a run, over disjoint groups of its parameters.
pub struct Optimizers {
    groups: Vec<Group>,
    params: Vec<Var>,
}

impl Optimizers {
    pub fn new(params: &Params, s: &TrainSettings) -> Result<Self> {
        let mut matrices = Vec::new();
        let mut others = Vec::new();
        for (n, v) in params.names.iter().zip(&params.vars) {
            if is_block_matrix(n) {
                matrices.push(v.clone());
            } else {
                others.push(v.clone());
            }
        }
        let adamw = |params: Vec<Var>, wd: f64, lr: f64| -> Result<Group> {
            let cfg = AdamWConfig {
                lr,
                beta1: s.beta1,
                beta2: s.beta2,
                eps: 1e-8,
                weight_decay: wd,
            };
            Ok(Group::AdamW(AdamW::new(params, cfg)?, lr))
        };
        let mut groups = vec![adamw(others, 0.0, s.lr)?];
        match s.optimizer {
            MatrixOptimizer::Adamw => groups.push(adamw(matrices, s.weight_decay, s.lr)?),
            MatrixOptimizer::Muon => {
                let cfg = MuonConfig {
                    lr: s.matrix_lr,
                    momentum: 0.95,
                    nesterov: true,
                    ns_steps: 5,
                    weight_decay: s.weight_decay,
                };
                groups.push(Group::Muon(Muon::new(matrices, cfg)?, s.matrix_lr));
            }
        }
        Ok(Self {
            groups,
            params: params.vars.clone(),
        })
    }

    /// Sets every group's learning rate to its base times `multiplier`.
    pub fn set_multiplier(&mut self, multiplier: f64) -> Result<()> {
        for g in &mut self.groups {
            match g {
                Group::AdamW(o, base) => o.set_lr(*base * multiplier)?,
                Group::Muon(o, base) => o.set_lr(*base * multiplier)?,
            }
        }
        Ok(())
    }

    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        for g in &mut self.groups {
            match g {
                Group::AdamW(o, _) => o.step(grads)?,
                Group::Muon(o, _) => o.step(grads)?,
            }
        }
        Ok(())
    }

    /// Every group's state as named tensors (`group{i}.{name}`).
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, g) in self.groups.iter().enumerate() {
            let st = match g {
                Group::AdamW(o, _) => o.state(),
                Group::Muon(o, _) => o.state(),
            };
            for (k, v) in st.to_tensors()? {
                out.insert(format!("group{i}.{k}"), v);
            }
        }
        Ok(out)
    }

    pub fn load_state_tensors(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (i, g) in self.groups.iter_mut().enumerate() {
            let prefix = format!("group{i}.");
            let mine: HashMap<String, Tensor> = tensors
                .iter()
                .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|k| (k.to_string(), v.clone())))
                .collect();
            let st = OptimState::from_tensors(&mine)?;
            match g {
                Group::AdamW(o, _) => o.load_state(st)?,
                Group::Muon(o, _) => o.load_state(st)?,
            }
        }
        Ok(())
    }
}

fn candle(op: &'static str) -> impl Fn(kiln_nn::candle_core::Error) -> TrainError {
    move |source| TrainError::Nn(kiln_nn::NnError::Candle { op, source })
}

/// One optimizer step over `micro` batches (each `batch x seq_len` inputs and targets):
/// forward, backward (loss scaled by 1/micro so gradients are the mean), optional clipping,
/// update. Returns the mean loss and the gradient norm before clipping.
pub fn train_step(
    model: &Llama,
    opt: &mut Optimizers,
    micro: &[(Vec<u32>, Vec<u32>)],
    batch: usize,
    seq_len: usize,
    grad_clip: f64,
) -> Result<(f32, f64)> {
    let n = micro.len().max(1);
    let mut acc: Vec<Option<Tensor>> = vec![None; opt.params.len()];
    let mut loss_sum = 0f32;
    for (x, y) in micro {
        let xs = Tensor::from_slice(x, (batch, seq_len), &Device::Cpu).map_err(candle("inputs"))?;
        let ys =
            Tensor::from_slice(y, (batch, seq_len), &Device::Cpu).map_err(candle("targets"))?;
        let loss = model.loss(&xs, &ys)?;
        loss_sum += loss.to_scalar::<f32>().map_err(candle("loss value"))?;
        let scaled = if n > 1 {
            (loss * (1.0 / n as f64)).map_err(candle("scale loss"))?
        } else {
            loss
        };
        let mut grads = scaled.backward().map_err(candle("backward"))?;
        for (slot, v) in acc.iter_mut().zip(&opt.params) {
            if let Some(g) = grads.remove(v.as_tensor()) {
                *slot = Some(match slot.take() {
                    None => g,
                    Some(prev) => (prev + g).map_err(candle("accumulate grads"))?,
                });
            }
        }
    }
    let mut store = GradStore::default();
    for (slot, v) in acc.into_iter().zip(&opt.params) {
        if let Some(g) = slot {
            store.insert(v.as_tensor(), g);
        }
    }
    // Without clipping the largest finite bound only measures the norm.
    let bound = if grad_clip > 0.0 { grad_clip } else { f64::MAX };
    let norm = kiln_nn::clip_grad_norm(&opt.params, &mut store, bound)?;
    opt.step(&store)?;
    Ok((loss_sum / n as f32, norm))
}

/// Per-token losses (nats) of `targets` given `ids`, both (rows x seq_len) flattened.
pub fn token_losses(
    model: &Llama,
    ids: &[u32],
    targets: &[u32],
    seq_len: usize,
) -> Result<Vec<f32>> {
    let rows = ids.len() / seq_len;
    let xs =
        Tensor::from_slice(ids, (rows, seq_len), &Device::Cpu).map_err(candle("eval inputs"))?;
    let logits = model.forward_train(&xs)?.detach();
    let v = logits.dim(2).map_err(candle("eval logits"))?;
    let flat: Vec<f32> = logits
        .flatten_all()
        .and_then(|l| l.to_vec1())
        .map_err(candle("eval logits"))?;
    Ok(flat
        .chunks_exact(v)
        .zip(targets)
        .map(|(row, &t)| {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = m + row
                .iter()
                .map(|&x| ((x - m) as f64).exp())
                .sum::<f64>()
                .ln() as f32;
            lse - row[t as usize]
        })
        .collect())
}

/// Validation loss (mean nats per token) and bits per byte: the summed loss over tokens that
/// stand for text, in bits, over the UTF-8 bytes those tokens decode to. Special tokens (no
/// bytes, e.g. the end-of-text separator) count in neither.
pub fn evaluate(
    model: &Llama,
    windows: &[(Vec<u32>, Vec<u32>)],
    token_bytes: &[u32],
    seq_len: usize,
) -> Result<(f64, f64)> {
    let (mut loss_sum, mut n, mut bits, mut bytes) = (0f64, 0usize, 0f64, 0u64);
    // Eight windows a forward pass keeps memory bounded.
    for chunk in windows.chunks(8) {
        let ids: Vec<u32> = chunk.iter().flat_map(|w| w.0.iter().copied()).collect();
        let tg: Vec<u32> = chunk.iter().flat_map(|w| w.1.iter().copied()).collect();
        let losses = token_losses(model, &ids, &tg, seq_len)?;
        for (&l, &t) in losses.iter().zip(&tg) {
            loss_sum += l as f64;
            n += 1;
            let b = token_bytes.get(t as usize).copied().unwrap_or(0);
            if b > 0 {
                bits += l as f64 / std::f64::consts::LN_2;
                bytes += b as u64;
            }
        }
    }
    Ok((loss_sum / n.max(1) as f64, bits / bytes.max(1) as f64))
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f32,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_bpb: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub samples: Vec<String>,
}

/// What the caller sees while a run goes (the CLI draws a progress bar from it).
pub trait Observer {
    fn on_start(&mut self, _first_step: u64, _total: u64, _params: usize) {}
    fn on_step(&mut self, _m: &StepMetrics) {}
    fn on_checkpoint(&mut self, _step: u64, _path: &Path) {}
}

/// Makes a few text samples from the model at eval time (the CLI supplies one built on the
/// engine; the trainer knows no sampling).
pub type Sampler<'a> = dyn FnMut(&Llama) -> Vec<String> + 'a;

#[derive(Debug, Serialize, Deserialize)]
struct CheckpointState {
    step: u64,
    loader: LoaderState,
    settings: TrainSettings,
    files: Vec<FileSum>,
}

/// How a call to [`Trainer::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The run reached its last step.
    Finished,
    /// `--until-step` or a stop request ended it early, after a checkpoint.
    Stopped { step: u64 },
}

/// What a run resumes from: model, its variables, optimizers, loader, step, elapsed seconds.
type Restored<'a> = (Llama, Params, Optimizers, Loader<'a>, u64, f64);

/// A training run in a folder.
pub struct Trainer<'a> {
    settings: TrainSettings,
    cfg: Config,
    model: Llama,
    params: Params,
    opt: Optimizers,
    loader: Loader<'a>,
    ds: &'a Dataset,
    step: u64,
    run: PathBuf,
    token_bytes: Vec<u32>,
    windows: Vec<(Vec<u32>, Vec<u32>)>,
    elapsed_before: f64,
}

impl<'a> Trainer<'a> {
    /// Starts a new run in `run` (which must not hold a checkpoint yet), or with `resume`
    /// continues the run there from its last checkpoint; `token_bytes[id]` is the number of
    /// text bytes of each token (0 for special tokens).
    pub fn open(
        ds: &'a Dataset,
        mut settings: TrainSettings,
        run: &Path,
        resume: bool,
        token_bytes: Vec<u32>,
    ) -> Result<Self> {
        settings.tokenizer_sha256 = ds.meta().tokenizer_sha256.clone();
        settings.check()?;
        let cfg = model_config(
            settings.depth,
            settings.style()?,
            ds.meta().vocab_size,
            settings.seq_len,
        );
        fs::create_dir_all(run).map_err(|e| TrainError::io(run, e))?;
        let run_json = run.join("run.json");
        let latest = checkpoint::latest(run)?;
        let windows = eval_windows(ds, Split::Val, settings.seq_len, settings.eval_windows);
        if windows.is_empty() {
            return Err(TrainError::Settings(format!(
                "the validation split has fewer than {} tokens, too few for one window of seq_len {}",
                settings.seq_len + 1,
                settings.seq_len
            )));
        }
        let (model, params, opt, loader, step, elapsed_before) = if !resume {
            if latest.is_some() {
                return Err(TrainError::Settings(format!(
                    "{} already holds a run with checkpoints; pass --resume to continue it or choose another --out",
                    run.display()
                )));
            }
            let (model, params) = init_model(&cfg, settings.seed)?;
            let opt = Optimizers::new(&params, &settings)?;
            let loader = Loader::new(
                ds,
                Split::Train,
                settings.seq_len,
                settings.batch,
                settings.seed,
            )?;
            let json = serde_json::to_vec_pretty(&settings).map_err(TrainError::json)?;
            checkpoint::write_atomic(&run_json, &json)?;
            // A new run starts a new metrics file.
            checkpoint::write_atomic(&run.join("metrics.jsonl"), b"")?;
            (model, params, opt, loader, 0, 0.0)
        } else {
            Self::restore(ds, &settings, &cfg, run, latest)?
        };
        Ok(Self {
            settings,
            cfg,
            model,
            params,
            opt,
            loader,
            ds,
            step,
            run: run.to_path_buf(),
            token_bytes,
            windows,
            elapsed_before,
        })
    }

    /// The state of the run in `run` at its last checkpoint `latest`: model, optimizers,
    /// loader, step and the elapsed time recorded there.
    fn restore(
        ds: &'a Dataset,
        settings: &TrainSettings,
        cfg: &Config,
        run: &Path,
        latest: Option<PathBuf>,
    ) -> Result<Restored<'a>> {
        let Some(dir) = latest else {
            return Err(TrainError::Settings(format!(
                "--resume: {} has no checkpoint to resume from",
                run.display()
            )));
        };
        let state_path = dir.join("state.json");
        let text = fs::read(&state_path).map_err(|e| TrainError::io(&state_path, e))?;
        let state: CheckpointState =
            serde_json::from_slice(&text).map_err(|e| TrainError::Checkpoint {
                path: dir.clone(),
                reason: format!("state.json is not valid: {e}"),
            })?;
        if state.settings != *settings {
            return Err(TrainError::Settings(format!(
                "--resume with different settings than the run in {}: it was started with {}, now asked for {}",
                run.display(),
                describe_diff(&state.settings, settings),
                describe_diff(settings, &state.settings),
            )));
        }
        checkpoint::verify_files(&dir, &state.files)?;
        let load = |name: &str| {
            let p = dir.join(name);
            kiln_nn::candle_core::safetensors::load(&p, &Device::Cpu).map_err(|e| {
                TrainError::Checkpoint {
                    path: dir.clone(),
                    reason: format!("{name}: {e}"),
                }
            })
        };
        let tensors = load("model.safetensors")?;
        let (model, params) = model_from_tensors(cfg, &tensors)?;
        let mut opt = Optimizers::new(&params, settings)?;
        opt.load_state_tensors(&load("optimizer.safetensors")?)?;
        let loader = Loader::restore(
            ds,
            Split::Train,
            settings.seq_len,
            settings.batch,
            state.loader.clone(),
        )?;
        let elapsed_before = truncate_metrics(&run.join("metrics.jsonl"), state.step)?;
        Ok((model, params, opt, loader, state.step, elapsed_before))
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn settings(&self) -> &TrainSettings {
        &self.settings
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn param_count(&self) -> usize {
        self.params.count()
    }

    /// Validation loss and bits per byte of the current weights.
    pub fn evaluate(&self) -> Result<(f64, f64)> {
        self.settings.precision.scope(|| {
            evaluate(
                &self.model,
                &self.windows,
                &self.token_bytes,
                self.settings.seq_len,
            )
        })
    }

    /// Trains until the run's last step, until step `until` (then checkpoints and stops), or
    /// until `stop` is set (checked after every step).
    pub fn run(
        &mut self,
        until: Option<u64>,
        stop: &AtomicBool,
        obs: &mut dyn Observer,
        sampler: &mut Sampler<'_>,
    ) -> Result<Outcome> {
        // Steps, evaluations and samples all in the run's precision.
        let precision = self.settings.precision;
        precision.scope(|| self.run_steps(until, stop, obs, sampler))
    }

    fn run_steps(
        &mut self,
        until: Option<u64>,
        stop: &AtomicBool,
        obs: &mut dyn Observer,
        sampler: &mut Sampler<'_>,
    ) -> Result<Outcome> {
        let s = self.settings.clone();
        obs.on_start(self.step, s.steps, self.params.count());
        let metrics_path = self.run.join("metrics.jsonl");
        let mut metrics = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&metrics_path)
            .map_err(|e| TrainError::io(&metrics_path, e))?;
        let started = Instant::now();
        while self.step < s.steps {
            let t0 = Instant::now();
            let mult = s.schedule.multiplier(self.step, s.steps);
            self.opt.set_multiplier(mult)?;
            let micro: Vec<_> = (0..s.grad_accum)
                .map(|_| self.loader.next_batch())
                .collect();
            let (loss, grad_norm) = train_step(
                &self.model,
                &mut self.opt,
                &micro,
                s.batch,
                s.seq_len,
                s.grad_clip,
            )?;
            if !loss.is_finite() {
                return Err(TrainError::Diverged {
                    step: self.step + 1,
                    loss,
                });
            }
            self.step += 1;
            let dt = t0.elapsed().as_secs_f64();
            let mut m = StepMetrics {
                step: self.step,
                loss,
                lr: s.lr * mult,
                grad_norm,
                tokens_per_s: s.tokens_per_step() as f64 / dt.max(1e-9),
                elapsed_s: self.elapsed_before + started.elapsed().as_secs_f64(),
                val_loss: None,
                val_bpb: None,
                samples: Vec::new(),
            };
            let last = self.step == s.steps;
            if last || (s.eval_every > 0 && self.step.is_multiple_of(s.eval_every)) {
                let (vl, bpb) = self.evaluate()?;
                m.val_loss = Some(vl);
                m.val_bpb = Some(bpb);
                m.samples = sampler(&self.model);
            }
            let mut line = serde_json::to_string(&m).map_err(TrainError::json)?;
            line.push('\n');
            metrics
                .write_all(line.as_bytes())
                .and_then(|_| metrics.flush())
                .map_err(|e| TrainError::io(&metrics_path, e))?;
            obs.on_step(&m);
            let stopping = until.is_some_and(|u| self.step >= u) || stop.load(Ordering::SeqCst);
            let periodic = s.checkpoint_every > 0 && self.step.is_multiple_of(s.checkpoint_every);
            if last || stopping || periodic {
                metrics
                    .sync_data()
                    .map_err(|e| TrainError::io(&metrics_path, e))?;
                let path = self.save_checkpoint()?;
                obs.on_checkpoint(self.step, &path);
            }
            if last {
                self.save_model(&self.run.join("model"))?;
                return Ok(Outcome::Finished);
            }
            if stopping {
                return Ok(Outcome::Stopped { step: self.step });
            }
        }
        Ok(Outcome::Finished)
    }

    /// Writes `model.safetensors`, `config.json` and `tokenizer.json` into `staging`.
    fn write_model_files(&self, staging: &Path) -> Result<()> {
        let model_path = staging.join("model.safetensors");
        kiln_nn::candle_core::safetensors::save(&self.params.tensors(), &model_path)
            .map_err(candle("save model"))?;
        let cfg = self.cfg.to_hf_json()?;
        let bytes = serde_json::to_vec_pretty(&cfg).map_err(TrainError::json)?;
        fs::write(staging.join("config.json"), bytes).map_err(|e| TrainError::io(staging, e))?;
        let tok = self.ds.tokenizer_path();
        fs::copy(&tok, staging.join("tokenizer.json")).map_err(|e| TrainError::io(&tok, e))?;
        Ok(())
    }

    /// The final model as a Hugging Face style folder (`kiln generate -m RUN/model`).
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        let staging = checkpoint::staging_dir(dir)?;
        self.write_model_files(&staging)?;
        checkpoint::publish_dir(&staging, dir)
    }

    /// Writes a complete checkpoint atomically, points LATEST at it, and keeps the newest two.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let ckpts = self.run.join("checkpoints");
        let name = format!("step-{:06}", self.step);
        let dir = ckpts.join(&name);
        let staging = checkpoint::staging_dir(&dir)?;
        self.write_model_files(&staging)?;
        let opt_path = staging.join("optimizer.safetensors");
        kiln_nn::candle_core::safetensors::save(&self.opt.state_tensors()?, &opt_path)
            .map_err(candle("save optimizer"))?;
        let mut files = Vec::new();
        for f in [
            "model.safetensors",
            "config.json",
            "tokenizer.json",
            "optimizer.safetensors",
        ] {
            let (sha256, bytes) = checkpoint::sha256_file(&staging.join(f))?;
            files.push(FileSum {
                name: f.into(),
                sha256,
                bytes,
            });
        }
        let state = CheckpointState {
            step: self.step,
            loader: self.loader.state(),
            settings: self.settings.clone(),
            files,
        };
        let json = serde_json::to_vec_pretty(&state).map_err(TrainError::json)?;
        fs::write(staging.join("state.json"), json).map_err(|e| TrainError::io(&staging, e))?;
        checkpoint::publish_dir(&staging, &dir)?;
        checkpoint::write_atomic(&ckpts.join("LATEST"), name.as_bytes())?;
        // Keep the newest two complete checkpoints.
        let mut old: Vec<PathBuf> = fs::read_dir(&ckpts)
            .map_err(|e| TrainError::io(&ckpts, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-") && n != name)
            })
            .collect();
        old.sort();
        let keep = 1;
        if old.len() > keep {
            for p in &old[..old.len() - keep] {
                let _ = fs::remove_dir_all(p);
            }
        }
        Ok(dir)
    }
}

/// Keeps the metrics lines of steps up to `step` (a resumed run rewrites the rest) and returns
/// the elapsed time recorded at that step.
fn truncate_metrics(path: &Path, step: u64) -> Result<f64> {
    let f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0.0),
        Err(e) => return Err(TrainError::io(path, e)),
    };
    let mut kept = String::new();
    let mut elapsed = 0.0;
    for line in std::io::BufReader::new(f).lines() {
        let line = line.map_err(|e| TrainError::io(path, e))?;
        // A line cut short by a kill is dropped, like every line after the checkpoint.
        let Ok(m) = serde_json::from_str::<StepMetrics>(&line) else {
            continue;
        };
        if m.step <= step {
            elapsed = m.elapsed_s;
            kept.push_str(&line);
            kept.push('\n');
        }
    }
    checkpoint::write_atomic(path, kept.as_bytes())?;
    Ok(elapsed)
}

fn describe_diff(a: &TrainSettings, b: &TrainSettings) -> String {
    let (Ok(ja), Ok(jb)) = (serde_json::to_value(a), serde_json::to_value(b)) else {
        return "(unprintable)".into();
    };
    let (Some(ma), Some(mb)) = (ja.as_object(), jb.as_object()) else {
        return "(unprintable)".into();
    };
    let diffs: Vec<String> = ma
        .iter()
        .filter(|(k, v)| mb.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    diffs.join(", ")
}
