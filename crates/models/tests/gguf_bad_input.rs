//! Malformed GGUF files (the regressions of the `gguf_model` fuzz target in
//! `crates/models/fuzz`) must fail to load with an error that names the problem, never panic.
//!
//! Each test writes real bytes: a tiny valid llama model from [`Gguf::llama`], with one field
//! broken.

use kiln_models::Llama;
use std::path::PathBuf;

const F32: u32 = 0;
const Q8_0: u32 = 8;
const T_U32: u32 = 4;
const T_STRING: u32 = 8;

/// A GGUF v3 file as written, field by field; nothing is checked, so tests can break anything.
struct Gguf {
    /// (key, value type, value bytes)
    meta: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<TensorEntry>,
    alignment: u64,
}

struct TensorEntry {
    name: String,
    /// In GGUF order: innermost (columns) first.
    dims: Vec<u64>,
    ggml_type: u32,
    /// `None`: right after the previous tensor's (aligned) data.
    offset: Option<u64>,
    data: Vec<u8>,
}

fn string_bytes(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend(s.as_bytes());
    v
}

impl Gguf {
    /// One layer, hidden 32, 2 heads of 16, ff 32, vocab 8, F32 everywhere but `attn_q` (Q8_0).
    fn llama() -> Self {
        let mut g = Gguf {
            meta: Vec::new(),
            tensors: Vec::new(),
            alignment: 32,
        };
        g.set_str("general.architecture", "llama");
        g.set_u32("general.alignment", 32);
        for (k, v) in [
            ("llama.embedding_length", 32),
            ("llama.block_count", 1),
            ("llama.attention.head_count", 2),
            ("llama.context_length", 16),
            ("llama.feed_forward_length", 32),
        ] {
            g.set_u32(k, v);
        }
        let (h, ff, vocab) = (32, 32, 8);
        g.f32("token_embd.weight", &[vocab, h]);
        g.f32("blk.0.attn_norm.weight", &[h]);
        // Q8_0 blocks: an f16 scale (1/128) and 32 int8 values.
        let block: Vec<u8> = [0x00, 0x20]
            .into_iter()
            .chain((0..32).map(|i| i as u8))
            .collect();
        g.tensor(
            "blk.0.attn_q.weight",
            &[h, h],
            Q8_0,
            block.repeat(h as usize),
        );
        for name in ["attn_k", "attn_v", "attn_output"] {
            g.f32(&format!("blk.0.{name}.weight"), &[h, h]);
        }
        g.f32("blk.0.ffn_norm.weight", &[h]);
        g.f32("blk.0.ffn_gate.weight", &[ff, h]);
        g.f32("blk.0.ffn_up.weight", &[ff, h]);
        g.f32("blk.0.ffn_down.weight", &[h, ff]);
        g.f32("output_norm.weight", &[h]);
        g
    }

    fn set(&mut self, key: &str, ty: u32, value: Vec<u8>) {
        self.meta.retain(|(k, _, _)| k != key);
        self.meta.push((key.to_string(), ty, value));
    }

    fn set_u32(&mut self, key: &str, v: u32) {
        self.set(key, T_U32, v.to_le_bytes().to_vec());
    }

    fn set_str(&mut self, key: &str, v: &str) {
        self.set(key, T_STRING, string_bytes(v));
    }

    /// A tensor of PyTorch shape `dims` (rows, cols).
    fn tensor(&mut self, name: &str, dims: &[u64], ggml_type: u32, data: Vec<u8>) {
        self.tensors.push(TensorEntry {
            name: name.to_string(),
            dims: dims.iter().rev().copied().collect(),
            ggml_type,
            offset: None,
            data,
        });
    }

    fn f32(&mut self, name: &str, dims: &[u64]) {
        let n: u64 = dims.iter().product();
        let data = (0..n)
            .flat_map(|i| (((i % 7) as f32 - 3.0) * 0.01).to_le_bytes())
            .collect();
        self.tensor(name, dims, F32, data);
    }

    fn get(&mut self, name: &str) -> &mut TensorEntry {
        self.tensors.iter_mut().find(|t| t.name == name).unwrap()
    }

    fn bytes(&self) -> Vec<u8> {
        let align = |n: usize| n.div_ceil(self.alignment as usize) * self.alignment as usize;
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.meta.len() as u64).to_le_bytes());
        for (k, ty, v) in &self.meta {
            out.extend(string_bytes(k));
            out.extend(ty.to_le_bytes());
            out.extend(v);
        }
        let mut next = 0u64;
        for t in &self.tensors {
            out.extend(string_bytes(&t.name));
            out.extend((t.dims.len() as u32).to_le_bytes());
            t.dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(t.ggml_type.to_le_bytes());
            out.extend(t.offset.unwrap_or(next).to_le_bytes());
            next += align(t.data.len()) as u64;
        }
        for t in &self.tensors {
            out.resize(align(out.len()), 0);
            out.extend(&t.data);
        }
        out
    }
}

/// A file that is removed when the test ends.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn write(name: &str, bytes: &[u8]) -> TempFile {
    let path = std::env::temp_dir().join(format!(
        "kiln-gguf-bad-input-{}-{name}.gguf",
        std::process::id()
    ));
    std::fs::write(&path, bytes).unwrap();
    TempFile(path)
}

/// Loads `bytes` and returns the error message; fails the test if the load succeeds.
fn load_err(name: &str, bytes: &[u8]) -> String {
    let f = write(name, bytes);
    match Llama::load_gguf(&f.0) {
        Ok(_) => panic!("{name}: a malformed file loaded"),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error `{msg}` does not mention `{p}`");
    }
}

#[test]
fn the_valid_base_file_loads_and_runs() {
    let f = write("valid", &Gguf::llama().bytes());
    let model = Llama::load_gguf(&f.0).unwrap();
    let mut cache = model.new_cache();
    let logits = model.logits_last(&[0, 1], 0, &mut cache).unwrap();
    assert_eq!(logits.len(), 8);
    assert!(logits.iter().all(|x| x.is_finite()));
}

// Fuzz finding: candle's header reader computes the data offset as
// `position.div_ceil(alignment) * alignment`; `general.alignment = 0` was a division by zero.
#[test]
fn zero_alignment_is_an_error() {
    let mut g = Gguf::llama();
    g.set_u32("general.alignment", 0);
    let msg = load_err("align0", &g.bytes());
    assert_mentions(&msg, &["general.alignment is 0"]);
}

// The same division happened while reading a v1 file, before kiln refused v1.
#[test]
fn version_1_is_refused_before_candle_reads_it() {
    let mut b = b"GGUF".to_vec();
    b.extend(1u32.to_le_bytes());
    b.extend(0u32.to_le_bytes()); // tensors (v1 counts and lengths are u32)
    b.extend(1u32.to_le_bytes()); // metadata entries
    b.extend(17u32.to_le_bytes());
    b.extend(b"general.alignment");
    b.extend(T_U32.to_le_bytes());
    b.extend(0u32.to_le_bytes());
    let msg = load_err("v1", &b);
    assert_mentions(&msg, &["version 1 is not supported"]);
}

// Fuzz finding: dimensions whose product overflows. candle multiplies them unchecked
// (`Shape::elem_count`, then blocks x block bytes): with overflow checks a panic; without, 2^59 x
// 32 wraps to a 0-byte tensor that claims 2^64 elements, and the loader went on to index it.
#[test]
fn dimensions_whose_product_overflows_are_an_error() {
    let mut g = Gguf::llama();
    let t = g.get("token_embd.weight");
    t.dims = vec![32, 1 << 59];
    t.ggml_type = Q8_0;
    t.data.clear();
    let msg = load_err("dims", &g.bytes());
    assert_mentions(&msg, &["token_embd.weight", "overflow"]);
}

// Fuzz finding: `llama.block_count` of 2^32 - 2 made the loader reserve room for that many layers
// (terabytes: an abort) before it noticed the first missing one.
#[test]
fn a_block_count_the_file_cannot_hold_is_an_error() {
    let mut g = Gguf::llama();
    g.set_u32("llama.block_count", u32::MAX - 1);
    let msg = load_err("blocks", &g.bytes());
    assert_mentions(&msg, &["llama.block_count is 4294967294", "blk.4294967293"]);
}

// num_heads x head_dim (`attention.key_length`) overflowed and wrapped to a small projection
// width (a panic with overflow checks).
#[test]
fn heads_times_head_dim_overflow_is_an_error() {
    let mut g = Gguf::llama();
    g.set(
        "llama.attention.key_length",
        10,
        (1u64 << 63).to_le_bytes().to_vec(),
    );
    let msg = load_err("headdim", &g.bytes());
    assert_mentions(
        &msg,
        &["num_heads 2 x head_dim 9223372036854775808 overflows"],
    );
}

// Not a fuzz finding (candle checks each tensor against the file's length when it reads it), kept
// as the model-level check that a truncated file names the first tensor it cannot read.
#[test]
fn a_truncated_file_names_the_tensor_past_the_end() {
    let mut b = Gguf::llama().bytes();
    b.truncate(b.len() - 100);
    let msg = load_err("truncated", &b);
    assert_mentions(&msg, &["output_norm.weight", "truncated"]);
}

// ggml stores whole blocks per row; a Q8_0 row of 16 values cannot be one.
#[test]
fn a_row_that_is_not_whole_blocks_is_an_error() {
    let mut g = Gguf::llama();
    g.get("blk.0.attn_q.weight").dims = vec![16, 64];
    let msg = load_err("rows", &g.bytes());
    assert_mentions(
        &msg,
        &[
            "blk.0.attn_q.weight",
            "not a whole number of 32-element blocks",
        ],
    );
}

// Tensors that share bytes would let a small file make the loader allocate without bound.
#[test]
fn overlapping_tensors_are_an_error() {
    let mut g = Gguf::llama();
    g.get("blk.0.ffn_up.weight").offset = Some(0);
    let msg = load_err("overlap", &g.bytes());
    assert_mentions(&msg, &["blk.0.ffn_up.weight", "overlap"]);
}
