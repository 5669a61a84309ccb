//! `encode_ordinary_parallel` must give exactly the serial ids, for every built-in pattern, on real
//! corpora and on text built to put awkward characters right at the chunk cuts.

mod common;

use kiln_tokenizer::Tokenizer;

fn shakespeare() -> String {
    let dir = common::asset("shakespeare");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    // About 1.5 MB: enough for dozens of chunks on a 4-thread pool.
    files
        .iter()
        .take(12)
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// Lines that end in whitespace, punctuation, digits and multi-byte letters before the newline,
/// so that cut candidates sit next to every kind of neighbour.
fn awkward(rng: &mut common::Rng) -> String {
    let mut s = String::new();
    while s.len() < 600_000 {
        s.push_str(&common::random_text(rng));
        s.push_str(rng.pick(&["\n", " \n", "\n\n", "x\n", ".\n", "9\n", "é\n", "\r\n"]));
        s.push_str(rng.pick(&["A", "b", " c", "'s", "\u{301}", "中", "1", ""]));
    }
    s
}

fn check(tok: &Tokenizer, text: &str, what: &str) {
    let serial = tok.encode_ordinary(text);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap();
    let parallel = pool.install(|| tok.encode_ordinary_parallel(text));
    assert_eq!(serial.len(), parallel.len(), "{what}: token counts differ");
    assert!(serial == parallel, "{what}: ids differ");
    assert_eq!(
        tok.decode_bytes(&parallel).unwrap(),
        text.as_bytes(),
        "{what}"
    );
}

#[test]
fn parallel_equals_serial() {
    let text = shakespeare();
    let mut rng = common::Rng::new(7);
    let odd = awkward(&mut rng);
    for enc in ["r50k_base", "cl100k_base", "o200k_base"] {
        let tok = Tokenizer::from_tiktoken_file(&common::asset(enc), enc).unwrap();
        check(&tok, &text, &format!("{enc} on shakespeare"));
        check(&tok, &odd, &format!("{enc} on awkward text"));
    }
}
