//! The tiktoken rank-file parser must return Ok or Err on any bytes, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = kiln_tokenizer::formats::tiktoken::parse_ranks(data, Path::new("fuzz.tiktoken"));
});
