//! The data pipeline end to end on a small corpus written to a temporary folder, with a tokenizer
//! trained here: shards decode back to the documents, splits are disjoint and complete, output is
//! deterministic, loaders resume exactly, and broken inputs and files give errors that say what
//! is wrong.

use kiln_tokenizer::train::{train_from_texts, TrainerConfig};
use kiln_tokenizer::{BpeModel, PreTokenizer, Tokenizer};
use kiln_train::data::{bytes_per_token, END_OF_TEXT, SHARD_HEADER_LEN};
use kiln_train::{
    eval_windows, prepare, DataMeta, Dataset, DocSplit, Loader, LoaderState, PrepareConfig, Split,
    TrainError,
};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const PIECES: &[&str] = &[
    "The quick brown fox jumps over the lazy dog.\n",
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n",
    "Unicode: naïve café, 東京, a crab 🦀 and a combining e\u{301}.\n",
    "This document mentions <|endoftext|> as plain text, which must stay text.\n",
    "Numbers 1234567890, 3.14159 and 2.71828 and 1e-9.\n",
    "   leading and trailing spaces   \n\n\n",
    "no trailing newline",
];

/// Twelve documents of different lengths, each distinct.
fn corpus() -> Vec<String> {
    (0..12)
        .map(|i| {
            let mut d = format!("Document {i}: ");
            for r in 0..(i % 4 + 1) {
                d.push_str(PIECES[(i + r) % PIECES.len()]);
            }
            d
        })
        .collect()
}

fn write_corpus(dir: &Path, docs: &[String]) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    docs.iter()
        .enumerate()
        .map(|(i, d)| {
            let p = dir.join(format!("{i:02}.txt"));
            std::fs::write(&p, d).unwrap();
            p
        })
        .collect()
}

/// Trains a small byte-level BPE on the pieces, saves it as tokenizer.json, loads it back.
fn tokenizer(dir: &Path, specials: &[&str]) -> (Tokenizer, PathBuf) {
    let cfg = TrainerConfig {
        vocab_size: 320,
        special_tokens: specials.iter().map(|s| s.to_string()).collect(),
        ..TrainerConfig::default()
    };
    let trained = train_from_texts(PIECES, &cfg).unwrap();
    let path = dir.join(format!("tok-{}.json", specials.len()));
    trained.save(&path).unwrap();
    (Tokenizer::load(&path).unwrap(), path)
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    docs: Vec<String>,
    files: Vec<PathBuf>,
    tok: Tokenizer,
    tok_path: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_owned();
    let docs = corpus();
    let files = write_corpus(&root.join("corpus"), &docs);
    let (tok, tok_path) = tokenizer(&root, &[END_OF_TEXT]);
    Fixture {
        _tmp: tmp,
        root,
        docs,
        files,
        tok,
        tok_path,
    }
}

fn cfg(seed: u64) -> PrepareConfig {
    PrepareConfig {
        val_fraction: 0.25,
        seed,
        ..PrepareConfig::default()
    }
}

impl Fixture {
    // TrainError is large because it wraps the model and kernel errors; tests do not care.
    #[allow(clippy::result_large_err)]
    fn prepare(&self, out: &str, cfg: &PrepareConfig) -> Result<DataMeta, TrainError> {
        prepare(
            &self.tok,
            Some(&self.tok_path),
            &self.files,
            &self.root.join(out),
            cfg,
            &|_| {},
        )
    }

    fn prepared(&self, out: &str, seed: u64) -> Dataset {
        self.prepare(out, &cfg(seed)).unwrap();
        Dataset::open(&self.root.join(out)).unwrap()
    }
}

/// A split's documents as (text, ids without the separator), checking each ends with eot.
fn split_docs(ds: &Dataset, split: Split, tok: &Tokenizer) -> Vec<(String, Vec<u32>)> {
    let view = ds.tokens(split);
    let all = view.to_vec();
    let eot = ds.meta().eot_id;
    let mut bounds: Vec<usize> = (0..view.n_docs())
        .map(|d| view.doc_start(d) as usize)
        .collect();
    bounds.push(all.len());
    bounds
        .windows(2)
        .map(|w| {
            let ids = &all[w[0]..w[1]];
            assert_eq!(ids.last(), Some(&eot), "document must end with eot");
            let body = ids[..ids.len() - 1].to_vec();
            let text = String::from_utf8(tok.decode_bytes(&body).unwrap()).unwrap();
            (text, body)
        })
        .collect()
}

#[test]
fn shards_decode_back_to_the_documents() {
    let f = fixture();
    let ds = f.prepared("out", 0);
    let meta = ds.meta();
    let eot = f.tok.id_of_special(END_OF_TEXT).unwrap();
    assert_eq!(meta.eot_id, eot);
    assert_eq!(meta.vocab_size, f.tok.vocab_size());
    assert_eq!(meta.bytes_per_token, 2);
    assert_eq!(meta.doc_split, DocSplit::File);
    assert_eq!(meta.inputs.len(), f.docs.len());
    // ceil(0.25 * 12) = 3 documents for validation.
    assert_eq!((meta.train.n_docs, meta.val.n_docs), (9, 3));

    let mut seen = BTreeSet::new();
    for split in [Split::Train, Split::Val] {
        let docs = split_docs(&ds, split, &f.tok);
        let sm = meta.split(split);
        assert_eq!(docs.len() as u64, sm.n_docs);
        assert_eq!(ds.tokens(split).len() as u64, sm.n_tokens);
        assert_eq!(
            docs.iter().map(|(t, _)| t.len() as u64).sum::<u64>(),
            sm.n_bytes
        );
        // The only eot ids are the separators: the literal "<|endoftext|>" stayed text.
        let n_eot = ds
            .tokens(split)
            .to_vec()
            .iter()
            .filter(|&&t| t == eot)
            .count();
        assert_eq!(n_eot as u64, sm.n_docs);
        let mut last_index = None;
        for (text, ids) in docs {
            let i = f
                .docs
                .iter()
                .position(|d| *d == text)
                .unwrap_or_else(|| panic!("decoded text is no document: {text:?}"));
            assert_eq!(ids, f.tok.encode_ordinary(&text));
            // Corpus order inside a split.
            assert!(last_index < Some(i), "documents out of order");
            last_index = Some(i);
            assert!(seen.insert(i), "document {i} is in both splits");
        }
    }
    assert_eq!(seen.len(), f.docs.len(), "every document is in a split");

    // The tokenizer beside the shards is the file we gave, byte for byte, and meta has its hash.
    let copied = std::fs::read(ds.tokenizer_path()).unwrap();
    assert_eq!(copied, std::fs::read(&f.tok_path).unwrap());
    assert_eq!(
        meta.tokenizer_sha256,
        format!("{:x}", Sha256::digest(&copied))
    );
    // Nothing temporary is left behind.
    let mut names: Vec<String> = std::fs::read_dir(f.root.join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    );
}

#[test]
fn shard_layout_matches_the_documented_format() {
    let f = fixture();
    let ds = f.prepared("out", 0);
    let bytes = std::fs::read(f.root.join("out/val.bin")).unwrap();
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
    assert_eq!(&bytes[..8], b"KILNTOKS");
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 1);
    assert_eq!(u32::from_le_bytes(bytes[12..16].try_into().unwrap()), 2);
    let (n_tokens, n_docs) = (u64_at(16) as usize, u64_at(24) as usize);
    assert_eq!(bytes.len(), SHARD_HEADER_LEN + 2 * n_tokens + 8 * n_docs);
    let view = ds.tokens(Split::Val);
    for i in 0..n_tokens {
        let o = SHARD_HEADER_LEN + 2 * i;
        assert_eq!(
            u32::from(u16::from_le_bytes([bytes[o], bytes[o + 1]])),
            view.get(i)
        );
    }
    for d in 0..n_docs {
        assert_eq!(
            u64_at(SHARD_HEADER_LEN + 2 * n_tokens + 8 * d),
            view.doc_start(d)
        );
    }
}

#[test]
fn blank_lines_make_one_document_per_paragraph() {
    let f = fixture();
    let text = "First paragraph,\nstill the first.\n\nSecond one.\n  \n\n\nThird, with no newline";
    let file = f.root.join("paragraphs.txt");
    std::fs::write(&file, text).unwrap();
    let out = f.root.join("para");
    let c = PrepareConfig {
        val_fraction: 0.3,
        doc_split: DocSplit::BlankLines,
        ..PrepareConfig::default()
    };
    let meta = prepare(&f.tok, Some(&f.tok_path), &[file], &out, &c, &|_| {}).unwrap();
    assert_eq!((meta.train.n_docs, meta.val.n_docs), (2, 1));
    let ds = Dataset::open(&out).unwrap();
    let mut got: Vec<String> = [Split::Train, Split::Val]
        .into_iter()
        .flat_map(|s| split_docs(&ds, s, &f.tok))
        .map(|(t, _)| t)
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            "First paragraph,\nstill the first.\n",
            "Second one.\n",
            "Third, with no newline"
        ]
    );
}

fn read_all(dir: &Path) -> Vec<Vec<u8>> {
    ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
        .iter()
        .map(|n| std::fs::read(dir.join(n)).unwrap())
        .collect()
}

fn val_docs(ds: &Dataset, tok: &Tokenizer) -> BTreeSet<String> {
    split_docs(ds, Split::Val, tok)
        .into_iter()
        .map(|(t, _)| t)
        .collect()
}

#[test]
fn output_is_deterministic_and_the_seed_picks_the_split() {
    let f = fixture();
    f.prepare("a", &cfg(7)).unwrap();
    let threaded = PrepareConfig {
        threads: Some(3),
        ..cfg(7)
    };
    f.prepare("b", &threaded).unwrap();
    let one = PrepareConfig {
        threads: Some(1),
        ..cfg(7)
    };
    f.prepare("c", &one).unwrap();
    let a = read_all(&f.root.join("a"));
    assert_eq!(a, read_all(&f.root.join("b")));
    assert_eq!(a, read_all(&f.root.join("c")));

    // Different seeds choose different validation documents (three seeds, not all alike).
    let sets: Vec<BTreeSet<String>> = [7, 8, 9]
        .iter()
        .map(|&s| val_docs(&f.prepared(&format!("s{s}"), s), &f.tok))
        .collect();
    assert!(
        sets[0] != sets[1] || sets[0] != sets[2],
        "three seeds gave one split"
    );
    assert_ne!(
        read_all(&f.root.join("s7"))[2],
        read_all(&f.root.join("s8"))[2]
    );
}

#[test]
fn an_existing_dataset_is_kept_unless_forced() {
    let f = fixture();
    f.prepare("out", &cfg(1)).unwrap();
    let before = read_all(&f.root.join("out"));
    let err = f.prepare("out", &cfg(2)).unwrap_err();
    assert!(matches!(err, TrainError::AlreadyPrepared { .. }), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(read_all(&f.root.join("out")), before);
    let forced = PrepareConfig {
        force: true,
        ..cfg(2)
    };
    let meta = f.prepare("out", &forced).unwrap();
    assert_eq!(meta.seed, 2);
    assert_eq!(Dataset::open(&f.root.join("out")).unwrap().meta(), &meta);
}

#[test]
fn wide_vocabularies_use_four_byte_tokens_and_are_exported() {
    // A tokenizer with only the 256 byte tokens and an end-of-text id above u16, built in code,
    // so no tokenizer.json exists: prepare exports one.
    let bytes: Vec<(Vec<u8>, u32)> = (0..=255u8).map(|b| (vec![b], u32::from(b))).collect();
    let pretok = PreTokenizer::new(&[kiln_tokenizer::pretok::CL100K_PATTERN]).unwrap();
    let eot = 70_000;
    let tok = Tokenizer::new(
        "bytes",
        BpeModel::from_ranks(&bytes),
        pretok,
        &[(END_OF_TEXT.to_string(), eot)],
    );
    let f = fixture();
    let out = f.root.join("wide");
    let meta = prepare(&tok, None, &f.files, &out, &cfg(0), &|_| {}).unwrap();
    assert_eq!(meta.vocab_size, 70_001);
    assert_eq!(meta.bytes_per_token, 4);
    assert_eq!(bytes_per_token(65_536), 2);
    assert_eq!(bytes_per_token(65_537), 4);
    let ds = Dataset::open(&out).unwrap();
    let shard = std::fs::read(out.join("train.bin")).unwrap();
    assert_eq!(u32::from_le_bytes(shard[12..16].try_into().unwrap()), 4);
    // Byte tokens: each document is its UTF-8 bytes then the separator.
    let saved = Tokenizer::load(&ds.tokenizer_path()).unwrap();
    let mut texts = BTreeSet::new();
    for split in [Split::Train, Split::Val] {
        for (text, ids) in split_docs(&ds, split, &saved) {
            assert_eq!(ids.len(), text.len());
            texts.insert(text);
        }
    }
    assert_eq!(texts, f.docs.iter().cloned().collect());
}

#[test]
fn an_export_that_would_encode_differently_is_refused() {
    // NFC normalisation is not written by the exporter, so the saved tokenizer.json would encode
    // a decomposed "e\u{301}" differently from the tokenizer that made the shards.
    let bytes: Vec<(Vec<u8>, u32)> = (0..=255u8).map(|b| (vec![b], u32::from(b))).collect();
    let pretok = PreTokenizer::new(&[kiln_tokenizer::pretok::CL100K_PATTERN]).unwrap();
    let tok = Tokenizer::new(
        "nfc",
        BpeModel::from_ranks(&bytes),
        pretok,
        &[(END_OF_TEXT.to_string(), 256)],
    )
    .with_normalizer(Some(kiln_tokenizer::Normalizer::Nfc));
    let tmp = tempfile::tempdir().unwrap();
    let files = write_corpus(
        &tmp.path().join("c"),
        &["cafe\u{301}".to_string(), "other".to_string()],
    );
    let out = tmp.path().join("out");
    let err = prepare(&tok, None, &files, &out, &cfg(0), &|_| {}).unwrap_err();
    assert!(matches!(err, TrainError::TokenizerExport { .. }), "{err}");
    assert!(!out.join("meta.json").exists());
}

#[test]
fn loader_is_reproducible_shifted_and_resumable() {
    let f = fixture();
    let ds = f.prepared("out", 0);
    let tokens = ds.tokens(Split::Train).to_vec();
    let (t, b) = (8, 4);
    let mut a = Loader::new(&ds, Split::Train, t, b, 42).unwrap();
    let mut a2 = Loader::new(&ds, Split::Train, t, b, 42).unwrap();
    let mut other = Loader::new(&ds, Split::Train, t, b, 43).unwrap();
    let mut differs = false;
    for _ in 0..5 {
        let (x, y) = a.next_batch();
        assert_eq!((x.len(), y.len()), (b * t, b * t));
        assert_eq!((x.clone(), y.clone()), a2.next_batch());
        differs |= other.next_batch() != (x.clone(), y.clone());
        for (xr, yr) in x.chunks(t).zip(y.chunks(t)) {
            assert_eq!(xr[1..], yr[..t - 1], "targets are inputs shifted by one");
            // The row is a real window of the split: find it.
            let found = tokens
                .windows(t + 1)
                .any(|w| w[..t] == *xr && w[1..] == *yr);
            assert!(found, "row is not a window of the split");
        }
    }
    assert!(differs, "seeds 42 and 43 gave the same batches");
    assert_eq!(
        a.state(),
        LoaderState {
            seed: 42,
            next_window: 20
        }
    );

    // Resume after 3 batches through JSON; it continues exactly like the unbroken loader.
    let mut unbroken = Loader::new(&ds, Split::Train, t, b, 42).unwrap();
    let saved = {
        let mut first = Loader::new(&ds, Split::Train, t, b, 42).unwrap();
        for _ in 0..3 {
            assert_eq!(unbroken.next_batch(), first.next_batch());
        }
        serde_json::to_string(&first.state()).unwrap()
    };
    let state: LoaderState = serde_json::from_str(&saved).unwrap();
    let mut resumed = Loader::restore(&ds, Split::Train, t, b, state.clone()).unwrap();
    for _ in 0..4 {
        assert_eq!(unbroken.next_batch(), resumed.next_batch());
    }
    // Windows are numbered, not batches: two half batches are one whole batch.
    let mut whole = Loader::restore(&ds, Split::Train, t, b, state.clone()).unwrap();
    let mut half = Loader::restore(&ds, Split::Train, t, b / 2, state).unwrap();
    let (x, y) = whole.next_batch();
    let (x1, y1) = half.next_batch();
    let (x2, y2) = half.next_batch();
    assert_eq!(x, [x1, x2].concat());
    assert_eq!(y, [y1, y2].concat());
}

#[test]
fn loader_starts_cover_the_whole_split() {
    let f = fixture();
    let ds = f.prepared("out", 0);
    let n = ds.tokens(Split::Train).len();
    let t = 4;
    let l = Loader::new(&ds, Split::Train, t, 1, 5).unwrap();
    let starts: Vec<usize> = (0..20_000).map(|i| l.window_start(i)).collect();
    assert!(starts.iter().all(|&s| s + t < n));
    assert_eq!(starts.iter().min(), Some(&0));
    assert_eq!(starts.iter().max(), Some(&(n - t - 1)));
}

#[test]
fn loader_needs_one_whole_window() {
    let f = fixture();
    let ds = f.prepared("out", 0);
    let n = ds.tokens(Split::Val).len();
    let err = Loader::new(&ds, Split::Val, n, 1, 0).unwrap_err();
    assert!(matches!(err, TrainError::SplitTooShort { .. }), "{err}");
    assert!(err.to_string().contains("the val split has"), "{err}");
    // Exactly seq_len + 1 tokens: one possible window, the whole split.
    let mut l = Loader::new(&ds, Split::Val, n - 1, 2, 0).unwrap();
    let all = ds.tokens(Split::Val).to_vec();
    let (x, y) = l.next_batch();
    assert_eq!(x, [&all[..n - 1], &all[..n - 1]].concat());
    assert_eq!(y, [&all[1..], &all[1..]].concat());
    let err = Loader::new(&ds, Split::Val, 0, 1, 0).unwrap_err();
    assert!(matches!(err, TrainError::BadLoaderShape { .. }), "{err}");
}

#[test]
fn eval_windows_are_fixed_consecutive_and_spread() {
    let f = fixture();
    let ds = f.prepared("out", 0);
    let all = ds.tokens(Split::Train).to_vec();
    let t = 5;
    let n = (all.len() - 1) / t;
    // Every window: consecutive, stride t, targets shifted by one.
    let every = eval_windows(&ds, Split::Train, t, usize::MAX);
    assert_eq!(every.len(), n);
    for (w, (x, y)) in every.iter().enumerate() {
        assert_eq!(x[..], all[w * t..w * t + t]);
        assert_eq!(y[..], all[w * t + 1..w * t + t + 1]);
    }
    // A few: evenly spread over all of them, the same on every call.
    let k = 4;
    let few = eval_windows(&ds, Split::Train, t, k);
    assert_eq!(few, eval_windows(&ds, Split::Train, t, k));
    assert_eq!(few.len(), k);
    for (j, w) in few.iter().enumerate() {
        assert_eq!(*w, every[j * n / k]);
    }
    assert!(eval_windows(&ds, Split::Val, all.len() * 10, 3).is_empty());
}

// ---------------------------------------------------------------------------
// Errors

fn flip(path: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(path).unwrap();
    edit(&mut bytes);
    std::fs::write(path, bytes).unwrap();
}

fn open_err(dir: &Path) -> TrainError {
    Dataset::open(dir).unwrap_err()
}

#[test]
fn damaged_shards_are_named_and_explained() {
    let f = fixture();
    let _ = f.prepared("out", 0);
    let dir = f.root.join("out");
    let train = dir.join("train.bin");
    let pristine = std::fs::read(&train).unwrap();
    let restore = || std::fs::write(&train, &pristine).unwrap();

    flip(&train, |b| b.truncate(b.len() - 1));
    let err = open_err(&dir);
    assert!(matches!(err, TrainError::BadShard { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("train.bin") && msg.contains("truncated"),
        "{msg}"
    );
    restore();

    flip(&train, |b| b.truncate(10));
    let msg = open_err(&dir).to_string();
    assert!(msg.contains("shorter than the 32-byte header"), "{msg}");
    restore();

    flip(&train, |b| b[0] = b'X');
    let msg = open_err(&dir).to_string();
    assert!(msg.contains("not a kiln token shard"), "{msg}");
    restore();

    flip(&train, |b| b[8] = 2);
    let msg = open_err(&dir).to_string();
    assert!(msg.contains("version 2"), "{msg}");
    restore();

    flip(&train, |b| b.push(0));
    let msg = open_err(&dir).to_string();
    assert!(msg.contains("corrupt") && msg.contains("1 more"), "{msg}");
    restore();

    // Token 1 of the first document is not a separator; make it an id past the vocabulary.
    let vocab = f.tok.vocab_size() as u16;
    flip(&train, |b| {
        b[SHARD_HEADER_LEN + 2..SHARD_HEADER_LEN + 4].copy_from_slice(&vocab.to_le_bytes())
    });
    match open_err(&dir) {
        TrainError::TokenOutOfRange {
            path,
            index,
            id,
            vocab_size,
        } => {
            assert!(path.ends_with("train.bin"));
            assert_eq!(
                (index, id, vocab_size),
                (1, u32::from(vocab), vocab as usize)
            );
        }
        e => panic!("expected TokenOutOfRange, got {e}"),
    }
    restore();

    // A separator replaced by an ordinary token.
    flip(&train, |b| {
        let n_tokens = u64::from_le_bytes(b[16..24].try_into().unwrap()) as usize;
        let last = SHARD_HEADER_LEN + 2 * (n_tokens - 1);
        b[last..last + 2].copy_from_slice(&65u16.to_le_bytes());
    });
    let msg = open_err(&dir).to_string();
    assert!(
        msg.contains("does not end with the end-of-text token"),
        "{msg}"
    );
    restore();

    // The tokenizer swapped after preparing.
    flip(&dir.join("tokenizer.json"), |b| b.push(b'\n'));
    let err = open_err(&dir);
    assert!(matches!(err, TrainError::TokenizerChanged { .. }), "{err}");

    let err = open_err(&f.root.join("corpus"));
    assert!(matches!(err, TrainError::NotADataset { .. }), "{err}");
}

#[test]
fn bad_corpora_are_refused_with_the_reason() {
    let f = fixture();
    let run = |files: &[PathBuf], c: &PrepareConfig| {
        prepare(
            &f.tok,
            Some(&f.tok_path),
            files,
            &f.root.join("bad"),
            c,
            &|_| {},
        )
        .unwrap_err()
    };
    let err = run(&[], &cfg(0));
    assert!(matches!(err, TrainError::NoInputs), "{err}");

    let empty = f.root.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let err = run(&[empty.clone(), empty.clone()], &cfg(0));
    assert!(
        matches!(err, TrainError::TooFewDocuments { n_docs: 0 }),
        "{err}"
    );

    let one = f.root.join("one.txt");
    std::fs::write(&one, "a single document").unwrap();
    let err = run(&[one, empty], &cfg(0));
    assert!(
        err.to_string().contains(
            "the corpus has 1 document, the validation split needs at least one and training at least one"
        ),
        "{err}"
    );

    let bad = f.root.join("bad.txt");
    std::fs::write(&bad, b"h\xc3\xa9llo\xffworld").unwrap();
    let mut files = f.files.clone();
    files.push(bad.clone());
    match run(&files, &cfg(0)) {
        TrainError::InvalidUtf8 { path, offset } => {
            assert_eq!((path, offset), (bad, 6));
        }
        e => panic!("expected InvalidUtf8, got {e}"),
    }

    for fraction in [0.0, 1.0, -0.5, f64::NAN] {
        let c = PrepareConfig {
            val_fraction: fraction,
            ..cfg(0)
        };
        let err = run(&f.files, &c);
        assert!(matches!(err, TrainError::BadValFraction(_)), "{err}");
    }
    assert!(!f.root.join("bad/meta.json").exists());
}

#[test]
fn the_separator_is_endoftext_or_eos_or_an_error() {
    let f = fixture();
    let (plain, plain_path) = tokenizer(&f.root, &[]);
    let out = f.root.join("x");
    let err = prepare(&plain, Some(&plain_path), &f.files, &out, &cfg(0), &|_| {}).unwrap_err();
    assert!(matches!(err, TrainError::NoEndOfText { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("kiln tokenizer train --special '<|endoftext|>'"),
        "{err}"
    );

    // No <|endoftext|>, but </s> is read as the end-of-sequence token.
    let cfg_eos = TrainerConfig {
        vocab_size: 320,
        special_tokens: vec!["<s>".into(), "</s>".into()],
        ..TrainerConfig::default()
    };
    let path = f.root.join("eos.json");
    train_from_texts(PIECES, &cfg_eos)
        .unwrap()
        .save(&path)
        .unwrap();
    let eos_tok = Tokenizer::load(&path).unwrap();
    let meta = prepare(&eos_tok, Some(&path), &f.files, &out, &cfg(0), &|_| {}).unwrap();
    assert_eq!(Some(meta.eot_id), eos_tok.id_of_special("</s>"));
    assert_eq!(Some(meta.eot_id), eos_tok.eos_id());
}
