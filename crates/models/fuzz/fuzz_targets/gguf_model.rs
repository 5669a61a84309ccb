//! The GGUF model loader (candle's header reader behind `kiln_nn::Weights::open_gguf`, the
//! tensor reads and `Llama::load_gguf`'s config checks) and one forward pass of the model it
//! builds must return Ok or Err on any bytes, never panic, abort or allocate without bound.
//!
//! kiln reads GGUF from a path, so each input is written to a temp file (one name per process,
//! removed after each input).
//! Seeds: `fuzz_targets/gguf_model_seeds.rs` writes them (see there, or the README).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        // /dev/shm keeps the per-input write off the disk where there is one.
        let dir = PathBuf::from("/dev/shm");
        let dir = if dir.is_dir() {
            dir
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("kiln-fuzz-gguf-model-{}.gguf", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = path();
    std::fs::write(path, data).expect("write the fuzz input to a temp file");
    let loaded = kiln_models::Llama::load_gguf(path);
    let _ = std::fs::remove_file(path);
    if let Ok(model) = loaded {
        let vocab = model.config().vocab_size as u32;
        let ids = [0, 1.min(vocab.saturating_sub(1))];
        let mut cache = model.new_cache();
        if let Ok(logits) = model.logits_last(&ids, 0, &mut cache) {
            assert_eq!(
                logits.len(),
                vocab as usize,
                "one logit per vocabulary entry"
            );
        }
    }
});
