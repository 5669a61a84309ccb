//! `kiln bench serve`: throughput and time to first token of `kiln serve` under 1, 4, 16 and 64
//! concurrent streaming clients on loopback.
//!
//! The server runs as a child `kiln serve` process (so the load generator's threads are not in
//! its rayon pool); each client is a task on a one-thread tokio runtime that sends streaming chat
//! requests back to back until the level's request count is used up. Every request asks for
//! exactly `--max-tokens` tokens (`ignore_eos`), so throughput compares equal work. The HTTP
//! client is a few lines over a TCP socket (HTTP/1.1, chunked SSE): enough for loopback and
//! exact about when the first token's bytes arrive.

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as TokioBufReader};

#[derive(Args, Debug)]
pub struct BenchServeArgs {
    /// Model: an asset name (smollm2), a .gguf file or a model folder.
    #[arg(long, short, default_value = "smollm2")]
    model: String,
    /// Concurrent clients, one level after another.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    clients: Vec<usize>,
    /// Requests per level: at least this many, and at least two per client.
    #[arg(long, default_value_t = 8)]
    requests: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Threads of the server's compute pool (RAYON_NUM_THREADS); default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// Sequences the server decodes together.
    #[arg(long, default_value_t = 64)]
    max_running: usize,
    /// Write the results as JSON to this file as well.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const QUESTIONS: [&str; 8] = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a hash table is, in two sentences.",
    "Give me three tips for learning to cook.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet in a few lines, mentioning the families and the ending.",
    "What are the planets of the solar system, in order from the sun?",
    "Translate 'good morning, how are you today?' into French and Spanish.",
];

#[derive(Debug, Clone, serde::Serialize)]
struct Level {
    clients: usize,
    requests: usize,
    failed: usize,
    output_tokens: usize,
    seconds: f64,
    tokens_per_s: f64,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
}

pub fn run(args: BenchServeArgs) -> Result<()> {
    if args.clients.is_empty() || args.clients.contains(&0) || args.max_tokens == 0 {
        bail!("--clients must list positive numbers and --max-tokens must be positive");
    }
    let exe = std::env::current_exe().context("locating the kiln binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(["serve", "--model", &args.model, "--port", "0"])
        .args(["--max-running", &args.max_running.to_string()])
        .args(["--max-queued", "1024"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(t) = args.threads {
        cmd.env("RAYON_NUM_THREADS", t.to_string());
    }
    let mut child = Server(cmd.spawn().context("starting kiln serve")?);
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().context("server stdout")?)
        .read_line(&mut line)
        .context("reading the server's address")?;
    let addr = line
        .trim()
        .strip_prefix("kiln serve: listening on http://")
        .with_context(|| format!("kiln serve did not start: {line:?}"))?
        .to_string();
    let model_id = crate::serve_cmd::model_id(&args.model);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Warm-up: page in the weights and the code paths.
    rt.block_on(one_request(&addr, &model_id, QUESTIONS[0], 8))?;
    let mut levels = Vec::new();
    println!(
        "{:>8} {:>9} {:>7} {:>14} {:>10} {:>10} {:>8}",
        "clients", "requests", "failed", "output tok/s", "TTFT p50", "TTFT p99", "seconds"
    );
    for &clients in &args.clients {
        let requests = args.requests.max(2 * clients);
        let level = rt.block_on(run_level(
            &addr,
            &model_id,
            clients,
            requests,
            args.max_tokens,
        ));
        println!(
            "{:>8} {:>9} {:>7} {:>14.1} {:>8.0}ms {:>8.0}ms {:>8.1}",
            level.clients,
            level.requests,
            level.failed,
            level.tokens_per_s,
            level.ttft_p50_ms,
            level.ttft_p99_ms,
            level.seconds
        );
        levels.push(level);
    }
    let base = levels
        .iter()
        .find(|l| l.clients == 1)
        .map(|l| l.tokens_per_s);
    if let Some(b) = base {
        for l in levels.iter().filter(|l| l.clients > 1) {
            println!(
                "throughput at {} clients = {:.2}x one client",
                l.clients,
                l.tokens_per_s / b
            );
        }
    }
    let failed: usize = levels.iter().map(|l| l.failed).sum();
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&json!({"model": args.model, "max_tokens": args.max_tokens, "threads": args.threads, "levels": levels}))?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if failed > 0 {
        bail!("{failed} requests failed");
    }
    Ok(())
}

async fn run_level(
    addr: &str,
    model: &str,
    clients: usize,
    requests: usize,
    max_tokens: usize,
) -> Level {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (addr, model, next) = (addr.to_string(), model.to_string(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= requests {
                    break;
                }
                out.push(
                    one_request(&addr, &model, QUESTIONS[i % QUESTIONS.len()], max_tokens).await,
                );
            }
            out
        }));
    }
    let mut ttfts = Vec::new();
    let (mut tokens, mut failed) = (0, 0);
    for t in tasks {
        for r in t.await.unwrap_or_default() {
            match r {
                Ok((ttft, n)) if n == max_tokens => {
                    ttfts.push(ttft.as_secs_f64() * 1e3);
                    tokens += n;
                }
                Ok((_, n)) => {
                    tracing::warn!("a request returned {n} tokens instead of {max_tokens}");
                    failed += 1;
                }
                Err(e) => {
                    tracing::warn!("request failed: {e:#}");
                    failed += 1;
                }
            }
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    ttfts.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if ttfts.is_empty() {
            return f64::NAN;
        }
        let i = ((p / 100.0) * (ttfts.len() - 1) as f64).round() as usize;
        ttfts[i.min(ttfts.len() - 1)]
    };
    Level {
        clients,
        requests,
        failed,
        output_tokens: tokens,
        seconds,
        tokens_per_s: tokens as f64 / seconds,
        ttft_p50_ms: pct(50.0),
        ttft_p99_ms: pct(99.0),
    }
}

/// One streaming chat request: (time to the first content chunk, content chunks received).
/// Each SSE chunk of content is one token for this server.
async fn one_request(
    addr: &str,
    model: &str,
    question: &str,
    max_tokens: usize,
) -> Result<(Duration, usize)> {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": 1,
        "stream": true,
        "stream_options": {"include_usage": true},
        "ignore_eos": true,
    })
    .to_string();
    let t0 = Instant::now();
    let mut sock = tokio::net::TcpStream::connect(addr).await?;
    sock.set_nodelay(true)?;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    let mut r = TokioBufReader::new(sock);
    let mut status = String::new();
    r.read_line(&mut status).await?;
    if !status.contains(" 200 ") {
        let mut rest = String::new();
        let _ = r.read_to_string(&mut rest).await;
        bail!("{} {}", status.trim(), rest.lines().last().unwrap_or(""));
    }
    loop {
        let mut h = String::new();
        r.read_line(&mut h).await?;
        if h == "\r\n" || h.is_empty() {
            break;
        }
    }
    // Chunked transfer encoding: hex size line, data, CRLF; SSE events inside.
    let mut pending = String::new();
    let mut first = None;
    let mut usage_tokens = None;
    'outer: loop {
        let mut size = String::new();
        if r.read_line(&mut size).await? == 0 {
            break;
        }
        let n = usize::from_str_radix(size.trim(), 16)
            .with_context(|| format!("bad chunk size {size:?}"))?;
        if n == 0 {
            break;
        }
        let mut buf = vec![0u8; n + 2];
        r.read_exact(&mut buf).await?;
        pending.push_str(&String::from_utf8_lossy(&buf[..n]));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                break 'outer;
            }
            let v: Value = serde_json::from_str(data)?;
            if let Some(e) = v.get("error") {
                bail!("server error: {e}");
            }
            if v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
                && first.is_none()
            {
                first = Some(t0.elapsed());
            }
            if let Some(u) = v["usage"]["completion_tokens"].as_u64() {
                usage_tokens = Some(u as usize);
            }
        }
    }
    let ttft = first.context("no token arrived")?;
    Ok((ttft, usage_tokens.context("no usage chunk")?))
}
