//! kiln's quantized kernels against their oracles on random data of awkward sizes.
//!
//! Two comparisons, for every kernel this CPU can run (the scalar one always):
//! - SIMD vs scalar: the integer block sums are exact in both, only the order of the f32 adds
//!   differs, so `|simd - scalar| <= 1e-5 * (1 + max |scalar|)` per matrix.
//! - Kernel vs `x dequantize(W)^T` in f32: the only approximation is rounding the activations to
//!   8 bits per block of 32, an error of at most `amax(block) / 254` per element, so each output
//!   must lie within `sum_i |w_i| * amax(block of i) / 254` of the f32 result (plus 1% and 1e-4
//!   of slack for f32 rounding). This bound is rigorous, unlike one relative to `max |ref|`,
//!   which random cancellation breaks for narrow outputs.

use kiln_nn::candle_core::quantized::{GgmlDType, QTensor};
use kiln_nn::candle_core::{Device, Tensor};
use kiln_nn::qkernels::{Kernel, QFormat, QWeight};
use kiln_nn::Linear;
use std::sync::Arc;

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    // A tiny LCG keeps the data reproducible without a dependency.
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Quantizes a random (n, k) matrix with candle (the GGUF encoder) and parses its bytes.
fn random_weight(format: QFormat, n: usize, k: usize, seed: u64) -> QWeight {
    let dtype = match format {
        QFormat::Q4_0 => GgmlDType::Q4_0,
        QFormat::Q4_1 => GgmlDType::Q4_1,
        QFormat::Q8_0 => GgmlDType::Q8_0,
    };
    let w = Tensor::from_vec(rand_vec(n * k, seed), (n, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, dtype).unwrap();
    QWeight::from_gguf_bytes(format, n, k, &q.data().unwrap()).unwrap()
}

/// `x dequantize(W)^T` in f32 and the per-output bound on the activation-rounding error.
fn reference(w: &QWeight, x: &[f32], m: usize) -> (Vec<f32>, Vec<f32>) {
    let (n, k) = w.dims();
    let wd = w.dequantize();
    let amax: Vec<f32> = x
        .chunks(32)
        .map(|c| c.iter().fold(0f32, |a, &v| a.max(v.abs())))
        .collect();
    let mut y = vec![0f32; m * n];
    let mut bound = vec![0f32; m * n];
    for r in 0..m {
        for j in 0..n {
            y[r * n + j] = (0..k).map(|i| x[r * k + i] * wd[j * k + i]).sum();
            let b: f32 = (0..k)
                .map(|i| wd[j * k + i].abs() * amax[(r * k + i) / 32] / 254.0)
                .sum();
            bound[r * n + j] = b * 1.01 + 1e-4;
        }
    }
    (y, bound)
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |a, &b| a.max(b.abs()))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

const FORMATS: [QFormat; 3] = [QFormat::Q4_0, QFormat::Q4_1, QFormat::Q8_0];
const MS: [usize; 5] = [1, 3, 4, 7, 33];
const KS: [usize; 4] = [32, 96, 576, 1536];
const NS: [usize; 3] = [1, 37, 577];

#[test]
fn every_available_kernel_matches_scalar_and_dequantized_matmul() {
    let kernels = Kernel::available();
    assert_eq!(kernels[0], Kernel::Scalar);
    eprintln!("kernels on this CPU: {kernels:?}");
    let mut seed = 1;
    for format in FORMATS {
        for &k in &KS {
            for &n in &NS {
                seed += 1;
                let w = random_weight(format, n, k, seed);
                for &m in &MS {
                    let x = rand_vec(m * k, seed * 7919 + m as u64);
                    let (want, bound) = reference(&w, &x, m);
                    let scalar = w.matmul_with(&x, Kernel::Scalar).unwrap();
                    assert_eq!(scalar.len(), m * n);
                    for (i, ((s, r), b)) in scalar.iter().zip(&want).zip(&bound).enumerate() {
                        assert!(
                            (s - r).abs() <= *b,
                            "{format:?} scalar vs f32 m={m} k={k} n={n} at {i}: {s} vs {r}, bound {b}"
                        );
                    }
                    for &kernel in &kernels[1..] {
                        let got = w.matmul_with(&x, kernel).unwrap();
                        let err = max_diff(&got, &scalar);
                        assert!(
                            err <= 1e-5 * (1.0 + max_abs(&scalar)),
                            "{format:?} {kernel:?} vs scalar m={m} k={k} n={n}: {err}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn kernels_agree_under_a_multi_threaded_pool() {
    // Large enough to take the parallel paths (m = 1 and 7 split W's rows, m = 33 splits the
    // activation rows); the result must not depend on the split.
    let w = random_weight(QFormat::Q4_1, 577, 1536, 99);
    for m in [1, 7, 33] {
        let x = rand_vec(m * 1536, 5);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| w.matmul_with(&x, Kernel::detect()).unwrap());
        let three = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap()
            .install(|| w.matmul_with(&x, Kernel::detect()).unwrap());
        assert_eq!(one, three, "m = {m}");
    }
}

#[test]
fn q4_0_repacks_to_the_same_values_as_candle_dequantizes() {
    for format in FORMATS {
        let dtype = match format {
            QFormat::Q4_0 => GgmlDType::Q4_0,
            QFormat::Q4_1 => GgmlDType::Q4_1,
            QFormat::Q8_0 => GgmlDType::Q8_0,
        };
        let w = Tensor::from_vec(rand_vec(37 * 96, 3), (37, 96), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let candle = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let ours = QWeight::from_gguf_bytes(format, 37, 96, &q.data().unwrap())
            .unwrap()
            .dequantize();
        assert_eq!(ours, candle, "{format:?}");
    }
}

#[test]
fn linear_routes_q4_1_through_the_block_kernel_with_the_same_shape() {
    let w = Tensor::from_vec(rand_vec(37 * 576, 11), (37, 576), &Device::Cpu).unwrap();
    let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap());
    let lin = Linear::from_qtensor(q, None).unwrap();
    assert!(lin.is_quantized());
    let x = Tensor::from_vec(rand_vec(2 * 3 * 576, 12), (2, 3, 576), &Device::Cpu).unwrap();
    let y = lin.forward(&x).unwrap();
    assert_eq!(y.dims(), &[2, 3, 37]);
    let want = x
        .reshape((6, 576))
        .unwrap()
        .matmul(&lin.dequantized_weight().unwrap().t().unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(max_diff(&got, &want) <= 1e-2 * max_abs(&want));
}

#[test]
fn bad_sizes_are_errors_not_panics() {
    assert!(QWeight::from_gguf_bytes(QFormat::Q4_1, 2, 33, &[0; 40]).is_err());
    assert!(QWeight::from_gguf_bytes(QFormat::Q4_1, 2, 32, &[0; 39]).is_err());
    let w = QWeight::from_gguf_bytes(QFormat::Q8_0, 2, 32, &[0; 68]).unwrap();
    assert!(w.matmul(&[0.0; 33]).is_err());
}

/// Batch invariance: a row's output does not depend on how many other rows share the matmul
/// (or which tile it lands in), bit for bit, for every kernel. Continuous batching relies on it:
/// a request decoded among others gets the same tokens as alone.
#[test]
fn each_row_is_the_same_whatever_shares_its_batch() {
    for format in FORMATS {
        let (n, k) = (45, 160);
        let w = random_weight(format, n, k, 77);
        let x = rand_vec(11 * k, 5);
        for kernel in Kernel::available() {
            let alone: Vec<Vec<f32>> = (0..11)
                .map(|r| w.matmul_with(&x[r * k..(r + 1) * k], kernel).unwrap())
                .collect();
            for m in 1..=11 {
                let got = w.matmul_with(&x[..m * k], kernel).unwrap();
                for r in 0..m {
                    assert_eq!(
                        &got[r * n..(r + 1) * n],
                        &alone[r][..],
                        "{format:?} {kernel:?}: row {r} of {m}"
                    );
                }
            }
        }
    }
}

/// One token against several matrices at once equals each matmul alone, bit for bit.
#[test]
fn one_row_against_many_matrices_equals_each_alone() {
    let k = 576;
    let ws = [
        random_weight(QFormat::Q4_1, 576, k, 3),
        random_weight(QFormat::Q8_0, 192, k, 4),
        random_weight(QFormat::Q4_0, 37, k, 5),
    ];
    let x = rand_vec(k, 9);
    let refs: Vec<&QWeight> = ws.iter().collect();
    let many = QWeight::matmul_row_many(&refs, &x).unwrap();
    for (w, got) in ws.iter().zip(&many) {
        assert_eq!(got, &w.matmul(&x).unwrap());
    }
    // Under a two-thread pool too (the rows are split over tasks).
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let many2 = pool.install(|| QWeight::matmul_row_many(&refs, &x).unwrap());
    assert_eq!(many, many2);
    assert!(QWeight::matmul_row_many(&refs, &x[..32]).is_none());
}

/// Any range of rows through `rows_into` (the decode step's unit of work, four weight rows per
/// kernel call where it can) equals the same rows of `matmul`, bit for bit.
#[test]
fn rows_into_any_range_equals_matmul() {
    for format in FORMATS {
        let (n, k) = (45, 160);
        let w = random_weight(format, n, k, 21);
        let x = rand_vec(k, 8);
        let want = w.matmul(&x).unwrap();
        let xq = w.quantize_input(&x).unwrap();
        for range in [0..45, 3..45, 7..8, 10..30, 41..45, 5..5] {
            let mut got = vec![f32::NAN; range.len()];
            w.rows_into(&xq, range.clone(), &mut got);
            assert_eq!(&got[..], &want[range.clone()], "{format:?} rows {range:?}");
        }
        assert!(
            w.quantize_input(&x[..128]).is_none(),
            "a row of the wrong width"
        );
    }
}
