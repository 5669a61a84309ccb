//! The engine against a mock model whose logits are known exactly, and against a real (tiny,
//! random-weight) Llama whose greedy continuation transformers computed.

use kiln_engine::{
    EngineError, GenerateOptions, LanguageModel, Sampler, SamplingParams, Session, StopReason,
};
use std::cell::RefCell;

/// Predicts `(last + 1) % vocab` with logit 10 and `(last + 2) % vocab` with logit 9; records
/// every call so tests can check prefill-then-one-token-per-step.
struct Mock {
    vocab: usize,
    context: usize,
    calls: RefCell<Vec<(usize, usize)>>,
}

impl Mock {
    fn new(vocab: usize, context: usize) -> Self {
        Self {
            vocab,
            context,
            calls: RefCell::new(Vec::new()),
        }
    }
}

impl LanguageModel for Mock {
    type Cache = usize;
    fn new_cache(&self) -> usize {
        0
    }
    fn context_len(&self) -> usize {
        self.context
    }
    fn next_logits(
        &self,
        tokens: &[u32],
        start_pos: usize,
        cache: &mut usize,
    ) -> kiln_engine::Result<Vec<f32>> {
        assert_eq!(*cache, start_pos, "cache and start position agree");
        assert!(!tokens.is_empty());
        *cache += tokens.len();
        self.calls.borrow_mut().push((start_pos, tokens.len()));
        let last = *tokens.last().unwrap() as usize;
        let mut l = vec![0f32; self.vocab];
        l[(last + 1) % self.vocab] = 10.0;
        l[(last + 2) % self.vocab] = 9.0;
        Ok(l)
    }
}

fn opts(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        ..Default::default()
    }
}

#[test]
fn greedy_prefills_once_then_steps() {
    let m = Mock::new(50, 100);
    let mut s = Session::new(&m);
    let g = s.generate(&[3, 4, 5], &opts(4), |_| true).unwrap();
    assert_eq!(g.tokens, vec![6, 7, 8, 9]);
    assert_eq!(g.stop, StopReason::MaxTokens);
    assert_eq!(*m.calls.borrow(), vec![(0, 3), (3, 1), (4, 1), (5, 1)]);
}

#[test]
fn stop_token_and_cancel_and_context() {
    let m = Mock::new(50, 100);
    let g = Session::new(&m)
        .generate(
            &[3],
            &GenerateOptions {
                max_tokens: 10,
                stop_ids: vec![6],
                ..Default::default()
            },
            |_| true,
        )
        .unwrap();
    assert_eq!(
        (g.tokens, g.stop),
        (vec![4, 5, 6], StopReason::StopToken(6))
    );
    let g = Session::new(&m)
        .generate(&[3], &opts(10), |t| t != 5)
        .unwrap();
    assert_eq!((g.tokens, g.stop), (vec![4, 5], StopReason::Cancelled));
    let small = Mock::new(50, 5);
    let g = Session::new(&small)
        .generate(&[1, 2, 3], &opts(10), |_| true)
        .unwrap();
    assert_eq!((g.tokens, g.stop), (vec![4, 5], StopReason::ContextFull));
    let err = Session::new(&small)
        .generate(&[1; 6], &opts(1), |_| true)
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::PromptTooLong {
                tokens: 6,
                context: 5
            }
        ),
        "{err}"
    );
    assert!(matches!(
        Session::new(&m).generate(&[], &opts(1), |_| true),
        Err(EngineError::EmptyPrompt)
    ));
}

#[test]
fn session_continues_across_turns_without_refeeding() {
    let m = Mock::new(50, 100);
    let mut s = Session::new(&m);
    s.generate(&[1, 2], &opts(2), |_| true).unwrap(); // 3, 4
    let g = s.generate(&[20], &opts(1), |_| true).unwrap();
    assert_eq!(g.tokens, vec![21]);
    assert_eq!(s.tokens(), &[1, 2, 3, 4, 20, 21]);
    // The second turn feeds only the unfed sampled token and the new prompt.
    assert_eq!(m.calls.borrow().last(), Some(&(3, 2)));
}

#[test]
fn invalid_parameters_are_typed_errors() {
    for p in [
        SamplingParams {
            temperature: -1.0,
            ..Default::default()
        },
        SamplingParams {
            temperature: f32::NAN,
            ..Default::default()
        },
        SamplingParams {
            top_p: 0.0,
            ..Default::default()
        },
        SamplingParams {
            top_p: 1.5,
            ..Default::default()
        },
        SamplingParams {
            min_p: -0.1,
            ..Default::default()
        },
        SamplingParams {
            repetition_penalty: 0.0,
            ..Default::default()
        },
        SamplingParams {
            frequency_penalty: 3.0,
            ..Default::default()
        },
    ] {
        assert!(matches!(
            Sampler::new(p),
            Err(EngineError::InvalidParam { .. })
        ));
    }
}

fn hist(params: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
    let mut s = Sampler::new(params).unwrap();
    let mut h = vec![0; logits.len()];
    for _ in 0..n {
        h[s.sample(&mut logits.to_vec(), &[], &[]).unwrap() as usize] += 1;
    }
    h
}

#[test]
fn filters_and_temperature() {
    // probabilities at T=1: softmax([2, 1, 0, -1]) = 0.64, 0.24, 0.09, 0.03
    let l = [2.0f32, 1.0, 0.0, -1.0];
    let t1 = SamplingParams {
        temperature: 1.0,
        seed: 7,
        ..Default::default()
    };
    let h = hist(t1.clone(), &l, 4000);
    assert!(h.iter().all(|c| *c > 0));
    assert!((h[0] as f64 / 4000.0 - 0.644).abs() < 0.03, "{h:?}");
    assert_eq!(
        hist(
            SamplingParams {
                top_k: 2,
                ..t1.clone()
            },
            &l,
            2000
        )[2..],
        [0, 0]
    );
    assert_eq!(
        hist(
            SamplingParams {
                top_k: 1,
                ..t1.clone()
            },
            &l,
            200
        )[0],
        200
    );
    // top_p 0.8: 0.64 < 0.8 <= 0.88 keeps two tokens.
    assert_eq!(
        hist(
            SamplingParams {
                top_p: 0.8,
                ..t1.clone()
            },
            &l,
            2000
        )[2..],
        [0, 0]
    );
    // min_p 0.1: keeps tokens with p >= 0.064, i.e. three.
    assert_eq!(
        hist(
            SamplingParams {
                min_p: 0.1,
                ..t1.clone()
            },
            &l,
            2000
        )[3],
        0
    );
    // A tiny temperature is nearly greedy.
    assert_eq!(
        hist(
            SamplingParams {
                temperature: 0.01,
                ..t1
            },
            &l,
            200
        )[0],
        200
    );
}

#[test]
fn seed_makes_runs_reproducible() {
    let l: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
    let run = |seed| {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed,
            ..Default::default()
        })
        .unwrap();
        (0..50)
            .map(|_| s.sample(&mut l.clone(), &[], &[]).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
}

#[test]
fn penalties() {
    let mut s = Sampler::new(SamplingParams {
        repetition_penalty: 2.0,
        ..Default::default()
    })
    .unwrap();
    let mut l = vec![4.0, 3.0, -1.0];
    assert_eq!(s.sample(&mut l, &[0, 0, 2], &[]).unwrap(), 1);
    assert_eq!(l, vec![2.0, 3.0, -2.0]); // divided once per distinct token; negatives multiplied
    let mut s = Sampler::new(SamplingParams {
        frequency_penalty: 1.0,
        presence_penalty: 0.5,
        ..Default::default()
    })
    .unwrap();
    let mut l = vec![4.0, 3.0, 0.0];
    assert_eq!(s.sample(&mut l, &[0, 0], &[0, 0]).unwrap(), 1);
    assert_eq!(l, vec![1.5, 3.0, 0.0]);
}

#[test]
fn greedy_on_random_llama_matches_transformers() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/tests/fixtures/random/llama");
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let ids = |v: &serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect::<Vec<_>>()
    };
    let model = kiln_models::Llama::load(&dir).unwrap();
    let g = Session::new(&model)
        .generate(&ids(&exp["prompt"]), &opts(8), |_| true)
        .unwrap();
    assert_eq!(g.tokens, ids(&exp["greedy"]));
}
