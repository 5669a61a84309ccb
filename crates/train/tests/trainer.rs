//! The trainer end to end on a tiny model and corpus: a run stopped and resumed any number of
//! times equals the same run done in one go (bit for bit), runs are deterministic, the saved
//! model loads for inference and agrees with the training forward pass, and bad resumes and
//! damaged checkpoints are refused with the reason.

use kiln_models::llama::Style;
use kiln_models::{KvCache, Llama};
use kiln_nn::candle_core::{Device, Tensor};
use kiln_tokenizer::train::{train_from_texts, TrainerConfig};
use kiln_tokenizer::Tokenizer;
use kiln_train::data::END_OF_TEXT;
use kiln_train::{
    prepare, Dataset, MatrixOptimizer, Observer, Outcome, Precision, PrepareConfig, StepMetrics,
    TrainError, TrainSettings, Trainer,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

const WORDS: &[&str] = &[
    "the", "king", "queen", "of", "and", "a", "sword", "crown", "speaks", "to", "his", "her",
    "lord", "lady", "castle", "night", "day", "love", "war", "peace", "shall", "thou", "art",
];

/// Forty documents of pseudo-sentences from a fixed generator.
fn corpus() -> Vec<String> {
    let mut state = 7u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    (0..40)
        .map(|d| {
            let mut s = format!("Scene {d}.\n");
            for _ in 0..60 + d % 7 * 10 {
                s.push_str(WORDS[next() % WORDS.len()]);
                s.push(if next() % 9 == 0 { '\n' } else { ' ' });
            }
            s
        })
        .collect()
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    ds: Dataset,
    tok: Tokenizer,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_owned();
    let docs = corpus();
    let files: Vec<PathBuf> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let p = root.join(format!("doc{i:02}.txt"));
            std::fs::write(&p, d).unwrap();
            p
        })
        .collect();
    let texts: Vec<&str> = docs.iter().map(|s| s.as_str()).collect();
    let cfg = TrainerConfig {
        vocab_size: 300,
        special_tokens: vec![END_OF_TEXT.to_string()],
        ..TrainerConfig::default()
    };
    let tok_path = root.join("tokenizer.json");
    train_from_texts(&texts, &cfg)
        .unwrap()
        .save(&tok_path)
        .unwrap();
    let tok = Tokenizer::load(&tok_path).unwrap();
    let pcfg = PrepareConfig {
        val_fraction: 0.2,
        ..PrepareConfig::default()
    };
    let data = root.join("data");
    prepare(&tok, Some(&tok_path), &files, &data, &pcfg, &|_| {}).unwrap();
    let ds = Dataset::open(&data).unwrap();
    Fixture {
        _tmp: tmp,
        root,
        ds,
        tok,
    }
}

fn settings(style: &str, optimizer: MatrixOptimizer) -> TrainSettings {
    let mut s = TrainSettings::for_depth(1);
    s.style = style.into();
    s.optimizer = optimizer;
    s.seq_len = 16;
    s.batch = 2;
    s.grad_accum = 2;
    s.steps = 12;
    s.eval_every = 4;
    s.eval_windows = 4;
    s.checkpoint_every = 5;
    s.schedule = kiln_train::Schedule::Wsd {
        warmup: 3,
        decay_fraction: 0.3,
        min_ratio: 0.0,
    };
    s
}

struct Quiet;
impl Observer for Quiet {}

fn token_bytes(tok: &Tokenizer) -> Vec<u32> {
    (0..tok.vocab_size() as u32)
        .map(|id| {
            if tok.id_of_special(END_OF_TEXT) == Some(id) {
                0
            } else {
                tok.token_bytes(id).map_or(0, |b| b.len() as u32)
            }
        })
        .collect()
}

#[allow(clippy::result_large_err)]
fn run(
    f: &Fixture,
    s: &TrainSettings,
    dir: &Path,
    resume: bool,
    until: Option<u64>,
) -> Result<Outcome, TrainError> {
    let mut t = Trainer::open(&f.ds, s.clone(), dir, resume, token_bytes(&f.tok))?;
    let stop = AtomicBool::new(false);
    t.run(until, &stop, &mut Quiet, &mut |_: &Llama| vec![])
}

fn metrics(dir: &Path) -> Vec<StepMetrics> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Losses and validation numbers as bits, step by step.
fn trace(dir: &Path) -> Vec<(u64, u32, Option<u64>, Option<u64>)> {
    metrics(dir)
        .into_iter()
        .map(|m| {
            (
                m.step,
                m.loss.to_bits(),
                m.val_loss.map(f64::to_bits),
                m.val_bpb.map(f64::to_bits),
            )
        })
        .collect()
}

fn stopped_and_resumed_equals_one_go(style: &str, optimizer: MatrixOptimizer) {
    let f = fixture();
    resumed_equals_one_go(&f, &settings(style, optimizer), "whole", "pieces");
}

/// Runs `s` in one go (in `root/whole`) and stopped at 3 and 7 (in `root/pieces`); asserts the
/// traces and final weights are the same bits.
fn resumed_equals_one_go(f: &Fixture, s: &TrainSettings, whole: &str, pieces: &str) {
    let s = s.clone();
    let whole = f.root.join(whole);
    assert_eq!(run(f, &s, &whole, false, None).unwrap(), Outcome::Finished);
    let pieces = f.root.join(pieces);
    assert_eq!(
        run(f, &s, &pieces, false, Some(3)).unwrap(),
        Outcome::Stopped { step: 3 }
    );
    assert_eq!(
        run(f, &s, &pieces, true, Some(7)).unwrap(),
        Outcome::Stopped { step: 7 }
    );
    assert_eq!(run(f, &s, &pieces, true, None).unwrap(), Outcome::Finished);
    let (a, b) = (trace(&whole), trace(&pieces));
    assert_eq!(a.len(), 12);
    assert_eq!(a, b, "a resumed run must reproduce every loss bit for bit");
    // Evaluations happened at steps 4, 8 and 12 and the loss went down.
    let m = metrics(&whole);
    let evals: Vec<u64> = m
        .iter()
        .filter(|m| m.val_loss.is_some())
        .map(|m| m.step)
        .collect();
    assert_eq!(evals, vec![4, 8, 12]);
    assert!(m[11].loss < m[0].loss, "{} !< {}", m[11].loss, m[0].loss);
    let w1 = std::fs::read(whole.join("model/model.safetensors")).unwrap();
    let w2 = std::fs::read(pieces.join("model/model.safetensors")).unwrap();
    assert!(w1 == w2, "final weights differ");
}

#[test]
fn llama_muon_run_resumes_exactly() {
    stopped_and_resumed_equals_one_go("llama", MatrixOptimizer::Muon);
}

#[test]
fn gpt2_adamw_run_resumes_exactly() {
    stopped_and_resumed_equals_one_go("gpt2", MatrixOptimizer::Adamw);
}

/// bf16 matmuls: a stopped and resumed run is still the one-go run bit for bit, it learns, its
/// losses are not the f32 run's (the mode is in effect), and an f32 run resumed as bf16 is
/// refused by name.
#[test]
fn bf16_run_resumes_exactly_and_differs_from_f32() {
    if !kiln_nn::fused::bf16_available() {
        eprintln!("skipped: this CPU has no AVX-512 BF16");
        return;
    }
    let f = fixture();
    let mut s = settings("gpt2", MatrixOptimizer::Adamw);
    s.precision = Precision::Bf16;
    resumed_equals_one_go(&f, &s, "bf16-whole", "bf16-pieces");
    let mut f32s = s.clone();
    f32s.precision = Precision::F32;
    let dir = f.root.join("f32");
    run(&f, &f32s, &dir, false, Some(2)).unwrap();
    let (a, b) = (trace(&f.root.join("bf16-whole")), trace(&dir));
    assert_ne!(a[..2], b[..2], "bf16 and f32 gave the same losses");
    // Close, though: bf16 rounding of the operands, not a different model.
    let (la, lb) = (metrics(&f.root.join("bf16-whole")), metrics(&dir));
    assert!(
        (la[0].loss - lb[0].loss).abs() < 0.05,
        "{} vs {}",
        la[0].loss,
        lb[0].loss
    );
    let e = run(&f, &s, &dir, true, None).unwrap_err().to_string();
    assert!(
        e.contains("different settings") && e.contains("precision"),
        "{e}"
    );
}

#[test]
fn runs_are_deterministic_and_the_seed_matters() {
    let f = fixture();
    let mut s = settings("llama", MatrixOptimizer::Muon);
    s.steps = 4;
    run(&f, &s, &f.root.join("a"), false, None).unwrap();
    run(&f, &s, &f.root.join("b"), false, None).unwrap();
    s.seed = 1;
    run(&f, &s, &f.root.join("c"), false, None).unwrap();
    let (a, b, c) = (
        trace(&f.root.join("a")),
        trace(&f.root.join("b")),
        trace(&f.root.join("c")),
    );
    assert_eq!(a, b);
    assert_ne!(a, c);
}

/// The saved model, loaded the way `kiln generate` loads it, gives the logits of the training
/// forward pass, also when fed token by token through the KV cache.
fn saved_model_matches_training_forward(style: &str) {
    let f = fixture();
    let mut s = settings(style, MatrixOptimizer::Adamw);
    s.steps = 3;
    let dir = f.root.join("run");
    let mut t = Trainer::open(&f.ds, s.clone(), &dir, false, token_bytes(&f.tok)).unwrap();
    t.run(
        None,
        &AtomicBool::new(false),
        &mut Quiet,
        &mut |_: &Llama| vec![],
    )
    .unwrap();
    let loaded = Llama::load(&dir.join("model")).unwrap();
    assert_eq!(loaded.config(), t.config());
    assert_eq!(
        loaded.config().style,
        if style == "gpt2" {
            Style::Gpt2
        } else {
            Style::Llama
        }
    );
    let ids: Vec<u32> = f
        .tok
        .encode_ordinary("the king speaks to his lady and the queen");
    let ids = &ids[..ids.len().min(s.seq_len)];
    let x = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap();
    let train_logits: Vec<Vec<f32>> = t
        .model()
        .forward_train(&x)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let mut cache = KvCache::new(loaded.config().num_layers);
    for (i, &id) in ids.iter().enumerate() {
        let step = loaded.logits_last(&[id], i, &mut cache).unwrap();
        let max = train_logits[i]
            .iter()
            .zip(&step)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max < 1e-4, "{style}: position {i} differs by {max}");
    }
}

#[test]
fn llama_model_loads_for_inference() {
    saved_model_matches_training_forward("llama");
}

#[test]
fn gpt2_model_loads_for_inference() {
    saved_model_matches_training_forward("gpt2");
}

#[test]
fn bad_resumes_are_refused() {
    let f = fixture();
    let s = settings("llama", MatrixOptimizer::Muon);
    let dir = f.root.join("run");
    // Nothing to resume yet.
    let e = run(&f, &s, &dir, true, None).unwrap_err().to_string();
    assert!(e.contains("no checkpoint"), "{e}");
    run(&f, &s, &dir, false, Some(2)).unwrap();
    // A new run over a run with checkpoints.
    let e = run(&f, &s, &dir, false, None).unwrap_err().to_string();
    assert!(e.contains("--resume"), "{e}");
    // A different model config.
    let mut other = s.clone();
    other.depth = 2;
    let e = run(&f, &other, &dir, true, None).unwrap_err().to_string();
    assert!(
        e.contains("different settings") && e.contains("depth"),
        "{e}"
    );
    // The untouched run still resumes.
    assert_eq!(run(&f, &s, &dir, true, None).unwrap(), Outcome::Finished);
}

#[test]
fn damaged_checkpoints_are_reported() {
    let f = fixture();
    let s = settings("llama", MatrixOptimizer::Muon);
    let dir = f.root.join("run");
    run(&f, &s, &dir, false, Some(2)).unwrap();
    let ckpt = dir.join("checkpoints/step-000002");
    let model = ckpt.join("model.safetensors");
    let good = std::fs::read(&model).unwrap();
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 5] ^= 0x40;
    std::fs::write(&model, &bad).unwrap();
    let e = run(&f, &s, &dir, true, None).unwrap_err().to_string();
    assert!(e.contains("model.safetensors is damaged"), "{e}");
    std::fs::write(&model, &good[..good.len() / 2]).unwrap();
    let e = run(&f, &s, &dir, true, None).unwrap_err().to_string();
    assert!(e.contains("model.safetensors is damaged"), "{e}");
    std::fs::write(&model, &good).unwrap();
    std::fs::remove_file(ckpt.join("optimizer.safetensors")).unwrap();
    let e = run(&f, &s, &dir, true, None).unwrap_err().to_string();
    assert!(e.contains("optimizer.safetensors is missing"), "{e}");
    std::fs::write(ckpt.join("state.json"), b"{ not json").unwrap();
    let e = run(&f, &s, &dir, true, None).unwrap_err().to_string();
    assert!(e.contains("state.json is not valid"), "{e}");
    std::fs::write(dir.join("checkpoints/LATEST"), b"../../etc").unwrap();
    let e = run(&f, &s, &dir, true, None).unwrap_err().to_string();
    assert!(e.contains("not a checkpoint name"), "{e}");
}

#[test]
fn settings_are_checked() {
    let f = fixture();
    let mut s = settings("llama", MatrixOptimizer::Muon);
    s.seq_len = 100_000;
    let e = run(&f, &s, &f.root.join("r1"), false, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("seq_len"), "{e}");
    let mut s = settings("transformer-xl", MatrixOptimizer::Muon);
    s.steps = 1;
    let e = run(&f, &s, &f.root.join("r2"), false, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("style"), "{e}");
    let mut s = settings("llama", MatrixOptimizer::Muon);
    s.lr = f64::NAN;
    let e = run(&f, &s, &f.root.join("r3"), false, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lr"), "{e}");
}
