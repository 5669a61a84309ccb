//! Property tests: every hand-written pre-tokenizer splits exactly like
//! fancy-regex running the same pattern string (the oracle), on deterministic
//! pseudo-random inputs mixing every character class the patterns distinguish.

mod common;

use common::{random_text, Rng};
use kiln_tokenizer::pretok::*;

fn check(patterns: &[&str], seed: u64, cases: usize) {
    let fast = PreTokenizer::new(patterns).expect("compile");
    assert!(
        fast.splits().iter().all(|s| s.is_hand_written()),
        "{patterns:?} should be hand-written"
    );
    let oracle = fast.reference().expect("compile reference");
    let mut rng = Rng::new(seed);
    let mut fixed: Vec<String> = vec![
        String::new(),
        " ".repeat(1000),
        "1".repeat(1000),
        format!("{}x", " ".repeat(100)),
        format!("a{}\n{} b", " ".repeat(50), " ".repeat(50)),
        "\n\n\n  \n \t\r\n".to_string(),
    ];
    fixed.extend((0..cases).map(|_| random_text(&mut rng)));
    for text in &fixed {
        let got = fast.split(text);
        let want = oracle.split(text);
        assert_eq!(got, want, "pattern(s) {patterns:?} differ on {text:?}");
        assert_eq!(got.concat(), *text);
    }
}

#[test]
fn r50k_matches_regex() {
    check(&[R50K_PATTERN], 1, 20_000);
}

#[test]
fn gpt2_matches_regex() {
    check(&[GPT2_PATTERN], 2, 20_000);
}

#[test]
fn cl100k_matches_regex() {
    check(&[CL100K_PATTERN], 3, 20_000);
    check(&[kiln_tokenizer::pretok::CL100K_HF_PATTERN], 13, 20_000);
}

#[test]
fn o200k_matches_regex() {
    check(&[O200K_PATTERN], 4, 20_000);
}

#[test]
fn llama3_matches_regex() {
    check(&[LLAMA3_PATTERN], 5, 20_000);
    check(&[LLAMA3_CPP_PATTERN], 6, 20_000);
}

#[test]
fn qwen2_matches_regex() {
    check(&[QWEN2_PATTERN], 7, 20_000);
    check(&[QWEN2_CPP_PATTERN], 8, 20_000);
}

#[test]
fn digits_then_gpt2_matches_regex() {
    check(&[DIGITS_PATTERN, GPT2_PATTERN], 9, 20_000);
}

/// Every assigned and unassigned code point once, in chunks, for the two
/// patterns with the most character classes.
#[test]
fn all_code_points() {
    let all: Vec<char> = (0..0x110000u32).filter_map(char::from_u32).collect();
    for pat in [CL100K_PATTERN, O200K_PATTERN, GPT2_PATTERN] {
        let fast = PreTokenizer::new(&[pat]).expect("compile");
        let oracle = fast.reference().expect("compile");
        for chunk in all.chunks(97) {
            // Interleave with letters and spaces so every class meets its neighbours.
            let mut text = String::new();
            for (i, c) in chunk.iter().enumerate() {
                text.push(*c);
                match i % 5 {
                    0 => text.push('a'),
                    1 => text.push(' '),
                    2 => text.push('A'),
                    _ => {}
                }
            }
            assert_eq!(
                fast.split(&text),
                oracle.split(&text),
                "{pat} differs on {text:?}"
            );
        }
    }
}
