//! The continuous-batching scheduler against the single-sequence generation loop: every request
//! generates what `Session::generate` gives for its prompt alone, whatever shares its batch,
//! when it arrives, whether its prompt prefix came from the cache and whether it was preempted.
//! Also cancellation, timeouts, the queue limit and the refusals at submit.

use kiln_engine::{
    CancelToken, EngineError, Event, Finish, GenerateOptions, Request, SamplingParams, Scheduler,
    SchedulerConfig, Session, StopReason,
};
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn random_model(name: &str) -> kiln_models::Llama {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures/random");
    kiln_models::Llama::load(&dir.join(name)).unwrap()
}

type Outcome = (Vec<u32>, Result<Finish, String>);

/// Submits a request whose events land in the returned receiver.
fn submit(
    s: &Scheduler,
    prompt: Vec<u32>,
    opts: GenerateOptions,
    cancel: CancelToken,
    deadline: Option<Instant>,
) -> Result<mpsc::Receiver<Event>, EngineError> {
    let (tx, rx) = mpsc::channel();
    s.submit(Request {
        prompt,
        opts,
        deadline,
        cancel,
        on_event: Box::new(move |e| tx.send(e).is_ok()),
    })?;
    Ok(rx)
}

fn collect(rx: mpsc::Receiver<Event>) -> Outcome {
    let mut tokens = Vec::new();
    loop {
        match rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the scheduler answers")
        {
            Event::Token(t) => tokens.push(t),
            Event::Finished(f) => return (tokens, Ok(f)),
            Event::Failed(e) => return (tokens, Err(e.to_string())),
        }
    }
}

/// The stats once the worker has retired everything (it publishes after each step).
fn settled(s: &Scheduler) -> kiln_engine::Stats {
    let t0 = Instant::now();
    loop {
        let st = s.stats();
        if (st.running == 0 && st.queued == 0) || t0.elapsed() > Duration::from_secs(5) {
            return st;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn opts(max_tokens: usize, sampling: SamplingParams) -> GenerateOptions {
    GenerateOptions {
        sampling,
        max_tokens,
        stop_ids: vec![],
    }
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![
            1, 17, 200, 45, 3, 99, 12, 7, 8, 33, 34, 35, 36, 37, 38, 39, 40, 41,
        ],
        vec![5],
        vec![9, 8, 7, 6],
        vec![250, 2, 44, 61, 5, 5, 5],
        (0..40).map(|i| (i * 13 + 7) % 256).collect(),
    ]
}

fn alone(model: &kiln_models::Llama, p: &[u32], o: &GenerateOptions) -> Vec<u32> {
    Session::new(model).generate(p, o, |_| true).unwrap().tokens
}

/// Runs all prompts (some submitted while others decode) and checks each against its solo run.
fn check_against_solo(name: &str, cfg: SchedulerConfig, sampling: SamplingParams) -> Vec<Finish> {
    let model = Arc::new(random_model(name));
    let o = opts(14, sampling);
    let want: Vec<Vec<u32>> = prompts().iter().map(|p| alone(&model, p, &o)).collect();
    let sched = Scheduler::start(model.clone(), cfg).unwrap();
    let mut rxs = Vec::new();
    for (i, p) in prompts().into_iter().enumerate() {
        rxs.push(submit(&sched, p, o.clone(), CancelToken::new(), None).unwrap());
        if i == 2 {
            // Let the first ones start decoding before the rest arrive.
            std::thread::sleep(Duration::from_millis(30));
        }
    }
    let mut finishes = Vec::new();
    for (i, rx) in rxs.into_iter().enumerate() {
        let (tokens, fin) = collect(rx);
        let fin = fin.unwrap();
        assert_eq!(tokens, want[i], "{name}: prompt {i}");
        assert_eq!(fin.stop, StopReason::MaxTokens);
        assert_eq!(fin.completion_tokens, 14);
        assert_eq!(fin.prompt_tokens, prompts()[i].len());
        finishes.push(fin);
    }
    let st = settled(&sched);
    assert_eq!(st.blocks_in_use, 0, "every block is released: {st:?}");
    finishes
}

#[test]
fn every_request_generates_what_it_generates_alone() {
    let seeded = SamplingParams {
        temperature: 0.8,
        top_k: 20,
        seed: 7,
        ..SamplingParams::default()
    };
    for name in ["llama", "qwen2", "mistral"] {
        for sampling in [SamplingParams::default(), seeded.clone()] {
            let cfg = SchedulerConfig {
                block_size: 4,
                num_blocks: 256,
                max_step_tokens: 16, // the 40-token prompt is prefilled in chunks
                ..SchedulerConfig::default()
            };
            check_against_solo(name, cfg, sampling);
        }
    }
}

#[test]
fn preempted_requests_still_generate_the_same_tokens() {
    // 28 positions of pool: the batch cannot hold everyone, so sequences are preempted and
    // recomputed later.
    let cfg = SchedulerConfig {
        block_size: 4,
        num_blocks: 15,
        max_running: 4,
        ..SchedulerConfig::default()
    };
    let model = Arc::new(random_model("llama"));
    let o = opts(14, SamplingParams::default());
    let prompts = prompts();
    let want: Vec<Vec<u32>> = prompts.iter().map(|p| alone(&model, p, &o)).collect();
    let sched = Scheduler::start(model.clone(), cfg).unwrap();
    let rxs: Vec<_> = prompts
        .iter()
        .map(|p| submit(&sched, p.clone(), o.clone(), CancelToken::new(), None).unwrap())
        .collect();
    for (i, rx) in rxs.into_iter().enumerate() {
        assert_eq!(collect(rx).0, want[i], "prompt {i}");
    }
    assert!(sched.stats().preemptions > 0, "{:?}", sched.stats());
}

#[test]
fn a_shared_prefix_is_computed_once() {
    let model = Arc::new(random_model("llama"));
    let cfg = SchedulerConfig {
        block_size: 4,
        num_blocks: 64,
        ..SchedulerConfig::default()
    };
    let system: Vec<u32> = (0..21).map(|i| (i * 7 + 3) % 256).collect();
    let o = opts(6, SamplingParams::default());
    let sched = Scheduler::start(model.clone(), cfg).unwrap();
    for (k, tail) in [vec![1u32, 2], vec![9, 9, 9], vec![4]]
        .into_iter()
        .enumerate()
    {
        let p: Vec<u32> = system.iter().copied().chain(tail).collect();
        let (tokens, fin) =
            collect(submit(&sched, p.clone(), o.clone(), CancelToken::new(), None).unwrap());
        assert_eq!(tokens, alone(&model, &p, &o));
        let fin = fin.unwrap();
        // The first request computes everything; later ones reuse the 5 whole blocks (20
        // tokens) of the shared prefix.
        assert_eq!(
            fin.cached_tokens,
            if k == 0 { 0 } else { 20 },
            "request {k}"
        );
    }
    assert_eq!(settled(&sched).prompt_tokens_cached, 40);
}

#[test]
fn cancel_timeout_and_callback_stop_free_their_blocks() {
    let model = Arc::new(random_model("llama"));
    let sched = Scheduler::start(
        model,
        SchedulerConfig {
            block_size: 4,
            num_blocks: 64,
            ..SchedulerConfig::default()
        },
    )
    .unwrap();
    let long = opts(10_000, SamplingParams::default());
    // Cancelled while running.
    let cancel = CancelToken::new();
    let rx = submit(&sched, vec![1, 2, 3], long.clone(), cancel.clone(), None).unwrap();
    assert!(matches!(rx.recv().unwrap(), Event::Token(_)));
    cancel.cancel();
    let (_, fin) = collect(rx);
    assert_eq!(fin.unwrap().stop, StopReason::Cancelled);
    // Timed out: each token takes 20 ms in the callback, the deadline is 50 ms away.
    let (tx, rx) = mpsc::channel();
    sched
        .submit(Request {
            prompt: vec![1, 2, 3],
            opts: long.clone(),
            deadline: Some(Instant::now() + Duration::from_millis(50)),
            cancel: CancelToken::new(),
            on_event: Box::new(move |e| {
                std::thread::sleep(Duration::from_millis(20));
                tx.send(e).is_ok()
            }),
        })
        .unwrap();
    let (tokens, fin) = collect(rx);
    let fin = fin.unwrap();
    assert_eq!(fin.stop, StopReason::TimedOut);
    assert_eq!(fin.completion_tokens, tokens.len());
    assert!(tokens.len() < 10, "{}", tokens.len());
    // The callback says stop after 3 tokens (as a dropped client or a stop string does).
    let (tx, rx) = mpsc::channel();
    let mut seen = 0;
    sched
        .submit(Request {
            prompt: vec![4, 5],
            opts: long,
            deadline: None,
            cancel: CancelToken::new(),
            on_event: Box::new(move |e| {
                let token = matches!(e, Event::Token(_));
                let _ = tx.send(e);
                seen += token as usize;
                seen < 3
            }),
        })
        .unwrap();
    let (tokens, fin) = collect(rx);
    assert_eq!(tokens.len(), 3);
    assert_eq!(fin.unwrap().stop, StopReason::Cancelled);
    assert_eq!(settled(&sched).blocks_in_use, 0);
}

#[test]
fn bad_requests_and_a_full_queue_are_refused_at_submit() {
    let model = Arc::new(random_model("llama"));
    let context = model.config().max_position_embeddings;
    let cfg = SchedulerConfig {
        block_size: 4,
        num_blocks: 8,
        max_queued: 2,
        max_running: 1,
        ..SchedulerConfig::default()
    };
    let sched = Scheduler::start(model, cfg).unwrap();
    let o = opts(4, SamplingParams::default());
    let err = |p: Vec<u32>, o: GenerateOptions| {
        submit(&sched, p, o, CancelToken::new(), None).unwrap_err()
    };
    assert!(matches!(err(vec![], o.clone()), EngineError::EmptyPrompt));
    assert!(matches!(
        err(vec![1; context], o.clone()),
        EngineError::PromptTooLong { .. }
    ));
    // Longer than the whole KV pool (32 positions).
    assert!(matches!(
        err(vec![1; 40], o.clone()),
        EngineError::PromptTooLong { .. }
    ));
    let bad = GenerateOptions {
        sampling: SamplingParams {
            top_p: 0.0,
            ..SamplingParams::default()
        },
        ..o.clone()
    };
    assert!(matches!(
        err(vec![1], bad),
        EngineError::InvalidParam { .. }
    ));
    // One running (its callback holds the scheduler thread until the gate opens), two queued,
    // the fourth is refused.
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    let (tx, running) = mpsc::channel();
    let mut first = true;
    sched
        .submit(Request {
            prompt: vec![1],
            opts: opts(1_000_000, SamplingParams::default()),
            deadline: None,
            cancel: CancelToken::new(),
            on_event: Box::new(move |e| {
                let _ = tx.send(e);
                if std::mem::take(&mut first) {
                    let _ = gate_rx.recv();
                }
                false // stop after the first token
            }),
        })
        .unwrap();
    assert!(matches!(running.recv().unwrap(), Event::Token(_)));
    let q1 = submit(&sched, vec![2], o.clone(), CancelToken::new(), None).unwrap();
    let q2 = submit(&sched, vec![3], o.clone(), CancelToken::new(), None).unwrap();
    assert!(matches!(
        err(vec![4], o.clone()),
        EngineError::Busy { queued: 2 }
    ));
    gate_tx.send(()).unwrap();
    assert_eq!(collect(running).1.unwrap().stop, StopReason::Cancelled);
    assert_eq!(collect(q1).1.unwrap().stop, StopReason::MaxTokens);
    assert_eq!(collect(q2).1.unwrap().stop, StopReason::MaxTokens);
}
