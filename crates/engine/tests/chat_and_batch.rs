//! Chat templates against transformers' `apply_chat_template` (fixture written by
//! `fixtures/make_chat_fixture.py`), a chat session that prefills only each new turn, and batched
//! decoding of prompts of different lengths against each prompt generated alone.

use kiln_engine::{
    generate_batch, ChatTemplate, GenerateOptions, LanguageModel, Message, SamplingParams, Session,
    StopReason,
};
use std::cell::RefCell;
use std::path::{Path, PathBuf};

fn here() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn smollm2_template_renders_like_transformers() {
    let fx = json(&here().join("tests/fixtures/chat_smollm2.json"));
    let t = ChatTemplate::new(fx["template"].as_str().unwrap())
        .unwrap()
        .with_special_tokens(
            fx["bos_token"].as_str().unwrap(),
            fx["eos_token"].as_str().unwrap(),
        );
    assert_eq!(t.end_of_turn_tokens(), vec!["<|im_end|>"]);
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for case in cases {
        let msgs: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let got = t
            .render(&msgs, case["add_generation_prompt"].as_bool().unwrap())
            .unwrap();
        assert_eq!(got, case["expected"].as_str().unwrap());
    }
}

/// A model that predicts `last + 1` and records every call as (start_pos, tokens fed).
struct Counter {
    calls: RefCell<Vec<(usize, usize)>>,
    rewinds: bool,
}

impl LanguageModel for Counter {
    type Cache = usize;
    fn new_cache(&self) -> usize {
        0
    }
    fn context_len(&self) -> usize {
        1000
    }
    fn next_logits(
        &self,
        tokens: &[u32],
        start_pos: usize,
        cache: &mut usize,
    ) -> kiln_engine::Result<Vec<f32>> {
        assert_eq!(*cache, start_pos);
        *cache += tokens.len();
        self.calls.borrow_mut().push((start_pos, tokens.len()));
        let mut l = vec![0f32; 100];
        l[(*tokens.last().unwrap() as usize + 1) % 100] = 1.0;
        Ok(l)
    }
    fn truncate_cache(&self, cache: &mut usize, len: usize) -> bool {
        if self.rewinds {
            *cache = (*cache).min(len);
        }
        self.rewinds
    }
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens: n,
        ..Default::default()
    }
}

/// The chat loop's pattern: render the whole conversation each turn, `sync` the session to it,
/// generate with an empty prompt. Only the new turn (and any re-tokenized tail) is prefilled.
#[test]
fn chat_session_prefills_only_the_new_turn() {
    let m = Counter {
        calls: RefCell::new(Vec::new()),
        rewinds: true,
    };
    let mut s = Session::new(&m);
    // Turn 1: 5 prompt tokens, reply 6 7 8.
    assert_eq!(s.sync(&[1, 2, 3, 4, 5]), 0);
    let g = s.generate(&[], &greedy(3), |_| true).unwrap();
    assert_eq!((g.tokens.clone(), g.prefill_tokens), (vec![6, 7, 8], 5));
    // Turn 2: the conversation re-rendered holds turn 1 and its reply, then 3 new tokens.
    let turn2 = [1, 2, 3, 4, 5, 6, 7, 8, 40, 41, 42];
    assert_eq!(
        s.sync(&turn2),
        7,
        "all but the unfed last reply token are kept"
    );
    m.calls.borrow_mut().clear();
    let g = s.generate(&[], &greedy(1), |_| true).unwrap();
    assert_eq!(g.prefill_tokens, 4);
    assert_eq!(*m.calls.borrow(), vec![(7, 4)]);
    assert_eq!(g.tokens, vec![43]);
    // The reply re-tokenized differently: only the changed tail is prefilled again.
    let edited = [1, 2, 3, 4, 5, 6, 9, 9];
    assert_eq!(s.sync(&edited), 6);
    m.calls.borrow_mut().clear();
    s.generate(&[], &greedy(1), |_| true).unwrap();
    assert_eq!(*m.calls.borrow(), vec![(6, 2)]);
    // Nothing new: one token is rewound so there are logits to sample from.
    let all = s.tokens().to_vec();
    s.sync(&all[..all.len() - 1]);
    let same = s.tokens().to_vec();
    assert_eq!(s.sync(&same), same.len() - 1);
    // A model whose cache cannot rewind starts over.
    let m2 = Counter {
        calls: RefCell::new(Vec::new()),
        rewinds: false,
    };
    let mut s2 = Session::new(&m2);
    s2.sync(&[1, 2, 3]);
    s2.generate(&[], &greedy(1), |_| true).unwrap();
    assert_eq!(s2.sync(&[1, 2, 7]), 0);
    s2.reset();
    assert_eq!((s2.tokens().len(), s2.cached()), (0, 0));
}

fn random_model(name: &str) -> kiln_models::Llama {
    kiln_models::Llama::load(&here().join("../models/tests/fixtures/random").join(name)).unwrap()
}

/// Each row of a left-padded batch generates what its prompt generates alone, greedy and with a
/// seeded sampler, on GQA (llama), MQA with biases (qwen2) and a sliding window (mistral).
#[test]
fn batch_rows_equal_each_prompt_alone() {
    let prompts: Vec<Vec<u32>> = vec![
        vec![1, 17, 200, 45, 3, 99, 12, 7, 8],
        vec![5],
        vec![9, 8, 7, 6],
        vec![250, 2, 44, 61, 5, 5, 5],
    ];
    for name in ["llama", "qwen2", "mistral"] {
        let model = random_model(name);
        for sampling in [
            SamplingParams::default(),
            SamplingParams {
                temperature: 0.8,
                top_k: 20,
                seed: 7,
                ..SamplingParams::default()
            },
        ] {
            let opts = GenerateOptions {
                sampling,
                max_tokens: 12,
                stop_ids: vec![],
            };
            let batch = generate_batch(&model, &prompts, &opts).unwrap();
            for (p, g) in prompts.iter().zip(&batch) {
                let alone = Session::new(&model).generate(p, &opts, |_| true).unwrap();
                assert_eq!(g.tokens, alone.tokens, "{name}, prompt {p:?}");
                assert_eq!(g.stop, StopReason::MaxTokens);
            }
        }
    }
}

#[test]
fn batch_rows_stop_independently() {
    let model = random_model("llama");
    let prompts = vec![vec![1, 2, 3], vec![4, 5, 6, 7, 8]];
    let free = generate_batch(&model, &prompts, &greedy(6)).unwrap();
    // Stop row 0 at its third token; row 1 must be unaffected.
    let stop = free[0].tokens[2];
    let opts = GenerateOptions {
        stop_ids: vec![stop],
        ..greedy(6)
    };
    let g = generate_batch(&model, &prompts, &opts).unwrap();
    let first = free[0].tokens.iter().position(|&t| t == stop).unwrap();
    assert_eq!(g[0].tokens, free[0].tokens[..=first].to_vec());
    assert_eq!(g[0].stop, StopReason::StopToken(stop));
    let row1_first = free[1].tokens.iter().position(|&t| t == stop);
    let expect1 = match row1_first {
        Some(i) => free[1].tokens[..=i].to_vec(),
        None => free[1].tokens.clone(),
    };
    assert_eq!(g[1].tokens, expect1);
    assert!(matches!(
        generate_batch(&model, &[vec![1], vec![]], &greedy(1)),
        Err(kiln_engine::EngineError::EmptyPrompt)
    ));
}
