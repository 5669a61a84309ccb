//! `kiln chat`: an interactive multi-turn chat in the terminal.
//!
//! Each turn reads one line from stdin, renders the whole conversation with the model's chat
//! template and hands its tokens to one [`Session`], which keeps the longest prefix it already
//! has in the KV cache ([`Session::sync`]) and prefills only the rest, usually just the new turn.
//! If the template re-renders an earlier part differently (or the reply re-tokenizes
//! differently), only the changed tail is prefilled again.
//!
//! Ctrl-C stops the reply being streamed; a second Ctrl-C during the same reply or within a second
//! of the first, Ctrl-C at the prompt, or end of input exits. `/reset` clears the conversation, `/exit` leaves. Works with
//! stdin not a terminal (lines are turns), which is how the tests drive it.

use crate::generate_cmd::{chat_template, encode_chat, load, Loaded, SamplingArgs};
use anyhow::{Context, Result};
use clap::Args;
use kiln_engine::TextStream;
use kiln_engine::{EngineError, GenerateOptions, Message, Session, StopReason};
use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Args, Debug)]
pub struct ChatArgs {
    /// Model: an asset name (smollm2), a .gguf file or a Hugging Face model folder.
    #[arg(long, short)]
    pub model: String,
    /// A system message to start the conversation with (else the template's default, if any).
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// End a reply when it contains this text (not printed); repeat for several.
    #[arg(long = "stop", value_name = "STR")]
    pub stop: Vec<String>,
}

/// Ctrl-C's effect depends on whether a reply is streaming; the handler and the loop share this.
#[derive(Default)]
struct Interrupt {
    generating: AtomicBool,
    hits: AtomicUsize,
    /// When the last Ctrl-C came, in milliseconds since the epoch.
    last_ms: AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn install_ctrlc() -> Arc<Interrupt> {
    let state = Arc::new(Interrupt::default());
    let s = state.clone();
    let installed = ctrlc::set_handler(move || {
        let first = s.hits.fetch_add(1, Ordering::SeqCst) == 0;
        let now = now_ms();
        let quick = now.saturating_sub(s.last_ms.swap(now, Ordering::SeqCst)) < 1000;
        if !s.generating.load(Ordering::SeqCst) || !first || quick {
            eprintln!();
            std::process::exit(130);
        }
    });
    if let Err(e) = installed {
        tracing::warn!("cannot handle Ctrl-C ({e}); it will end kiln instead of the reply");
    }
    state
}

pub fn run(args: ChatArgs) -> Result<()> {
    let sampling = args.sampling.params()?;
    let loaded = load(&args.model)?;
    let (template, stop_ids) = chat_template(&loaded)?;
    let Loaded {
        model, tokenizer, ..
    } = &loaded;
    let opts = GenerateOptions {
        sampling,
        max_tokens: args.max_tokens,
        stop_ids: stop_ids.clone(),
    };
    let interrupt = install_ctrlc();
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "chatting with {} (/reset clears, /exit or Ctrl-D leaves)",
            args.model
        );
    }
    let start: Vec<Message> = args
        .system
        .iter()
        .map(|s| Message::new("system", s))
        .collect();
    let mut messages = start.clone();
    let mut session = Session::new(model);
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    let mut line = String::new();
    let mut turn = 0;
    loop {
        if interactive {
            write!(stdout, "> ")?;
            stdout.flush()?;
        }
        line.clear();
        if stdin.read_line(&mut line).context("reading stdin")? == 0 {
            break;
        }
        let input = line.trim_end_matches(['\n', '\r']);
        match input.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages = start.clone();
                session.reset();
                if interactive {
                    eprintln!("(conversation cleared)");
                }
                continue;
            }
            _ => {}
        }
        turn += 1;
        messages.push(Message::new("user", input));
        let ids = encode_chat(&loaded, &template, &messages)?;
        let kept = session.sync(&ids);
        interrupt.hits.store(0, Ordering::SeqCst);
        interrupt.generating.store(true, Ordering::SeqCst);
        let mut stream = TextStream::new(tokenizer, &args.stop, &stop_ids);
        let mut reply = String::new();
        let mut write_err = None;
        let result = session.generate(&[], &opts, |id| {
            let piece = stream.push(id);
            if let Err(e) = stdout
                .write_all(piece.as_bytes())
                .and_then(|_| stdout.flush())
            {
                write_err = Some(e);
                return false;
            }
            reply.push_str(&piece);
            !stream.stopped && interrupt.hits.load(Ordering::SeqCst) == 0
        });
        interrupt.generating.store(false, Ordering::SeqCst);
        if let Some(e) = write_err {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(e).context("writing to stdout");
        }
        let g = match result {
            Ok(g) => g,
            Err(e @ EngineError::PromptTooLong { .. }) => {
                // The conversation outgrew the context window: say so and let the user /reset.
                messages.pop();
                eprintln!("error: {e}; /reset to start over");
                continue;
            }
            Err(e) => return Err(e).context("generating the reply"),
        };
        let rest = stream.finish();
        write!(stdout, "{rest}")?;
        reply.push_str(&rest);
        writeln!(stdout)?;
        stdout.flush()?;
        let why = match g.stop {
            StopReason::MaxTokens => "max tokens",
            StopReason::StopToken(_) => "end of turn",
            StopReason::ContextFull => "context full",
            StopReason::Cancelled if interrupt.hits.load(Ordering::SeqCst) > 0 => "interrupted",
            StopReason::Cancelled => "stop string",
            StopReason::TimedOut => "timed out",
        };
        tracing::info!(
            "turn {turn}: prompt {} tokens, {kept} reused from the KV cache, {} prefilled; \
             reply {} tokens ({why})",
            ids.len(),
            g.prefill_tokens,
            g.tokens.len()
        );
        if matches!(g.stop, StopReason::ContextFull) {
            eprintln!("(the context window is full; /reset to start over)");
        }
        messages.push(Message::new("assistant", reply));
    }
    Ok(())
}
