//! Tests of the BPE trainer and its exports.
//!
//! The oracle is a naive trainer kept here: it recounts every pair of every word
//! before each merge and applies the same rules as the fast trainer (highest count,
//! ties to the smallest `(left, right)` id pair, never a pair whose bytes already
//! are a token, stop below `min_frequency`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_tokenizer::train::{
    train_from_counts, train_from_files, train_from_texts, TokenizerError, TrainProgress,
    TrainedBpe, TrainerConfig, GPT4_PATTERN,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/train")
        .join(name)
}

fn corpus() -> String {
    std::fs::read_to_string(fixture("corpus.txt")).expect("fixture corpus")
}

fn cfg(vocab_size: u32) -> TrainerConfig {
    TrainerConfig {
        vocab_size,
        ..TrainerConfig::default()
    }
}

/// Pieces of `texts` counted with fancy-regex directly, independent of the crate's
/// pre-tokenizer and chunking.
fn count_pieces(texts: &[&str], pattern: &str) -> BTreeMap<Vec<u8>, u64> {
    let re = fancy_regex::Regex::new(pattern).expect("pattern compiles");
    let mut counts = BTreeMap::new();
    for t in texts {
        let mut last = 0;
        for m in re.find_iter(t) {
            let m = m.expect("no backtrack limit on test corpora");
            assert_eq!(
                m.start(),
                last,
                "the pattern leaves no gaps on the test corpora"
            );
            *counts.entry(m.as_str().as_bytes().to_vec()).or_insert(0) += 1;
            last = m.end();
        }
        assert_eq!(last, t.len());
    }
    counts
}

/// The naive oracle: returns the merges, whether it stopped early and how many
/// times the best pair was passed over because its bytes already were a token.
fn naive_train(
    counts: &BTreeMap<Vec<u8>, u64>,
    n_merges: usize,
    min_frequency: u64,
) -> (Vec<(u32, u32)>, bool, usize) {
    let mut words: Vec<(Vec<u32>, u64)> = counts
        .iter()
        .map(|(w, &c)| (w.iter().map(|&b| u32::from(b)).collect(), c))
        .collect();
    let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    let mut merges = Vec::new();
    let mut passed_over = 0;
    while merges.len() < n_merges {
        let mut pc: BTreeMap<(u32, u32), u64> = BTreeMap::new();
        for (w, c) in &words {
            for p in w.windows(2) {
                *pc.entry((p[0], p[1])).or_insert(0) += c;
            }
        }
        // BTreeMap iterates pairs in ascending order, so `>` keeps the smallest pair
        // among equal counts.
        let mut best: Option<((u32, u32), u64)> = None;
        let mut best_any = 0;
        for (&p, &c) in &pc {
            best_any = best_any.max(c);
            let mut cat = vocab[p.0 as usize].clone();
            cat.extend_from_slice(&vocab[p.1 as usize]);
            if vocab.contains(&cat) {
                continue;
            }
            if best.is_none_or(|(_, bc)| c > bc) {
                best = Some((p, c));
            }
        }
        if best.is_some_and(|(_, c)| c < best_any) {
            passed_over += 1;
        }
        let Some(((a, b), c)) = best else {
            return (merges, true, passed_over);
        };
        if c < min_frequency.max(1) {
            return (merges, true, passed_over);
        }
        let t = vocab.len() as u32;
        let mut cat = vocab[a as usize].clone();
        cat.extend_from_slice(&vocab[b as usize]);
        vocab.push(cat);
        merges.push((a, b));
        for (w, _) in &mut words {
            let mut out = Vec::with_capacity(w.len());
            let mut i = 0;
            while i < w.len() {
                if i + 1 < w.len() && w[i] == a && w[i + 1] == b {
                    out.push(t);
                    i += 2;
                } else {
                    out.push(w[i]);
                    i += 1;
                }
            }
            *w = out;
        }
    }
    (merges, false, passed_over)
}

/// Slow reference encoder: split with fancy-regex, then per piece merge the
/// lowest-ranked adjacent pair (leftmost first) until none applies.
fn reference_encode(bpe: &TrainedBpe, text: &str) -> Vec<u32> {
    let re = fancy_regex::Regex::new(&bpe.pattern).expect("pattern compiles");
    let rank: BTreeMap<(u32, u32), u32> = bpe
        .merges
        .iter()
        .enumerate()
        .map(|(i, &p)| (p, i as u32))
        .collect();
    let mut out = Vec::new();
    for m in re.find_iter(text) {
        let mut s: Vec<u32> = m.expect("match").as_str().bytes().map(u32::from).collect();
        loop {
            let best = (0..s.len().saturating_sub(1))
                .filter_map(|i| rank.get(&(s[i], s[i + 1])).map(|&r| (r, i)))
                .min();
            let Some((r, i)) = best else { break };
            s[i] = 256 + r;
            s.remove(i + 1);
        }
        out.extend(s);
    }
    out
}

fn decode(bpe: &TrainedBpe, ids: &[u32]) -> Vec<u8> {
    ids.iter()
        .flat_map(|&id| bpe.vocab[id as usize].iter().copied())
        .collect()
}

/// Deterministic pseudo-random numbers (xorshift64*), so the corpora are seeded.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Random text from a small alphabet (ASCII letters, digits, punctuation, several
/// kinds of whitespace and multi-byte characters) so that pairs repeat a lot and
/// ties and "bytes already a token" cases occur.
fn random_corpus(seed: u64, len: usize) -> String {
    const ALPHABET: &[&str] = &[
        "a", "b", "c", "ab", "e", "t", "h", "the", " ", " ", " ", "  ", "\n", "\r\n", "\t", "1",
        "23", ".", ",", "'s", "'", "é", "ß", "日本", "ж", "🙂", "!?", "A", "B",
    ];
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut s = String::new();
    while s.len() < len {
        s.push_str(ALPHABET[rng.below(ALPHABET.len())]);
    }
    s
}

/// Compares merge lists, reporting the first difference rather than both lists.
fn assert_same_merges(a: &[(u32, u32)], b: &[(u32, u32)]) {
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!("merge {i} differs: {:?} vs {:?}", a[i], b[i]);
    }
    assert_eq!(a.len(), b.len(), "number of merges");
}

/// Returns how often the oracle passed over a pair whose bytes were already a token.
fn assert_matches_naive(texts: &[&str], vocab_size: u32, min_frequency: u64) -> usize {
    let c = TrainerConfig {
        vocab_size,
        min_frequency,
        ..TrainerConfig::default()
    };
    let fast = train_from_texts(texts, &c).expect("training succeeds");
    let counts = count_pieces(texts, GPT4_PATTERN);
    let (merges, stopped, passed_over) =
        naive_train(&counts, vocab_size as usize - 256, min_frequency);
    assert_same_merges(&fast.merges, &merges);
    assert_eq!(fast.stopped_early, stopped);
    assert_eq!(fast.vocab.len(), 256 + fast.merges.len());
    // The same merges from the counts-only entry point.
    let pieces: Vec<(&[u8], u64)> = counts.iter().map(|(k, &v)| (k.as_slice(), v)).collect();
    assert_eq!(
        train_from_counts(&pieces, &c)
            .expect("training succeeds")
            .merges,
        fast.merges
    );
    passed_over
}

#[test]
fn fast_trainer_equals_naive_on_fixture_corpus() {
    let text = corpus();
    assert_matches_naive(&[&text], 256 + 400, 2);
    let passed_over = assert_matches_naive(&[&text], 256 + 3000, 0);
    eprintln!("fixture corpus: pairs passed over because their bytes were a token: {passed_over}");
}

#[test]
fn fast_trainer_equals_naive_on_random_corpora() {
    let mut passed_over = 0;
    for seed in 0..12u64 {
        let text = random_corpus(seed, 1500 + 300 * seed as usize);
        let min_frequency = if seed % 2 == 0 { 0 } else { 2 };
        passed_over += assert_matches_naive(&[&text], 256 + 300, min_frequency);
    }
    // The rule is defensive: no corpus tried so far (including a random search over
    // two- and three-letter alphabets) produced such a pair.
    eprintln!("pairs passed over because their bytes were a token: {passed_over}");
    // Several texts: pieces never span two texts.
    let a = random_corpus(100, 800);
    let b = random_corpus(101, 800);
    assert_matches_naive(&[&a, &b], 256 + 200, 0);
}

#[test]
fn stops_early_and_handles_empty_input() {
    let empty = train_from_texts(&[], &cfg(300)).expect("empty corpus is not an error");
    assert!(empty.stopped_early);
    assert!(empty.merges.is_empty());
    assert_eq!(empty.vocab.len(), 256);
    let tiny = train_from_texts(&["hello hello"], &cfg(10_000)).expect("training succeeds");
    assert!(tiny.stopped_early);
    assert!(!tiny.merges.is_empty());
    // Exactly enough merges: not early.
    let n = tiny.merges.len() as u32;
    let exact = train_from_texts(&["hello hello"], &cfg(256 + n)).expect("training succeeds");
    assert!(!exact.stopped_early);
    assert_eq!(exact.merges, tiny.merges);
}

/// A corpus over 1 MiB, so counting runs on several chunks in parallel.
fn big_corpus() -> String {
    let base = corpus();
    let mut s = String::new();
    let mut seed = 0;
    while s.len() < 2_500_000 {
        s.push_str(&base);
        s.push_str(&random_corpus(seed, 2000));
        s.push_str("\nLine.\n");
        seed += 1;
    }
    s
}

#[test]
fn deterministic_across_thread_counts_and_chunking() {
    let text = big_corpus();
    let mut c = cfg(256 + 1500);
    c.special_tokens = vec!["<|endoftext|>".into()];
    c.threads = Some(1);
    let one = train_from_texts(&[&text], &c).expect("training succeeds");
    c.threads = Some(3);
    let three = train_from_texts(&[&text], &c).expect("training succeeds");
    assert_same_merges(&one.merges, &three.merges);
    assert_eq!(one, three);
    // Chunking at safe line breaks must not change the pieces: compare with counts
    // taken over the whole text at once by fancy-regex.
    let counts = count_pieces(&[&text], GPT4_PATTERN);
    let pieces: Vec<(&[u8], u64)> = counts.iter().map(|(k, &v)| (k.as_slice(), v)).collect();
    c.special_tokens.clear();
    c.vocab_size -= 1;
    let from_counts = train_from_counts(&pieces, &c).expect("training succeeds");
    assert_same_merges(&from_counts.merges, &one.merges);
}

#[test]
fn special_tokens_get_the_next_ids_and_are_not_merged_across() {
    let text = "ab<|endoftext|>ab<|endoftext|>ab ab ab <|pad|> <|endoftext|>";
    let mut c = cfg(300);
    c.special_tokens = vec!["<|endoftext|>".into(), "<|pad|>".into()];
    let bpe = train_from_texts(&[text], &c).expect("training succeeds");
    let n = bpe.vocab.len() as u32;
    assert_eq!(
        bpe.special_tokens,
        vec![
            ("<|endoftext|>".to_string(), n),
            ("<|pad|>".to_string(), n + 1)
        ]
    );
    // No learned token contains a piece of a special token string.
    for t in &bpe.vocab[256..] {
        assert!(
            !t.contains(&b'|'),
            "token {:?} learned from a special token",
            String::from_utf8_lossy(t)
        );
    }
    // The same as training on the text with the specials removed piecewise.
    let pieces = ["ab", "ab", "ab ab ab ", " ", " "];
    let plain = train_from_texts(&pieces, &cfg(300 - 2)).expect("training succeeds");
    assert_eq!(plain.merges, bpe.merges);
}

#[test]
fn trained_merges_round_trip_and_match_reference_encoder() {
    let text = corpus();
    let bpe = train_from_texts(&[&text], &cfg(256 + 500)).expect("training succeeds");
    let samples = [
        text.as_str(),
        "",
        "Hello, world! It's 2024.",
        "Unseen words: zyzzyva quixotic 😀 ünïcödé 語彙",
        "  leading and trailing   \n\n",
        "\u{0}\u{1}\u{7f} control bytes",
    ];
    for s in samples {
        let ids = bpe.encode_ordinary(s).expect("encodes");
        assert_eq!(
            ids,
            reference_encode(&bpe, s),
            "encoder differs from reference on {s:?}"
        );
        assert_eq!(decode(&bpe, &ids), s.as_bytes(), "round trip of {s:?}");
    }
    // Trained merges do compress the training text.
    assert!(bpe.encode_ordinary(&text).expect("encodes").len() < text.len() / 2);
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

#[test]
fn tiktoken_export_parses_back() {
    use base64::Engine as _;
    let bpe = train_from_texts(&[&corpus()], &cfg(256 + 300)).expect("training succeeds");
    let dir = temp_dir();
    let path = dir.path().join("kiln.tiktoken");
    bpe.write_tiktoken(&path).expect("writes");
    let text = std::fs::read_to_string(&path).expect("reads");
    let mut vocab = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let (b64, rank) = line.split_once(' ').expect("two fields");
        assert_eq!(rank.parse::<usize>().expect("rank"), i);
        vocab.push(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("base64"),
        );
    }
    assert_eq!(vocab, bpe.vocab);
    // Only the file itself is left in the directory (the temp file was renamed).
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o644, "not left private like a temp file");
    }
}

/// What tests/fixtures/train/check_hf.py recorded: it trained on corpus.txt with
/// kiln, loaded the export in Hugging Face `tokenizers` and tiktoken, checked they
/// agree with kiln, and saved Hugging Face's ids.
fn fixture_expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("check_hf.out.json")).expect("fixture"))
        .expect("json")
}

fn fixture_bpe() -> (TrainedBpe, serde_json::Value) {
    let expected = fixture_expected();
    let vocab_size = expected["vocab_size"].as_u64().expect("vocab_size") as u32;
    let mut c = cfg(vocab_size);
    c.special_tokens = vec!["<|endoftext|>".into()];
    (
        train_from_texts(&[&corpus()], &c).expect("training succeeds"),
        expected,
    )
}

fn hf_cases(expected: &serde_json::Value) -> Vec<(String, Vec<u32>)> {
    expected["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            let text = c["text"].as_str().expect("text").to_owned();
            (
                text,
                serde_json::from_value(c["hf_ids"].clone()).expect("ids"),
            )
        })
        .collect()
}

#[test]
fn hf_json_export_loads_back() {
    let mut c = cfg(256 + 400);
    c.special_tokens = vec!["<|endoftext|>".into(), "<|im_start|>".into()];
    let bpe = train_from_texts(&[&corpus()], &c).expect("training succeeds");
    let dir = temp_dir();
    let path = dir.path().join("tokenizer.json");
    bpe.save(&path).expect("writes");
    let back = TrainedBpe::load(&path).expect("loads");
    assert_eq!(
        back,
        TrainedBpe {
            stopped_early: false,
            ..bpe.clone()
        }
    );
    // Not JSON, and JSON that is not a tokenizer: errors naming the file.
    std::fs::write(&path, "{").expect("write");
    let err = TrainedBpe::load(&path).expect_err("bad file");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    std::fs::write(&path, r#"{"model": {"type": "BPE"}}"#).expect("write");
    assert!(matches!(
        TrainedBpe::load(&path),
        Err(TokenizerError::BadFile { .. })
    ));
}

#[test]
fn hf_json_matches_committed_fixture_and_hugging_face_ids() {
    let (bpe, expected) = fixture_bpe();
    let committed = std::fs::read_to_string(fixture("trained.tokenizer.json")).expect("fixture");
    assert_eq!(
        bpe.to_hf_json(),
        committed,
        "training or export changed; rerun check_hf.py"
    );
    for (text, hf) in hf_cases(&expected) {
        assert_eq!(
            bpe.encode_ordinary(&text).expect("encodes"),
            hf,
            "on {text:?}"
        );
    }
}

#[test]
fn crate_tokenizer_encodes_trained_hf_json_like_the_merges() {
    let expected = fixture_expected();
    let tok = kiln_tokenizer::Tokenizer::from_hf_json(&fixture("trained.tokenizer.json"))
        .expect("the crate's loader reads it");
    for (text, hf) in hf_cases(&expected) {
        assert_eq!(tok.encode_ordinary(&text), hf, "on {text:?}");
    }
    let special = &expected["special_case"];
    let hf: Vec<u32> = serde_json::from_value(special["hf_ids"].clone()).expect("ids");
    assert_eq!(
        tok.encode_with_special_tokens(special["text"].as_str().expect("text")),
        hf
    );

    // A larger vocabulary, with the merges-only encoder as the reference.
    let mut c = cfg(256 + 2000);
    c.min_frequency = 0;
    c.special_tokens = vec!["<|endoftext|>".into(), "<|im_start|>".into()];
    let text = big_corpus();
    let bpe2 = train_from_texts(&[&text], &c).expect("training succeeds");
    let dir = temp_dir();
    let path = dir.path().join("tokenizer.json");
    bpe2.write_hf_json(&path).expect("writes");
    let tok = kiln_tokenizer::Tokenizer::from_hf_json(&path).expect("the crate's loader reads it");
    for s in [
        &text[..200_000],
        "Hello, world! It's 2024.",
        "  x\n\n\ty 🙂 ünïcödé",
        "",
    ] {
        assert_eq!(
            tok.encode_ordinary(s),
            bpe2.encode_ordinary(s).expect("encodes"),
            "on {s:?}"
        );
    }
    assert_eq!(tok.special_tokens(), bpe2.special_tokens);
}

#[test]
fn train_from_files_reports_progress_and_matches_texts() {
    let dir = temp_dir();
    let a = dir.path().join("a.txt");
    let b = dir.path().join("b.txt");
    std::fs::write(&a, corpus()).expect("write");
    std::fs::write(&b, random_corpus(7, 3000)).expect("write");
    let events = std::cell::RefCell::new(Vec::new());
    let c = cfg(256 + 300);
    let from_files =
        train_from_files(&[a, b], &c, &|p| events.borrow_mut().push(p)).expect("training succeeds");
    let from_texts =
        train_from_texts(&[&corpus(), &random_corpus(7, 3000)], &c).expect("training succeeds");
    assert_eq!(from_files, from_texts);
    let events = events.into_inner();
    assert!(events.iter().any(|e| matches!(e, TrainProgress::Counting { bytes_done, bytes_total } if bytes_done == bytes_total && *bytes_total > 0)));
    assert!(events.iter().any(|e| matches!(
        e,
        TrainProgress::Merging {
            merges_done: 300,
            merges_target: 300
        }
    )));
    assert!(matches!(
        events.last(),
        Some(TrainProgress::Finished {
            merges: 300,
            stopped_early: false
        })
    ));
}

#[test]
fn invalid_utf8_names_file_and_offset() {
    let dir = temp_dir();
    let path = dir.path().join("bad.txt");
    let mut bytes = b"valid text\nmore valid text ".to_vec();
    let offset = bytes.len();
    bytes.extend_from_slice(&[0xff, b'x']);
    std::fs::write(&path, &bytes).expect("write");
    let err = train_from_files(std::slice::from_ref(&path), &cfg(300), &|_| {})
        .expect_err("invalid UTF-8 is an error");
    match &err {
        TokenizerError::InvalidUtf8File { path: p, offset: o } => {
            assert_eq!(p, &path);
            assert_eq!(*o, offset as u64);
        }
        other => panic!("unexpected error {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("bad.txt") && msg.contains(&offset.to_string()),
        "{msg}"
    );

    let missing = train_from_files(&[dir.path().join("missing.txt")], &cfg(300), &|_| {})
        .expect_err("missing file");
    assert!(matches!(missing, TokenizerError::Io { .. }));
}

#[test]
fn configuration_errors() {
    let err = train_from_texts(&["abc"], &cfg(255)).expect_err("too small");
    assert!(
        matches!(err, TokenizerError::VocabTooSmall { minimum: 256, .. }),
        "{err:?}"
    );
    let mut c = cfg(257);
    c.special_tokens = vec!["<a>".into(), "<b>".into()];
    let err = train_from_texts(&["abc"], &c).expect_err("too small for the specials");
    assert!(err.to_string().contains("258"), "{err}");
    c.vocab_size = 300;
    c.special_tokens = vec!["<a>".into(), "<a>".into()];
    assert!(matches!(
        train_from_texts(&["abc"], &c),
        Err(TokenizerError::BadSpecialTokens(_))
    ));
    let mut c = cfg(300);
    c.pattern = "(unclosed".into();
    assert!(matches!(
        train_from_texts(&["abc"], &c),
        Err(TokenizerError::BadRegex { .. })
    ));
    // Exactly 256 + specials is fine and learns no merges.
    let bpe = train_from_texts(&["abcabc"], &cfg(256)).expect("no merges requested");
    assert!(bpe.merges.is_empty() && !bpe.stopped_early);
}
