//! `kiln tokenizer ...`: encode, decode, train and benchmark byte-level BPE tokenizers.

use crate::resolve;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_tokenizer::train::{TrainProgress, TrainerConfig};
use kiln_tokenizer::{validate_utf8, Rank};
use std::io::{Read, Write};
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum TokenizerCommand {
    /// Encode text (from --text or stdin) and print the token ids separated by spaces.
    ///
    /// By default special-token strings such as <|endoftext|> are encoded as ordinary text, like
    /// tiktoken's encode_ordinary; --allow-special turns them into their special ids.
    Encode(EncodeArgs),
    /// Decode token ids (arguments, or whitespace-separated on stdin) and write the exact bytes.
    Decode {
        /// Tokenizer: an asset name (cl100k_base, o200k_base, p50k_base, r50k_base, gpt2-vocab,
        /// smollm2), a .tiktoken file, a tokenizer.json, a .gguf, or a tokenizer kiln trained.
        #[arg(long, short)]
        tokenizer: String,
        /// Token ids; read from stdin when none are given.
        ids: Vec<String>,
    },
    /// Train a byte-level BPE vocabulary on text files.
    Train(TrainArgs),
    /// Encode and train side by side with tiktoken and Hugging Face tokenizers and print the ratios.
    Bench(crate::tokenizer_bench::BenchArgs),
}

#[derive(Args, Debug)]
pub struct EncodeArgs {
    /// Tokenizer: an asset name (cl100k_base, o200k_base, p50k_base, r50k_base, gpt2-vocab,
    /// smollm2), a .tiktoken file, a tokenizer.json, a .gguf, or a tokenizer kiln trained.
    #[arg(long, short)]
    tokenizer: String,
    /// The text to encode; stdin is read when this is absent.
    #[arg(long)]
    text: Option<String>,
    /// Worker threads (default: all cores). The ids are the same for any thread count.
    #[arg(long)]
    threads: Option<usize>,
    /// Print only the number of tokens.
    #[arg(long)]
    count: bool,
    /// Encode special-token strings (e.g. <|endoftext|>) as their special ids.
    #[arg(long)]
    allow_special: bool,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Training text: files, folders (every file inside), or a corpus asset name (shakespeare).
    #[arg(long, short, required = true, num_args = 1..)]
    input: Vec<String>,
    /// Vocabulary size including the 256 byte tokens and the special tokens.
    #[arg(long, default_value_t = 4096)]
    vocab_size: u32,
    /// Where to write the tokenizer (a Hugging Face compatible tokenizer.json that kiln loads back).
    #[arg(long, short)]
    output: PathBuf,
    /// Also write the vocabulary as a tiktoken rank file.
    #[arg(long)]
    tiktoken: Option<PathBuf>,
    /// Pre-tokenizer split regex (default: GPT-4's cl100k_base pattern).
    #[arg(long)]
    pattern: Option<String>,
    /// A special token to add after the merges (repeatable), e.g. --special '<|endoftext|>'.
    #[arg(long = "special")]
    special: Vec<String>,
    /// Ignore pairs seen fewer times than this.
    #[arg(long, default_value_t = 0)]
    min_frequency: u64,
    /// Worker threads for counting (default: all cores). The result is the same for any count.
    #[arg(long)]
    threads: Option<usize>,
}

pub fn run(cmd: TokenizerCommand) -> Result<()> {
    match cmd {
        TokenizerCommand::Encode(a) => encode(a),
        TokenizerCommand::Decode { tokenizer, ids } => decode(&tokenizer, &ids),
        TokenizerCommand::Train(a) => train(a),
        TokenizerCommand::Bench(a) => crate::tokenizer_bench::run(a),
    }
}

fn thread_pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    let mut b = rayon::ThreadPoolBuilder::new();
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        b = b.num_threads(n);
    }
    b.build().context("starting worker threads")
}

/// Writes to stdout, treating a closed pipe (`kiln ... | head`) as a normal end.
fn write_stdout(bytes: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to stdout"),
    }
}

fn encode(a: EncodeArgs) -> Result<()> {
    let tok = resolve::tokenizer(&a.tokenizer)?;
    let raw;
    let text: &str = match &a.text {
        Some(t) => t,
        None => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading stdin")?;
            raw = buf;
            validate_utf8(&raw).context("reading text from stdin")?
        }
    };
    let pool = thread_pool(a.threads)?;
    let ids: Vec<Rank> = pool.install(|| {
        if a.allow_special {
            tok.encode_with_special_tokens(text)
        } else {
            tok.encode_ordinary_parallel(text)
        }
    });
    if a.count {
        return write_stdout(format!("{}\n", ids.len()).as_bytes());
    }
    let mut s = String::with_capacity(ids.len() * 6);
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(&id.to_string());
    }
    s.push('\n');
    write_stdout(s.as_bytes())
}

fn decode(tokenizer: &str, ids: &[String]) -> Result<()> {
    let tok = resolve::tokenizer(tokenizer)?;
    let stdin_text;
    let words: Vec<&str> = if ids.is_empty() {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading ids from stdin")?;
        stdin_text = validate_utf8(&buf)
            .context("reading ids from stdin")?
            .to_string();
        stdin_text.split_whitespace().collect()
    } else {
        ids.iter().flat_map(|s| s.split_whitespace()).collect()
    };
    let mut parsed = Vec::with_capacity(words.len());
    for (i, w) in words.iter().enumerate() {
        let id: Rank = w
            .parse()
            .with_context(|| format!("token id #{} `{w}` is not a non-negative integer", i + 1))?;
        parsed.push(id);
    }
    let bytes = tok.decode_bytes(&parsed)?;
    write_stdout(&bytes)
}

fn train(a: TrainArgs) -> Result<()> {
    let files = resolve::input_files(&a.input)?;
    let mut cfg = TrainerConfig {
        vocab_size: a.vocab_size,
        special_tokens: a.special.clone(),
        min_frequency: a.min_frequency,
        threads: a.threads,
        ..TrainerConfig::default()
    };
    if let Some(p) = &a.pattern {
        cfg.pattern = p.clone();
    }
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    let trained = kiln_tokenizer::train::train_from_files(&files, &cfg, &|p| match p {
        TrainProgress::Counting {
            bytes_done,
            bytes_total,
        } => {
            pb.set_message("counting");
            pb.set_length(bytes_total);
            pb.set_position(bytes_done);
        }
        TrainProgress::Counted { .. } => pb.set_position(pb.length().unwrap_or(0)),
        TrainProgress::Merging {
            merges_done,
            merges_target,
        } => {
            pb.set_message("merging");
            pb.set_length(merges_target as u64);
            pb.set_position(merges_done as u64);
        }
        TrainProgress::Finished { .. } => pb.finish_and_clear(),
    })
    .context("training the tokenizer")?;
    pb.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    trained
        .save(&a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    if let Some(t) = &a.tiktoken {
        trained
            .write_tiktoken(t)
            .with_context(|| format!("writing {}", t.display()))?;
    }
    eprintln!(
        "trained {} merges ({} tokens with {} special) from {} files in {:.2}s -> {}",
        trained.merges.len(),
        trained.vocab_size(),
        trained.special_tokens.len(),
        files.len(),
        secs,
        a.output.display()
    );
    if trained.stopped_early {
        eprintln!(
            "note: the corpus ran out of pairs to merge before reaching --vocab-size {}",
            a.vocab_size
        );
    }
    Ok(())
}
