//! Property tests: the fast encoder (hand-written splitter, linear/heap merge)
//! equals the slow reference (fancy-regex splitter, naive merge loop) on
//! deterministic pseudo-random text, and on raw byte pieces long enough to take
//! the heap path. Also checks decode(encode(x)) == x.

mod common;

use common::{random_text, Rng};
use kiln_tokenizer::bpe::{Scratch, HEAP_THRESHOLD};
use kiln_tokenizer::Tokenizer;

fn tiktoken(name: &str) -> Tokenizer {
    let spec = kiln_tokenizer::formats::tiktoken::spec(name).expect("spec");
    Tokenizer::from_tiktoken_file(&common::asset(spec.rank_file), name).expect("load")
}

fn check_text(tok: &Tokenizer, seed: u64, cases: usize) {
    let mut rng = Rng::new(seed);
    for _ in 0..cases {
        let text = random_text(&mut rng);
        let fast = tok.encode_ordinary(&text);
        let slow = tok.encode_ordinary_reference(&text).expect("reference");
        assert_eq!(fast, slow, "{}: fast != reference on {text:?}", tok.name());
        assert_eq!(tok.decode(&fast).expect("decode"), text);
    }
}

/// Random byte strings (including invalid UTF-8) of lengths around and well
/// beyond the heap threshold, fed straight to the merge step.
fn check_pieces(tok: &Tokenizer, seed: u64, cases: usize) {
    let mut rng = Rng::new(seed);
    let mut scratch = Scratch::default();
    let alphabets: [&[u8]; 4] = [b"ab", b"abcdefghij", b"etaoin shrdlu", "é中🌍x".as_bytes()];
    for i in 0..cases {
        let len = match i % 3 {
            0 => rng.below(HEAP_THRESHOLD),
            1 => HEAP_THRESHOLD - 2 + rng.below(5),
            _ => rng.below(3000),
        };
        let piece: Vec<u8> = if i % 4 == 0 {
            (0..len).map(|_| rng.next() as u8).collect()
        } else {
            let a = alphabets[rng.below(alphabets.len())];
            (0..len).map(|_| a[rng.below(a.len())]).collect()
        };
        let mut fast = Vec::new();
        tok.bpe().encode_piece(&piece, &mut fast, &mut scratch);
        let slow = tok.bpe().encode_piece_reference(&piece);
        assert_eq!(
            fast,
            slow,
            "{}: fast != reference on piece {piece:?}",
            tok.name()
        );
        assert_eq!(tok.decode_bytes(&fast).expect("decode"), piece);
    }
}

#[test]
fn cl100k_fast_equals_reference() {
    let t = tiktoken("cl100k_base");
    check_text(&t, 11, 5_000);
    check_pieces(&t, 12, 600);
}

#[test]
fn o200k_fast_equals_reference() {
    let t = tiktoken("o200k_base");
    check_text(&t, 21, 5_000);
    check_pieces(&t, 22, 600);
}

#[test]
fn r50k_fast_equals_reference() {
    let t = tiktoken("r50k_base");
    check_text(&t, 31, 5_000);
    check_pieces(&t, 32, 600);
}

#[test]
fn gpt2_files_fast_equals_reference() {
    let dir = common::asset("gpt2-vocab");
    let t = Tokenizer::from_gpt2_files(&dir.join("encoder.json"), &dir.join("vocab.bpe"))
        .expect("load");
    check_text(&t, 41, 3_000);
    check_pieces(&t, 42, 400);
}
