//! `kiln bench embed`: sentence embeddings per second of kiln's `Embedder` and of
//! sentence-transformers on the CPU, for the same model folder and the same texts, at each thread
//! count, in one run.
//!
//! The texts are `--texts` English-like sentences of mixed length drawn from a fixed seed (half of
//! 4-12 words, a third of 12-40, the rest of 40-120; about 1.3 WordPiece tokens per word), the same
//! list on both sides. One timed round embeds all of them in batches of `--batch`, tokenization,
//! pooling and normalization included (sentence-transformers sorts the texts by length and pads
//! each batch to its longest; kiln packs each batch without padding):
//! `Embedder::embed` for kiln, `SentenceTransformer.encode` for the peer
//! (`crates/cli/bench/embed_peer.py`). Loading and `--warmup` rounds are excluded; embeddings/s is
//! `texts / median round time` over `--rounds` rounds.
//!
//! Each measurement runs in its own child process (kiln with `RAYON_NUM_THREADS`, which candle's
//! kernels and kiln's fused ops obey; the peer with `torch.set_num_threads` plus
//! `OMP_NUM_THREADS` and `MKL_NUM_THREADS`), and kiln and the peer alternate per thread count so
//! that both see the same background load. As a sanity check both sides return the vectors of
//! the first texts and the largest difference between them is printed.
//!
//! sentence-transformers comes from a venv the bench makes under `$KILN_HOME/bench-venv-st` with
//! the pinned versions (PyPI's Linux torch wheel, which carries several GB of CUDA libraries;
//! only its CPU path runs), or from `--python`.

use anyhow::{bail, Context, Result};
use clap::Args;
use kiln_engine::Embedder;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const PEER_PY: &str = include_str!("../bench/embed_peer.py");
const PEER_PACKAGES: &[&str] = &[
    "torch==2.15.0",
    "sentence-transformers==6.2.0",
    "transformers==5.24.0",
    "numpy==2.4.6",
];
/// Texts whose vectors both sides return for the sanity check.
const CHECK: usize = 4;
const SEED: u64 = 20_240_601;

#[derive(Args, Debug)]
pub struct BenchEmbedArgs {
    /// Model: an asset name (minilm) or a sentence-transformers folder.
    #[arg(long, short, default_value = "minilm")]
    model: String,
    /// Thread counts; each runs in its own child process on both sides.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// How many texts one round embeds.
    #[arg(long, default_value_t = 512)]
    texts: usize,
    /// Texts per encoder call (sentence-transformers' default is 32).
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Timed rounds per measurement (embeddings/s comes from the median round).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Untimed rounds before the timed ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// A Python interpreter that already has sentence-transformers, instead of the bench's venv.
    #[arg(long)]
    python: Option<PathBuf>,
    /// Measure kiln only (no Python, no venv).
    #[arg(long)]
    no_peer: bool,
    /// Print the results as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Internal: run one kiln measurement and print JSON (the parent sets the thread count).
    #[arg(long, hide = true)]
    worker: bool,
}

struct Measured {
    round_s: Vec<f64>,
    check: Vec<Vec<f32>>,
    peak_bytes: u64,
}

impl Measured {
    fn median_s(&self) -> f64 {
        let mut v = self.round_s.clone();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
}

/// SplitMix64: the texts must be the same on every run and on both sides.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const WORDS: &[&str] = &[
    "the",
    "model",
    "search",
    "a",
    "query",
    "returns",
    "documents",
    "that",
    "are",
    "similar",
    "in",
    "meaning",
    "to",
    "sentence",
    "embeddings",
    "of",
    "vector",
    "database",
    "nearest",
    "neighbours",
    "is",
    "fast",
    "when",
    "index",
    "fits",
    "memory",
    "users",
    "ask",
    "questions",
    "about",
    "weather",
    "tomorrow",
    "city",
    "river",
    "mountain",
    "train",
    "station",
    "coffee",
    "morning",
    "evening",
    "children",
    "played",
    "football",
    "park",
    "after",
    "school",
    "rain",
    "stopped",
    "quickly",
    "scientists",
    "discovered",
    "new",
    "species",
    "deep",
    "ocean",
    "near",
    "volcanic",
    "vents",
    "market",
    "prices",
    "rose",
    "sharply",
    "inflation",
    "report",
    "central",
    "bank",
    "interest",
    "rates",
    "engineers",
    "rewrote",
    "compiler",
    "performance",
    "improved",
    "benchmark",
    "results",
    "translation",
    "language",
    "English",
    "French",
    "German",
    "dictionary",
    "library",
    "books",
    "history",
    "ancient",
    "empire",
    "trade",
    "routes",
    "silk",
    "spices",
    "recipe",
    "bread",
    "flour",
    "water",
    "salt",
    "oven",
    "minutes",
    "hospital",
    "doctor",
    "patients",
    "treatment",
    "vaccine",
    "music",
    "concert",
    "orchestra",
    "played",
    "symphony",
    "audience",
    "applauded",
    "loudly",
    "with",
    "and",
    "but",
    "because",
    "although",
    "while",
    "for",
    "from",
    "on",
    "at",
    "by",
    "it",
    "they",
    "we",
    "she",
    "he",
    "was",
    "were",
    "will",
    "could",
    "should",
    "never",
    "always",
];

/// The benchmark's texts: mixed lengths, deterministic.
fn texts(n: usize) -> Vec<String> {
    let mut rng = Rng(SEED);
    (0..n)
        .map(|_| {
            let words = match rng.below(100) {
                0..=49 => 4 + rng.below(9),
                50..=84 => 12 + rng.below(29),
                _ => 40 + rng.below(81),
            };
            let mut s = String::new();
            for i in 0..words {
                if i > 0 {
                    s.push(if rng.below(12) == 0 { ',' } else { ' ' });
                    if s.ends_with(',') {
                        s.push(' ');
                    }
                }
                let w = WORDS[rng.below(WORDS.len())];
                if i == 0 {
                    let mut c = w.chars();
                    if let Some(f) = c.next() {
                        s.extend(f.to_uppercase());
                        s.push_str(c.as_str());
                    }
                } else {
                    s.push_str(w);
                }
            }
            s.push(if rng.below(5) == 0 { '?' } else { '.' });
            s
        })
        .collect()
}

fn check(a: &BenchEmbedArgs) -> Result<()> {
    if a.threads.is_empty() || a.threads.contains(&0) {
        bail!(
            "--threads must list thread counts of at least 1 (got {:?})",
            a.threads
        );
    }
    if a.texts == 0 || a.batch == 0 || a.rounds == 0 {
        bail!("--texts, --batch and --rounds must be at least 1");
    }
    Ok(())
}

pub fn run(a: BenchEmbedArgs) -> Result<()> {
    check(&a)?;
    let dir = crate::resolve::path_arg(&a.model)?;
    if a.worker {
        return worker(&a, &dir);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if let Some(&t) = a.threads.iter().find(|&&t| t > cores) {
        eprintln!("note: {t} threads on a machine with {cores} cores oversubscribes it");
    }
    let peer = if a.no_peer {
        None
    } else {
        Some(
            peer_env(a.python.as_deref(), a.texts)
                .context("setting up the sentence-transformers peer")?,
        )
    };
    let probe = Embedder::load(&dir).with_context(|| format!("loading `{}`", a.model))?;
    let all = texts(a.texts);
    let tokens: usize = all.iter().map(|t| probe.tokenize(t).len()).sum();
    eprintln!(
        "model {} (dim {}, max_seq_length {}); {} texts, {tokens} tokens ({:.1} per text), batch {}, \
         {} warm-up + {} timed rounds",
        a.model,
        probe.dim(),
        probe.max_len(),
        a.texts,
        tokens as f64 / a.texts as f64,
        a.batch,
        a.warmup,
        a.rounds
    );
    drop(probe);

    let mut rows = Vec::new();
    for &threads in &a.threads {
        let kiln = kiln_in_child(&a, threads)?;
        eprintln!(
            "kiln                  {threads} thread(s): {:.1} embeddings/s (median round {:.3} s)",
            a.texts as f64 / kiln.median_s(),
            kiln.median_s()
        );
        let st = match &peer {
            None => None,
            Some(p) => {
                let m = run_peer(p, &a, &dir, threads)?;
                eprintln!(
                    "sentence-transformers {threads} thread(s): {:.1} embeddings/s (median round {:.3} s)",
                    a.texts as f64 / m.median_s(),
                    m.median_s()
                );
                Some(m)
            }
        };
        rows.push((threads, kiln, st));
    }

    let diffs: Vec<Option<f32>> = rows
        .iter()
        .map(|(_, k, s)| s.as_ref().map(|s| max_abs_diff(&k.check, &s.check)))
        .collect();
    if a.json {
        let v = json!({
            "model": a.model,
            "texts": a.texts,
            "tokens": tokens,
            "batch": a.batch,
            "peer": peer.as_ref().map(|p| p.versions.clone()),
            "rows": rows.iter().zip(&diffs).map(|((threads, k, s), d)| json!({
                "threads": threads,
                "kiln_embeddings_per_s": a.texts as f64 / k.median_s(),
                "kiln_round_s": k.round_s,
                "kiln_peak_mb": mb(k.peak_bytes),
                "peer_embeddings_per_s": s.as_ref().map(|s| a.texts as f64 / s.median_s()),
                "peer_round_s": s.as_ref().map(|s| s.round_s.clone()),
                "peer_peak_mb": s.as_ref().map(|s| mb(s.peak_bytes)),
                "max_abs_diff": d,
            })).collect::<Vec<_>>(),
        });
        println!("{v}");
        return Ok(());
    }
    print!(
        "{}: {} texts ({tokens} tokens), batch {}, fp32",
        a.model, a.texts, a.batch
    );
    if let Some(p) = &peer {
        print!("; {} ({})", p.versions, p.python.display());
    }
    println!("\n");
    println!(
        "| threads | kiln emb/s | sentence-transformers emb/s | kiln / ST | kiln peak MB | ST peak MB |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for (threads, k, s) in &rows {
        let ke = a.texts as f64 / k.median_s();
        let (se, ratio, smem) = match s {
            Some(s) => {
                let se = a.texts as f64 / s.median_s();
                (
                    format!("{se:.1}"),
                    format!("{:.2}x", ke / se),
                    format!("{:.0}", mb(s.peak_bytes)),
                )
            }
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "| {threads} | {ke:.1} | {se} | {ratio} | {:.0} | {smem} |",
            mb(k.peak_bytes)
        );
    }
    for ((threads, _, _), d) in rows.iter().zip(&diffs) {
        if let Some(d) = d {
            println!(
                "\nmax abs difference of the first {CHECK} vectors at {threads} thread(s): {d:.2e}"
            );
        }
    }
    Ok(())
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    if a.len() != b.len() {
        return f32::NAN;
    }
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0f32, f32::max)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Runs [`worker`] in a child `kiln` (see [`crate::worker`]).
fn kiln_in_child(a: &BenchEmbedArgs, threads: usize) -> Result<Measured> {
    let args = [
        "bench",
        "embed",
        "--worker",
        "--model",
        &a.model,
        "--texts",
        &a.texts.to_string(),
        "--batch",
        &a.batch.to_string(),
        "--rounds",
        &a.rounds.to_string(),
        "--warmup",
        &a.warmup.to_string(),
    ];
    let v = crate::worker::run_kiln_json(&args, threads)?;
    parse_measured(&v, "kiln worker")
}

fn parse_measured(v: &Value, who: &str) -> Result<Measured> {
    let round_s: Vec<f64> = v["round_s"]
        .as_array()
        .with_context(|| format!("{who}: no round_s in its output"))?
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    let check: Vec<Vec<f32>> = v["check"]
        .as_array()
        .with_context(|| format!("{who}: no check vectors in its output"))?
        .iter()
        .map(|row| {
            row.as_array()
                .map(|r| {
                    r.iter()
                        .filter_map(Value::as_f64)
                        .map(|x| x as f32)
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect();
    Ok(Measured {
        round_s,
        check,
        peak_bytes: v["peak_rss_kib"].as_u64().unwrap_or(0) * 1024,
    })
}

/// A line of `/proc/self/status` (`VmHWM`) in KiB; 0 where there is no procfs.
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

/// The child side of [`kiln_in_child`]: load, warm up, time, print one JSON object.
fn worker(a: &BenchEmbedArgs, dir: &Path) -> Result<()> {
    let mut embedder = Embedder::load(dir)?;
    embedder.set_batch_size(a.batch);
    let owned = texts(a.texts);
    let texts: Vec<&str> = owned.iter().map(String::as_str).collect();
    let mut round_s = Vec::with_capacity(a.rounds);
    let mut last = None;
    for i in 0..a.warmup + a.rounds {
        let t0 = Instant::now();
        let out = embedder.embed(&texts)?;
        let dt = t0.elapsed().as_secs_f64();
        if i >= a.warmup {
            round_s.push(dt);
        }
        last = Some(out);
    }
    let check: Vec<Vec<f32>> = last
        .map(|o| o.vectors.into_iter().take(CHECK).collect())
        .unwrap_or_default();
    println!(
        "{}",
        json!({
            "threads": rayon::current_num_threads(),
            "round_s": round_s,
            "check": check,
            "peak_rss_kib": proc_status_kib("VmHWM"),
        })
    );
    Ok(())
}

/// The interpreter, script and text file of the sentence-transformers side.
struct Peer {
    python: PathBuf,
    script: PathBuf,
    texts_file: PathBuf,
    versions: String,
}

/// `--python` as given, or the bench's own venv, made (once) with the pinned packages.
fn peer_env(python: Option<&Path>, n: usize) -> Result<Peer> {
    let store = kiln_assets::Store::from_env()?;
    let python = match python {
        Some(p) => p.to_path_buf(),
        // Not quiet: pip's own progress is the progress bar of this long step.
        None => {
            crate::venv::ensure(
                "bench-venv-st",
                PEER_PACKAGES,
                "; PyPI's Linux torch wheel brings several GB of CUDA libraries, so this takes a while once",
                false,
            )?
            .1
        }
    };
    let out = Command::new(&python)
        .args([
            "-c",
            "import sentence_transformers, torch; \
             print(f'sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}')",
        ])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "{} cannot import sentence_transformers and torch: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let versions = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let dir = store.home().join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let script = dir.join("embed_peer.py");
    std::fs::write(&script, PEER_PY).with_context(|| format!("writing {}", script.display()))?;
    let texts_file = dir.join(format!("embed_texts_{n}.json"));
    std::fs::write(&texts_file, serde_json::to_string(&texts(n))?)
        .with_context(|| format!("writing {}", texts_file.display()))?;
    Ok(Peer {
        python,
        script,
        texts_file,
        versions,
    })
}

fn run_peer(p: &Peer, a: &BenchEmbedArgs, dir: &Path, threads: usize) -> Result<Measured> {
    let args = json!({
        "model": dir, "texts_file": p.texts_file, "threads": threads, "batch": a.batch,
        "warmup": a.warmup, "rounds": a.rounds, "check": CHECK,
    });
    let out = Command::new(&p.python)
        .arg(&p.script)
        .arg(args.to_string())
        .env("OMP_NUM_THREADS", threads.to_string())
        .env("MKL_NUM_THREADS", threads.to_string())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .with_context(|| format!("running {}", p.python.display()))?;
    if !out.status.success() {
        bail!(
            "the sentence-transformers peer ({threads} threads) failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout)
        .context("reading the sentence-transformers peer's JSON")?;
    parse_measured(&v, "sentence-transformers peer")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_deterministic_and_mixed() {
        let a = texts(64);
        assert_eq!(a, texts(64));
        let words: Vec<usize> = a.iter().map(|t| t.split_whitespace().count()).collect();
        assert!(words.iter().any(|&w| w < 12) && words.iter().any(|&w| w > 40));
    }
}
