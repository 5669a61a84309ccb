//! AdamW and Muon against PyTorch, state round trips, thread-count independence, gradient clipping
//! and input validation.
//!
//! The reference is `fixtures/optim/optim_reference.json`, written by `make_optim_fixture.py`
//! beside it (torch.optim.AdamW with `foreach=False`; Keller Jordan's Muon reimplemented in f32).
//! Tolerances, as max |kiln − reference| over every parameter after every step (parameters are
//! O(1); `--nocapture` prints the measured values):
//! - AdamW: 1e-6 absolute. kiln follows torch's order of operations; it differs only where torch's
//!   vectorised CPU `lerp` fuses a multiply-add, by an ulp or so. Measured with torch 2.15:
//!   max 6.0e-8, 67 of 1505 values not bit-equal (12 if kiln's lerp used `mul_add` too).
//! - Muon: 1e-5 absolute. The Newton–Schulz matmuls accumulate in another order than torch's CPU
//!   BLAS and the iteration amplifies that rounding; updates are O(lr) = 0.02. Measured: max
//!   1.8e-7. (The reference itself runs the iteration in bf16, with 8 mantissa bits, so this
//!   compares against its f32 twin, as kiln runs in f32.)

use kiln_nn::candle_core::backprop::GradStore;
use kiln_nn::candle_core::{DType, Device, Tensor, Var};
use kiln_nn::{
    clip_grad_norm, AdamW, AdamWConfig, Muon, MuonConfig, NnError, OptimState, ParamState,
};

// ---------------------------------------------------------------------------------------------
// A minimal JSON reader: the crate has no serde_json, and the fixture is plain numbers, arrays,
// objects, strings, booleans and nulls.

#[derive(Debug, Clone)]
enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn parse(text: &str) -> Json {
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
        };
        let v = p.value();
        p.ws();
        assert_eq!(p.i, p.s.len(), "trailing data in JSON");
        v
    }

    fn get(&self, key: &str) -> &Json {
        match self {
            Json::Obj(kv) => kv
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)
                .unwrap_or_else(|| panic!("missing key {key}")),
            _ => panic!("not an object looking up {key}"),
        }
    }

    fn arr(&self) -> &[Json] {
        match self {
            Json::Arr(a) => a,
            _ => panic!("not an array: {self:?}"),
        }
    }

    fn num(&self) -> f64 {
        match self {
            Json::Num(x) => *x,
            _ => panic!("not a number: {self:?}"),
        }
    }

    fn boolean(&self) -> bool {
        match self {
            Json::Bool(b) => *b,
            _ => panic!("not a bool: {self:?}"),
        }
    }

    /// float32 values written with 9 significant digits round-trip exactly through f64.
    fn f32s(&self) -> Vec<f32> {
        self.arr().iter().map(|x| x.num() as f32).collect()
    }

    fn is_null(&self) -> bool {
        matches!(self, Json::Null)
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) {
        self.ws();
        assert_eq!(self.s[self.i], c, "expected {:?} at {}", c as char, self.i);
        self.i += 1;
    }

    fn value(&mut self) -> Json {
        self.ws();
        match self.s[self.i] {
            b'{' => {
                self.i += 1;
                let mut kv = Vec::new();
                self.ws();
                if self.s[self.i] == b'}' {
                    self.i += 1;
                    return Json::Obj(kv);
                }
                loop {
                    self.ws();
                    let Json::Str(k) = self.value() else {
                        panic!("object key is not a string at {}", self.i)
                    };
                    self.eat(b':');
                    kv.push((k, self.value()));
                    self.ws();
                    self.i += 1;
                    match self.s[self.i - 1] {
                        b',' => continue,
                        b'}' => return Json::Obj(kv),
                        c => panic!("unexpected {:?} in object", c as char),
                    }
                }
            }
            b'[' => {
                self.i += 1;
                let mut a = Vec::new();
                self.ws();
                if self.s[self.i] == b']' {
                    self.i += 1;
                    return Json::Arr(a);
                }
                loop {
                    a.push(self.value());
                    self.ws();
                    self.i += 1;
                    match self.s[self.i - 1] {
                        b',' => continue,
                        b']' => return Json::Arr(a),
                        c => panic!("unexpected {:?} in array", c as char),
                    }
                }
            }
            b'"' => {
                // The fixture's strings have no escapes.
                let start = self.i + 1;
                let len = self.s[start..].iter().position(|&c| c == b'"').unwrap();
                self.i = start + len + 1;
                Json::Str(String::from_utf8(self.s[start..start + len].to_vec()).unwrap())
            }
            b'n' => self.word("null", Json::Null),
            b't' => self.word("true", Json::Bool(true)),
            b'f' => self.word("false", Json::Bool(false)),
            _ => {
                let start = self.i;
                while self.i < self.s.len() && b"+-.eE0123456789".contains(&self.s[self.i]) {
                    self.i += 1;
                }
                let t = std::str::from_utf8(&self.s[start..self.i]).unwrap();
                Json::Num(t.parse().unwrap_or_else(|_| panic!("bad number {t}")))
            }
        }
    }

    fn word(&mut self, w: &str, v: Json) -> Json {
        assert_eq!(&self.s[self.i..self.i + w.len()], w.as_bytes());
        self.i += w.len();
        v
    }
}

// ---------------------------------------------------------------------------------------------
// Fixture replay.

fn fixture() -> Json {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/optim/optim_reference.json"
    );
    Json::parse(&std::fs::read_to_string(path).unwrap())
}

/// One optimizer behind one interface, so every test runs on both.
enum Opt {
    AdamW(AdamW),
    Muon(Muon),
}

impl Opt {
    fn new(kind: &str, cfg: &Json, params: Vec<Var>) -> Opt {
        match kind {
            "adamw" => Opt::AdamW(
                AdamW::new(
                    params,
                    AdamWConfig {
                        lr: cfg.get("lr").num(),
                        beta1: cfg.get("beta1").num(),
                        beta2: cfg.get("beta2").num(),
                        eps: cfg.get("eps").num(),
                        weight_decay: cfg.get("weight_decay").num(),
                    },
                )
                .unwrap(),
            ),
            "muon" => Opt::Muon(
                Muon::new(
                    params,
                    MuonConfig {
                        lr: cfg.get("lr").num(),
                        momentum: cfg.get("momentum").num(),
                        nesterov: cfg.get("nesterov").boolean(),
                        ns_steps: cfg.get("ns_steps").num() as usize,
                        weight_decay: cfg.get("weight_decay").num(),
                    },
                )
                .unwrap(),
            ),
            k => panic!("unknown optimizer {k}"),
        }
    }

    fn set_lr(&mut self, lr: f64) {
        match self {
            Opt::AdamW(o) => o.set_lr(lr).unwrap(),
            Opt::Muon(o) => o.set_lr(lr).unwrap(),
        }
    }

    fn step(&mut self, grads: &GradStore) {
        match self {
            Opt::AdamW(o) => o.step(grads).unwrap(),
            Opt::Muon(o) => o.step(grads).unwrap(),
        }
    }

    fn state(&self) -> OptimState {
        match self {
            Opt::AdamW(o) => o.state(),
            Opt::Muon(o) => o.state(),
        }
    }

    fn load_state(&mut self, s: OptimState) {
        match self {
            Opt::AdamW(o) => o.load_state(s).unwrap(),
            Opt::Muon(o) => o.load_state(s).unwrap(),
        }
    }
}

/// A gradient store holding exactly `grads` (candle only makes stores through `backward`).
fn grad_store(grads: &[(&Var, Tensor)]) -> GradStore {
    let dummy = Var::zeros(1, DType::F32, &Device::Cpu).unwrap();
    let mut store = dummy.as_tensor().sum_all().unwrap().backward().unwrap();
    store.remove(dummy.as_tensor());
    for (v, g) in grads {
        store.insert(v.as_tensor(), g.clone());
    }
    store
}

struct Case {
    kind: String,
    cfg: Json,
    lrs: Vec<f64>,
    shapes: Vec<Vec<usize>>,
    init: Vec<Vec<f32>>,
    /// `grads[step][param]`.
    grads: Vec<Vec<Option<Vec<f32>>>>,
    /// `params[step][param]`, after the step.
    params: Vec<Vec<Vec<f32>>>,
}

fn case(fx: &Json, name: &str) -> Case {
    let c = fx.get("cases").get(name);
    let nested = |j: &Json| j.arr().iter().map(Json::f32s).collect::<Vec<_>>();
    Case {
        kind: match c.get("kind") {
            Json::Str(s) => s.clone(),
            _ => panic!(),
        },
        cfg: c.get("config").clone(),
        lrs: c.get("lrs").arr().iter().map(Json::num).collect(),
        shapes: c
            .get("shapes")
            .arr()
            .iter()
            .map(|s| s.arr().iter().map(|d| d.num() as usize).collect())
            .collect(),
        init: nested(c.get("init")),
        grads: c
            .get("grads")
            .arr()
            .iter()
            .map(|gs| {
                gs.arr()
                    .iter()
                    .map(|g| (!g.is_null()).then(|| g.f32s()))
                    .collect()
            })
            .collect(),
        params: c.get("params").arr().iter().map(nested).collect(),
    }
}

impl Case {
    fn vars(&self, values: &[Vec<f32>]) -> Vec<Var> {
        values
            .iter()
            .zip(&self.shapes)
            .map(|(v, s)| Var::from_slice(v, s.as_slice(), &Device::Cpu).unwrap())
            .collect()
    }

    fn grads_at(&self, step: usize, vars: &[Var]) -> GradStore {
        let pairs: Vec<(&Var, Tensor)> = vars
            .iter()
            .zip(&self.grads[step])
            .zip(&self.shapes)
            .filter_map(|((v, g), s)| {
                g.as_ref().map(|g| {
                    (
                        v,
                        Tensor::from_slice(g, s.as_slice(), &Device::Cpu).unwrap(),
                    )
                })
            })
            .collect();
        grad_store(&pairs)
    }

    /// Runs steps `from..to` on `vars` with the fixture's gradients and learning rates.
    fn run(&self, opt: &mut Opt, vars: &[Var], from: usize, to: usize) {
        for step in from..to {
            opt.set_lr(self.lrs[step]);
            opt.step(&self.grads_at(step, vars));
        }
    }
}

fn values(vars: &[Var]) -> Vec<Vec<f32>> {
    vars.iter()
        .map(|v| v.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

fn bits(vals: &[Vec<f32>]) -> Vec<Vec<u32>> {
    vals.iter()
        .map(|v| v.iter().map(|x| x.to_bits()).collect())
        .collect()
}

/// How far kiln is from the reference over all parameters after every step.
struct Diff {
    max_abs: f32,
    differing: usize,
    total: usize,
}

fn replay(c: &Case) -> Diff {
    let vars = c.vars(&c.init);
    let mut opt = Opt::new(&c.kind, &c.cfg, vars.clone());
    let mut d = Diff {
        max_abs: 0.0,
        differing: 0,
        total: 0,
    };
    for step in 0..c.lrs.len() {
        c.run(&mut opt, &vars, step, step + 1);
        for (got, want) in values(&vars).iter().zip(&c.params[step]) {
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want) {
                d.total += 1;
                if g.to_bits() != w.to_bits() {
                    d.differing += 1;
                    d.max_abs = d.max_abs.max((g - w).abs());
                }
            }
        }
    }
    d
}

fn check(name: &str, d: &Diff, tol: f32) {
    eprintln!(
        "{name}: max |kiln - reference| = {:e}; {} of {} values differ",
        d.max_abs, d.differing, d.total
    );
    assert!(d.max_abs <= tol, "{name}: {:e} > {tol:e}", d.max_abs);
}

#[test]
fn adamw_matches_torch() {
    let fx = fixture();
    for name in ["adamw", "adamw_schedule"] {
        check(name, &replay(&case(&fx, name)), 1e-6);
    }
}

#[test]
fn muon_matches_reference() {
    let fx = fixture();
    for name in ["muon", "muon_plain"] {
        check(name, &replay(&case(&fx, name)), 1e-5);
    }
}

#[test]
fn adamw_skips_params_without_grads_like_torch() {
    // In the schedule case parameter 1 has no gradient on step 2: it must not move on that step
    // (weight decay included), and its step count lags by one.
    let c = case(&fixture(), "adamw_schedule");
    assert!(c.grads[2][1].is_none());
    assert_eq!(c.params[1][1], c.params[2][1]);
    let vars = c.vars(&c.init);
    let mut opt = Opt::new(&c.kind, &c.cfg, vars.clone());
    c.run(&mut opt, &vars, 0, 2);
    let before = values(&vars)[1].clone();
    c.run(&mut opt, &vars, 2, 3);
    assert_eq!(bits(&[values(&vars)[1].clone()]), bits(&[before]));
    let s = opt.state();
    assert_eq!((s.step, s.params[0].step, s.params[1].step), (3, 3, 2));
}

#[test]
fn resume_from_state_is_bit_identical() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    for name in ["adamw", "adamw_schedule", "muon", "muon_plain"] {
        let c = case(&fx, name);
        let steps = c.lrs.len();

        let vars = c.vars(&c.init);
        let mut straight = Opt::new(&c.kind, &c.cfg, vars.clone());
        c.run(&mut straight, &vars, 0, steps);

        // Interrupt after 3 steps: save weights and state, rebuild everything from the files.
        let first = c.vars(&c.init);
        let mut opt = Opt::new(&c.kind, &c.cfg, first.clone());
        c.run(&mut opt, &first, 0, 3);
        let path = dir.path().join(format!("{name}.safetensors"));
        kiln_nn::candle_core::safetensors::save(&opt.state().to_tensors().unwrap(), &path).unwrap();
        let weights = values(&first);
        drop(opt);

        let loaded = kiln_nn::candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let state = OptimState::from_tensors(&loaded).unwrap();
        let resumed_vars = c.vars(&weights);
        let mut resumed = Opt::new(&c.kind, &c.cfg, resumed_vars.clone());
        resumed.load_state(state);
        c.run(&mut resumed, &resumed_vars, 3, steps);

        assert_eq!(bits(&values(&vars)), bits(&values(&resumed_vars)), "{name}");
        let (a, b) = (straight.state(), resumed.state());
        assert_eq!((a.step, a.kind.as_str()), (b.step, b.kind.as_str()));
        for (pa, pb) in a.params.iter().zip(&b.params) {
            assert_eq!(pa.step, pb.step);
            assert_eq!(bits(&pa.buffers), bits(&pb.buffers), "{name}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Thread-count independence on parameters larger than one chunk (16384 elements).

fn lcg(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Three AdamW steps, three Muon steps and a clip, all inside a rayon pool of `threads` threads.
fn big_run(threads: usize) -> (Vec<Vec<f32>>, f64, Vec<f32>) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let cpu = &Device::Cpu;
        let shapes: [&[usize]; 3] = [&[300, 170], &[40_000], &[130, 7]];
        let vars: Vec<Var> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let n = s.iter().product();
                Var::from_vec(lcg(n, i as u64, 0.5), *s, cpu).unwrap()
            })
            .collect();
        let grads_for = |step: u64| {
            let pairs: Vec<(&Var, Tensor)> = vars
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let n = v.elem_count();
                    let g = lcg(n, 100 + 10 * step + i as u64, 1.0);
                    (v, Tensor::from_vec(g, v.dims(), cpu).unwrap())
                })
                .collect();
            grad_store(&pairs)
        };
        let mut adamw = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
        let mut muon = Muon::new(
            vec![vars[0].clone(), vars[2].clone()],
            MuonConfig::default(),
        )
        .unwrap();
        for step in 0..3 {
            adamw.step(&grads_for(step)).unwrap();
            muon.step(&grads_for(10 + step)).unwrap();
        }
        let mut g = grads_for(99);
        let norm = clip_grad_norm(&vars, &mut g, 1.0).unwrap();
        let clipped = g
            .get(vars[1].as_tensor())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (values(&vars), norm, clipped)
    })
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let (w1, n1, c1) = big_run(1);
    let (w3, n3, c3) = big_run(3);
    assert_eq!(bits(&w1), bits(&w3));
    assert_eq!(n1.to_bits(), n3.to_bits());
    assert_eq!(bits(&[c1]), bits(&[c3]));
}

// ---------------------------------------------------------------------------------------------
// Gradient clipping.

#[test]
fn clip_grad_norm_matches_hand_computation() {
    let cpu = &Device::Cpu;
    let a = Var::from_slice(&[0.0f32; 2], 2, cpu).unwrap();
    let b = Var::from_slice(&[0.0f32; 4], (2, 2), cpu).unwrap();
    let no_grad = Var::from_slice(&[1.0f32], 1, cpu).unwrap();
    let ga = Tensor::new(&[3.0f32, -4.0], cpu).unwrap();
    let gb = Tensor::new(&[[12.0f32, 0.0], [0.0, 0.0]], cpu).unwrap();
    let params = [a.clone(), b.clone(), no_grad];
    let store = || grad_store(&[(&a, ga.clone()), (&b, gb.clone())]);

    // sqrt(9 + 16 + 144) = 13: above max_norm, so every gradient is scaled by 6.5 / (13 + 1e-6).
    let mut g = store();
    let norm = clip_grad_norm(&params, &mut g, 6.5).unwrap();
    assert_eq!(norm, 13.0);
    let coef = (6.5 / (13.0 + 1e-6)) as f32;
    let got_a = g.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(got_a, vec![3.0 * coef, -4.0 * coef]);
    let got_b = g.get(b.as_tensor()).unwrap().flatten_all().unwrap();
    assert_eq!(
        got_b.to_vec1::<f32>().unwrap(),
        vec![12.0 * coef, 0.0, 0.0, 0.0]
    );
    // The clipped total norm is max_norm (up to the 1e-6 guard).
    let again = clip_grad_norm(&params, &mut g, 100.0).unwrap();
    assert!((again - 6.5).abs() < 1e-5, "{again}");

    // Below max_norm nothing changes.
    let mut g = store();
    assert_eq!(clip_grad_norm(&params, &mut g, 20.0).unwrap(), 13.0);
    let same = g.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(same, vec![3.0, -4.0]);

    // A non-finite norm is reported and the gradients are left for the caller to discard.
    let inf = Tensor::new(&[f32::INFINITY, 1.0], cpu).unwrap();
    let mut g = grad_store(&[(&a, inf)]);
    assert!(clip_grad_norm(&params, &mut g, 1.0).unwrap().is_infinite());
    let kept = g.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(kept, vec![f32::INFINITY, 1.0]);

    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let mut g = store();
        assert!(matches!(
            clip_grad_norm(&params, &mut g, bad),
            Err(NnError::Config { .. })
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// Optimisation sanity: both optimizers descend a quadratic through candle's autograd.

#[test]
fn adamw_and_muon_minimise_a_quadratic() {
    let cpu = &Device::Cpu;
    let target = Tensor::from_vec(lcg(6 * 10, 7, 1.0), (6, 10), cpu).unwrap();
    let loss_of = |w: &Var| {
        w.as_tensor()
            .sub(&target)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let w = Var::zeros((6, 10), DType::F32, cpu).unwrap();
    let first = loss_of(&w).to_scalar::<f32>().unwrap();
    let mut adamw = AdamW::new(
        vec![w.clone()],
        AdamWConfig {
            lr: 0.05,
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    for _ in 0..200 {
        adamw.step(&loss_of(&w).backward().unwrap()).unwrap();
    }
    let after = loss_of(&w).to_scalar::<f32>().unwrap();
    assert!(after < 1e-2 * first, "AdamW: {first} -> {after}");

    let w = Var::zeros((6, 10), DType::F32, cpu).unwrap();
    let mut muon = Muon::new(
        vec![w.clone()],
        MuonConfig {
            lr: 0.05,
            ..MuonConfig::default()
        },
    )
    .unwrap();
    for _ in 0..100 {
        muon.step(&loss_of(&w).backward().unwrap()).unwrap();
    }
    let after = loss_of(&w).to_scalar::<f32>().unwrap();
    assert!(after < 0.1 * first, "Muon: {first} -> {after}");
}

#[test]
fn muon_skips_params_without_grads() {
    let cpu = &Device::Cpu;
    let a = Var::from_vec(lcg(12, 1, 1.0), (3, 4), cpu).unwrap();
    let b = Var::from_vec(lcg(12, 2, 1.0), (4, 3), cpu).unwrap();
    let before = values(std::slice::from_ref(&b));
    let mut muon = Muon::new(vec![a.clone(), b.clone()], MuonConfig::default()).unwrap();
    let g = Tensor::from_vec(lcg(12, 3, 1.0), (3, 4), cpu).unwrap();
    muon.step(&grad_store(&[(&a, g)])).unwrap();
    assert_eq!(values(&[b]), before);
    let s = muon.state();
    assert_eq!((s.step, s.params[0].step, s.params[1].step), (1, 1, 0));
    assert!(s.params[1].buffers[0].iter().all(|&x| x == 0.0));
}

// ---------------------------------------------------------------------------------------------
// Bad inputs.

#[test]
fn bad_inputs_are_errors() {
    let cpu = &Device::Cpu;
    let w = Var::zeros((3, 4), DType::F32, cpu).unwrap();
    let bias = Var::zeros(4, DType::F32, cpu).unwrap();
    let f64_param = Var::zeros((3, 4), DType::F64, cpu).unwrap();
    let config = |r: Result<(), NnError>| matches!(r, Err(NnError::Config { .. }));
    let shape = |r: Result<(), NnError>| matches!(r, Err(NnError::Shape { .. }));

    // Non-f32 parameters, the same parameter twice, 1-D parameters for Muon.
    assert!(config(
        AdamW::new(vec![f64_param.clone()], AdamWConfig::default()).map(drop)
    ));
    assert!(config(
        Muon::new(vec![f64_param], MuonConfig::default()).map(drop)
    ));
    assert!(config(
        AdamW::new(vec![w.clone(), w.clone()], AdamWConfig::default()).map(drop)
    ));
    assert!(shape(
        Muon::new(vec![bias.clone()], MuonConfig::default()).map(drop)
    ));

    // Learning rates and hyper-parameters.
    let mut adamw = AdamW::new(vec![w.clone(), bias.clone()], AdamWConfig::default()).unwrap();
    let mut muon = Muon::new(vec![w.clone()], MuonConfig::default()).unwrap();
    for lr in [f64::NAN, f64::INFINITY, -1e-3] {
        assert!(config(adamw.set_lr(lr)));
        assert!(config(muon.set_lr(lr)));
        let cfg = AdamWConfig {
            lr,
            ..AdamWConfig::default()
        };
        assert!(config(AdamW::new(vec![w.clone()], cfg).map(drop)));
    }
    assert_eq!(adamw.lr(), AdamWConfig::default().lr);
    let cfg = AdamWConfig {
        beta2: 1.0,
        ..AdamWConfig::default()
    };
    assert!(config(AdamW::new(vec![w.clone()], cfg).map(drop)));

    // A gradient whose shape is not the parameter's.
    let wrong = grad_store(&[(&w, Tensor::zeros((4, 3), DType::F32, cpu).unwrap())]);
    assert!(shape(adamw.step(&wrong)));
    assert!(shape(muon.step(&wrong)));

    // States of the wrong kind, count or size.
    let good = adamw.state();
    assert!(config(muon.load_state(good.clone())));
    let mut fewer = good.clone();
    fewer.params.pop();
    assert!(shape(adamw.load_state(fewer)));
    let mut short = good.clone();
    short.params[1].buffers[0].pop();
    assert!(shape(adamw.load_state(short)));
    let mut one_buffer = good.clone();
    one_buffer.params[0].buffers.pop();
    assert!(shape(adamw.load_state(one_buffer)));
    let mut ahead = good.clone();
    ahead.params[0] = ParamState {
        step: 5,
        buffers: ahead.params[0].buffers.clone(),
    };
    assert!(config(adamw.load_state(ahead)));
    assert!(adamw.load_state(good).is_ok());

    // Missing tensors in a serialised state.
    let mut tensors = muon.state().to_tensors().unwrap();
    tensors.remove("step");
    assert!(matches!(
        OptimState::from_tensors(&tensors),
        Err(NnError::Config { .. })
    ));
}
