//! `kiln embed`: sentence embeddings from a BERT-style sentence-transformers model (all-MiniLM-L6-v2
//! as the `minilm` asset): mean pooling over the tokens, then L2 normalization.

use crate::resolve::path_arg;
use anyhow::{Context, Result};
use clap::Args;
use kiln_engine::Embedder;

#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// Model: an asset name (minilm) or a sentence-transformers / BERT folder (config.json,
    /// model.safetensors, tokenizer.json or vocab.txt).
    #[arg(long, short)]
    pub model: String,
    /// The texts to embed: `--text "first" "second"` or `--text a --text b`. Texts longer than the
    /// model's max_seq_length (256 tokens for MiniLM) are truncated, as sentence-transformers does.
    #[arg(long, short, required = true, num_args = 1.., action = clap::ArgAction::Append)]
    pub text: Vec<String>,
    /// Texts per encoder call.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Print JSON: {"model", "dim", "embeddings": [[...], ...], "tokens"} (tokens: input tokens
    /// over all texts, special tokens included).
    #[arg(long)]
    pub json: bool,
}

/// How many leading components the plain output shows per text.
const SHOWN: usize = 8;

pub fn run(args: EmbedArgs) -> Result<()> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let dir = path_arg(&args.model)?;
    let mut embedder = Embedder::load(&dir)
        .with_context(|| format!("loading embedding model `{}`", args.model))?;
    embedder.set_batch_size(args.batch_size);
    let texts: Vec<&str> = args.text.iter().map(String::as_str).collect();
    let out = embedder.embed(&texts)?;
    if args.json {
        // A struct rather than `json!`, so the floats print as the shortest f32 that round-trips
        // (`json!` widens them to f64 digits).
        #[derive(serde::Serialize)]
        struct Out<'a> {
            model: &'a str,
            dim: usize,
            embeddings: &'a [Vec<f32>],
            tokens: usize,
        }
        let v = Out {
            model: &args.model,
            dim: embedder.dim(),
            embeddings: &out.vectors,
            tokens: out.tokens,
        };
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    for (text, v) in texts.iter().zip(&out.vectors) {
        let head: Vec<String> = v.iter().take(SHOWN).map(|x| format!("{x:+.6}")).collect();
        println!("dim {} [{} ...] {text:?}", v.len(), head.join(" "));
    }
    eprintln!("{} text(s), {} tokens", texts.len(), out.tokens);
    Ok(())
}
