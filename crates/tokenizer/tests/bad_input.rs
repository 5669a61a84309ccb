//! Malformed inputs must give clear errors naming the file and the problem,
//! never a panic: truncated or corrupt rank files, bad JSON, truncated GGUF at
//! every prefix length around the header, unknown ids, invalid UTF-8.

mod common;

use kiln_tokenizer::formats::gguf::read_metadata;
use kiln_tokenizer::formats::tiktoken::parse_ranks;
use kiln_tokenizer::{validate_utf8, AllowedSpecial, Tokenizer, TokenizerError};
use std::io::Write;
use std::path::{Path, PathBuf};

fn tmp(name: &str, data: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-tokenizer-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).expect("create");
    f.write_all(data).expect("write");
    p
}

fn cl100k_bytes() -> Vec<u8> {
    std::fs::read(common::asset("cl100k_base")).expect("read cl100k")
}

#[test]
fn truncated_rank_file() {
    let data = cl100k_bytes();
    // Cut mid-line (bad base64 / missing rank) and at a line boundary (too few ranks).
    for cut in [data.len() / 2 + 3, data.len() - 5, 1000] {
        let p = tmp("cl100k_base.tiktoken", &data[..cut]);
        let e = Tokenizer::from_tiktoken_file(&p, "cl100k_base").expect_err("must fail");
        let msg = e.to_string();
        assert!(msg.contains("cl100k_base.tiktoken"), "{msg}");
    }
    let nl = data[..data.len() / 2]
        .iter()
        .rposition(|&b| b == b'\n')
        .expect("newline")
        + 1;
    let p = tmp("cl100k_base.tiktoken", &data[..nl]);
    let msg = Tokenizer::from_tiktoken_file(&p, "cl100k_base")
        .expect_err("must fail")
        .to_string();
    assert!(msg.contains("ranks") && msg.contains("truncated"), "{msg}");
}

#[test]
fn malformed_rank_lines() {
    let p = Path::new("x.tiktoken");
    let e = parse_ranks(b"IQ== 0\n!!!notbase64 1\n", p).expect_err("bad base64");
    assert!(matches!(e, TokenizerError::BadLine { line: 2, .. }), "{e}");
    assert!(e.to_string().contains("x.tiktoken:2"), "{e}");
    let e = parse_ranks(b"IQ== 0\nIg== 0\n", p).expect_err("duplicate rank");
    assert!(e.to_string().contains("duplicate rank 0"), "{e}");
    let e = parse_ranks(b"IQ== 0\nIQ== 1\n", p).expect_err("duplicate token");
    assert!(e.to_string().contains("duplicate token"), "{e}");
    let e = parse_ranks(b"IQ== zero\n", p).expect_err("bad rank");
    assert!(e.to_string().contains("bad rank"), "{e}");
    let e = parse_ranks(b"IQ==\n", p).expect_err("missing rank");
    assert!(e.to_string().contains("x.tiktoken:1"), "{e}");
    let e = parse_ranks(b"IQ== 1 2\n", p).expect_err("extra field");
    assert!(matches!(e, TokenizerError::BadLine { line: 1, .. }), "{e}");
    assert!(Tokenizer::from_tiktoken_file(p, "nope").is_err());
}

#[test]
fn bad_json() {
    for (name, data) in [
        ("empty.json", &b""[..]),
        ("trunc.json", &br#"{"model": {"type": "BPE", "vocab": {"a": 0}"#[..]),
        ("notobj.json", &b"[1,2,3]"[..]),
        ("nomodel.json", &br#"{"version": "1.0"}"#[..]),
        ("wp.json", &br#"{"model": {"type": "WordPiece", "vocab": {}}}"#[..]),
        ("nobl.json", &br#"{"model": {"type": "BPE", "vocab": {}, "merges": []}, "pre_tokenizer": {"type": "Whitespace"}}"#[..]),
        ("badmerge.json", &br#"{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a"]}, "pre_tokenizer": {"type": "ByteLevel"}}"#[..]),
    ] {
        let p = tmp(name, data);
        let msg = Tokenizer::from_hf_json(&p).expect_err(name).to_string();
        assert!(msg.contains(name), "{msg}");
    }
    let p = tmp("encoder.json", b"{\"a\": \"x\"}");
    let b = tmp("vocab.bpe", b"#version: 0.2\n");
    assert!(Tokenizer::from_gpt2_files(&p, &b)
        .expect_err("bad id")
        .to_string()
        .contains("encoder.json"));
}

/// A tiny but complete tokenizer GGUF, so truncation can be tried at every offset.
fn tiny_gguf() -> Vec<u8> {
    fn s(v: &mut Vec<u8>, x: &str) {
        v.extend_from_slice(&(x.len() as u64).to_le_bytes());
        v.extend_from_slice(x.as_bytes());
    }
    let mut v = b"GGUF".to_vec();
    v.extend_from_slice(&3u32.to_le_bytes());
    v.extend_from_slice(&0u64.to_le_bytes());
    v.extend_from_slice(&4u64.to_le_bytes());
    s(&mut v, "tokenizer.ggml.model");
    v.extend_from_slice(&8u32.to_le_bytes());
    s(&mut v, "gpt2");
    s(&mut v, "tokenizer.ggml.pre");
    v.extend_from_slice(&8u32.to_le_bytes());
    s(&mut v, "gpt2");
    s(&mut v, "tokenizer.ggml.tokens");
    v.extend_from_slice(&9u32.to_le_bytes());
    v.extend_from_slice(&8u32.to_le_bytes());
    let toks = ["a", "b", "ab"];
    v.extend_from_slice(&(toks.len() as u64).to_le_bytes());
    for t in toks {
        s(&mut v, t);
    }
    s(&mut v, "tokenizer.ggml.merges");
    v.extend_from_slice(&9u32.to_le_bytes());
    v.extend_from_slice(&8u32.to_le_bytes());
    v.extend_from_slice(&1u64.to_le_bytes());
    s(&mut v, "a b");
    v
}

#[test]
fn truncated_gguf_every_prefix() {
    let full = tiny_gguf();
    let p = tmp("tiny.gguf", &full);
    let t = Tokenizer::from_gguf(&p).expect("tiny gguf loads");
    assert_eq!(t.encode_ordinary("abba"), vec![2, 1, 0]);
    for cut in 0..full.len() {
        let r = read_metadata(
            &mut &full[..cut],
            cut as u64,
            Path::new("cut.gguf"),
            &|_| true,
        );
        let e = r.expect_err("truncated must fail");
        assert!(e.to_string().contains("cut.gguf"), "{e}");
        let p = tmp("cut.gguf", &full[..cut]);
        assert!(Tokenizer::from_gguf(&p).is_err());
    }
    // A real file cut around its header and early metadata.
    let real =
        std::fs::read(common::asset("tokenizer-tests").join("llama-vocab/ggml-vocab-gpt-2.gguf"))
            .expect("read");
    for cut in (0..600).chain([4096, 100_000, real.len() / 2]) {
        let r = read_metadata(
            &mut &real[..cut],
            cut as u64,
            Path::new("real.gguf"),
            &|_| true,
        );
        assert!(r.is_err(), "cut at {cut} should fail");
    }
    // Corrupt lengths: huge array count and huge string length.
    let mut bad = full.clone();
    let at = bad
        .windows(8)
        .position(|w| w == 3u64.to_le_bytes())
        .expect("count");
    bad[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = read_metadata(
        &mut &bad[..],
        bad.len() as u64,
        Path::new("huge.gguf"),
        &|_| true,
    )
    .expect_err("huge");
    assert!(e.to_string().contains("huge.gguf"), "{e}");
    let mut bad = full.clone();
    bad[4] = 9;
    assert!(read_metadata(
        &mut &bad[..],
        bad.len() as u64,
        Path::new("v9.gguf"),
        &|_| true
    )
    .is_err());
    let mut bad = full;
    bad[0] = b'X';
    assert!(read_metadata(
        &mut &bad[..],
        bad.len() as u64,
        Path::new("magic.gguf"),
        &|_| true
    )
    .is_err());
}

#[test]
fn unknown_id_and_specials() {
    let t =
        Tokenizer::from_tiktoken_file(&common::asset("cl100k_base"), "cl100k_base").expect("load");
    let e = t.decode(&[9, 4_000_000]).expect_err("unknown id");
    assert!(
        matches!(e, TokenizerError::UnknownId { id: 4_000_000, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("4000000"));
    let mut sd = t.stream_decoder();
    assert!(sd.push(4_000_000).is_err());

    let text = "hi <|endoftext|> there";
    let e = t
        .encode(text, &AllowedSpecial::None)
        .expect_err("disallowed");
    assert!(
        matches!(e, TokenizerError::DisallowedSpecial { offset: 3, .. }),
        "{e}"
    );
    let all = t.encode(text, &AllowedSpecial::All).expect("all");
    assert!(all.contains(&100257));
    assert_eq!(all, t.encode_with_special_tokens(text));
    let set = AllowedSpecial::Set(["<|endoftext|>".to_string()].into_iter().collect());
    assert_eq!(t.encode(text, &set).expect("set"), all);
    let set = AllowedSpecial::Set(["<|fim_prefix|>".to_string()].into_iter().collect());
    assert!(t.encode(text, &set).is_err());
    assert!(!t.encode_ordinary(text).contains(&100257));
    assert_eq!(t.decode(&all).expect("decode"), text);
    assert_eq!(t.id_of_special("<|endofprompt|>"), Some(100276));
    assert_eq!(t.vocab_size(), 100277);
}

#[test]
fn invalid_utf8_offset() {
    assert_eq!(validate_utf8(b"abc").expect("ok"), "abc");
    let e = validate_utf8(b"ab\xffcd").expect_err("invalid");
    assert!(
        matches!(
            e,
            TokenizerError::InvalidUtf8 {
                offset: 2,
                byte: 0xff
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("offset 2"));
    let e = validate_utf8("héllo".as_bytes().split_at(2).0).expect_err("truncated");
    assert!(
        matches!(e, TokenizerError::TruncatedUtf8 { offset: 1 }),
        "{e}"
    );
}

#[test]
fn stream_decoder_matches_decode() {
    let t =
        Tokenizer::from_tiktoken_file(&common::asset("o200k_base"), "o200k_base").expect("load");
    let mut rng = common::Rng::new(5);
    for _ in 0..500 {
        let text = common::random_text(&mut rng);
        let ids = t.encode_ordinary(&text);
        let mut sd = t.stream_decoder();
        let mut out = String::new();
        for &id in &ids {
            let piece = sd.push(id).expect("push");
            out.push_str(&piece);
        }
        out.push_str(&sd.finish());
        assert_eq!(out, text);
    }
    // Lossy: a lone continuation byte and an unfinished sequence.
    let ids: Vec<u32> = t.encode_ordinary("€").into_iter().collect();
    let bytes = t.decode_bytes(&ids).expect("bytes");
    let id_first = (0..t.vocab_size() as u32)
        .find(|&i| t.token_bytes(i) == Some(&bytes[..1]))
        .expect("byte token");
    let mut sd = t.stream_decoder();
    assert_eq!(sd.push(id_first).expect("push"), "");
    assert_eq!(sd.finish(), "\u{fffd}");
    assert_eq!(t.decode(&[id_first]).expect("decode"), "\u{fffd}");
}
