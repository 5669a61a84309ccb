//! `kiln generate`: stream a model's continuation of a prompt. Also the model/tokenizer loading
//! shared with `kiln logits`.

use crate::resolve;
use anyhow::{Context, Result};
use clap::Args;
use kiln_engine::{GenerateOptions, SamplingParams, Session, StopReason};
use kiln_models::Llama;
use kiln_tokenizer::{AllowedSpecial, Tokenizer};
use std::io::Write;
use std::path::PathBuf;

/// Where a model lives and how to read its text.
pub struct Loaded {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    /// The resolved file or folder.
    #[allow(dead_code)]
    pub source: PathBuf,
}

/// Loads a model from an asset name (`smollm2`), a `.gguf` file or a Hugging Face folder, with
/// the tokenizer stored beside it (inside the GGUF, or the folder's `tokenizer.json`).
pub fn load(spec: &str) -> Result<Loaded> {
    let path = resolve::path_arg(spec)?;
    let start = std::time::Instant::now();
    let model = Llama::load(&path).with_context(|| format!("loading model `{spec}`"))?;
    tracing::info!("loaded {} in {:.2?}", path.display(), start.elapsed());
    let tokenizer = if path.is_dir() {
        Tokenizer::load(&path.join("tokenizer.json"))
    } else {
        Tokenizer::from_gguf(&path)
    }
    .with_context(|| format!("loading the tokenizer of `{spec}`"))?;
    Ok(Loaded {
        model,
        tokenizer,
        source: path,
    })
}

/// Prompt text to ids; special-token strings in the prompt (`<|im_start|>`) become their ids.
pub fn encode(tok: &Tokenizer, prompt: &str) -> Result<Vec<u32>> {
    tok.encode(prompt, &AllowedSpecial::All)
        .context("encoding the prompt")
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model: an asset name (smollm2), a .gguf file or a Hugging Face model folder.
    #[arg(long, short)]
    pub model: String,
    /// The prompt text (special tokens such as <|im_start|> are recognized).
    #[arg(long, short)]
    pub prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the K most likely tokens (0 keeps all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep tokens at least this fraction as likely as the most likely one.
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Penalize tokens already in the context (1 is off; 1.1 is typical).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Subtract this times a token's count so far from its logit (OpenAI's frequency_penalty).
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Random seed for sampling (the same seed gives the same text).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object (prompt tokens, generated tokens, text, timings) instead of streaming.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        frequency_penalty: args.frequency_penalty,
        presence_penalty: 0.0,
        seed: args.seed,
    };
    // Check parameters before the (slow) model load.
    sampling.validate()?;
    let Loaded {
        model, tokenizer, ..
    } = load(&args.model)?;
    let prompt = encode(&tokenizer, &args.prompt)?;
    let stop_ids: Vec<u32> = tokenizer.eos_id().into_iter().collect();
    let opts = GenerateOptions {
        sampling,
        max_tokens: args.max_tokens,
        stop_ids: stop_ids.clone(),
    };
    let mut decoder = tokenizer.stream_decoder();
    let mut stdout = std::io::stdout().lock();
    let mut text = String::new();
    let mut write_err = None;
    let mut session = Session::new(&model);
    let g = session.generate(&prompt, &opts, |id| {
        if stop_ids.contains(&id) {
            return true;
        }
        match decoder.push(id) {
            Ok(piece) => {
                if !args.json {
                    if let Err(e) = stdout
                        .write_all(piece.as_bytes())
                        .and_then(|_| stdout.flush())
                    {
                        write_err = Some(e);
                        return false;
                    }
                }
                text.push_str(&piece);
                true
            }
            Err(e) => {
                tracing::warn!("cannot decode token {id}: {e}");
                true
            }
        }
    })?;
    if let Some(e) = write_err {
        // A closed pipe (`| head`) is not an error worth reporting.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("writing to stdout");
        }
        return Ok(());
    }
    let rest = decoder.finish();
    text.push_str(&rest);
    let decoded = g.tokens.len().saturating_sub(1);
    let prefill_tps = g.prefill_tokens as f64 / g.prefill_time.as_secs_f64().max(1e-9);
    let decode_tps = decoded as f64 / g.decode_time.as_secs_f64().max(1e-9);
    let stop = match g.stop {
        StopReason::MaxTokens => "max_tokens".to_string(),
        StopReason::StopToken(id) => format!("stop_token:{id}"),
        StopReason::ContextFull => "context_full".to_string(),
        StopReason::Cancelled => "cancelled".to_string(),
    };
    if args.json {
        let v = serde_json::json!({
            "prompt_tokens": prompt,
            "tokens": g.tokens,
            "text": text,
            "stop": stop,
            "prefill_tokens_per_s": prefill_tps,
            "decode_tokens_per_s": decode_tps,
        });
        writeln!(stdout, "{v}")?;
    } else {
        writeln!(stdout, "{rest}")?;
        tracing::info!(
            "prompt {} tokens at {prefill_tps:.1} tok/s; generated {} tokens, decode {decode_tps:.1} tok/s; stop: {stop}",
            g.prefill_tokens,
            g.tokens.len()
        );
    }
    Ok(())
}
