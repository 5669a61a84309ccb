//! The GGUF metadata reader and tokenizer builder must return Ok or Err on any
//! bytes, never panic or allocate unboundedly.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.gguf");
    if let Ok(md) = kiln_tokenizer::formats::gguf::read_metadata(&mut &data[..], data.len() as u64, path, &|_| true) {
        if let Ok(t) = kiln_tokenizer::formats::gguf::from_metadata(&md, path) {
            let _ = t.encode_ordinary("Hello world 123 'll");
        }
    }
});
