//! `kiln generate`: stream a model's continuation of a prompt. Also what `kiln logits` and
//! `kiln chat` share: model/tokenizer loading, the sampling flags, the chat template and the
//! streaming of text with stop strings held back.

use crate::resolve;
use anyhow::{Context, Result};
use clap::Args;
use kiln_engine::{
    ChatTemplate, GenerateOptions, Message, SamplingParams, Session, StopReason, TextStream,
};
use kiln_models::Llama;
use kiln_tokenizer::{AllowedSpecial, Tokenizer};
use std::io::Write;
use std::path::PathBuf;

/// Where a model lives and how to read its text.
pub struct Loaded {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    /// The resolved file or folder.
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

/// The model's chat template (from the GGUF or the folder's tokenizer files), with the
/// tokenizer's BOS/EOS strings, and the ids that end an assistant turn (the template's
/// end-of-turn token and EOS).
pub fn chat_template(loaded: &Loaded) -> Result<(ChatTemplate, Vec<u32>)> {
    let source = kiln_models::chat_template(&loaded.source)
        .context("reading the chat template")?
        .with_context(|| {
            format!(
                "{} carries no chat template, so it cannot be used for chat",
                loaded.source.display()
            )
        })?;
    let tok = &loaded.tokenizer;
    let text = |id: Option<u32>| {
        id.and_then(|i| tok.token_bytes(i))
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default()
    };
    let template = ChatTemplate::new(&source)
        .context("compiling the model's chat template")?
        .with_special_tokens(&text(tok.bos_id()), &text(tok.eos_id()));
    let mut stop_ids: Vec<u32> = tok.eos_id().into_iter().collect();
    for t in template.end_of_turn_tokens() {
        match single_token(tok, &t) {
            Some(id) if !stop_ids.contains(&id) => stop_ids.push(id),
            Some(_) => {}
            None => tracing::warn!("end-of-turn token {t} is not one token; not stopping on it"),
        }
    }
    Ok((template, stop_ids))
}

/// The id of a special or added token given as text.
fn single_token(tok: &Tokenizer, s: &str) -> Option<u32> {
    tok.id_of_special(s).or_else(
        || match tok.encode(s, &AllowedSpecial::All).ok()?.as_slice() {
            [id] => Some(*id),
            _ => None,
        },
    )
}

/// Renders `messages` with the template (ending in the assistant's header) and encodes it.
pub fn encode_chat(
    loaded: &Loaded,
    template: &ChatTemplate,
    messages: &[Message],
) -> Result<Vec<u32>> {
    let text = template
        .render(messages, true)
        .context("rendering the chat template")?;
    tracing::debug!("chat prompt: {text:?}");
    encode(&loaded.tokenizer, &text)
}

/// The sampling flags `kiln generate` and `kiln chat` share.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
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
}

impl SamplingArgs {
    /// The engine's parameters, checked.
    pub fn params(&self) -> Result<SamplingParams> {
        let p = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: 0.0,
            seed: self.seed,
        };
        p.validate()?;
        Ok(p)
    }
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
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Stop when the continuation contains this text (not printed); repeat for several.
    #[arg(long = "stop", value_name = "STR")]
    pub stop: Vec<String>,
    /// Wrap the prompt as one user message in the model's chat template (with the assistant's
    /// header after it) and stop at the template's end-of-turn token.
    #[arg(long)]
    pub chat: bool,
    /// Print one JSON object (prompt tokens, generated tokens, text, timings) instead of streaming.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    // Check parameters before the (slow) model load.
    let sampling = args.sampling.params()?;
    let loaded = load(&args.model)?;
    let (prompt, stop_ids) = if args.chat {
        let (template, stop_ids) = chat_template(&loaded)?;
        let prompt = encode_chat(&loaded, &template, &[Message::new("user", &args.prompt)])?;
        (prompt, stop_ids)
    } else {
        let stop_ids: Vec<u32> = loaded.tokenizer.eos_id().into_iter().collect();
        (encode(&loaded.tokenizer, &args.prompt)?, stop_ids)
    };
    let Loaded {
        model, tokenizer, ..
    } = &loaded;
    let opts = GenerateOptions {
        sampling,
        max_tokens: args.max_tokens,
        stop_ids: stop_ids.clone(),
    };
    let mut stream = TextStream::new(tokenizer, &args.stop, &stop_ids);
    let mut stdout = std::io::stdout().lock();
    let mut text = String::new();
    let mut write_err = None;
    let mut session = Session::new(model);
    let g = session.generate(&prompt, &opts, |id| {
        let piece = stream.push(id);
        if !args.json && !piece.is_empty() {
            if let Err(e) = stdout
                .write_all(piece.as_bytes())
                .and_then(|_| stdout.flush())
            {
                write_err = Some(e);
                return false;
            }
        }
        text.push_str(&piece);
        !stream.stopped
    })?;
    if let Some(e) = write_err {
        // A closed pipe (`| head`) is not an error worth reporting.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("writing to stdout");
        }
        return Ok(());
    }
    let stop_string = stream.stopped;
    let rest = stream.finish();
    text.push_str(&rest);
    let decoded = g.tokens.len().saturating_sub(1);
    let prefill_tps = g.prefill_tokens as f64 / g.prefill_time.as_secs_f64().max(1e-9);
    let decode_tps = decoded as f64 / g.decode_time.as_secs_f64().max(1e-9);
    let stop = match g.stop {
        StopReason::MaxTokens => "max_tokens".to_string(),
        StopReason::StopToken(id) => format!("stop_token:{id}"),
        StopReason::ContextFull => "context_full".to_string(),
        StopReason::TimedOut => "timed_out".to_string(),
        StopReason::Cancelled if stop_string => "stop_string".to_string(),
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
