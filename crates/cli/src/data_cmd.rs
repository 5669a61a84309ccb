//! `kiln data ...`: turn text into the token shards that pretraining reads.

use crate::resolve;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_train::data::{DocSplit, PrepareConfig, PrepareProgress};
use std::path::{Path, PathBuf};

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Tokenize text files into DIR/train.bin, DIR/val.bin, DIR/tokenizer.json and DIR/meta.json.
    ///
    /// Each input file is one document (or, with --doc-split blank-lines, each run of text
    /// between blank lines); every document is followed by the tokenizer's <|endoftext|> token
    /// (or its end-of-sequence token). Whole documents are held out for validation, chosen by
    /// --seed. The output appears atomically: meta.json is written last, so a folder that has it
    /// is complete.
    Prepare(PrepareArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DocSplitArg {
    /// Each file is one document.
    File,
    /// Each run of non-blank lines is one document.
    BlankLines,
}

#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// Tokenizer: a tokenizer.json (e.g. from `kiln tokenizer train --special '<|endoftext|>'`),
    /// an asset name (cl100k_base, o200k_base, gpt2-vocab, smollm2...), a .tiktoken file or a
    /// .gguf. One that is not a tokenizer.json is saved beside the shards in that format.
    #[arg(long, short)]
    tokenizer: String,
    /// Text: files, folders (every regular file inside, recursively, sorted by path; hidden
    /// files skipped) or a corpus asset name (shakespeare).
    #[arg(long, short, required = true, num_args = 1..)]
    input: Vec<String>,
    /// The output folder.
    #[arg(long, short)]
    out: PathBuf,
    /// Share of documents held out for validation (at least one document each way).
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Seed that chooses the validation documents.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// How input files are cut into documents.
    #[arg(long, value_enum, default_value = "file")]
    doc_split: DocSplitArg,
    /// Tokenizer threads (default: all cores). The output is the same for any count.
    #[arg(long)]
    threads: Option<usize>,
    /// Replace a dataset already in --out.
    #[arg(long)]
    force: bool,
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Prepare(a) => prepare(a),
    }
}

/// Regular files under `dir`, recursively, skipping hidden names (an asset folder's manifest).
/// Symbolic links to files are followed; links to folders are not, so a cycle cannot loop.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("reading folder {}", dir.display()))?
    {
        let entry = entry.with_context(|| format!("reading folder {}", dir.display()))?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let kind = entry
            .file_type()
            .with_context(|| format!("reading {}", path.display()))?;
        if kind.is_dir() {
            files_under(&path, out)?;
        } else if path.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

fn input_files(inputs: &[String]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for spec in inputs {
        let p = resolve::path_arg(spec)?;
        if p.is_dir() {
            let mut inner = Vec::new();
            files_under(&p, &mut inner)?;
            if inner.is_empty() {
                bail!("folder {} has no files", p.display());
            }
            inner.sort();
            files.extend(inner);
        } else {
            files.push(p);
        }
    }
    Ok(files)
}

/// The tokenizer.json a spec loads from, if it is one: copied verbatim beside the shards.
fn tokenizer_json_source(spec: &str) -> Result<Option<PathBuf>> {
    let p = resolve::path_arg(spec)?;
    if p.is_dir() {
        let j = p.join("tokenizer.json");
        return Ok(j.is_file().then_some(j));
    }
    Ok((p.extension().and_then(|e| e.to_str()) == Some("json")).then_some(p))
}

fn prepare(a: PrepareArgs) -> Result<()> {
    if a.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    let tok = resolve::tokenizer(&a.tokenizer)?;
    let tok_json = tokenizer_json_source(&a.tokenizer)?;
    let files = input_files(&a.input)?;
    let cfg = PrepareConfig {
        val_fraction: a.val_fraction,
        seed: a.seed,
        doc_split: match a.doc_split {
            DocSplitArg::File => DocSplit::File,
            DocSplitArg::BlankLines => DocSplit::BlankLines,
        },
        force: a.force,
        threads: a.threads,
    };
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {bytes}/{total_bytes} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message("tokenizing");
    let started = std::time::Instant::now();
    let meta = kiln_train::prepare(
        &tok,
        tok_json.as_deref(),
        &files,
        &a.out,
        &cfg,
        &|p: PrepareProgress| {
            pb.set_length(p.bytes_total);
            pb.set_position(p.bytes_done);
        },
    )
    .with_context(|| format!("preparing {}", a.out.display()))?;
    pb.finish_and_clear();
    let (t, v) = (&meta.train, &meta.val);
    let tokens = t.n_tokens + v.n_tokens;
    let docs = t.n_docs + v.n_docs;
    // Bytes per text token: the separators carry no text.
    let bytes_per_token = (t.n_bytes + v.n_bytes) as f64 / (tokens - docs).max(1) as f64;
    eprintln!(
        "prepared {} documents ({} train, {} val), {} tokens ({} train, {} val), {:.2} bytes per token, from {} files in {:.2}s -> {}",
        docs,
        t.n_docs,
        v.n_docs,
        tokens,
        t.n_tokens,
        v.n_tokens,
        bytes_per_token,
        files.len(),
        started.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}
