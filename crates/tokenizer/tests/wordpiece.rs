//! all-MiniLM-L6-v2's WordPiece tokenizer against Hugging Face `tokenizers`: the ids of
//! `fixtures/wordpiece/minilm_ids.json` (written by `fixtures/wordpiece/make_fixture.py`) from
//! both the asset's `tokenizer.json` and its bare `vocab.txt`, plus the loaders' errors.

mod common;

use kiln_tokenizer::{TokenizerError, WordPiece};

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn fixture() -> serde_json::Value {
    serde_json::from_str(include_str!("fixtures/wordpiece/minilm_ids.json")).expect("fixture")
}

#[test]
fn minilm_tokenizer_json_matches_hf_tokenizers() {
    let dir = common::asset("minilm");
    let wp = WordPiece::from_hf_json(&dir.join("tokenizer.json")).expect("load tokenizer.json");
    let auto = WordPiece::load(&dir).expect("load folder");
    assert_eq!(wp.vocab_size(), 30522);
    assert_eq!(wp.pad_id(), Some(0));
    let fx = fixture();
    for case in fx["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let want = ids(&case["ids"]);
        assert_eq!(wp.encode(text), want, "on {text:?}");
        assert_eq!(auto.encode(text), want, "folder, on {text:?}");
    }
    let t = &fx["truncated"];
    let max_len = t["max_len"].as_u64().expect("max_len") as usize;
    assert_eq!(
        wp.encode_truncated(t["text"].as_str().expect("text"), max_len),
        ids(&t["ids"])
    );
}

#[test]
fn minilm_vocab_txt_matches_hf_tokenizers() {
    let dir = common::asset("minilm");
    let wp = WordPiece::from_vocab_txt(&dir.join("vocab.txt"), true).expect("load vocab.txt");
    for case in fixture()["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        assert_eq!(wp.encode(text), ids(&case["vocab_txt_ids"]), "on {text:?}");
    }
}

#[test]
fn bad_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).expect("write");
        p
    };
    let cases = [
        write("not_json.json", "{"),
        write(
            "bpe.json",
            r#"{"model": {"type": "BPE", "vocab": {}, "merges": []}}"#,
        ),
        write(
            "no_unk.json",
            r#"{"model": {"type": "WordPiece", "vocab": {"a": 0}}}"#,
        ),
        write(
            "bad_norm.json",
            r#"{"model": {"type": "WordPiece", "unk_token": "a", "vocab": {"a": 0}},
                "normalizer": {"type": "NFKC"}}"#,
        ),
        write(
            "bad_id.json",
            r#"{"model": {"type": "WordPiece", "vocab": {"a": -1}}}"#,
        ),
        write("vocab.txt", "a\nb\n"),
    ];
    for p in &cases {
        let e = WordPiece::load(p).expect_err("must fail");
        let msg = e.to_string();
        assert!(msg.contains(p.to_str().expect("utf-8 path")), "{msg}");
    }
    assert!(matches!(
        WordPiece::load(&cases[1]),
        Err(TokenizerError::Unsupported { .. })
    ));
    let missing = dir.path().join("missing.json");
    assert!(matches!(
        WordPiece::load(&missing),
        Err(TokenizerError::Io { .. })
    ));
    let empty = tempfile::tempdir().expect("tempdir");
    let e = WordPiece::load(empty.path()).expect_err("empty folder");
    assert!(
        e.to_string()
            .contains("neither tokenizer.json nor vocab.txt"),
        "{e}"
    );
}
