//! The OpenAI-compatible HTTP server and the web chat page (axum on tokio). It knows the engine,
//! never the models' insides.
//!
//! - Generation requests (`/v1/chat/completions`, `/v1/completions`) are parsed ([`api`]),
//!   rendered with the model's chat template, tokenized and handed to the engine's continuous
//!   batching [`Scheduler`], which owns the model and its paged KV pool on its own thread. Each
//!   request's tokens come back through a channel; a task per request turns them into text
//!   ([`TextStream`]: UTF-8 across tokens, stop strings held back) and into the OpenAI response,
//!   whole or as server-sent events.
//! - A client that goes away drops its response stream; the request's [`CancelToken`]s fire
//!   and the scheduler frees its blocks at its next step.
//! - Embeddings (`/v1/embeddings`) run on tokio's blocking pool, a bounded number at a time.
//! - Limits ([`Limits`]): body size, prompt and output tokens, choices per request, queue length
//!   (429 beyond it), request timeout. Every error has OpenAI's shape ([`error::ApiError`]).

pub mod api;
pub mod error;
pub mod metrics;

use api::Common;
use axum::body::Body;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use error::ApiError;
use futures_util::stream::Stream;
use kiln_engine::{
    CancelToken, ChatTemplate, Embedder, Event, GenerateOptions, Request, Scheduler, StopReason,
    TextStream,
};
use kiln_tokenizer::{AllowedSpecial, Tokenizer};
use metrics::Metrics;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, Semaphore};

/// Errors from starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// What protects the server from its clients.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// Prompt tokens per request (also bounded by the model's context window).
    pub max_prompt_tokens: usize,
    /// Generated tokens per choice.
    pub max_output_tokens: usize,
    /// Choices per request (`n`, times the prompts of a completion request).
    pub max_n: usize,
    pub max_embedding_inputs: usize,
    /// Embedding requests computed at once (the rest wait).
    pub max_concurrent_embeddings: usize,
    /// A generation that runs longer is stopped (streaming: an error event; otherwise 504).
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_prompt_tokens: 4096,
            max_output_tokens: 2048,
            max_n: 8,
            max_embedding_inputs: 256,
            max_concurrent_embeddings: 2,
            request_timeout: Duration::from_secs(300),
        }
    }
}

/// A generative model as the server serves it.
pub struct ServedModel {
    /// The name clients use in `"model"`.
    pub id: String,
    pub tokenizer: Arc<Tokenizer>,
    /// The chat template and the ids that end a chat reply (its end-of-turn tokens and EOS, as
    /// `kiln serve` gets them from the model); without one, only `/v1/completions` works.
    pub chat: Option<(ChatTemplate, Vec<u32>)>,
    /// Ids that end any generation (EOS).
    pub stop_ids: Vec<u32>,
    pub scheduler: Scheduler,
}

pub struct ServedEmbedder {
    pub id: String,
    pub embedder: Arc<Embedder>,
}

pub struct AppState {
    pub model: Option<ServedModel>,
    pub embedder: Option<ServedEmbedder>,
    pub limits: Limits,
    pub metrics: Metrics,
    embed_slots: Semaphore,
    next_id: AtomicU64,
    started: u64,
}

impl AppState {
    pub fn new(
        model: Option<ServedModel>,
        embedder: Option<ServedEmbedder>,
        limits: Limits,
    ) -> Arc<Self> {
        Arc::new(Self {
            embed_slots: Semaphore::new(limits.max_concurrent_embeddings.max(1)),
            model,
            embedder,
            limits,
            metrics: Metrics::default(),
            next_id: AtomicU64::new(1),
            started: now_secs(),
        })
    }

    fn ids(&self) -> Vec<&str> {
        self.model
            .iter()
            .map(|m| m.id.as_str())
            .chain(self.embedder.iter().map(|e| e.id.as_str()))
            .collect()
    }

    fn generator(&self, asked: &str) -> Result<&ServedModel, ApiError> {
        match &self.model {
            Some(m) if m.id == asked => Ok(m),
            _ if self.embedder.as_ref().is_some_and(|e| e.id == asked) => Err(ApiError::invalid(
                "model",
                format!(
                    "`{asked}` is an embedding model; it cannot generate text (use /v1/embeddings)"
                ),
            )),
            _ => Err(ApiError::model_not_found(asked, &self.ids())),
        }
    }

    fn request_id(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{:x}{:06x}",
            self.started,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The page served at `/`.
const INDEX_HTML: &str = include_str!("web/index.html");

/// All routes, for [`serve`] and for tests that drive the app in-process.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "no such endpoint; see GET /v1/models",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        // Bodies are read by `body` below, which enforces the limit itself.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

async fn count_requests(
    State(state): State<Arc<AppState>>,
    req: HttpRequest,
    next: Next,
) -> Response {
    let path = req.uri().path().to_string();
    let endpoint = match path.as_str() {
        "/"
        | "/health"
        | "/metrics"
        | "/v1/models"
        | "/v1/chat/completions"
        | "/v1/completions"
        | "/v1/embeddings" => path,
        _ => "other".to_string(),
    };
    let r = next.run(req).await;
    state.metrics.request(&endpoint, r.status().as_u16());
    r
}

/// Binds `addr`, calls `on_listen` with the bound address (port 0 picks a free one), and serves
/// until Ctrl-C.
pub async fn serve(
    state: Arc<AppState>,
    addr: &str,
    on_listen: impl FnOnce(SocketAddr),
) -> Result<(), ServerError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    on_listen(listener.local_addr()?);
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

async fn health(State(state): State<Arc<AppState>>) -> Json<Value> {
    let stats = state.model.as_ref().map(|m| m.scheduler.stats());
    Json(json!({
        "status": "ok",
        "models": state.ids(),
        "running": stats.map(|s| s.running),
        "queued": stats.map(|s| s.queued),
    }))
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    let stats = state.model.as_ref().map(|m| m.scheduler.stats());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(stats.as_ref()),
    )
        .into_response()
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let data: Vec<Value> = state
        .ids()
        .into_iter()
        .map(
            |id| json!({"id": id, "object": "model", "created": state.started, "owned_by": "kiln"}),
        )
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// The body, or a 413 in OpenAI's shape when it is over the limit. An oversized body is still
/// read (and dropped) up to 16 times the limit before the answer goes out: a client that writes
/// its whole body before reading the response then gets the 413 instead of a broken pipe.
/// Beyond that the connection is closed.
async fn body(b: Body, limits: &Limits) -> Result<Bytes, ApiError> {
    use futures_util::StreamExt;
    let limit = limits.max_body_bytes;
    let drain = limit.saturating_mul(16).max(1 << 20);
    let mut stream = b.into_data_stream();
    let mut buf = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
        total += chunk.len();
        if total <= limit {
            buf.extend_from_slice(&chunk);
        } else if total > drain {
            break;
        }
    }
    if total > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than this server's limit of {limit} bytes"),
        )
        .with_code("request_too_large"));
    }
    Ok(Bytes::from(buf))
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

async fn chat_completions(State(state): State<Arc<AppState>>, b: Body) -> Response {
    let run = async {
        let m = api::object(&body(b, &state.limits).await?)?;
        let served = state.generator(&api::model(&m)?)?;
        let req = api::chat(m, &state.limits)?;
        let Some((template, reply_stops)) = &served.chat else {
            return Err(ApiError::invalid(
                "model",
                format!("`{}` has no chat template; use /v1/completions", served.id),
            ));
        };
        let text = template.render(&req.messages, true)?;
        let prompt = encode(&served.tokenizer, &text)?;
        generate(
            &state,
            Kind::Chat,
            req.common,
            vec![prompt],
            reply_stops.clone(),
        )
        .await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(state): State<Arc<AppState>>, b: Body) -> Response {
    let run = async {
        let m = api::object(&body(b, &state.limits).await?)?;
        let served = state.generator(&api::model(&m)?)?;
        let mut req = api::completion(m, &state.limits)?;
        let prompts = req
            .prompts
            .iter()
            .map(|p| encode(&served.tokenizer, p))
            .collect::<Result<Vec<_>, _>>()?;
        // OpenAI's default for completions.
        req.common.max_tokens.get_or_insert(16);
        generate(
            &state,
            Kind::Text,
            req.common,
            prompts,
            served.stop_ids.clone(),
        )
        .await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>, ApiError> {
    tok.encode(text, &AllowedSpecial::All)
        .map_err(|e| ApiError::bad_request(format!("cannot tokenize the prompt: {e}")))
}

/// What one choice reports to the response builder.
enum ChoiceEvent {
    Text(usize, String),
    Done {
        index: usize,
        finish_reason: &'static str,
        completion_tokens: usize,
    },
    Failed(ApiError),
}

/// Cancels every choice of a request when dropped: the response (or its stream) went away.
struct CancelOnDrop(Vec<CancelToken>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.iter().for_each(CancelToken::cancel);
    }
}

async fn generate(
    state: &Arc<AppState>,
    kind: Kind,
    common: Common,
    prompts: Vec<Vec<u32>>,
    stop_ids: Vec<u32>,
) -> Result<Response, ApiError> {
    let served = state.generator(&common.model)?;
    let context = served.scheduler.context_len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let prompt_limit = state.limits.max_prompt_tokens.min(context - 1);
    if longest > prompt_limit {
        return Err(ApiError::bad_request(format!(
            "the prompt has {longest} tokens, more than this server accepts ({prompt_limit}: the model's context window is {context})"
        ))
        .with_code("context_length_exceeded"));
    }
    let room = context - longest;
    let max_tokens = match common.max_tokens {
        Some(m) if m > room => {
            return Err(ApiError::bad_request(format!(
                "the prompt ({longest} tokens) plus max_tokens ({m}) is more than the model's context window of {context} tokens"
            ))
            .with_code("context_length_exceeded"))
        }
        Some(m) => m,
        None => room.min(state.limits.max_output_tokens),
    };
    let stop_ids = if common.ignore_eos {
        Vec::new()
    } else {
        stop_ids
    };
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum::<usize>() * common.n;
    // One choice per (prompt, n); choice index = prompt * n + j, as OpenAI numbers them.
    let choices: Vec<(usize, Vec<u32>, u64)> = prompts
        .iter()
        .flat_map(|p| (0..common.n).map(move |j| (p.clone(), j as u64)))
        .enumerate()
        .map(|(i, (p, j))| (i, p, common.sampling.seed.wrapping_add(j)))
        .collect();
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<(usize, Event)>();
    let deadline = Instant::now() + state.limits.request_timeout;
    let guard = CancelOnDrop(choices.iter().map(|_| CancelToken::new()).collect());
    for (i, prompt, seed) in &choices {
        let tx = raw_tx.clone();
        let i = *i;
        let mut sampling = common.sampling.clone();
        sampling.seed = *seed;
        served.scheduler.submit(Request {
            prompt: prompt.clone(),
            opts: GenerateOptions {
                sampling,
                max_tokens,
                stop_ids: stop_ids.clone(),
            },
            deadline: Some(deadline),
            cancel: guard.0[i].clone(),
            on_event: Box::new(move |e| tx.send((i, e)).is_ok()),
        })?; // a refusal drops `guard`, which cancels the choices already queued
    }
    drop(raw_tx);
    let n_choices = choices.len();
    let (out_tx, out_rx) = mpsc::channel::<ChoiceEvent>(64);
    let task_state = state.clone();
    let stops = common.stop.clone();
    let timeout = state.limits.request_timeout;
    tokio::spawn(async move {
        let guard = guard;
        let Some(served) = task_state.model.as_ref() else {
            return;
        };
        let tok = served.tokenizer.clone();
        let mut streams: Vec<Option<TextStream>> = (0..n_choices)
            .map(|_| Some(TextStream::new(&tok, &stops, &stop_ids)))
            .collect();
        let mut by_string = vec![false; n_choices];
        let mut completion = 0;
        let mut first_token = true;
        loop {
            let ev = tokio::select! {
                _ = out_tx.closed() => break, // the client went away
                ev = raw_rx.recv() => ev,
            };
            let Some((i, ev)) = ev else { break };
            let out = match ev {
                Event::Token(id) => {
                    let Some(s) = streams[i].as_mut() else {
                        continue;
                    };
                    let text = s.push(id);
                    if s.stopped && !by_string[i] {
                        by_string[i] = true;
                        guard.0[i].cancel();
                    }
                    if text.is_empty() {
                        continue;
                    }
                    ChoiceEvent::Text(i, text)
                }
                Event::Finished(f) => {
                    completion += f.completion_tokens;
                    if let (true, Some(t)) =
                        (std::mem::take(&mut first_token), f.time_to_first_token)
                    {
                        task_state.metrics.time_to_first_token(t);
                    }
                    let tail = streams[i]
                        .take()
                        .map(TextStream::finish)
                        .unwrap_or_default();
                    if !tail.is_empty() && out_tx.send(ChoiceEvent::Text(i, tail)).await.is_err() {
                        break;
                    }
                    let finish_reason = match f.stop {
                        StopReason::StopToken(_) => "stop",
                        _ if by_string[i] => "stop",
                        StopReason::MaxTokens | StopReason::ContextFull => "length",
                        StopReason::TimedOut => {
                            let e = ApiError::new(
                                StatusCode::GATEWAY_TIMEOUT,
                                "timeout_error",
                                format!(
                                    "the request ran past this server's timeout of {} s",
                                    timeout.as_secs()
                                ),
                            )
                            .with_code("timeout");
                            let _ = out_tx.send(ChoiceEvent::Failed(e)).await;
                            break;
                        }
                        StopReason::Cancelled => break,
                    };
                    ChoiceEvent::Done {
                        index: i,
                        finish_reason,
                        completion_tokens: f.completion_tokens,
                    }
                }
                Event::Failed(e) => ChoiceEvent::Failed(e.into()),
            };
            if out_tx.send(out).await.is_err() {
                break;
            }
        }
        task_state.metrics.tokens(0, completion);
    });
    state.metrics.tokens(prompt_tokens, 0);
    let id = state.request_id(if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    });
    let meta = Meta {
        id,
        created: now_secs(),
        model: common.model.clone(),
        kind,
        prompt_tokens,
        n_choices,
    };
    if common.stream {
        Ok(stream_response(meta, out_rx, common.include_usage).into_response())
    } else {
        whole_response(meta, out_rx).await
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    prompt_tokens: usize,
    n_choices: usize,
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    fn usage(&self, completion: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    fn chunk(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        })
    }

    fn delta(&self, index: usize, text: Option<&str>, first: bool, finish: Option<&str>) -> Value {
        match self.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Text => {
                json!({"index": index, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        }
    }
}

async fn whole_response(
    meta: Meta,
    mut rx: mpsc::Receiver<ChoiceEvent>,
) -> Result<Response, ApiError> {
    let mut texts = vec![String::new(); meta.n_choices];
    let mut finish = vec![None; meta.n_choices];
    let mut completion = 0;
    while let Some(ev) = rx.recv().await {
        match ev {
            ChoiceEvent::Text(i, t) => texts[i].push_str(&t),
            ChoiceEvent::Done {
                index,
                finish_reason,
                completion_tokens,
            } => {
                finish[index] = Some(finish_reason);
                completion += completion_tokens;
            }
            ChoiceEvent::Failed(e) => return Err(e),
        }
    }
    if finish.iter().any(Option::is_none) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the request was stopped before it finished",
        ));
    }
    let choices: Vec<Value> = texts
        .into_iter()
        .zip(finish)
        .enumerate()
        .map(|(i, (text, f))| match meta.kind {
            Kind::Chat => json!({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": f}),
            Kind::Text => json!({"index": i, "text": text, "logprobs": null, "finish_reason": f}),
        })
        .collect();
    Ok(Json(json!({
        "id": meta.id,
        "object": meta.object(false),
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": null,
        "choices": choices,
        "usage": meta.usage(completion),
    }))
    .into_response())
}

fn stream_response(
    meta: Meta,
    rx: mpsc::Receiver<ChoiceEvent>,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    struct St {
        meta: Meta,
        rx: mpsc::Receiver<ChoiceEvent>,
        started: Vec<bool>,
        completion: usize,
        include_usage: bool,
        phase: u8, // 0 streaming, 1 usage sent or skipped, 2 done sent
    }
    let st = St {
        started: vec![false; meta.n_choices],
        meta,
        rx,
        completion: 0,
        include_usage,
        phase: 0,
    };
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let stream = futures_util::stream::unfold(st, move |mut st| async move {
        loop {
            match st.phase {
                0 => match st.rx.recv().await {
                    Some(ChoiceEvent::Text(i, t)) => {
                        let first = !std::mem::replace(&mut st.started[i], true);
                        let ev =
                            data(
                                st.meta
                                    .chunk(json!([st.meta.delta(i, Some(&t), first, None)])),
                            );
                        return Some((Ok(ev), st));
                    }
                    Some(ChoiceEvent::Done {
                        index,
                        finish_reason,
                        completion_tokens,
                    }) => {
                        st.completion += completion_tokens;
                        let first = !std::mem::replace(&mut st.started[index], true);
                        let text = if first && st.meta.kind == Kind::Chat {
                            Some("")
                        } else {
                            None
                        };
                        let ev = data(st.meta.chunk(json!([st.meta.delta(
                            index,
                            text,
                            first,
                            Some(finish_reason)
                        )])));
                        return Some((Ok(ev), st));
                    }
                    Some(ChoiceEvent::Failed(e)) => {
                        st.phase = 1;
                        return Some((Ok(data(e.body())), st));
                    }
                    None => st.phase = 1,
                },
                1 => {
                    st.phase = 2;
                    if st.include_usage {
                        let mut v = st.meta.chunk(json!([]));
                        v["usage"] = st.meta.usage(st.completion);
                        return Some((Ok(data(v)), st));
                    }
                }
                2 => {
                    st.phase = 3;
                    return Some((Ok(SseEvent::default().data("[DONE]")), st));
                }
                _ => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

async fn embeddings(State(state): State<Arc<AppState>>, b: Body) -> Response {
    let run = async {
        let m = api::object(&body(b, &state.limits).await?)?;
        api::model(&m)?;
        let req = api::embeddings(m, &state.limits)?;
        let served = match &state.embedder {
            Some(e) if e.id == req.model => e,
            _ if state.model.as_ref().is_some_and(|m| m.id == req.model) => {
                return Err(ApiError::invalid("model", format!("`{}` is a generative model; embeddings need an embedding model (start the server with --embedding-model)", req.model)))
            }
            _ => return Err(ApiError::model_not_found(&req.model, &state.ids())),
        };
        let dim = served.embedder.dim();
        if let Some(d) = req.dimensions {
            if d != dim {
                return Err(ApiError::invalid(
                    "dimensions",
                    format!(
                        "'dimensions' is {d}, but `{}` gives vectors of {dim}",
                        served.id
                    ),
                ));
            }
        }
        let _slot = state.embed_slots.acquire().await.map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the server is shutting down",
            )
        })?;
        let embedder = served.embedder.clone();
        let inputs = req.inputs;
        let n = inputs.len();
        let out = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
            embedder.embed(&refs)
        })
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("the embedding task failed: {e}"),
            )
        })?
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                e.to_string(),
            )
        })?;
        state.metrics.embeddings(n, out.tokens);
        let data: Vec<Value> = out
            .vectors
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let embedding = if req.base64 {
                    use base64::Engine;
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(v)
                };
                json!({"object": "embedding", "index": i, "embedding": embedding})
            })
            .collect();
        Ok(Json(json!({
            "object": "list",
            "data": data,
            "model": served.id,
            "usage": {"prompt_tokens": out.tokens, "total_tokens": out.tokens},
        }))
        .into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}
