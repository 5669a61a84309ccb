//! Fast paths against their oracles on random data of awkward sizes.
//!
//! Quantized matmul tolerance: candle's kernels quantize the activations to 8 bits per block (Q8_0
//! or Q8_K, as llama.cpp does) before the integer dot products, so `x W^T` differs from
//! `x dequantize(W)^T` in f32 by that rounding. We require
//! `max |fast - ref| <= 1e-2 * max |ref|` (measured: 2.4e-3 to 5.4e-3 across Q4_0..Q6_K).

use kiln_nn::candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use kiln_nn::candle_core::{DType, Device, Tensor};
use kiln_nn::{
    causal_attention, causal_attention_padded, causal_attention_reference, KvCache, Linear,
    NnError, Weights,
};
use std::sync::Arc;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // A tiny LCG keeps the data reproducible without a dependency.
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn quantized_matmul_equals_dequantized_f32_matmul() {
    let types = [
        (GgmlDType::Q4_0, 32),
        (GgmlDType::Q4_1, 32),
        (GgmlDType::Q5_0, 32),
        (GgmlDType::Q5_1, 32),
        (GgmlDType::Q8_0, 32),
        (GgmlDType::Q2K, 256),
        (GgmlDType::Q3K, 256),
        (GgmlDType::Q4K, 256),
        (GgmlDType::Q5K, 256),
        (GgmlDType::Q6K, 256),
    ];
    for (dtype, block) in types {
        for (m, n, k_blocks) in [(1, 37, 3), (3, 37, 3), (7, 61, 5), (1, 256, 2)] {
            let k = block * k_blocks;
            let w = randn(&[n, k], (n * k) as u64);
            let x = randn(&[m, k], (m + 7 * k) as u64);
            let q = QTensor::quantize(&w, dtype).unwrap();
            let lin = Linear::from_qtensor(Arc::new(q), None).unwrap();
            assert!(lin.is_quantized());
            let reference = x
                .matmul(&lin.dequantized_weight().unwrap().t().unwrap())
                .unwrap();
            let fast = lin.forward(&x).unwrap();
            let err = max_abs(&(fast - &reference).unwrap());
            let rel = err / max_abs(&reference);
            eprintln!("{dtype:?} m={m} n={n} k={k}: max rel err {rel:.2e}");
            assert!(
                rel <= 1e-2,
                "{dtype:?} m={m} n={n} k={k}: relative error {rel}"
            );
        }
    }
}

#[test]
fn quantized_linear_handles_batched_3d_input() {
    let w = randn(&[40, 64], 1);
    let q = Linear::from_qtensor(
        Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()),
        None,
    )
    .unwrap();
    let x = randn(&[2, 3, 64], 2);
    let y = q.forward(&x).unwrap();
    assert_eq!(y.dims(), &[2, 3, 40]);
    let y2 = q
        .forward(&x.reshape((6, 64)).unwrap())
        .unwrap()
        .reshape((2, 3, 40))
        .unwrap();
    assert!(max_abs(&(y - y2).unwrap()) == 0.0);
}

#[test]
fn dense_linear_matches_matmul_with_bias() {
    let w = randn(&[5, 9], 3);
    let b = randn(&[5], 4);
    let x = randn(&[2, 3, 9], 5);
    let lin = Linear::dense(w.clone(), Some(b.clone())).unwrap();
    let got = lin.forward(&x).unwrap();
    let want = x
        .broadcast_matmul(&w.t().unwrap())
        .unwrap()
        .broadcast_add(&b)
        .unwrap();
    assert!(max_abs(&(got - want).unwrap()) < 1e-6);
}

#[test]
fn gqa_attention_matches_repeat_kv_reference() {
    // (H_q, H_kv, T, S, window): MHA, GQA, MQA, decode step, chunk with past, sliding windows.
    for (hq, hkv, t, s, window) in [
        (4, 4, 5, 5, None),
        (6, 2, 7, 7, None),
        (6, 1, 3, 10, None),
        (8, 2, 1, 13, None),
        (4, 2, 6, 11, Some(4)),
        (3, 3, 1, 9, Some(3)),
    ] {
        let (b, d) = (2, 8);
        let q = randn(&[b, hq, t, d], 11);
        let k = randn(&[b, hkv, s, d], 12);
        let v = randn(&[b, hkv, s, d], 13);
        let fast = causal_attention(&q, &k, &v, window).unwrap();
        let slow = causal_attention_reference(&q, &k, &v, window).unwrap();
        let err = max_abs(&(fast - slow).unwrap());
        assert!(
            err < 1e-5,
            "hq={hq} hkv={hkv} t={t} s={s} window={window:?}: {err}"
        );
    }
}

/// A left-padded row's real queries see exactly what they would see without the padding: its
/// output equals plain causal attention over the row's unpadded keys.
#[test]
fn padded_attention_equals_each_row_unpadded() {
    // (H_q, H_kv, T, S, window, pads): prefill, chunk with past, decode step, sliding window.
    for (hq, hkv, t, s, window, pads) in [
        (4, 2, 7, 7, None, vec![0, 3, 6]),
        (6, 3, 3, 9, None, vec![2, 0, 5]),
        (4, 1, 1, 12, None, vec![4, 11, 0]),
        (4, 2, 5, 10, Some(3), vec![1, 6, 0]),
    ] {
        let (b, d) = (pads.len(), 8);
        let q = randn(&[b, hq, t, d], 21);
        let k = randn(&[b, hkv, s, d], 22);
        let v = randn(&[b, hkv, s, d], 23);
        let out = causal_attention_padded(&q, &k, &v, window, &pads).unwrap();
        assert!(max_abs(&out).is_finite(), "padded queries stay finite");
        for (row, &p) in pads.iter().enumerate() {
            // Queries at positions s - t + i >= p are real.
            let first = p.saturating_sub(s - t);
            let n = t - first;
            let one = |x: &Tensor, start: usize, len: usize| {
                x.narrow(0, row, 1).unwrap().narrow(2, start, len).unwrap()
            };
            let alone = causal_attention(
                &one(&q, first, n),
                &one(&k, p, s - p),
                &one(&v, p, s - p),
                window,
            )
            .unwrap();
            let got = one(&out, first, n);
            let err = max_abs(&(got - alone).unwrap());
            assert!(
                err < 1e-5,
                "row {row} pad {p} t={t} s={s} window={window:?}: {err}"
            );
        }
    }
}

#[test]
fn kv_cache_appends_and_grows() {
    let mut c = KvCache::new(1);
    let mut all_k = Vec::new();
    for (i, t) in [3usize, 1, 1, 20, 1].iter().enumerate() {
        let k = randn(&[2, 2, *t, 4], i as u64);
        let v = (&k * 2.0).unwrap();
        let (ck, cv) = c.append(0, &k, &v).unwrap();
        c.advance(*t);
        all_k.push(k);
        let want = Tensor::cat(&all_k, 2).unwrap();
        assert_eq!(ck.dims(), want.dims());
        assert!(max_abs(&(ck - &want).unwrap()) == 0.0);
        assert!(max_abs(&(cv - (want * 2.0).unwrap()).unwrap()) == 0.0);
    }
    assert_eq!(c.len(), 26);
}

fn tiny_gguf(path: &std::path::Path) {
    let w = QTensor::quantize(&randn(&[4, 32], 9), GgmlDType::Q8_0).unwrap();
    let meta = gguf_file::Value::String("llama".into());
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &[("general.architecture", &meta)], &[("w", &w)]).unwrap();
}

#[test]
fn truncated_gguf_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    tiny_gguf(&path);
    let full = std::fs::read(&path).unwrap();
    // Cut in the tensor data: the header reads, the tensor does not.
    std::fs::write(&path, &full[..full.len() - 100]).unwrap();
    let mut w = Weights::open_gguf(&path).unwrap();
    let err = w.linear("w", None, (4, 32)).unwrap_err();
    assert!(matches!(err, NnError::BadFile { .. }), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");
    // Cut in the header.
    for cut in [3, 12, 30] {
        std::fs::write(&path, &full[..cut]).unwrap();
        let err = Weights::open_gguf(&path).err().unwrap();
        assert!(matches!(err, NnError::BadFile { .. }), "{err}");
    }
}

#[test]
fn unknown_tensor_type_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    tiny_gguf(&path);
    let mut bytes = std::fs::read(&path).unwrap();
    // The tensor info's type field follows its name "w" (u64 len + 1 byte), n_dims and 2 dims.
    let name_at = bytes
        .windows(9)
        .position(|w| w == [1, 0, 0, 0, 0, 0, 0, 0, b'w'])
        .unwrap();
    let ty_at = name_at + 9 + 4 + 16;
    assert_eq!(bytes[ty_at], 8); // Q8_0
    bytes[ty_at] = 20; // IQ4_NL: not supported by candle 0.11
    std::fs::write(&path, &bytes).unwrap();
    let err = Weights::open_gguf(&path).err().unwrap();
    assert!(err.to_string().contains("unsupported tensor type"), "{err}");
}

#[test]
fn missing_and_misshapen_tensors_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    tiny_gguf(&path);
    let mut w = Weights::open_gguf(&path).unwrap();
    assert!(matches!(
        w.linear("nope", None, (4, 32)),
        Err(NnError::MissingTensor { .. })
    ));
    assert!(matches!(
        w.linear("w", None, (32, 4)),
        Err(NnError::TensorShape { .. })
    ));
    let t = w.tensor("w", &[4, 32]).unwrap();
    assert_eq!(t.dtype(), DType::F32);
}
