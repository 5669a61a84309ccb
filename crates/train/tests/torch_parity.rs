//! kiln's decoder and trainer against the same model written in plain PyTorch, as llm.c's
//! `test_gpt2.c` checks its GPT-2 against a PyTorch dump: the loss and every parameter's gradient
//! of one batch, then the losses and gradient norms of ten AdamW steps (with one and with two
//! micro-batches per step), for a tiny LLaMA-style model (RMSNorm, RoPE, GQA, SwiGLU) and a tiny
//! GPT-2-style one (LayerNorm, learned positions, GELU, every bias).
//!
//! The reference is `fixtures/torch/torch_reference.json`, written by `make_torch_fixture.py`
//! beside it (which also describes its contents); the initial weights are not stored there but
//! rebuilt here from the same counter-based generator, checked against the stored sums.
//!
//! Tolerances (float32 on both sides; the two differ only in the order of floating-point sums):
//! - loss of one batch: 1e-5 absolute;
//! - each gradient: max |kiln - torch| <= 1e-5 x max |torch| of that tensor, except the key
//!   biases, whose true gradient is zero (a bias shared by all keys shifts every score of a query
//!   alike, which softmax ignores): there both sides must stay below 1e-9;
//! - ten training steps: each step's loss within 1e-5 absolute and its gradient norm within
//!   1e-5 relative.
//!
//! Run with `--nocapture` to see the errors measured.

// `!(err <= tol)` is deliberate: a NaN error fails it.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use kiln_models::llama::Style;
use kiln_models::{Config, Llama};
use kiln_nn::candle_core::{Device, Tensor};
use kiln_nn::RopeScaling;
use kiln_train::{
    model_from_tensors, train_step, MatrixOptimizer, Optimizers, Params, Schedule, TrainSettings,
};
use serde::Deserialize;
use std::collections::HashMap;
use std::error::Error;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const LOSS_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-5;
const NORM_TOL: f64 = 1e-5;
const ZERO_GRAD_TOL: f64 = 1e-9;

#[derive(Deserialize)]
struct Fixture {
    torch: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    config: CaseConfig,
    params: Vec<ParamSpec>,
    batches: Vec<Batch>,
    grad_check: GradCheck,
    train: Hyper,
    runs: Vec<Run>,
}

#[derive(Deserialize)]
struct CaseConfig {
    style: String,
    vocab: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    intermediate: usize,
    eps: f64,
    rope_theta: f64,
    seq: usize,
    batch: usize,
    qkv_bias: bool,
    o_bias: bool,
    mlp_bias: bool,
}

/// One tensor and the recipe of its initial values (see the generator script).
#[derive(Deserialize)]
struct ParamSpec {
    name: String,
    shape: Vec<usize>,
    seed: u64,
    offset: f64,
    scale: f64,
    sum: f64,
}

/// `batch` x `seq` ids and targets; a target of -1 is ignored.
#[derive(Deserialize)]
struct Batch {
    inputs: Vec<Vec<i64>>,
    targets: Vec<Vec<i64>>,
}

#[derive(Deserialize)]
struct GradCheck {
    batch: usize,
    loss: f64,
    /// Little-endian float32, base64.
    grads: HashMap<String, String>,
}

#[derive(Deserialize)]
struct Hyper {
    steps: usize,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    grad_clip: f64,
}

#[derive(Deserialize)]
struct Run {
    accum: usize,
    losses: Vec<f64>,
    grad_norms: Vec<f64>,
}

fn fixture() -> Result<Fixture> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/torch/torch_reference.json"
    );
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    Ok(serde_json::from_str(&text)?)
}

fn case(name: &str) -> Result<Case> {
    let fx = fixture()?;
    println!("reference: torch {}", fx.torch);
    fx.cases
        .into_iter()
        .find(|c| c.name == name)
        .ok_or_else(|| format!("the fixture has no case `{name}`").into())
}

fn config(c: &CaseConfig) -> Result<Config> {
    let style = match c.style.as_str() {
        "llama" => Style::Llama,
        "gpt2" => Style::Gpt2,
        other => return Err(format!("unknown style `{other}`").into()),
    };
    Ok(Config {
        vocab_size: c.vocab,
        hidden_size: c.hidden,
        intermediate_size: c.intermediate,
        num_layers: c.layers,
        num_heads: c.heads,
        num_kv_heads: c.kv_heads,
        head_dim: c.head_dim,
        rms_norm_eps: c.eps,
        rope_theta: c.rope_theta,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: c.seq,
        tie_word_embeddings: true,
        qkv_bias: c.qkv_bias,
        o_bias: c.o_bias,
        mlp_bias: c.mlp_bias,
        sliding_window: None,
        sliding_window_from_layer: 0,
        style,
    })
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The generator script's `init_values`: the same float64 arithmetic, rounded to float32.
fn init_values(p: &ParamSpec) -> Vec<f32> {
    let n: usize = p.shape.iter().product();
    (0..n as u64)
        .map(|i| {
            let u = (splitmix64((p.seed << 32) + i) >> 40) as f64 / (1u64 << 24) as f64;
            (p.offset + p.scale * (2.0 * u - 1.0)) as f32
        })
        .collect()
}

/// The initial weights under their Hugging Face names, checked against the script's sums.
fn initial_tensors(c: &Case) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for p in &c.params {
        let v = init_values(p);
        let sum: f64 = v.iter().map(|&x| f64::from(x)).sum();
        // A single element one float32 step off would move the sum by more than 1e-10.
        if (sum - p.sum).abs() > 1e-10 {
            return Err(format!(
                "{}: rebuilt initial values sum to {sum}, the script's to {}",
                p.name, p.sum
            )
            .into());
        }
        out.insert(
            p.name.clone(),
            Tensor::from_vec(v, p.shape.as_slice(), &Device::Cpu)?,
        );
    }
    Ok(out)
}

/// A batch as the trainer takes it: flat row-major ids and targets, -1 as `u32::MAX` (ignored).
fn flat(b: &Batch) -> (Vec<u32>, Vec<u32>) {
    let ids = b.inputs.iter().flatten().map(|&x| x as u32).collect();
    let targets = b
        .targets
        .iter()
        .flatten()
        .map(|&x| if x < 0 { u32::MAX } else { x as u32 })
        .collect();
    (ids, targets)
}

fn base64_f32(text: &str) -> Result<Vec<f32>> {
    let mut bytes = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(format!("byte {c} is not base64").into()),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            bytes.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    if bytes.len() % 4 != 0 {
        return Err(format!("{} bytes are not whole float32s", bytes.len()).into());
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn model(c: &Case) -> Result<(Llama, Params)> {
    Ok(model_from_tensors(
        &config(&c.config)?,
        &initial_tensors(c)?,
    )?)
}

/// Loss and every gradient of batch 0 from the initial weights.
fn check_step(name: &str) -> Result<()> {
    let c = case(name)?;
    let (model, params) = model(&c)?;
    let (b, t) = (c.config.batch, c.config.seq);
    let (ids, targets) = flat(&c.batches[c.grad_check.batch]);
    let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu)?;
    let targets = Tensor::from_vec(targets, (b, t), &Device::Cpu)?;
    let loss = model.loss(&ids, &targets)?;
    let loss_err = (f64::from(loss.to_scalar::<f32>()?) - c.grad_check.loss).abs();
    let grads = loss.backward()?;
    if params.names.len() != c.grad_check.grads.len() {
        return Err(format!(
            "kiln has {} parameters, torch {}",
            params.names.len(),
            c.grad_check.grads.len()
        )
        .into());
    }
    let mut worst = (0f64, String::new());
    let mut zero_noise = 0f64;
    let mut failures = Vec::new();
    for (n, v) in params.names.iter().zip(&params.vars) {
        let want = base64_f32(
            c.grad_check
                .grads
                .get(n)
                .ok_or_else(|| format!("torch has no gradient for `{n}`"))?,
        )?;
        let got: Vec<f32> = grads
            .get(v.as_tensor())
            .ok_or_else(|| format!("kiln computed no gradient for `{n}`"))?
            .flatten_all()?
            .to_vec1()?;
        if got.len() != want.len() {
            return Err(
                format!("{n}: {} gradient elements, torch {}", got.len(), want.len()).into(),
            );
        }
        let max_abs = want.iter().fold(0f64, |m, &x| m.max(f64::from(x).abs()));
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f64, |m, (&a, &b)| m.max(f64::from(a - b).abs()));
        if n.ends_with("k_proj.bias") {
            // Softmax ignores a shift shared by all of a query's scores, and `q . b_k` is one:
            // the key bias's true gradient is zero, and both sides hold rounding noise.
            let noise = got.iter().chain(&want).fold(0f32, |m, &x| m.max(x.abs()));
            zero_noise = zero_noise.max(f64::from(noise));
            if !(f64::from(noise) <= ZERO_GRAD_TOL) {
                failures.push(format!("{n}: should be zero, max |grad| {noise:.3e}"));
            }
            continue;
        }
        let rel = diff / max_abs.max(f64::MIN_POSITIVE);
        if rel > worst.0 {
            worst = (rel, n.clone());
        }
        if !(rel <= GRAD_TOL) {
            failures.push(format!(
                "{n}: max |diff| {diff:.3e} = {rel:.3e} x max |grad| {max_abs:.3e}"
            ));
        }
    }
    let zero = if c.config.qkv_bias {
        format!("; the zero k_proj.bias gradients below {zero_noise:.3e}")
    } else {
        String::new()
    };
    println!(
        "{name} step: loss kiln {} torch {} |diff| {loss_err:.3e}; gradients of {} tensors: worst {:.3e} x max |grad| ({}){zero}",
        loss.to_scalar::<f32>()?,
        c.grad_check.loss,
        params.names.len(),
        worst.0,
        worst.1
    );
    assert!(
        loss_err <= LOSS_TOL,
        "{name}: loss differs from torch by {loss_err:.3e}"
    );
    assert!(
        failures.is_empty(),
        "{name}: gradients differ from torch:\n{}",
        failures.join("\n")
    );
    Ok(())
}

fn settings(c: &Case, accum: usize) -> Result<TrainSettings> {
    let hp = &c.train;
    // kiln's AdamW groups use eps 1e-8; the reference must too.
    assert_eq!(hp.eps, 1e-8, "the fixture's AdamW eps is not kiln's");
    let mut s = TrainSettings::for_depth(1);
    s.style = c.config.style.clone();
    s.optimizer = MatrixOptimizer::Adamw;
    s.lr = hp.lr;
    s.weight_decay = hp.weight_decay;
    s.beta1 = hp.beta1;
    s.beta2 = hp.beta2;
    s.grad_clip = hp.grad_clip;
    s.schedule = Schedule::Constant;
    s.batch = c.config.batch;
    s.seq_len = c.config.seq;
    s.grad_accum = accum;
    s.steps = hp.steps as u64;
    s.check()?;
    Ok(s)
}

/// Each step's mean loss and gradient norm, and every parameter's final values.
type Trained = (Vec<(f32, f64)>, Vec<Vec<f32>>);

/// `steps` optimizer steps from the initial weights, as `Trainer::run` drives them.
fn train(c: &Case, accum: usize, steps: usize) -> Result<Trained> {
    let s = settings(c, accum)?;
    let (model, params) = model(c)?;
    let mut opt = Optimizers::new(&params, &s)?;
    let mut out = Vec::with_capacity(steps);
    for step in 0..steps {
        opt.set_multiplier(s.schedule.multiplier(step as u64, s.steps))?;
        let micro: Vec<_> = c.batches[step * accum..(step + 1) * accum]
            .iter()
            .map(flat)
            .collect();
        out.push(train_step(
            &model,
            &mut opt,
            &micro,
            s.batch,
            s.seq_len,
            s.grad_clip,
        )?);
    }
    let weights = params
        .vars
        .iter()
        .map(|v| v.as_tensor().flatten_all().and_then(|t| t.to_vec1()))
        .collect::<std::result::Result<_, _>>()?;
    Ok((out, weights))
}

/// Ten steps with one and with two micro-batches per step against torch's losses and norms.
fn check_training(name: &str) -> Result<()> {
    let c = case(name)?;
    for run in &c.runs {
        let (got, _) = train(&c, run.accum, c.train.steps)?;
        let (mut loss_err, mut norm_err) = (0f64, 0f64);
        for (i, ((l, n), (wl, wn))) in got
            .iter()
            .zip(run.losses.iter().zip(&run.grad_norms))
            .enumerate()
        {
            let le = (f64::from(*l) - wl).abs();
            let ne = (n - wn).abs() / wn;
            println!(
                "{name} accum {} step {}: loss kiln {l:.7} torch {wl:.7} |diff| {le:.2e}; grad norm kiln {n:.7} torch {wn:.7} rel {ne:.2e}",
                run.accum,
                i + 1
            );
            loss_err = loss_err.max(le);
            norm_err = norm_err.max(ne);
        }
        println!(
            "{name} accum {}: {} steps, max loss |diff| {loss_err:.3e}, max grad norm rel diff {norm_err:.3e}",
            run.accum,
            got.len()
        );
        assert_eq!(got.len(), run.losses.len());
        assert!(
            loss_err <= LOSS_TOL,
            "{name} accum {}: losses differ from torch by up to {loss_err:.3e}",
            run.accum
        );
        assert!(
            norm_err <= NORM_TOL,
            "{name} accum {}: gradient norms differ from torch by up to {norm_err:.3e} (relative)",
            run.accum
        );
    }
    Ok(())
}

#[test]
fn llama_step_matches_torch() -> Result<()> {
    check_step("llama")
}

#[test]
fn gpt2_step_matches_torch() -> Result<()> {
    check_step("gpt2")
}

#[test]
fn llama_training_matches_torch() -> Result<()> {
    check_training("llama")
}

#[test]
fn gpt2_training_matches_torch() -> Result<()> {
    check_training("gpt2")
}

/// The same three steps (two micro-batches each) from the same weights give the same bits:
/// losses, gradient norms and every final weight.
#[test]
fn training_is_deterministic() -> Result<()> {
    for name in ["llama", "gpt2"] {
        let c = case(name)?;
        let (a, wa) = train(&c, 2, 3)?;
        let (b, wb) = train(&c, 2, 3)?;
        let bits = |r: &[(f32, f64)]| -> Vec<(u32, u64)> {
            r.iter().map(|(l, n)| (l.to_bits(), n.to_bits())).collect()
        };
        assert_eq!(
            bits(&a),
            bits(&b),
            "{name}: losses or norms differ between runs"
        );
        let same = wa.iter().zip(&wb).all(|(x, y)| {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())
        });
        assert!(same, "{name}: weights differ between runs");
        println!("{name}: 3 steps twice, identical bits: {a:?}");
    }
    Ok(())
}
