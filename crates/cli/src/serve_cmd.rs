//! `kiln serve`: load the models, start the continuous-batching scheduler and the
//! OpenAI-compatible HTTP server.

use crate::generate_cmd::{chat_template, load};
use crate::resolve::path_arg;
use anyhow::{bail, Context, Result};
use clap::Args;
use kiln_engine::{Embedder, PagedLanguageModel, Scheduler, SchedulerConfig};
use kiln_server::{AppState, Limits, ServedEmbedder, ServedModel};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The generative model: an asset name (smollm2), a .gguf file or a model folder. Its id in
    /// the API is this name (an asset name, or the file or folder name).
    #[arg(long, short)]
    pub model: Option<String>,
    /// An embedding model for /v1/embeddings (an asset name such as minilm, or a folder).
    #[arg(long)]
    pub embedding_model: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (the address is printed on stdout).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 16)]
    pub max_running: usize,
    /// Requests that may wait for a place in the batch; more get 429.
    #[arg(long, default_value_t = 64)]
    pub max_queued: usize,
    /// Memory for the paged KV cache, in MiB.
    #[arg(long, default_value_t = 512)]
    pub kv_memory_mb: usize,
    /// Positions per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Tokens one batched step processes at most (decodes first, then prompt chunks).
    #[arg(long, default_value_t = 256)]
    pub max_step_tokens: usize,
    /// Do not share KV blocks between requests with the same prompt prefix.
    #[arg(long)]
    pub no_prefix_cache: bool,
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    #[arg(long, default_value_t = 4096)]
    pub max_prompt_tokens: usize,
    #[arg(long, default_value_t = 2048)]
    pub max_output_tokens: usize,
    /// Choices per request at most (`n`).
    #[arg(long, default_value_t = 8)]
    pub max_n: usize,
    /// Seconds a request may run before it is stopped.
    #[arg(long, default_value_t = 300)]
    pub request_timeout: u64,
}

/// The id clients use: the name as given, or the file or folder name of a path.
pub fn model_id(spec: &str) -> String {
    if kiln_assets::is_asset_name(spec) && !Path::new(spec).exists() {
        return spec.to_string();
    }
    Path::new(spec.trim_end_matches('/'))
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| spec.to_string())
}

pub fn run(args: ServeArgs) -> Result<()> {
    if args.model.is_none() && args.embedding_model.is_none() {
        bail!("nothing to serve: give --model (and/or --embedding-model)");
    }
    let limits = Limits {
        max_body_bytes: args.max_body_bytes,
        max_prompt_tokens: args.max_prompt_tokens,
        max_output_tokens: args.max_output_tokens,
        max_n: args.max_n.max(1),
        request_timeout: Duration::from_secs(args.request_timeout.max(1)),
        ..Limits::default()
    };
    let model = match &args.model {
        None => None,
        Some(spec) => {
            let loaded = load(spec)?;
            let chat = match chat_template(&loaded) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!("{e:#}; /v1/chat/completions will refuse this model");
                    None
                }
            };
            let stop_ids: Vec<u32> = loaded.tokenizer.eos_id().into_iter().collect();
            let llama = Arc::new(loaded.model);
            let cfg = SchedulerConfig {
                max_running: args.max_running,
                max_queued: args.max_queued,
                block_size: args.block_size,
                max_step_tokens: args.max_step_tokens,
                prefix_cache: !args.no_prefix_cache,
                ..SchedulerConfig::default()
            }
            .with_kv_bytes(
                llama.as_ref() as &dyn PagedLanguageModel,
                args.kv_memory_mb << 20,
            );
            tracing::info!(
                "KV pool: {} blocks of {} positions ({} MiB)",
                cfg.num_blocks,
                cfg.block_size,
                args.kv_memory_mb
            );
            let scheduler = Scheduler::start(llama, cfg).context("starting the scheduler")?;
            Some(ServedModel {
                id: model_id(spec),
                tokenizer: Arc::new(loaded.tokenizer),
                chat,
                stop_ids,
                scheduler,
            })
        }
    };
    let embedder = match &args.embedding_model {
        None => None,
        Some(spec) => {
            let dir = path_arg(spec)?;
            let e = Embedder::load(&dir)
                .with_context(|| format!("loading embedding model `{spec}`"))?;
            Some(ServedEmbedder {
                id: model_id(spec),
                embedder: Arc::new(e),
            })
        }
    };
    if let (Some(m), Some(e)) = (&model, &embedder) {
        if m.id == e.id {
            bail!(
                "the model and the embedding model have the same id `{}`",
                m.id
            );
        }
    }
    let state = AppState::new(model, embedder, limits);
    let addr = format!("{}:{}", args.host, args.port);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(kiln_server::serve(state, &addr, |bound| {
        println!("kiln serve: listening on http://{bound}");
        let _ = std::io::stdout().flush();
    }))?;
    eprintln!("kiln serve: stopped");
    Ok(())
}
