//! `kiln`: the command-line front end. It parses arguments into plain structs and calls the library
//! crates; nothing here knows how a tokenizer or a model works inside.

mod assets_cmd;
mod bench_embed;
mod bench_generate;
mod bench_serve;
mod bench_train;
mod chat_cmd;
mod data_cmd;
mod embed_cmd;
mod generate_cmd;
mod logits_cmd;
mod plot;
mod resolve;
mod serve_cmd;
mod speedrun_cmd;
mod tokenizer_bench;
mod tokenizer_cmd;
mod train_cmd;
mod venv;
mod worker;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// kiln: a foundation model's whole life in one tool: data, tokenizers, pretraining, fine-tuning,
/// evaluation, inference and serving.
#[derive(Parser, Debug)]
#[command(name = "kiln", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace). KILN_LOG overrides it with a tracing filter.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Fetch, list, locate and verify the reference assets (models, tokenizers, corpora, tests).
    #[command(subcommand)]
    Assets(assets_cmd::AssetsCommand),
    /// Encode, decode, train and benchmark byte-level BPE tokenizers.
    #[command(subcommand)]
    Tokenizer(tokenizer_cmd::TokenizerCommand),
    /// Generate a continuation of a prompt with a LLaMA-family model (streams to stdout).
    Generate(generate_cmd::GenerateArgs),
    /// Print a model's top next-token logits for a prompt.
    Logits(logits_cmd::LogitsArgs),
    /// Sentence embeddings from a BERT-style sentence-transformers model (minilm).
    Embed(embed_cmd::EmbedArgs),
    /// Chat with a model in the terminal (one line per turn; Ctrl-C stops a reply).
    Chat(chat_cmd::ChatArgs),
    /// Serve a model over an OpenAI-compatible HTTP API with continuous batching, plus a web chat.
    Serve(serve_cmd::ServeArgs),
    /// Prepare pretraining data: text files to token shards.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// Pretrain a model on a prepared dataset (resumable, deterministic).
    Train(train_cmd::TrainArgs),
    /// The end-to-end speedrun: tokenizer, data, pretraining, evaluation, samples and a report.
    Speedrun(speedrun_cmd::SpeedrunArgs),
    /// Benchmarks that run kiln and its peer side by side and print the ratios.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Prompt processing and decode tok/s against llama.cpp's llama-bench on the same GGUF.
    Generate(bench_generate::BenchGenerateArgs),
    /// Output tokens/s and time to first token of `kiln serve` at 1-64 concurrent streaming clients.
    Serve(bench_serve::BenchServeArgs),
    /// Training tokens/s and peak memory against PyTorch eager on the same GPT-2-style model.
    Train(bench_train::BenchTrainArgs),
    /// Sentence embeddings/s against sentence-transformers on the same model and texts.
    Embed(bench_embed::BenchEmbedArgs),
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Assets(cmd) => assets_cmd::run(cmd),
        Command::Tokenizer(cmd) => tokenizer_cmd::run(cmd),
        Command::Generate(args) => generate_cmd::run(args),
        Command::Logits(args) => logits_cmd::run(args),
        Command::Bench(BenchCommand::Generate(args)) => bench_generate::run(args),
        Command::Chat(args) => chat_cmd::run(args),
        Command::Train(args) => train_cmd::run(args),
        Command::Speedrun(args) => speedrun_cmd::run(args),
        Command::Bench(BenchCommand::Train(args)) => bench_train::run(args),
        Command::Data(cmd) => data_cmd::run(cmd),
        Command::Serve(args) => serve_cmd::run(args),
        Command::Bench(BenchCommand::Serve(args)) => bench_serve::run(args),
        Command::Embed(args) => embed_cmd::run(args),
        Command::Bench(BenchCommand::Embed(args)) => bench_embed::run(args),
    }
}

/// candle's CPU element-wise ops (SiLU, exp, ...) run on its own barrier pool, whose idle workers
/// spin 25,000 times after every op before parking. Between two ops they steal a core from the
/// rayon workers of kiln's quantized matmuls: on 2 cores, 128-token prefill at 2 threads measured
/// ~310 tok/s with the default and ~390 tok/s with a limit of 200 spins (decode unchanged within
/// noise; CANDLE_NUM_THREADS=1, which drops the pool, gave ~375). Set before any thread starts,
/// and only when the user has not chosen a value.
fn tame_candle_spinning() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "200");
    }
}

/// candle allocates a fresh buffer for every tensor op; glibc serves buffers above its mmap
/// threshold (128 KiB, growing to at most 32 MiB) with `mmap` and returns them with `munmap`, so
/// each training step page-faulted and zeroed its activations and gradients anew: about 10% of
/// a step's time in the kernel (`exc_page_fault`, `clear_page_erms`). Serving every size from the
/// heap and never trimming it lets freed buffers be reused. Only on glibc; elsewhere a no-op.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Training runs its heavy work (GEMMs, fused kernels, the optimizer) on rayon's pool; candle's
/// own pool for its element-wise ops then only competes with it for the cores: the 2-thread
/// training step measured 0.48 s with both pools and 0.43 s with candle's ops on the calling
/// thread. Serving is the same: the scheduler thread and rayon's pool do the work (16 streaming
/// clients measured ~110-117 tok/s with it, ~92-106 without). Set before any candle op runs, and
/// only when the user has not chosen a value.
fn single_candle_pool() {
    const VAR: &str = "CANDLE_NUM_THREADS";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "1");
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    // A panic is a bug in kiln, never the user's fault; say so in one line instead of a backtrace
    // (RUST_BACKTRACE=1 still gets the full report).
    if std::env::var_os("RUST_BACKTRACE").is_none() {
        std::panic::set_hook(Box::new(|info| {
            eprintln!("kiln: internal error (please report it): {info}");
        }));
    }
    tame_candle_spinning();
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Train(_)
            | Command::Speedrun(_)
            | Command::Bench(BenchCommand::Train(_))
            | Command::Embed(_)
            | Command::Bench(BenchCommand::Embed(_))
            | Command::Serve(_)
    ) {
        single_candle_pool();
    }
    init_tracing(cli.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole cause chain on one line: "what failed: why: root cause".
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
