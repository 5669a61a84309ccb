//! The tokenizer.json loader must return Ok or Err on any bytes; when it loads,
//! encoding its own input must not panic either.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = kiln_tokenizer::formats::hf_json::parse(data, Path::new("fuzz.json")) {
        let text = String::from_utf8_lossy(data);
        let ids = t.encode_with_special_tokens(&text);
        let _ = t.decode(&ids);
    }
});
