//! `kiln logits`: the model's top next-token candidates for a prompt, for scripts and parity checks.

use crate::generate_cmd::{encode, load, Loaded};
use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct LogitsArgs {
    /// Model: an asset name (smollm2), a .gguf file or a Hugging Face model folder.
    #[arg(long, short)]
    pub model: String,
    /// The prompt text.
    #[arg(long, short)]
    pub prompt: String,
    /// How many of the highest logits to print.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Print JSON: {"tokens": [prompt ids], "top": [{"id", "text", "logit"}, ...]}.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: LogitsArgs) -> Result<()> {
    let Loaded {
        model, tokenizer, ..
    } = load(&args.model)?;
    let ids = encode(&tokenizer, &args.prompt)?;
    anyhow::ensure!(!ids.is_empty(), "the prompt is empty");
    let ctx = model.config().max_position_embeddings;
    anyhow::ensure!(
        ids.len() <= ctx,
        "the prompt has {} tokens but the context window holds {ctx}",
        ids.len()
    );
    let logits = model.logits_last(&ids, 0, &mut model.new_cache())?;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b)));
    let top: Vec<(u32, String, f32)> = order
        .iter()
        .take(args.top)
        .map(|&i| {
            let text = tokenizer
                .decode_bytes(&[i as u32])
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            (i as u32, text, logits[i])
        })
        .collect();
    if args.json {
        let v = serde_json::json!({
            "tokens": ids,
            "top": top.iter().map(|(id, text, logit)| serde_json::json!({"id": id, "text": text, "logit": logit})).collect::<Vec<_>>(),
        });
        println!("{v}");
    } else {
        println!("prompt tokens: {ids:?}");
        for (id, text, logit) in top {
            println!("{id:>8}  {logit:>10.4}  {text:?}");
        }
    }
    Ok(())
}
