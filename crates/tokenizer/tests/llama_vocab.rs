//! Golden test: llama.cpp's `ggml-vocab-*.gguf` files with their `.inp`/`.out`
//! pairs. The `.inp` holds test strings separated by a line
//! `__ggml_vocab_test__`; the `.out` holds the expected ids of each case on one
//! line, space separated, with no BOS (llama.cpp's test-tokenizer-0 tokenizes
//! with add_special = false and parse_special = false, which the outputs
//! confirm: the empty string has an empty line).
//!
//! Supported (byte-level BPE vocabularies whose pre-tokenizer we implement):
//! gpt-2, llama-bpe, qwen2, starcoder, refact, deepseek-coder, deepseek-llm,
//! falcon, mpt, command-r (see the assertion list below for what must pass).
//! Not supported yet (printed by the test, see also the crate docs):
//! SentencePiece vocabularies (llama-spm, phi-3, baichuan, aquila, gemma-4),
//! WordPiece (bert-bge, nomic-bert-moe), gpt-neox (no pre-tokenizer recorded
//! and no test pair), qwen35 (pre-tokenizer not implemented here).

mod common;

use kiln_tokenizer::{Tokenizer, TokenizerError};
use std::path::Path;

fn parse_inp(text: &str) -> Vec<String> {
    let sep = "\n__ggml_vocab_test__\n";
    let mut cases: Vec<String> = text.split(sep).map(str::to_string).collect();
    // The file ends with a separator line; drop what follows it.
    if let Some(last) = cases.last() {
        if last.is_empty() || last == "\n" || last.trim_end_matches('\n').is_empty() {
            cases.pop();
        }
    }
    cases
}

fn run_one(gguf: &Path) -> Result<(usize, usize, Vec<String>), TokenizerError> {
    let tok = Tokenizer::from_gguf(gguf)?;
    let inp = std::fs::read_to_string(gguf.with_extension("gguf.inp")).expect("read .inp");
    let out = std::fs::read_to_string(gguf.with_extension("gguf.out")).expect("read .out");
    let cases = parse_inp(&inp);
    let expected: Vec<Vec<u32>> = out
        .split('\n')
        .take(cases.len())
        .map(|l| {
            l.split_whitespace()
                .map(|x| x.parse().expect("id"))
                .collect()
        })
        .collect();
    assert_eq!(
        expected.len(),
        cases.len(),
        "{}: .inp/.out case counts",
        gguf.display()
    );
    let mut pass = 0;
    let mut fails = Vec::new();
    for (text, want) in cases.iter().zip(&expected) {
        let got = tok.encode_ordinary(text);
        if &got == want {
            pass += 1;
            let reference = tok.encode_ordinary_reference(text).expect("reference");
            assert_eq!(
                reference,
                got,
                "{}: reference differs on {text:?}",
                gguf.display()
            );
            let back = tok.decode(&got).expect("decode");
            assert_eq!(back, *text, "{}: round trip", gguf.display());
        } else {
            fails.push(format!("  {text:?}\n    want {want:?}\n    got  {got:?}"));
        }
    }
    Ok((pass, cases.len(), fails))
}

#[test]
fn llama_cpp_vocabs() {
    let dir = common::asset("tokenizer-tests").join("llama-vocab");
    let mut ggufs: Vec<_> = std::fs::read_dir(&dir)
        .expect("read llama-vocab")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    ggufs.sort();
    let must_pass = [
        "gpt-2",
        "llama-bpe",
        "qwen2",
        "starcoder",
        "refact",
        "deepseek-coder",
        "deepseek-llm",
        "falcon",
        "mpt",
        "command-r",
    ];
    let mut failures = Vec::new();
    for g in &ggufs {
        let name = g
            .file_name()
            .and_then(|f| f.to_str())
            .and_then(|f| f.strip_prefix("ggml-vocab-"))
            .and_then(|f| f.strip_suffix(".gguf"))
            .unwrap_or("?")
            .to_string();
        let has_pair = g.with_extension("gguf.out").is_file();
        match run_one_if(g, has_pair) {
            Ok(Some((pass, total, fails))) => {
                println!("{name}: {pass}/{total}");
                if pass != total {
                    for f in &fails {
                        println!("{f}");
                    }
                    if must_pass.contains(&name.as_str()) {
                        failures.push(format!("{name}: {pass}/{total}"));
                    }
                }
            }
            Ok(None) => println!("{name}: loads; no .inp/.out pair to test"),
            Err(e) => {
                println!("{name}: UNSUPPORTED: {e}");
                if must_pass.contains(&name.as_str()) {
                    failures.push(format!("{name}: {e}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "failures: {failures:?}");
}

fn run_one_if(
    g: &Path,
    has_pair: bool,
) -> Result<Option<(usize, usize, Vec<String>)>, TokenizerError> {
    if has_pair {
        run_one(g).map(Some)
    } else {
        Tokenizer::from_gguf(g).map(|_| None)
    }
}
