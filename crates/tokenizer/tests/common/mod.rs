//! Shared helpers for the integration tests: finding assets and parsing fixtures.
#![allow(dead_code)]

use std::path::PathBuf;

/// The path of a named asset (see the kiln-assets catalogue), fetched if missing.
pub fn asset(name: &str) -> PathBuf {
    match kiln_assets::ensure(name) {
        Ok(p) => p,
        Err(e) => panic!("asset {name} is not available: {e}"),
    }
}

/// A small deterministic PRNG (xorshift64*), so property tests are reproducible
/// without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())]
    }
}

/// Fragments chosen to exercise every branch of the split patterns: letters of
/// every case class, digits of every numeric class, all kinds of whitespace,
/// contractions (including the case-folding corner `ſ`), punctuation, emoji,
/// combining marks and scripts without case.
const ATOMS: &[&str] = &[
    "a",
    "b",
    "Z",
    "hello",
    "World",
    "HELLO",
    "camelCase",
    "ǅ",
    "ʰ",
    "ſ",
    "K",
    "µ",
    "ß",
    "é",
    "e\u{301}",
    "\u{301}",
    "\u{308}",
    "\u{20DD}",
    "A\u{301}b",
    "中文",
    "日本語",
    "안녕",
    "Привет",
    "Ωmega",
    "عربي",
    "हिन्दी",
    "ก",
    "0",
    "7",
    "123",
    "4567",
    "½",
    "²",
    "Ⅻ",
    "٣",
    "１２",
    "𝟘",
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\r",
    "\r\n",
    "\n\n",
    " \n",
    "\u{a0}",
    "\u{2003}",
    "\u{3000}",
    "\u{85}",
    "\u{2028}",
    "\u{b}",
    "\u{c}",
    "'",
    "'s",
    "'S",
    "'t",
    "'T",
    "'re",
    "'RE",
    "'rE",
    "'ve",
    "'Ve",
    "'m",
    "'M",
    "'ll",
    "'LL",
    "'lL",
    "'d",
    "'D",
    "'ſ",
    "'x",
    "''",
    "’s",
    "!",
    "?",
    ".",
    ",",
    ";",
    ":",
    "/",
    "//",
    "-",
    "_",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    "\"",
    "<|",
    "|>",
    "<|endoftext|>",
    "$",
    "+",
    "<",
    "=",
    ">",
    "^",
    "~",
    "|",
    "`",
    "🌍",
    "🇪🇸",
    "👍🏽",
    "👨‍👩‍👧",
    "\u{200d}",
    "\u{feff}",
    "\u{0}",
    "\u{7f}",
    "\u{e000}",
    "\u{10ffff}",
    "a'b",
    "it's",
    "I'M",
];

/// A random string of fragments, random Unicode scalars and long runs.
pub fn random_text(rng: &mut Rng) -> String {
    let mut s = String::new();
    let n = rng.below(24);
    for _ in 0..n {
        match rng.below(12) {
            0 => {
                // Any Unicode scalar value, biased to the BMP.
                let max = if rng.below(4) == 0 { 0x110000 } else { 0x10000 };
                if let Some(c) = char::from_u32(rng.below(max) as u32) {
                    s.push(c);
                }
            }
            1 => {
                let run = rng.pick(&[" ", "0", "9", "\n", "\t", "a", "'", "!", "中", "\u{301}"]);
                let k = 1 + rng.below(40);
                for _ in 0..k {
                    s.push_str(run);
                }
            }
            _ => s.push_str(rng.pick(ATOMS)),
        }
    }
    s
}
