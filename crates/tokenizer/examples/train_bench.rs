//! Trains a BPE vocabulary and prints timings as JSON; the Rust half of the
//! training benchmark (`bench/train_hf.py` is the Hugging Face half) and the
//! fixture generator used by `tests/fixtures/train/check_hf.py`.
//!
//! ```text
//! cargo run --release -p kiln-tokenizer --example train_bench -- \
//!     --vocab-size 16384 [--threads N] [--min-frequency N] [--special S]... \
//!     [--pattern REGEX] [--hf-json OUT] [--tiktoken OUT] \
//!     [--encode STRINGS.json IDS.json] --input FILES...
//! ```
//!
//! Output: `{"seconds": .., "count_seconds": .., "vocab_size": .., "merges": ..,
//! "stopped_early": .., "unique_pieces": ..}`.

use std::cell::Cell;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use kiln_tokenizer::train::{train_from_files, TrainProgress, TrainerConfig};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("train_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut cfg = TrainerConfig::default();
    let mut inputs: Vec<PathBuf> = Vec::new();
    let mut hf_json: Option<PathBuf> = None;
    let mut tiktoken: Option<PathBuf> = None;
    let mut encode: Option<(PathBuf, PathBuf)> = None;
    let mut args = std::env::args().skip(1);
    let value = |args: &mut dyn Iterator<Item = String>, flag: &str| -> Result<String, String> {
        args.next().ok_or_else(|| format!("{flag} needs a value"))
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--vocab-size" => cfg.vocab_size = value(&mut args, &a)?.parse()?,
            "--threads" => cfg.threads = Some(value(&mut args, &a)?.parse()?),
            "--min-frequency" => cfg.min_frequency = value(&mut args, &a)?.parse()?,
            "--special" => cfg.special_tokens.push(value(&mut args, &a)?),
            "--pattern" => cfg.pattern = value(&mut args, &a)?,
            "--hf-json" => hf_json = Some(value(&mut args, &a)?.into()),
            "--tiktoken" => tiktoken = Some(value(&mut args, &a)?.into()),
            "--encode" => {
                let input = value(&mut args, &a)?;
                let output = value(&mut args, &a)?;
                encode = Some((input.into(), output.into()));
            }
            "--input" => {}
            other if other.starts_with("--") => return Err(format!("unknown flag {other}").into()),
            file => inputs.push(file.into()),
        }
    }
    if inputs.is_empty() {
        return Err("no input files (--input FILES...)".into());
    }

    let start = Instant::now();
    let counted = Cell::new(None);
    let unique = Cell::new(0usize);
    let bpe = train_from_files(&inputs, &cfg, &|p| {
        if let TrainProgress::Counted { unique_pieces, .. } = p {
            counted.set(Some(start.elapsed().as_secs_f64()));
            unique.set(unique_pieces);
        }
    })?;
    let seconds = start.elapsed().as_secs_f64();

    if let Some(p) = &hf_json {
        bpe.write_hf_json(p)?;
    }
    if let Some(p) = &tiktoken {
        bpe.write_tiktoken(p)?;
    }
    if let Some((input, output)) = &encode {
        let strings: Vec<String> = serde_json::from_str(&std::fs::read_to_string(input)?)?;
        let ids = strings
            .iter()
            .map(|s| bpe.encode_ordinary(s))
            .collect::<Result<Vec<_>, _>>()?;
        std::fs::write(output, serde_json::to_string(&ids)?)?;
    }
    println!(
        "{}",
        serde_json::json!({
            "seconds": seconds,
            "count_seconds": counted.get(),
            "vocab_size": bpe.vocab_size(),
            "merges": bpe.merges.len(),
            "stopped_early": bpe.stopped_early,
            "unique_pieces": unique.get(),
        })
    );
    Ok(())
}
