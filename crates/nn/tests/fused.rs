//! kiln's fused CPU kernels (`kiln_nn::fused`) against the naive compositions of candle
//! primitives, which candle differentiates itself: forward outputs and every gradient, on random
//! inputs of awkward sizes (sequence lengths around the 64-key block, head dims that are not a
//! multiple of the 16-float lanes, grouped-query heads, ignored targets, non-contiguous inputs).
//!
//! Gradients come from candle's autodiff on both sides: `loss = (out * r).sum_all()` for a random
//! `r`, `loss.backward()`.
//!
//! Tolerance (f32), elementwise: `|fused - naive| <= TOL * (|naive| + max |naive|)` with
//! `TOL = 1e-5`, i.e. 1e-5 relative, with an absolute floor of 1e-5 of the tensor's largest
//! magnitude for elements near zero (gradients that are sums of terms cancelling each other).
//! The two sides sum in different orders and the fused kernels use FMA and their own `exp`, so
//! bit equality is not expected; the worst observed ratio is printed per case.

use kiln_nn::candle_core::{DType, Device, IndexOp, Tensor, Var, D};
use kiln_nn::{fused, NnError};

const TOL: f32 = 1e-5;

/// splitmix64: a tiny deterministic generator, so the tests need no dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }

    fn tensor(&mut self, shape: &[usize], scale: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(self.vec(n, scale), shape, &Device::Cpu).unwrap()
    }

    fn below(&mut self, n: usize) -> u32 {
        (self.next_u64() % n as u64) as u32
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Asserts the tolerance of the module header; returns the worst `|err| / allowed`.
fn assert_close(what: &str, got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    let (g, w) = (values(got), values(want));
    let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
    let mut worst = 0f32;
    for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
        let allowed = TOL * (b.abs() + scale);
        let err = (a - b).abs();
        assert!(
            err <= allowed,
            "{what}: element {i}: fused {a}, naive {b}, |err| {err:e} > {allowed:e}"
        );
        if allowed > 0.0 {
            worst = worst.max(err / allowed);
        }
    }
    worst
}

/// Runs `f` on fresh `Var`s holding `inputs`, then `loss = (out * r).sum_all()` backward.
/// Returns the output and the gradient of each input (zeros where it got none).
fn run(inputs: &[Tensor], r: &Tensor, f: impl Fn(&[Tensor]) -> Tensor) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts);
    let loss = out.broadcast_mul(r).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = ts
        .iter()
        .map(|t| {
            grads
                .get(t)
                .cloned()
                .unwrap_or_else(|| t.zeros_like().unwrap())
        })
        .collect();
    (out, g)
}

/// Compares output and gradients of the fused and naive versions of one op.
fn check(
    case: &str,
    names: &[&str],
    inputs: &[Tensor],
    r: &Tensor,
    fused_fn: impl Fn(&[Tensor]) -> Tensor,
    naive_fn: impl Fn(&[Tensor]) -> Tensor,
) {
    let (out_f, grads_f) = run(inputs, r, fused_fn);
    let (out_n, grads_n) = run(inputs, r, naive_fn);
    let mut worst = assert_close(&format!("{case} out"), &out_f, &out_n);
    for ((name, gf), gn) in names.iter().zip(&grads_f).zip(&grads_n) {
        worst = worst.max(assert_close(&format!("{case} d{name}"), gf, gn));
    }
    eprintln!("{case}: worst err / allowed = {worst:.3}");
}

// ---------------------------------------------------------------------------------------------
// The naive compositions (oracles).

fn naive_rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Tensor {
    let r = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps as f64)
        .unwrap()
        .sqrt()
        .unwrap()
        .recip()
        .unwrap();
    x.broadcast_mul(&r).unwrap().broadcast_mul(w).unwrap()
}

fn naive_layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Tensor {
    let mu = x.mean_keepdim(D::Minus1).unwrap();
    let xc = x.broadcast_sub(&mu).unwrap();
    let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let r = (var + eps as f64).unwrap().sqrt().unwrap().recip().unwrap();
    xc.broadcast_mul(&r)
        .unwrap()
        .broadcast_mul(w)
        .unwrap()
        .broadcast_add(b)
        .unwrap()
}

fn naive_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let (_, _, t, d) = x.dims4().unwrap();
    // (1, 1, T, D) or (B, 1, T, D) tables: the first T rows, each half repeated.
    let table = |c: &Tensor| {
        let c = if c.rank() == 2 {
            c.narrow(0, 0, t).unwrap().unsqueeze(0).unwrap()
        } else {
            c.narrow(1, 0, t).unwrap()
        };
        Tensor::cat(&[&c, &c], D::Minus1)
            .unwrap()
            .unsqueeze(1)
            .unwrap()
    };
    let x1 = x.narrow(D::Minus1, 0, d / 2).unwrap();
    let x2 = x.narrow(D::Minus1, d / 2, d / 2).unwrap();
    let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
    let a = x.broadcast_mul(&table(cos)).unwrap();
    let b = rotated.broadcast_mul(&table(sin)).unwrap();
    (a + b).unwrap()
}

fn causal_mask(t: usize) -> Tensor {
    let m: Vec<f32> = (0..t * t)
        .map(|ij| {
            if ij % t > ij / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(m, (t, t), &Device::Cpu).unwrap()
}

fn naive_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Tensor {
    let (_, hq, t, _) = q.dims4().unwrap();
    let n_rep = hq / k.dim(1).unwrap();
    let k = kiln_nn::repeat_kv(&k.contiguous().unwrap(), n_rep).unwrap();
    let v = kiln_nn::repeat_kv(&v.contiguous().unwrap(), n_rep).unwrap();
    let scores = (q.contiguous().unwrap().matmul(&k.t().unwrap()).unwrap() * scale as f64)
        .unwrap()
        .broadcast_add(&causal_mask(t))
        .unwrap();
    // candle_nn::ops::softmax is composed of primitives (max, exp, sum, div), so it has a
    // backward pass; softmax_last_dim has none.
    let p = kiln_nn::candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
    p.matmul(&v).unwrap()
}

fn naive_cross_entropy(logits: &Tensor, targets: &[u32], ignore: u32) -> Tensor {
    let n = targets.len();
    let keep: Vec<f32> = targets
        .iter()
        .map(|&t| if t == ignore { 0.0 } else { 1.0 })
        .collect();
    let count: f32 = keep.iter().sum();
    let safe: Vec<u32> = targets
        .iter()
        .map(|&t| if t == ignore { 0 } else { t })
        .collect();
    let safe = Tensor::from_vec(safe, (n, 1), &Device::Cpu).unwrap();
    let keep = Tensor::from_vec(keep, n, &Device::Cpu).unwrap();
    let logp = kiln_nn::candle_nn::ops::log_softmax(logits, D::Minus1).unwrap();
    let picked = logp.gather(&safe, 1).unwrap().squeeze(1).unwrap();
    (picked.mul(&keep).unwrap().sum_all().unwrap() * (-1.0 / count as f64)).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Fused against naive.

#[test]
fn rms_norm_matches_naive() {
    let mut rng = Rng(1);
    // The last two have many row chunks (partial weight gradients) and D not a multiple of 16.
    for shape in [
        &[1usize, 16][..],
        &[3, 5, 24],
        &[7, 64],
        &[1000, 24],
        &[2, 3, 1000],
    ] {
        let d = *shape.last().unwrap();
        let x = rng.tensor(shape, 2.0);
        let w = (rng.tensor(&[d], 0.5) + 1.0).unwrap();
        let r = rng.tensor(shape, 1.0);
        let eps = 1e-5;
        check(
            &format!("rms_norm {shape:?}"),
            &["x", "w"],
            &[x, w],
            &r,
            |t| fused::rms_norm(&t[0], &t[1], eps).unwrap(),
            |t| naive_rms_norm(&t[0], &t[1], eps),
        );
    }
    // A non-contiguous input: x is the transpose of a (D, N) tensor.
    let x = rng.tensor(&[24, 37], 2.0);
    let w = rng.tensor(&[24], 1.0);
    let r = rng.tensor(&[37, 24], 1.0);
    check(
        "rms_norm transposed",
        &["x", "w"],
        &[x, w],
        &r,
        |t| fused::rms_norm(&t[0].t().unwrap(), &t[1], 1e-6).unwrap(),
        |t| naive_rms_norm(&t[0].t().unwrap(), &t[1], 1e-6),
    );
}

#[test]
fn layer_norm_matches_naive() {
    let mut rng = Rng(2);
    for (shape, offset) in [
        (&[1usize, 16][..], 0.0),
        (&[3, 5, 24], 3.0),
        (&[7, 64], -1.0),
        (&[1000, 24], 0.5),
        (&[2, 3, 1000], 10.0),
    ] {
        let d = *shape.last().unwrap();
        let x = (rng.tensor(shape, 2.0) + offset).unwrap();
        let w = (rng.tensor(&[d], 0.5) + 1.0).unwrap();
        let b = rng.tensor(&[d], 0.5);
        let r = rng.tensor(shape, 1.0);
        let eps = 1e-5;
        check(
            &format!("layer_norm {shape:?} offset {offset}"),
            &["x", "w", "b"],
            &[x, w, b],
            &r,
            |t| fused::layer_norm(&t[0], &t[1], &t[2], eps).unwrap(),
            |t| naive_layer_norm(&t[0], &t[1], &t[2], eps),
        );
    }
    let x = rng.tensor(&[24, 37], 2.0);
    let w = rng.tensor(&[24], 1.0);
    let b = rng.tensor(&[24], 1.0);
    let r = rng.tensor(&[37, 24], 1.0);
    check(
        "layer_norm transposed",
        &["x", "w", "b"],
        &[x, w, b],
        &r,
        |t| fused::layer_norm(&t[0].t().unwrap(), &t[1], &t[2], 1e-5).unwrap(),
        |t| naive_layer_norm(&t[0].t().unwrap(), &t[1], &t[2], 1e-5),
    );
}

/// cos/sin tables of positions `0..rows` for head dim `d`, with random frequencies.
fn tables(rng: &mut Rng, lead: &[usize], rows: usize, d: usize) -> (Tensor, Tensor) {
    let half = d / 2;
    let batches: usize = lead.iter().product();
    let freqs: Vec<f32> = (0..half).map(|_| rng.uniform().abs() + 0.01).collect();
    let mut cos = Vec::new();
    let mut sin = Vec::new();
    for b in 0..batches {
        for p in 0..rows {
            for &f in &freqs {
                let a = (p + 3 * b) as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    let mut shape = lead.to_vec();
    shape.extend([rows, half]);
    let cos = Tensor::from_vec(cos, &shape[..], &Device::Cpu).unwrap();
    let sin = Tensor::from_vec(sin, &shape[..], &Device::Cpu).unwrap();
    (cos, sin)
}

#[test]
fn rope_matches_naive() {
    let mut rng = Rng(3);
    let (b, h) = (2, 3);
    for t in [1usize, 7, 67] {
        for d in [16usize, 24, 64] {
            // Exactly T rows, more rows than T, and one table per batch row.
            for (lead, extra) in [
                (&[][..], 0usize),
                (&[][..], 5),
                (&[b][..], 0),
                (&[b][..], 2),
            ] {
                let (cos, sin) = tables(&mut rng, lead, t + extra, d);
                let x = rng.tensor(&[b, h, t, d], 1.0);
                let r = rng.tensor(&[b, h, t, d], 1.0);
                let case = format!("rope T={t} D={d} table {:?}", cos.dims());
                let (c, s) = (&cos, &sin);
                check(
                    &case,
                    &["x"],
                    std::slice::from_ref(&x),
                    &r,
                    |v| fused::rope(&v[0], c, s).unwrap(),
                    |v| naive_rope(&v[0], c, s),
                );
                // candle's own fused rope (no backward): same forward. (Its per-batch tables
                // must have exactly T rows: it strides them by T.)
                if lead.is_empty() || extra == 0 {
                    let candle = kiln_nn::candle_nn::rotary_emb::rope(&x, &cos, &sin).unwrap();
                    let ours = fused::rope(&x, &cos, &sin).unwrap();
                    assert_close(&format!("{case} vs candle"), &ours, &candle);
                }
            }
        }
    }
    // A non-contiguous input: x is stored (B, T, H, D).
    let (cos, sin) = tables(&mut rng, &[], 7, 24);
    let x = rng.tensor(&[b, 7, h, 24], 1.0);
    let r = rng.tensor(&[b, h, 7, 24], 1.0);
    check(
        "rope transposed",
        &["x"],
        &[x],
        &r,
        |v| fused::rope(&v[0].transpose(1, 2).unwrap(), &cos, &sin).unwrap(),
        |v| naive_rope(&v[0].transpose(1, 2).unwrap(), &cos, &sin),
    );
}

#[test]
fn causal_attention_matches_naive() {
    // One thread: backward runs one task per (batch, kv head). Eight threads and B * H_kv <= 8:
    // backward splits dK/dV per key block and dQ per query block.
    for threads in [1, 8] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(attention_cases);
    }
}

fn attention_cases() {
    let mut rng = Rng(4);
    let (b, hq) = (2, 4);
    for hkv in [1usize, 2, 4] {
        for t in [1usize, 7, 67, 130] {
            for d in [16usize, 24, 64] {
                let q = rng.tensor(&[b, hq, t, d], 2.0);
                let k = rng.tensor(&[b, hkv, t, d], 2.0);
                let v = rng.tensor(&[b, hkv, t, d], 1.0);
                let r = rng.tensor(&[b, hq, t, d], 1.0);
                let scale = 1.0 / (d as f32).sqrt();
                check(
                    &format!("attention Hkv={hkv} T={t} D={d}"),
                    &["q", "k", "v"],
                    &[q, k, v],
                    &r,
                    |x| fused::causal_attention(&x[0], &x[1], &x[2], scale).unwrap(),
                    |x| naive_attention(&x[0], &x[1], &x[2], scale),
                );
            }
        }
    }
    // Non-contiguous inputs: q, k, v stored (B, T, H, D), as a projection produces them.
    let (t, d, hkv) = (67, 24, 2);
    let q = rng.tensor(&[b, t, hq, d], 2.0);
    let k = rng.tensor(&[b, t, hkv, d], 2.0);
    let v = rng.tensor(&[b, t, hkv, d], 1.0);
    let r = rng.tensor(&[b, hq, t, d], 1.0);
    let tr = |x: &Tensor| x.transpose(1, 2).unwrap();
    check(
        "attention transposed",
        &["q", "k", "v"],
        &[q, k, v],
        &r,
        |x| fused::causal_attention(&tr(&x[0]), &tr(&x[1]), &tr(&x[2]), 0.2).unwrap(),
        |x| naive_attention(&tr(&x[0]), &tr(&x[1]), &tr(&x[2]), 0.2),
    );
}

#[test]
fn cross_entropy_matches_naive() {
    let mut rng = Rng(5);
    for n in [1usize, 13, 67] {
        for v in [37usize, 1000] {
            // No ignore index; ignore a real class (3); u32::MAX targets with u32::MAX ignored.
            for ignore in [None, Some(3u32), Some(u32::MAX)] {
                let mut targets: Vec<u32> = (0..n).map(|_| rng.below(v)).collect();
                if let Some(ig) = ignore {
                    for t in targets.iter_mut().skip(1).step_by(4) {
                        *t = ig;
                    }
                }
                let ignore = ignore.unwrap_or(u32::MAX);
                let tt = Tensor::from_vec(targets.clone(), n, &Device::Cpu).unwrap();
                let logits = rng.tensor(&[n, v], 4.0);
                let r = Tensor::new(0.7f32, &Device::Cpu).unwrap();
                let ts = &targets;
                check(
                    &format!("cross_entropy N={n} V={v} ignore {ignore}"),
                    &["logits"],
                    &[logits],
                    &r,
                    |x| fused::cross_entropy(&x[0], &tt, ignore).unwrap(),
                    |x| naive_cross_entropy(&x[0], ts, ignore),
                );
            }
        }
    }
}

#[test]
fn cross_entropy_of_only_ignored_rows_is_nan_with_zero_grad() {
    let mut rng = Rng(6);
    let logits = Var::from_tensor(&rng.tensor(&[5, 37], 1.0)).unwrap();
    let targets = Tensor::from_vec(vec![7u32; 5], 5, &Device::Cpu).unwrap();
    let loss = fused::cross_entropy(logits.as_tensor(), &targets, 7).unwrap();
    assert_eq!(loss.dims(), &[] as &[usize]);
    assert!(loss.to_scalar::<f32>().unwrap().is_nan());
    let grads = loss.backward().unwrap();
    let g = values(grads.get(logits.as_tensor()).unwrap());
    assert!(g.iter().all(|&x| x == 0.0));
}

#[test]
fn linear_cross_entropy_matches_naive() {
    let mut rng = Rng(31);
    for (n, k, v) in [(1usize, 5usize, 37usize), (13, 24, 1000), (67, 64, 300)] {
        for ignore in [None, Some(3u32)] {
            let mut targets: Vec<u32> = (0..n).map(|_| rng.below(v)).collect();
            if let Some(ig) = ignore {
                for (i, t) in targets.iter_mut().enumerate() {
                    if i % 3 == 1 {
                        *t = ig;
                    } else if *t == ig {
                        *t = ig + 1; // row 0 always counts: never a NaN mean
                    }
                }
            }
            let ignore = ignore.unwrap_or(u32::MAX);
            let tt = Tensor::from_vec(targets.clone(), n, &Device::Cpu).unwrap();
            let x = rng.tensor(&[n, k], 1.0);
            let w = rng.tensor(&[v, k], 0.5);
            // An upstream gradient other than 1 (gradient accumulation scales the loss).
            let r = Tensor::new(0.7f32, &Device::Cpu).unwrap();
            let ts = &targets;
            check(
                &format!("linear_cross_entropy N={n} K={k} V={v} ignore {ignore}"),
                &["x", "w"],
                &[x, w],
                &r,
                |t| fused::linear_cross_entropy(&t[0], &t[1], &tt, ignore).unwrap(),
                |t| naive_cross_entropy(&t[0].matmul(&t[1].t().unwrap()).unwrap(), ts, ignore),
            );
        }
    }
}

/// With an upstream gradient of 1 (a training step's loss), the one-node head + loss gives the
/// bits of `cross_entropy(linear(x, w))`: loss and both gradients, in each precision.
#[test]
fn linear_cross_entropy_is_bit_identical_to_two_nodes() {
    use fused::MatmulPrecision;
    let mut rng = Rng(37);
    let (n, k, v) = (130usize, 96usize, 517usize);
    let mut targets: Vec<u32> = (0..n).map(|_| rng.below(v)).collect();
    targets[5] = u32::MAX;
    let tt = Tensor::from_vec(targets, n, &Device::Cpu).unwrap();
    let (x, w) = (rng.tensor(&[n, k], 1.0), rng.tensor(&[v, k], 0.5));
    let mut precisions = vec![MatmulPrecision::F32];
    if fused::bf16_available() {
        precisions.push(MatmulPrecision::Bf16);
    }
    for p in precisions {
        let run = |one_node: bool| {
            let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
            let loss = fused::with_matmul_precision(p, || {
                if one_node {
                    fused::linear_cross_entropy(xv.as_tensor(), wv.as_tensor(), &tt, u32::MAX)
                } else {
                    let logits = fused::linear(xv.as_tensor(), wv.as_tensor(), None).unwrap();
                    fused::cross_entropy(&logits, &tt, u32::MAX)
                }
            })
            .unwrap()
            .unwrap();
            let grads = loss.backward().unwrap();
            let g = |v: &Var| values(grads.get(v.as_tensor()).unwrap());
            (values(&loss.reshape(1).unwrap()), g(&xv), g(&wv))
        };
        assert_eq!(run(true), run(false), "{p:?}");
    }
}

#[test]
fn linear_cross_entropy_refuses_bad_input() {
    let mut rng = Rng(41);
    let x = rng.tensor(&[4, 8], 1.0);
    let w = rng.tensor(&[10, 8], 1.0);
    let t = |v: Vec<u32>| Tensor::from_vec(v.clone(), v.len(), &Device::Cpu).unwrap();
    let err = fused::linear_cross_entropy(&x, &w, &t(vec![1, 2, 10, 3]), u32::MAX).unwrap_err();
    assert!(err.to_string().contains("target 10 of row 2"), "{err}");
    let err = fused::linear_cross_entropy(&x, &w, &t(vec![1, 2, 3]), u32::MAX).unwrap_err();
    assert!(matches!(err, NnError::Shape { .. }), "{err}");
    let w7 = rng.tensor(&[10, 7], 1.0);
    let err = fused::linear_cross_entropy(&x, &w7, &t(vec![1, 2, 3, 4]), u32::MAX).unwrap_err();
    assert!(matches!(err, NnError::Shape { .. }), "{err}");
    // Every row ignored: NaN loss and zero gradients, as cross_entropy.
    let xv = Var::from_tensor(&x).unwrap();
    let loss = fused::linear_cross_entropy(xv.as_tensor(), &w, &t(vec![4; 4]), 4).unwrap();
    assert!(loss.to_scalar::<f32>().unwrap().is_nan());
    let g = values(loss.backward().unwrap().get(xv.as_tensor()).unwrap());
    assert!(g.iter().all(|&v| v == 0.0));
}

#[test]
fn causal_attention_forward_matches_inference_reference() {
    let mut rng = Rng(7);
    for (b, hq, hkv, t, d) in [(1, 4, 4, 1, 16), (2, 4, 2, 67, 24), (1, 8, 1, 130, 64)] {
        let q = rng.tensor(&[b, hq, t, d], 2.0);
        let k = rng.tensor(&[b, hkv, t, d], 2.0);
        let v = rng.tensor(&[b, hkv, t, d], 1.0);
        let ours = fused::causal_attention(&q, &k, &v, 1.0 / (d as f32).sqrt()).unwrap();
        let reference = kiln_nn::causal_attention_reference(&q, &k, &v, None).unwrap();
        assert_close(
            &format!("attention vs inference reference {:?}", q.dims()),
            &ours,
            &reference,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Determinism and errors.

/// Output and input gradients of every op on fixed inputs, as bits.
fn all_ops_bits() -> Vec<Vec<u32>> {
    let mut rng = Rng(8);
    let bits = |t: &Tensor| values(t).iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    let mut out = Vec::new();
    let mut record = |inputs: &[Tensor], r: &Tensor, f: &dyn Fn(&[Tensor]) -> Tensor| {
        let (o, grads) = run(inputs, r, f);
        out.push(bits(&o));
        out.extend(grads.iter().map(bits));
    };
    let (x, w, b) = (
        rng.tensor(&[1000, 24], 2.0),
        rng.tensor(&[24], 1.0),
        rng.tensor(&[24], 1.0),
    );
    let r = rng.tensor(&[1000, 24], 1.0);
    record(&[x.clone(), w.clone()], &r, &|t| {
        fused::rms_norm(&t[0], &t[1], 1e-5).unwrap()
    });
    record(&[x, w, b], &r, &|t| {
        fused::layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap()
    });
    let (cos, sin) = tables(&mut rng, &[], 67, 24);
    let x = rng.tensor(&[2, 3, 67, 24], 1.0);
    let r = rng.tensor(&[2, 3, 67, 24], 1.0);
    record(&[x], &r, &|t| fused::rope(&t[0], &cos, &sin).unwrap());
    let q = rng.tensor(&[2, 4, 130, 24], 2.0);
    let k = rng.tensor(&[2, 2, 130, 24], 2.0);
    let v = rng.tensor(&[2, 2, 130, 24], 1.0);
    let r = rng.tensor(&[2, 4, 130, 24], 1.0);
    record(&[q, k, v], &r, &|t| {
        fused::causal_attention(&t[0], &t[1], &t[2], 0.2).unwrap()
    });
    let targets: Vec<u32> = (0..67)
        .map(|i| if i % 5 == 0 { 9 } else { i * 13 })
        .collect();
    let targets = Tensor::from_vec(targets, 67, &Device::Cpu).unwrap();
    let logits = rng.tensor(&[67, 1000], 4.0);
    let r = Tensor::new(1.3f32, &Device::Cpu).unwrap();
    record(&[logits], &r, &|t| {
        fused::cross_entropy(&t[0], &targets, 9).unwrap()
    });
    // Large enough that the GEMM splits its output between threads.
    let x = rng.tensor(&[3, 67, 96], 1.0);
    let w = rng.tensor(&[200, 96], 0.3);
    let b = rng.tensor(&[200], 0.5);
    let r = rng.tensor(&[3, 67, 200], 1.0);
    record(&[x, w, b], &r, &|t| {
        fused::linear(&t[0], &t[1], Some(&t[2])).unwrap()
    });
    let g = rng.tensor(&[5, 7000], 3.0);
    let u = rng.tensor(&[5, 7000], 1.0);
    let r = rng.tensor(&[5, 7000], 1.0);
    record(&[g.clone(), u], &r, &|t| {
        fused::swiglu(&t[0], &t[1]).unwrap()
    });
    record(std::slice::from_ref(&g), &r, &|t| {
        fused::gelu_tanh(&t[0]).unwrap()
    });
    record(&[g], &r, &|t| fused::gelu_erf(&t[0]).unwrap());
    out
}

#[test]
fn linear_matches_naive() {
    let mut rng = Rng(21);
    for (lead, k, n, bias) in [
        (&[1usize][..], 13usize, 1usize, true),
        (&[3, 5][..], 24, 7, true),
        (&[67][..], 64, 256, false),
        (&[2, 130][..], 96, 1000, true),
    ] {
        let mut xs = lead.to_vec();
        xs.push(k);
        let mut ys = lead.to_vec();
        ys.push(n);
        let x = rng.tensor(&xs, 1.0);
        let w = rng.tensor(&[n, k], 0.5);
        let b = rng.tensor(&[n], 0.5);
        let r = rng.tensor(&ys, 1.0);
        let case = format!("linear x {xs:?} w [{n}, {k}] bias {bias}");
        let naive = |t: &[Tensor]| {
            let y = t[0].broadcast_matmul(&t[1].t().unwrap()).unwrap();
            if bias {
                y.broadcast_add(&t[2]).unwrap()
            } else {
                y
            }
        };
        check(
            &case,
            &["x", "w", "b"],
            &[x, w, b],
            &r,
            |t| fused::linear(&t[0], &t[1], bias.then_some(&t[2])).unwrap(),
            naive,
        );
    }
    // A transposed (non-contiguous) input.
    let x = rng.tensor(&[24, 9], 1.0).t().unwrap();
    let w = rng.tensor(&[5, 24], 1.0);
    let y = fused::linear(&x, &w, None).unwrap();
    let want = x.matmul(&w.t().unwrap()).unwrap();
    assert_close("linear transposed x", &y, &want);
}

/// Bf16 matmul precision: the output and the gradients of x and W are the f32 products of the
/// bf16-rounded operands (the upstream gradient rounded too), the bias gradient stays f32; the
/// backward keeps the precision its op was built with even when run outside the scope.
#[test]
fn linear_bf16_equals_f32_products_of_rounded_operands() {
    use fused::MatmulPrecision;
    if !fused::bf16_available() {
        eprintln!("skipped: this CPU has no AVX-512 BF16");
        return;
    }
    // candle's f32 -> bf16 is round to nearest even, like the kernel (no denormals here).
    let bf = |t: &Tensor| {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let mut rng = Rng(29);
    for (m, k, n) in [
        (1usize, 13usize, 1usize),
        (15, 24, 7),
        (67, 64, 256),
        (260, 97, 1000),
    ] {
        let case = format!("bf16 linear m{m} k{k} n{n}");
        let (x, w, b, r) = (
            rng.tensor(&[m, k], 1.0),
            rng.tensor(&[n, k], 0.5),
            rng.tensor(&[n], 0.5),
            rng.tensor(&[m, n], 1.0),
        );
        let vars: Vec<Var> = [&x, &w, &b]
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let y = fused::with_matmul_precision(MatmulPrecision::Bf16, || {
            fused::linear(
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                Some(vars[2].as_tensor()),
            )
        })
        .unwrap()
        .unwrap();
        assert_eq!(
            fused::matmul_precision(),
            MatmulPrecision::F32,
            "scope restored"
        );
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = |i: usize| grads.get(vars[i].as_tensor()).unwrap().clone();
        let y_ref = bf(&x)
            .matmul(&bf(&w).t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert_close(&format!("{case} y"), &y, &y_ref);
        assert_close(
            &format!("{case} dx"),
            &grad(0),
            &bf(&r).matmul(&bf(&w)).unwrap(),
        );
        let dw_ref = bf(&r).t().unwrap().matmul(&bf(&x)).unwrap();
        assert_close(&format!("{case} dw"), &grad(1), &dw_ref);
        assert_close(&format!("{case} db"), &grad(2), &r.sum(0).unwrap());
        // The mode is in effect: f32 products differ from these by bf16's rounding.
        if k > 1 {
            let y32 = fused::linear(&x, &w, Some(&b)).unwrap();
            let diff = (&y32 - &y).unwrap().abs().unwrap().max_all().unwrap();
            assert!(
                diff.to_scalar::<f32>().unwrap() > 1e-4,
                "{case}: bf16 equals f32"
            );
        }
    }
}

/// The (B, T, H, D) entry points equal the (B, H, T, D) ones on transposed inputs, gradients
/// included.
#[test]
fn bthd_layouts_match_bhtd() {
    let mut rng = Rng(23);
    for (b, hq, hkv, t, d) in [
        (2usize, 4usize, 2usize, 67usize, 24usize),
        (1, 3, 3, 130, 16),
        (3, 2, 1, 5, 64),
    ] {
        let q = rng.tensor(&[b, t, hq, d], 2.0);
        let k = rng.tensor(&[b, t, hkv, d], 2.0);
        let v = rng.tensor(&[b, t, hkv, d], 1.0);
        let r = rng.tensor(&[b, t, hq, d], 1.0);
        let (cos, sin) = tables(&mut rng, &[], t + 3, d);
        let front = |x: &Tensor| x.transpose(1, 2).unwrap().contiguous().unwrap();
        check(
            &format!("attention_bthd b{b} hq{hq} hkv{hkv} t{t} d{d}"),
            &["q", "k", "v"],
            &[q, k, v],
            &r,
            |x| {
                let q = fused::rope_bthd(&x[0], &cos, &sin).unwrap();
                let k = fused::rope_bthd(&x[1], &cos, &sin).unwrap();
                fused::causal_attention_bthd(&q, &k, &x[2], 0.3).unwrap()
            },
            |x| {
                let q = fused::rope(&front(&x[0]), &cos, &sin).unwrap();
                let k = fused::rope(&front(&x[1]), &cos, &sin).unwrap();
                fused::causal_attention(&q, &k, &front(&x[2]), 0.3)
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
            },
        );
    }
}

#[test]
fn gelu_and_swiglu_match_candle() {
    let mut rng = Rng(22);
    for shape in [&[1usize][..], &[1000][..], &[3, 7, 130][..]] {
        // Scale 6 reaches the saturated tails of tanh and the sigmoid.
        let x = rng.tensor(shape, 6.0);
        let r = rng.tensor(shape, 1.0);
        check(
            &format!("gelu_tanh {shape:?}"),
            &["x"],
            std::slice::from_ref(&x),
            &r,
            |t| fused::gelu_tanh(&t[0]).unwrap(),
            |t| t[0].gelu().unwrap(),
        );
        check(
            &format!("gelu_erf {shape:?}"),
            &["x"],
            std::slice::from_ref(&x),
            &r,
            |t| fused::gelu_erf(&t[0]).unwrap(),
            |t| t[0].gelu_erf().unwrap(),
        );
        let u = rng.tensor(shape, 2.0);
        check(
            &format!("swiglu {shape:?}"),
            &["gate", "up"],
            &[x, u],
            &r,
            |t| fused::swiglu(&t[0], &t[1]).unwrap(),
            |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
        );
    }
    let a = rng.tensor(&[4, 5], 1.0);
    let b = rng.tensor(&[5, 4], 1.0);
    assert!(matches!(fused::swiglu(&a, &b), Err(NnError::Shape { .. })));
    let w = rng.tensor(&[3, 6], 1.0);
    assert!(matches!(
        fused::linear(&a, &w, None),
        Err(NnError::Shape { .. })
    ));
    let bias = rng.tensor(&[4], 1.0);
    let w = rng.tensor(&[3, 5], 1.0);
    assert!(fused::linear(&a, &w, Some(&bias)).is_err());
    let ints = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
    assert!(fused::gelu_tanh(&ints).is_err());
    assert!(fused::gelu_erf(&ints).is_err());
}

#[test]
fn outputs_and_grads_are_bit_identical_across_runs_and_thread_counts() {
    let first = all_ops_bits();
    assert_eq!(first, all_ops_bits(), "two runs differ");
    // The attention case has B * H_kv = 4 groups: with 3 or 8 threads its backward takes the
    // split path (dK/dV per key block, dQ per query block), with 1, 2 or 5 one task per group.
    for threads in [1, 2, 3, 5, 8] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let again = pool.install(all_ops_bits);
        assert_eq!(
            first, again,
            "{threads} threads differ from the default pool"
        );
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let mut rng = Rng(9);
    let cpu = &Device::Cpu;
    let x = rng.tensor(&[3, 8], 1.0);
    let w = rng.tensor(&[8], 1.0);
    let is_shape = |r: kiln_nn::Result<Tensor>| matches!(r, Err(NnError::Shape { .. }));
    let is_config = |r: kiln_nn::Result<Tensor>| matches!(r, Err(NnError::Config { .. }));

    // Norms: dtype, weight length, rank 0, eps, empty.
    let x64 = x.to_dtype(DType::F64).unwrap();
    assert!(is_config(fused::rms_norm(&x64, &w, 1e-5)));
    let xbf = x.to_dtype(DType::BF16).unwrap();
    assert!(is_config(fused::layer_norm(&xbf, &w, &w, 1e-5)));
    assert!(is_shape(fused::rms_norm(&x, &w.i(..7).unwrap(), 1e-5)));
    assert!(is_shape(fused::layer_norm(&x, &w, &x, 1e-5)));
    let scalar = Tensor::new(1f32, cpu).unwrap();
    assert!(is_shape(fused::rms_norm(&scalar, &w, 1e-5)));
    assert!(is_config(fused::rms_norm(&x, &w, -1.0)));
    assert!(is_config(fused::rms_norm(&x, &w, f32::NAN)));
    let empty = Tensor::zeros((0, 8), DType::F32, cpu).unwrap();
    assert!(is_config(fused::rms_norm(&empty, &w, 1e-5)));

    // Rope: rank, odd head dim, short or mismatched tables, dtype.
    let (cos, sin) = tables(&mut rng, &[], 5, 8);
    let xr = rng.tensor(&[1, 2, 5, 8], 1.0);
    assert!(fused::rope(&xr, &cos, &sin).is_ok());
    assert!(is_shape(fused::rope(&x, &cos, &sin)));
    let odd = rng.tensor(&[1, 2, 5, 7], 1.0);
    assert!(is_shape(fused::rope(&odd, &cos, &sin)));
    let long = rng.tensor(&[1, 2, 6, 8], 1.0);
    assert!(is_shape(fused::rope(&long, &cos, &sin)));
    assert!(is_shape(fused::rope(&xr, &cos, &sin.i(..4).unwrap())));
    let cos64 = cos.to_dtype(DType::F64).unwrap();
    assert!(is_config(fused::rope(&xr, &cos64, &sin)));

    // Attention: rank, head counts, mismatched k/v, dtype, scale.
    let q = rng.tensor(&[1, 4, 5, 8], 1.0);
    let k = rng.tensor(&[1, 2, 5, 8], 1.0);
    assert!(fused::causal_attention(&q, &k, &k, 0.3).is_ok());
    let q3 = rng.tensor(&[4, 5, 8], 1.0);
    assert!(is_shape(fused::causal_attention(&q3, &k, &k, 0.3)));
    let k3 = rng.tensor(&[1, 3, 5, 8], 1.0);
    assert!(is_shape(fused::causal_attention(&q, &k3, &k3, 0.3)));
    let k_short = rng.tensor(&[1, 2, 4, 8], 1.0);
    assert!(is_shape(fused::causal_attention(
        &q, &k_short, &k_short, 0.3
    )));
    assert!(is_shape(fused::causal_attention(&q, &k, &k3, 0.3)));
    let q64 = q.to_dtype(DType::F64).unwrap();
    assert!(is_config(fused::causal_attention(&q64, &k, &k, 0.3)));
    assert!(is_config(fused::causal_attention(
        &q,
        &k,
        &k,
        f32::INFINITY
    )));

    // Cross-entropy: target dtype, length, range, logits rank.
    let logits = rng.tensor(&[3, 8], 1.0);
    let targets = Tensor::from_vec(vec![1u32, 7, 0], 3, cpu).unwrap();
    assert!(fused::cross_entropy(&logits, &targets, u32::MAX).is_ok());
    let tf = targets.to_dtype(DType::F32).unwrap();
    assert!(is_config(fused::cross_entropy(&logits, &tf, u32::MAX)));
    let t2 = Tensor::from_vec(vec![1u32, 7], 2, cpu).unwrap();
    assert!(is_shape(fused::cross_entropy(&logits, &t2, u32::MAX)));
    let t_oob = Tensor::from_vec(vec![1u32, 8, 0], 3, cpu).unwrap();
    assert!(is_config(fused::cross_entropy(&logits, &t_oob, u32::MAX)));
    assert!(fused::cross_entropy(&logits, &t_oob, 8).is_ok());
    let l3 = rng.tensor(&[1, 3, 8], 1.0);
    assert!(is_shape(fused::cross_entropy(&l3, &targets, u32::MAX)));
}

/// The textbook composition for one sequence of [`fused::encoder_attention`]: `x` is its
/// (len, 3 * h * d) slice of the packed QKV.
fn naive_encoder_sequence(x: &Tensor, h: usize, d: usize, scale: f32) -> Tensor {
    let (len, _) = x.dims2().unwrap();
    let x = x.reshape((len, 3, h, d)).unwrap();
    let part = |i: usize| {
        x.i((.., i))
            .unwrap()
            .transpose(0, 1)
            .unwrap()
            .contiguous()
            .unwrap()
    }; // (h, len, d)
    let (q, k, v) = (part(0), part(1), part(2));
    let s = (q.matmul(&k.t().unwrap()).unwrap() * scale as f64).unwrap();
    let p = kiln_nn::candle_nn::ops::softmax_last_dim(&s).unwrap();
    p.matmul(&v)
        .unwrap()
        .transpose(0, 1)
        .unwrap()
        .reshape((len, h * d))
        .unwrap()
}

#[test]
fn encoder_attention_matches_naive() {
    let mut rng = Rng(31);
    for (h, d, lengths) in [
        (1usize, 1usize, vec![1usize]),
        (3, 5, vec![7, 1, 4]),
        (2, 33, vec![70, 66]),
        (12, 32, vec![3, 19, 19, 18]),
    ] {
        let n: usize = lengths.iter().sum();
        let qkv = rng.tensor(&[n, 3 * h * d], 2.0);
        let scale = 1.0 / (d as f32).sqrt();
        let got = fused::encoder_attention(&qkv, h, &lengths, scale).unwrap();
        assert_eq!(got.dims(), &[n, h * d]);
        let mut start = 0;
        for &len in &lengths {
            let case = format!("encoder_attention h{h} d{d} lengths {lengths:?} at {start}");
            assert_close(
                &case,
                &got.narrow(0, start, len).unwrap(),
                &naive_encoder_sequence(&qkv.narrow(0, start, len).unwrap(), h, d, scale),
            );
            start += len;
        }
        // Bit-identical across thread counts (one task per sequence).
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let single = one.install(|| fused::encoder_attention(&qkv, h, &lengths, scale).unwrap());
        assert_eq!(values(&single), values(&got));
    }
    let qkv = rng.tensor(&[8, 18], 1.0);
    for bad in [&[4usize][..], &[0, 8], &[5, 4]] {
        assert!(matches!(
            fused::encoder_attention(&qkv, 2, bad, 0.5),
            Err(NnError::Shape { .. })
        ));
    }
    assert!(fused::encoder_attention(&qkv, 4, &[4, 4], 0.5).is_err());
    assert!(fused::encoder_attention(&qkv, 2, &[4, 4], f32::NAN).is_err());
    let three = rng.tensor(&[2, 4, 18], 1.0);
    assert!(fused::encoder_attention(&three, 2, &[4, 4], 0.5).is_err());
}
