//! Encoding any text with cl100k_base must decode back to it, and the fast
//! encoder must equal the reference. Set KILN_CL100K to the rank file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn tok() -> &'static kiln_tokenizer::Tokenizer {
    static T: OnceLock<kiln_tokenizer::Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let path = std::env::var("KILN_CL100K").expect("set KILN_CL100K to cl100k_base.tiktoken");
        kiln_tokenizer::Tokenizer::from_tiktoken_file(path.as_ref(), "cl100k_base").expect("load")
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let t = tok();
        let ids = t.encode_ordinary(text);
        assert_eq!(t.decode(&ids).expect("decode"), text);
        assert_eq!(ids, t.encode_ordinary_reference(text).expect("reference"));
    }
});
