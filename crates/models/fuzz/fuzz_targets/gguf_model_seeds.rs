//! Writes the seed corpus of the `gguf_model` fuzz target: a few tiny, valid GGUF v3 llama /
//! qwen2 models (F32, F16, Q4_0, Q4_1 and Q8_0 tensors, tied and untied heads, biases,
//! `rope_freqs`, rope scaling), each a few KB, that `Llama::load_gguf` loads and runs.
//!
//! It has no dependencies, so plain `rustc` builds it (cargo would build kiln and candle too):
//!
//! ```text
//! cd crates/models/fuzz
//! mkdir -p target
//! rustc -O --edition 2021 fuzz_targets/gguf_model_seeds.rs -o target/gguf_model_seeds
//! target/gguf_model_seeds          # writes corpus/gguf_model/seed-*.gguf (or: ... DIR)
//! ```
//!
//! The bytes are written by hand (no GGUF library), so the generator also documents the layout:
//! magic `GGUF`, version u32, tensor count u64, metadata count u64, the metadata (key string,
//! value type u32, value), the tensor infos (name, n_dims u32, dims u64 innermost first, ggml
//! type u32, offset u64 from the data section), padding to `general.alignment` (32), the data.

use std::path::PathBuf;

const ALIGN: usize = 32;

enum Val {
    U32(u32),
    F32(f32),
    Str(&'static str),
}

#[derive(Clone, Copy)]
enum Ty {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl Ty {
    fn ggml(self) -> u32 {
        match self {
            Ty::F32 => 0,
            Ty::F16 => 1,
            Ty::Q4_0 => 2,
            Ty::Q4_1 => 3,
            Ty::Q8_0 => 8,
        }
    }
}

/// f32 -> IEEE half bits for the small values used here (truncating the mantissa; values
/// below f16's smallest normal become zero).
fn f16_bits(x: f32) -> u16 {
    if x.abs() < 6.2e-5 {
        return 0;
    }
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    assert!((1..=30).contains(&exp), "{x} is not a normal f16");
    sign | ((exp as u16) << 10) | ((b >> 13) & 0x3ff) as u16
}

/// Deterministic small values in [-0.5, 0.5).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

/// The GGUF bytes of a tensor of PyTorch shape `dims` (rows last-but-one, columns last).
fn tensor_bytes(ty: Ty, dims: &[usize], rng: &mut Rng, ones: bool) -> Vec<u8> {
    let n: usize = dims.iter().product();
    let vals: Vec<f32> = (0..n)
        .map(|_| if ones { 1.0 } else { rng.next() * 0.2 })
        .collect();
    let mut out = Vec::new();
    match ty {
        Ty::F32 => vals.iter().for_each(|v| out.extend(v.to_le_bytes())),
        Ty::F16 => vals
            .iter()
            .for_each(|v| out.extend(f16_bits(*v).to_le_bytes())),
        Ty::Q8_0 => {
            for block in vals.chunks(32) {
                out.extend(f16_bits(1.0 / 1024.0).to_le_bytes());
                block
                    .iter()
                    .for_each(|v| out.push((v * 1024.0) as i8 as u8));
            }
        }
        Ty::Q4_0 | Ty::Q4_1 => {
            for block in vals.chunks(32) {
                out.extend(f16_bits(1.0 / 64.0).to_le_bytes());
                if matches!(ty, Ty::Q4_1) {
                    out.extend(f16_bits(-8.0 / 64.0).to_le_bytes());
                }
                // Element j in the low nibble of byte j, element j + 16 in the high nibble.
                let q = |v: f32| ((v * 64.0 + 8.0) as i32).clamp(0, 15) as u8;
                (0..16).for_each(|j| out.push(q(block[j]) | (q(block[j + 16]) << 4)));
            }
        }
    }
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

struct Tensor {
    name: String,
    ty: Ty,
    dims: Vec<usize>,
    data: Vec<u8>,
}

fn gguf(meta: &[(&str, Val)], tensors: &[Tensor]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut out, k);
        match v {
            Val::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Val::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Val::Str(s) => {
                out.extend(8u32.to_le_bytes());
                put_str(&mut out, s);
            }
        }
    }
    let mut offset = 0usize;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        t.dims
            .iter()
            .rev()
            .for_each(|d| out.extend((*d as u64).to_le_bytes()));
        out.extend(t.ty.ggml().to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offset += t.data.len().div_ceil(ALIGN) * ALIGN;
    }
    for t in tensors {
        out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
        out.extend(&t.data);
    }
    out
}

struct Spec {
    file: &'static str,
    arch: &'static str,
    /// (hidden, heads, kv heads, ff, layers, vocab)
    sizes: (usize, usize, usize, usize, usize, usize),
    /// Type of the big matrices; norms are always F32.
    ty: Ty,
    embed_ty: Ty,
    tied: bool,
    qkv_bias: bool,
    rope_freqs: bool,
    extra: Vec<(&'static str, Val)>,
}

fn model(spec: &Spec, seed: u64) -> Vec<u8> {
    let (h, heads, kv, ff, layers, vocab) = spec.sizes;
    let d = h / heads;
    let mut rng = Rng(seed);
    let mut ts = Vec::new();
    let mut add = |name: String, ty: Ty, dims: Vec<usize>, ones: bool, rng: &mut Rng| {
        let data = tensor_bytes(ty, &dims, rng, ones);
        ts.push(Tensor {
            name,
            ty,
            dims,
            data,
        });
    };
    add(
        "token_embd.weight".into(),
        spec.embed_ty,
        vec![vocab, h],
        false,
        &mut rng,
    );
    for i in 0..layers {
        let p = |s: &str| format!("blk.{i}.{s}");
        add(p("attn_norm.weight"), Ty::F32, vec![h], true, &mut rng);
        add(
            p("attn_q.weight"),
            spec.ty,
            vec![heads * d, h],
            false,
            &mut rng,
        );
        add(
            p("attn_k.weight"),
            spec.ty,
            vec![kv * d, h],
            false,
            &mut rng,
        );
        add(
            p("attn_v.weight"),
            spec.ty,
            vec![kv * d, h],
            false,
            &mut rng,
        );
        if spec.qkv_bias {
            add(p("attn_q.bias"), Ty::F32, vec![heads * d], false, &mut rng);
            add(p("attn_k.bias"), Ty::F32, vec![kv * d], false, &mut rng);
            add(p("attn_v.bias"), Ty::F32, vec![kv * d], false, &mut rng);
        }
        add(
            p("attn_output.weight"),
            spec.ty,
            vec![h, heads * d],
            false,
            &mut rng,
        );
        add(p("ffn_norm.weight"), Ty::F32, vec![h], true, &mut rng);
        add(p("ffn_gate.weight"), spec.ty, vec![ff, h], false, &mut rng);
        add(p("ffn_up.weight"), spec.ty, vec![ff, h], false, &mut rng);
        add(p("ffn_down.weight"), spec.ty, vec![h, ff], false, &mut rng);
    }
    add(
        "output_norm.weight".into(),
        Ty::F32,
        vec![h],
        true,
        &mut rng,
    );
    if !spec.tied {
        add(
            "output.weight".into(),
            spec.ty,
            vec![vocab, h],
            false,
            &mut rng,
        );
    }
    if spec.rope_freqs {
        add(
            "rope_freqs.weight".into(),
            Ty::F32,
            vec![d / 2],
            true,
            &mut rng,
        );
    }
    let k = |s: &str| -> &'static str { Box::leak(format!("{}.{s}", spec.arch).into_boxed_str()) };
    let mut meta = vec![
        ("general.architecture", Val::Str(spec.arch)),
        ("general.alignment", Val::U32(ALIGN as u32)),
        (k("embedding_length"), Val::U32(h as u32)),
        (k("block_count"), Val::U32(layers as u32)),
        (k("attention.head_count"), Val::U32(heads as u32)),
        (k("attention.head_count_kv"), Val::U32(kv as u32)),
        (k("context_length"), Val::U32(64)),
        (k("feed_forward_length"), Val::U32(ff as u32)),
        (k("attention.layer_norm_rms_epsilon"), Val::F32(1e-5)),
        (k("rope.freq_base"), Val::F32(10_000.0)),
    ];
    meta.extend(spec.extra.iter().map(|(k, v)| {
        let v = match v {
            Val::U32(x) => Val::U32(*x),
            Val::F32(x) => Val::F32(*x),
            Val::Str(s) => Val::Str(s),
        };
        (*k, v)
    }));
    gguf(&meta, &ts)
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("corpus/gguf_model"));
    std::fs::create_dir_all(&dir).expect("create the corpus folder");
    let specs = [
        // Q8_0 everywhere, an untied head, GQA (2 query heads share 1 key/value head).
        Spec {
            file: "seed-llama-q8_0.gguf",
            arch: "llama",
            sizes: (32, 2, 1, 32, 1, 16),
            ty: Ty::Q8_0,
            embed_ty: Ty::Q8_0,
            tied: false,
            qkv_bias: false,
            rope_freqs: false,
            extra: vec![("tokenizer.chat_template", Val::Str("{{ messages }}"))],
        },
        // Q4_0 / Q4_1 weights, llama.cpp's Llama 3 rope divisors, linear rope scaling.
        Spec {
            file: "seed-llama-q4.gguf",
            arch: "llama",
            sizes: (32, 4, 2, 64, 2, 8),
            ty: Ty::Q4_0,
            embed_ty: Ty::Q4_1,
            tied: true,
            qkv_bias: false,
            rope_freqs: true,
            extra: vec![
                ("llama.rope.scaling.type", Val::Str("linear")),
                ("llama.rope.scaling.factor", Val::F32(2.0)),
            ],
        },
        // qwen2 (half-split rope) with q/k/v biases, F16 weights, F32 tied embeddings, yarn.
        Spec {
            file: "seed-qwen2-f16.gguf",
            arch: "qwen2",
            sizes: (16, 2, 2, 24, 1, 12),
            ty: Ty::F16,
            embed_ty: Ty::F32,
            tied: true,
            qkv_bias: true,
            rope_freqs: false,
            extra: vec![
                ("qwen2.rope.scaling.type", Val::Str("yarn")),
                ("qwen2.rope.scaling.factor", Val::F32(4.0)),
                ("qwen2.rope.scaling.original_context_length", Val::U32(16)),
                ("qwen2.attention.sliding_window", Val::U32(8)),
            ],
        },
    ];
    for spec in &specs {
        let bytes = model(spec, 0x9E37_79B9_7F4A_7C15);
        assert!(
            bytes.len() < 64 * 1024,
            "{} is {} bytes",
            spec.file,
            bytes.len()
        );
        let path = dir.join(spec.file);
        std::fs::write(&path, &bytes).expect("write a seed");
        println!("{} ({} bytes)", path.display(), bytes.len());
    }
}
