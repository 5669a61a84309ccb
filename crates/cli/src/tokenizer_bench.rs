//! `kiln tokenizer bench`: kiln against tiktoken and Hugging Face tokenizers, in one run, on the
//! same text and the same vocabularies, printing throughput and ratios.
//!
//! The peers run in a Python venv that the bench creates under `$KILN_HOME/bench-venv` with pinned
//! versions. Every tool is timed on the encode or train call alone (loading excluded), best of
//! `--reps`. Token counts are compared as a sanity check: a mismatch is printed loudly, because a
//! fast wrong tokenizer is worthless.

use anyhow::{bail, Context, Result};
use clap::Args;
use kiln_tokenizer::train::TrainerConfig;
use kiln_tokenizer::Tokenizer;
use serde_json::{json, Value};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const PEERS_PY: &str = include_str!("../bench/tokenizer_peers.py");
const PEER_PACKAGES: &[&str] = &["tiktoken==0.14.0", "tokenizers==0.23.3"];

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Encodings to benchmark (tiktoken asset names).
    #[arg(long, value_delimiter = ',', default_value = "cl100k_base,o200k_base")]
    encodings: Vec<String>,
    /// Corpora: shakespeare, gcide, mix (multilingual test strings plus Rust source code).
    #[arg(long, value_delimiter = ',', default_value = "shakespeare,gcide,mix")]
    corpora: Vec<String>,
    /// Cap on each corpus, in MB.
    #[arg(long, default_value_t = 8)]
    max_mb: usize,
    /// Thread counts to measure; 0 means all cores.
    #[arg(long, value_delimiter = ',', default_value = "1,0")]
    threads: Vec<usize>,
    /// Repetitions per measurement; the best is kept.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Vocabulary sizes for the training comparison.
    #[arg(long, value_delimiter = ',', default_value = "4096,16384")]
    train_vocab: Vec<u32>,
    /// Skip the training comparison.
    #[arg(long)]
    no_train: bool,
    /// Skip the encoding comparison.
    #[arg(long)]
    no_encode: bool,
    /// Write the results as JSON to this file as well.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn bench_dir() -> Result<PathBuf> {
    let store = kiln_assets::Store::from_env()?;
    let dir = store.home().join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Creates (once) the venv with the peers and the script; returns (python, script).
fn peer_env() -> Result<(PathBuf, PathBuf)> {
    let (venv, python) = crate::venv::ensure("bench-venv", PEER_PACKAGES, "", true)?;
    let script = venv.join("tokenizer_peers.py");
    std::fs::write(&script, PEERS_PY)?;
    Ok((python, script))
}

fn run_peer(python: &Path, script: &Path, args: Value, threads: usize) -> Result<Value> {
    let mut cmd = Command::new(python);
    cmd.arg(script).arg(args.to_string());
    cmd.env("RAYON_NUM_THREADS", threads.to_string());
    cmd.env(
        "TOKENIZERS_PARALLELISM",
        if threads > 1 { "true" } else { "false" },
    );
    let out = cmd.output().context("running the Python peers")?;
    if !out.status.success() {
        bail!(
            "the Python peers failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("reading the peers' JSON output")
}

/// Builds the corpus file once and returns its path.
fn corpus(name: &str, max_bytes: usize) -> Result<PathBuf> {
    let path = bench_dir()?.join(format!("{name}-{}mb.txt", max_bytes >> 20));
    if path.is_file() {
        return Ok(path);
    }
    let mut text = String::new();
    match name {
        "shakespeare" => {
            for f in crate::resolve::input_files(&["shakespeare".to_string()])? {
                text.push_str(&std::fs::read_to_string(&f)?);
                text.push_str("\n\n");
            }
        }
        "gcide" => {
            // The dictd file is gzip-compatible (dictzip adds only an extra header field).
            let f = std::fs::File::open(kiln_assets::ensure("gcide")?)?;
            let mut gz = flate2::read::GzDecoder::new(f);
            let mut bytes = Vec::new();
            gz.by_ref()
                .take(max_bytes as u64 * 2)
                .read_to_end(&mut bytes)?;
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        "mix" => {
            // Multilingual: the strings llama.cpp and gpt-tokenizer test with (many scripts, emoji).
            let tests = kiln_assets::ensure("tokenizer-tests")?;
            let mut inputs: Vec<PathBuf> = std::fs::read_dir(tests.join("llama-vocab"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "inp"))
                .collect();
            inputs.sort();
            for p in inputs {
                text.push_str(&std::fs::read_to_string(&p)?.replace("__ggml_vocab_test__", ""));
            }
            text.push_str(&std::fs::read_to_string(tests.join("TestPlans.txt"))?);
            // Code: Rust sources of the crates cargo has unpacked on this machine.
            let cargo_home = std::env::var_os("CARGO_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
                .context("no CARGO_HOME or HOME to find Rust sources in")?;
            let mut files = Vec::new();
            collect_rs(&cargo_home.join("registry").join("src"), &mut files, 4);
            files.sort();
            for f in files {
                if text.len() >= max_bytes {
                    break;
                }
                if let Ok(s) = std::fs::read_to_string(&f) {
                    text.push_str(&s);
                    text.push_str("\n\n");
                }
            }
        }
        other => bail!("unknown corpus `{other}` (expected shakespeare, gcide or mix)"),
    }
    if text.len() > max_bytes {
        let mut cut = max_bytes;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    std::fs::write(&path, &text)?;
    Ok(path)
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() && depth > 0 {
            collect_rs(&p, out, depth - 1);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn best_of<T>(reps: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut out = f();
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        out = f();
        best = best.min(t0.elapsed().as_secs_f64());
    }
    (best, out)
}

pub fn run(a: BenchArgs) -> Result<()> {
    let (python, script) = peer_env()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rows = Vec::new();
    println!(
        "| encoding | corpus | MB | threads | kiln MB/s | tiktoken MB/s | HF MB/s | kiln/tiktoken | kiln/HF |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let encodings: &[String] = if a.no_encode { &[] } else { &a.encodings };
    for enc in encodings {
        let ranks = crate::resolve::path_arg(enc)?;
        let tok = Tokenizer::from_tiktoken_file(&ranks, enc)?;
        let hf_json = bench_dir()?.join(format!("{enc}.tokenizer.json"));
        // Rewritten every run (a second or two) so it always matches this build's converter.
        std::fs::write(&hf_json, kiln_tokenizer::convert::to_hf_json(&tok)?)?;
        let pattern = tok
            .pre_tokenizer()
            .splits()
            .first()
            .map(|s| s.pattern().to_string())
            .context("tokenizer has no split pattern")?;
        for c in &a.corpora {
            let path = corpus(c, a.max_mb << 20)?;
            let text = std::fs::read_to_string(&path)?;
            let docs: Vec<&str> = text.split_inclusive("\n\n").collect();
            let mb = text.len() as f64 / 1e6;
            for &t in &a.threads {
                let threads = if t == 0 { cores } else { t };
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()?;
                let (secs, kiln_tokens) = pool.install(|| {
                    if threads == 1 {
                        best_of(a.reps, || tok.encode_ordinary(&text).len())
                    } else {
                        best_of(a.reps, || {
                            tok.encode_batch(&docs).iter().map(Vec::len).sum::<usize>()
                        })
                    }
                });
                let peers = run_peer(
                    &python,
                    &script,
                    json!({"mode": "encode", "ranks": ranks, "encoding": enc, "pattern": pattern,
                           "hf_json": hf_json, "corpus": path, "threads": threads, "reps": a.reps}),
                    threads,
                )?;
                let tt = &peers["tiktoken"];
                let hf = &peers["hf"];
                let tt_s = tt["seconds"].as_f64().unwrap_or(f64::NAN);
                let hf_s = hf["seconds"].as_f64().unwrap_or(f64::NAN);
                // Whole-text and per-document encodings differ slightly at document edges, so
                // each peer is compared with kiln's count for the same input shape.
                let doc_tokens = if threads == 1 {
                    tok.encode_batch(&docs).iter().map(Vec::len).sum::<usize>()
                } else {
                    kiln_tokens
                };
                for (name, v, want) in [
                    ("tiktoken", tt, kiln_tokens),
                    ("HF tokenizers", hf, doc_tokens),
                ] {
                    if v["tokens"].as_u64() != Some(want as u64) {
                        eprintln!(
                            "WARNING: {enc} on {c}: kiln produced {want} tokens, {name} {}",
                            v["tokens"]
                        );
                    }
                }
                println!(
                    "| {enc} | {c} | {mb:.1} | {threads} | {:.1} | {:.1} | {:.1} | {:.2}x | {:.2}x |",
                    mb / secs,
                    mb / tt_s,
                    mb / hf_s,
                    tt_s / secs,
                    hf_s / secs
                );
                rows.push(json!({"kind": "encode", "encoding": enc, "corpus": c, "mb": mb,
                    "threads": threads, "kiln_s": secs, "tiktoken_s": tt_s, "hf_s": hf_s,
                    "kiln_tokens": kiln_tokens, "tiktoken_tokens": tt["tokens"], "hf_tokens": hf["tokens"]}));
            }
        }
    }
    if !a.no_train {
        let files = crate::resolve::input_files(&["shakespeare".to_string()])?;
        let mb: f64 = files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len() as f64)
            .sum::<f64>()
            / 1e6;
        println!();
        println!(
            "| training (shakespeare, {mb:.1} MB, {cores} threads) | kiln s | HF tokenizers s | HF/kiln |"
        );
        println!("|---|---|---|---|");
        for &v in &a.train_vocab {
            let cfg = TrainerConfig {
                vocab_size: v,
                ..TrainerConfig::default()
            };
            let (secs, trained) = best_of(1, || {
                kiln_tokenizer::train::train_from_files(&files, &cfg, &|_| {})
            });
            let trained = trained?;
            let peers = run_peer(
                &python,
                &script,
                json!({"mode": "train", "files": files, "vocab_size": v, "pattern": cfg.pattern}),
                cores,
            )?;
            let hf_s = peers["hf"]["seconds"].as_f64().unwrap_or(f64::NAN);
            println!(
                "| vocab {v} (kiln {} / HF {}) | {secs:.2} | {hf_s:.2} | {:.1}x |",
                trained.vocab_size(),
                peers["hf"]["vocab_size"],
                hf_s / secs
            );
            rows.push(
                json!({"kind": "train", "vocab_size": v, "kiln_s": secs, "hf_s": hf_s,
                "kiln_vocab": trained.vocab_size(), "hf_vocab": peers["hf"]["vocab_size"]}),
            );
        }
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}
