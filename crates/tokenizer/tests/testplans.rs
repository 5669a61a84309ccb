//! Golden test: every case of gpt-tokenizer's `TestPlans.txt` (blocks of
//! `EncodingName:` / `Sample:` / `Encoded: [..]`) must encode exactly and
//! round-trip through decode. Encodings map to tiktoken rank files; p50k_edit uses
//! p50k_base's ranks with its extra FIM specials. Any encoding that cannot be
//! loaded is reported and counted as a failure.

mod common;

use kiln_tokenizer::Tokenizer;
use std::collections::BTreeMap;

struct Case {
    encoding: String,
    sample: String,
    expected: Vec<u32>,
    line: usize,
}

/// Samples may span lines: a sample runs from `Sample: ` up to the line that
/// starts with `Encoded: [`.
fn parse(text: &str) -> Vec<Case> {
    let lines: Vec<&str> = text.split('\n').collect();
    let mut cases = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(enc) = lines[i].strip_prefix("EncodingName: ") else {
            i += 1;
            continue;
        };
        let start = i + 1;
        let first = lines[start]
            .strip_prefix("Sample: ")
            .unwrap_or_else(|| panic!("line {}: expected Sample:", start + 1));
        let mut sample = first.to_string();
        let mut j = start + 1;
        while !lines[j].starts_with("Encoded: [") {
            sample.push('\n');
            sample.push_str(lines[j]);
            j += 1;
        }
        let enc_line = lines[j].trim_end();
        let inner = enc_line
            .strip_prefix("Encoded: [")
            .and_then(|s| s.strip_suffix(']'))
            .unwrap_or_else(|| panic!("line {}: bad Encoded line", j + 1));
        let expected = inner
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse()
                    .unwrap_or_else(|_| panic!("line {}: bad id {s}", j + 1))
            })
            .collect();
        cases.push(Case {
            encoding: enc.trim().to_string(),
            sample,
            expected,
            line: i + 1,
        });
        i = j + 1;
    }
    cases
}

fn load(encoding: &str) -> Result<Tokenizer, String> {
    let spec = kiln_tokenizer::formats::tiktoken::spec(encoding).map_err(|e| e.to_string())?;
    let path = common::asset(spec.rank_file);
    Tokenizer::from_tiktoken_file(&path, encoding).map_err(|e| e.to_string())
}

#[test]
fn testplans_all_cases() {
    let dir = common::asset("tokenizer-tests");
    let text = std::fs::read_to_string(dir.join("TestPlans.txt")).expect("read TestPlans.txt");
    let cases = parse(&text);
    assert_eq!(cases.len(), 313, "TestPlans.txt should hold 313 cases");

    let mut toks: BTreeMap<String, Result<Tokenizer, String>> = BTreeMap::new();
    let mut pass: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for c in &cases {
        let tok = toks
            .entry(c.encoding.clone())
            .or_insert_with(|| load(&c.encoding));
        let tok = match tok {
            Ok(t) => t,
            Err(e) => {
                failures.push(format!(
                    "line {}: encoding {} not loadable: {e}",
                    c.line, c.encoding
                ));
                continue;
            }
        };
        let got = tok.encode_ordinary(&c.sample);
        if got != c.expected {
            failures.push(format!(
                "line {} ({}): {:?}\n  expected {:?}\n  got      {:?}",
                c.line, c.encoding, c.sample, c.expected, got
            ));
            continue;
        }
        let reference = tok.encode_ordinary_reference(&c.sample).expect("reference");
        if reference != c.expected {
            failures.push(format!(
                "line {} ({}): reference encoder differs",
                c.line, c.encoding
            ));
            continue;
        }
        let back = tok.decode(&got).expect("decode");
        if back != c.sample {
            failures.push(format!(
                "line {} ({}): decode(encode(x)) != x",
                c.line, c.encoding
            ));
            continue;
        }
        *pass.entry(c.encoding.clone()).or_default() += 1;
    }
    for (enc, t) in &toks {
        if let Err(e) = t {
            println!("encoding {enc}: NOT LOADABLE: {e}");
        }
    }
    println!(
        "TestPlans: {} cases, passed per encoding: {pass:?}",
        cases.len()
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
