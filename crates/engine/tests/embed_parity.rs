//! all-MiniLM-L6-v2 sentence embeddings against sentence-transformers: the token ids and vectors
//! of `fixtures/minilm/embeddings.json` (written by `fixtures/minilm/make_fixture.py`, texts
//! encoded one at a time in float32), batched and one at a time, plus the loader's errors.
//!
//! Tolerance (f32 against f32 PyTorch): every component within 2e-6 of the reference and cosine
//! similarity above 0.999999. The measured maximum difference is printed.

use kiln_engine::{EmbedError, Embedder};
use std::path::{Path, PathBuf};

fn minilm() -> PathBuf {
    match kiln_assets::ensure("minilm") {
        Ok(p) => p,
        Err(e) => panic!("asset minilm is not available: {e}"),
    }
}

struct Case {
    text: String,
    ids: Vec<u32>,
    embedding: Vec<f32>,
}

fn fixture() -> Vec<Case> {
    let v: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/minilm/embeddings.json")).expect("fixture");
    assert_eq!(v["max_seq_length"], 256);
    assert_eq!(v["dim"], 384);
    v["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().expect("text").to_string(),
            ids: c["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|x| x.as_u64().expect("id") as u32)
                .collect(),
            embedding: c["embedding"]
                .as_array()
                .expect("embedding")
                .iter()
                .map(|x| x.as_f64().expect("float") as f32)
                .collect(),
        })
        .collect()
}

const MAX_ABS: f32 = 2e-6;
const MIN_COS: f32 = 0.999_999;

fn compare(got: &[f32], want: &[f32], what: &str) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: dimension");
    let diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let dot: f32 = got.iter().zip(want).map(|(a, b)| a * b).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let cos = dot / (norm(got) * norm(want));
    assert!(diff < MAX_ABS, "{what}: max abs diff {diff:e}");
    assert!(cos > MIN_COS, "{what}: cosine {cos}");
    diff
}

#[test]
fn minilm_matches_sentence_transformers() {
    let embedder = Embedder::load(&minilm()).expect("load minilm");
    assert_eq!(embedder.dim(), 384);
    assert_eq!(embedder.max_len(), 256);
    let cases = fixture();
    let texts: Vec<&str> = cases.iter().map(|c| c.text.as_str()).collect();
    for c in &cases {
        assert_eq!(embedder.tokenize(&c.text), c.ids, "ids of {:?}", c.text);
    }
    let batched = embedder.embed(&texts).expect("embed batch");
    assert_eq!(
        batched.tokens,
        cases.iter().map(|c| c.ids.len()).sum::<usize>()
    );
    let mut worst = 0f32;
    for (c, v) in cases.iter().zip(&batched.vectors) {
        worst = worst.max(compare(v, &c.embedding, &format!("batched {:?}", c.text)));
        let single = embedder.embed(&[&c.text]).expect("embed one");
        worst = worst.max(compare(
            &single.vectors[0],
            &c.embedding,
            &format!("single {:?}", c.text),
        ));
        // Batch and single agree more closely than either agrees with PyTorch.
        let d = single.vectors[0]
            .iter()
            .zip(v)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-6, "batch vs single {:?}: {d:e}", c.text);
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "unit length");
    }
    eprintln!("max abs diff against sentence-transformers: {worst:e}");

    // Smaller batches (several calls, different padding) give the same vectors.
    let mut small = embedder.clone();
    small.set_batch_size(3);
    let again = small.embed(&texts).expect("embed in batches of 3");
    for (a, b) in again.vectors.iter().zip(&batched.vectors) {
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-6, "batch size 3 vs 32: {d:e}");
    }
}

#[test]
fn long_text_is_truncated_to_max_seq_length() {
    let embedder = Embedder::load(&minilm()).expect("load minilm");
    let long = "word ".repeat(1000);
    let out = embedder.embed(&[&long, "short"]).expect("embed");
    assert_eq!(embedder.tokenize(&long).len(), 256);
    assert_eq!(out.tokens, 256 + 3);
    assert_eq!(out.vectors.len(), 2);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let dest = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).expect("copy");
        }
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let dir = minilm();
    let embedder = Embedder::load(&dir).expect("load minilm");
    assert!(matches!(embedder.embed(&[]), Err(EmbedError::NoTexts)));

    let tmp = tempfile::tempdir().expect("tempdir");
    let err = |p: &Path| Embedder::load(p).expect_err("must fail").to_string();
    // Not a folder, an empty folder.
    let e = err(&tmp.path().join("nope"));
    assert!(e.contains("not a model folder"), "{e}");
    let e = err(tmp.path());
    assert!(e.contains("config.json"), "{e}");

    // Missing files, one at a time.
    for missing in ["model.safetensors", "tokenizer.json"] {
        let m = tmp.path().join(format!("no-{missing}"));
        copy_dir(&dir, &m);
        std::fs::remove_file(m.join(missing)).expect("rm");
        if missing == "tokenizer.json" {
            // vocab.txt is the fallback; without it too, the error names both.
            std::fs::remove_file(m.join("vocab.txt")).expect("rm");
        }
        let e = err(&m);
        assert!(
            e.contains(missing) || e.contains("neither tokenizer.json nor vocab.txt"),
            "{missing}: {e}"
        );
    }

    // A safetensors file whose tensor shapes disagree with config.json.
    let m = tmp.path().join("wrong-shape");
    copy_dir(&dir, &m);
    let cfg_path = m.join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).expect("config");
    std::fs::write(
        &cfg_path,
        cfg.replace("\"intermediate_size\": 1536", "\"intermediate_size\": 1024"),
    )
    .expect("write");
    let e = err(&m);
    assert!(
        e.contains("intermediate.dense.weight") && e.contains("1024"),
        "{e}"
    );

    // A truncated safetensors file.
    let m = tmp.path().join("truncated");
    copy_dir(&dir, &m);
    let st = m.join("model.safetensors");
    let bytes = std::fs::read(&st).expect("read");
    std::fs::write(&st, &bytes[..bytes.len() / 2]).expect("write");
    let e = err(&m);
    assert!(e.contains("model.safetensors"), "{e}");

    // Garbage config.json.
    let m = tmp.path().join("bad-config");
    copy_dir(&dir, &m);
    std::fs::write(m.join("config.json"), "{ not json").expect("write");
    let e = err(&m);
    assert!(e.contains("config.json"), "{e}");
}
