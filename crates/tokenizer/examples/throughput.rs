//! Single-thread encode throughput on the Shakespeare corpus.
//!
//! `cargo run -p kiln-tokenizer --release --example throughput [encoding] [path]`
//! prints MB/s for `encode_ordinary` on one thread (the lead's benchmark compares
//! against tiktoken side by side; this is the quick self-check).

use kiln_tokenizer::Tokenizer;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let encoding = args.get(1).map(String::as_str).unwrap_or("cl100k_base");
    let rank_file = kiln_tokenizer::formats::tiktoken::spec(encoding)?.rank_file;
    let path = match args.get(2) {
        Some(p) => p.into(),
        None => kiln_assets::ensure(rank_file)?,
    };
    let tok = Tokenizer::from_tiktoken_file(&path, encoding)?;
    let dir = kiln_assets::ensure("shakespeare")?;
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let mut text = String::new();
    for f in files
        .iter()
        .filter(|f| f.to_string_lossy().ends_with("_gut.txt"))
    {
        text.push_str(&std::fs::read_to_string(f)?);
    }
    // Warm up (tables, caches), then time a few full passes.
    let n_tokens = tok.encode_ordinary(&text).len();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let ids = tok.encode_ordinary(&text);
        std::hint::black_box(&ids);
        best = best.min(t.elapsed().as_secs_f64());
    }
    let mb = text.len() as f64 / 1e6;
    println!(
        "{encoding}: {mb:.1} MB, {n_tokens} tokens, best of 3: {best:.3} s = {:.1} MB/s (1 thread)",
        mb / best
    );
    Ok(())
}
