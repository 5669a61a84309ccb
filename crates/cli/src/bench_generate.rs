//! `kiln bench generate`: prompt processing and decode speed of kiln against llama.cpp's
//! `llama-bench` on the same GGUF file in the same run, plus decode as a fraction of the
//! memory-bandwidth limit.
//!
//! What is measured, so the two sides compare like with like (llama-bench's `pp` and `tg` tests):
//! - prompt processing: one forward pass over a fixed `--prompt-tokens`-token prompt from an
//!   empty cache, `batch * T / seconds`;
//! - decode: `--gen-tokens` single-token steps from an empty cache, `batch * N / seconds`.
//!
//! Token ids are fixed and arbitrary (no sampling, no tokenizer), as in llama-bench. Each number is
//! the best of `--reps` runs after one warm-up. Each thread count runs in a child `kiln` process
//! with `RAYON_NUM_THREADS` set, which is the only setting candle's own kernels obey. llama-bench has no batch-of-sequences mode that
//! maps to kiln's (B, T) forward, so its column is empty for batch > 1.
//!
//! llama.cpp is built once from the llama-cpp-python 0.3.36 sdist (the archive the
//! `tokenizer-tests` asset already downloads and checks) with CMake and Ninja from PyPI in a venv
//! under `$KILN_HOME/llamacpp`, without `GGML_NATIVE` (its AMX path dies with SIGILL here) and
//! AMX, with the instruction sets the running CPU has turned on one by one (`../shared/ASSETS.md`
//! records the AVX-512 machine's set), and the binary is cached there per instruction set.

use anyhow::{bail, Context, Result};
use clap::Args;
use kiln_models::Llama;
use kiln_nn::candle_core::quantized::gguf_file;
use kiln_nn::candle_core::{Device, Tensor};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const LLAMA_CPP_VERSION: &str = "0.3.36";
const LLAMA_CMAKE_FLAGS: &[&str] = &[
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
    "-DLLAMA_CURL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
];

/// llama.cpp's instruction-set flags for the CPU this runs on, and a name for that set (the build
/// folder is per set, so a cache made on an AVX-512 machine is never run on an AVX2-only one,
/// where it dies with SIGILL). `GGML_NATIVE` would do the detection itself, but its AMX path
/// dies with SIGILL on the AMX machines here (it never asks the kernel for tile state).
fn llama_isa_flags() -> (Vec<String>, String) {
    let mut on: Vec<(&str, &str)> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx") {
            on.push(("GGML_AVX", "avx"));
        }
        if has!("avx2") && has!("fma") && has!("f16c") && has!("bmi2") {
            on.extend([
                ("GGML_AVX2", "avx2"),
                ("GGML_FMA", "fma"),
                ("GGML_F16C", "f16c"),
                ("GGML_BMI2", "bmi2"),
            ]);
        }
        if has!("avxvnni") {
            on.push(("GGML_AVX_VNNI", "avxvnni"));
        }
        if has!("avx512f")
            && has!("avx512bw")
            && has!("avx512dq")
            && has!("avx512vl")
            && has!("avx512cd")
        {
            on.push(("GGML_AVX512", "avx512"));
            if has!("avx512vbmi") {
                on.push(("GGML_AVX512_VBMI", "vbmi"));
            }
            if has!("avx512vnni") {
                on.push(("GGML_AVX512_VNNI", "vnni"));
            }
            if has!("avx512bf16") {
                on.push(("GGML_AVX512_BF16", "bf16"));
            }
        }
    }
    let flags = on.iter().map(|(f, _)| format!("-D{f}=ON")).collect();
    let name = match on.is_empty() {
        true => "baseline".to_string(),
        false => on.iter().map(|(_, n)| *n).collect::<Vec<_>>().join("-"),
    };
    (flags, name)
}

#[derive(Args, Debug)]
pub struct BenchGenerateArgs {
    /// Model: an asset name (smollm2) or a .gguf file.
    #[arg(long, short, default_value = "smollm2")]
    model: String,
    /// Prompt length for the prompt-processing test.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens generated in the decode test.
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Batch sizes (sequences decoded together) for kiln.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batch: Vec<usize>,
    /// Thread counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Repetitions per measurement; the best is kept.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Skip llama.cpp (no build, no peer column).
    #[arg(long)]
    no_peer: bool,
    /// Write the results as JSON to this file as well.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal: measure kiln only, in this process, and print one JSON line per batch size.
    #[arg(long, hide = true)]
    worker: bool,
}

#[derive(Debug, Clone)]
struct Row {
    test: String,
    batch: usize,
    threads: usize,
    kiln_tps: f64,
    llama_tps: Option<f64>,
}

pub fn run(args: BenchGenerateArgs) -> Result<()> {
    if args.reps == 0 || args.prompt_tokens == 0 || args.gen_tokens == 0 {
        bail!("--reps, --prompt-tokens and --gen-tokens must be at least 1");
    }
    if args.batch.contains(&0) {
        bail!("--batch sizes must be at least 1");
    }
    let path = crate::resolve::path_arg(&args.model)?;
    if args.worker {
        return worker(&path, &args);
    }
    let weight_bytes = gguf_tensor_bytes(&path)?;
    let llama_bench = if args.no_peer {
        None
    } else {
        Some(ensure_llama_bench().context("building llama.cpp's llama-bench")?)
    };
    let mut rows = Vec::new();
    for &threads in &args.threads {
        for (batch, pp, tg) in kiln_in_child(&path, threads.max(1), &args)? {
            eprintln!("kiln  batch {batch} threads {threads}: pp {pp:.1} tok/s, tg {tg:.1} tok/s");
            rows.push(Row {
                test: format!("pp{}", args.prompt_tokens),
                batch,
                threads,
                kiln_tps: pp,
                llama_tps: None,
            });
            rows.push(Row {
                test: format!("tg{}", args.gen_tokens),
                batch,
                threads,
                kiln_tps: tg,
                llama_tps: None,
            });
        }
    }

    if let Some(bin) = &llama_bench {
        let peer = run_llama_bench(bin, &path, &args)?;
        for row in rows.iter_mut().filter(|r| r.batch == 1) {
            row.llama_tps = peer
                .iter()
                .find(|(test, t, _)| *test == row.test && *t == row.threads)
                .map(|(_, _, tps)| *tps);
        }
    }

    let mut bandwidth = Vec::new();
    for &threads in &args.threads {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build()
            .context("building the thread pool")?;
        bandwidth.push((threads, pool.install(measure_bandwidth)));
    }

    println!(
        "model: {} ({:.1} MB of tensors read per decoded token)\n",
        path.display(),
        weight_bytes as f64 / 1e6
    );
    println!("| test | batch | threads | kiln tok/s | llama.cpp tok/s | kiln / llama.cpp |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        let (peer, ratio) = match r.llama_tps {
            Some(p) => (format!("{p:.1}"), format!("{:.2}", r.kiln_tps / p)),
            None => ("n/a".to_string(), "-".to_string()),
        };
        println!(
            "| {} | {} | {} | {:.1} | {peer} | {ratio} |",
            r.test, r.batch, r.threads, r.kiln_tps
        );
    }
    println!("\n| threads | read bandwidth GB/s | decode limit tok/s | kiln tg (batch 1) | fraction | llama.cpp tg | fraction |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for (threads, bw) in &bandwidth {
        let limit = bw / weight_bytes as f64;
        let tg = rows
            .iter()
            .find(|r| r.test.starts_with("tg") && r.batch == 1 && r.threads == *threads);
        let (k, kf) = tg
            .map(|r| {
                (
                    format!("{:.1}", r.kiln_tps),
                    format!("{:.2}", r.kiln_tps / limit),
                )
            })
            .unwrap_or(("-".into(), "-".into()));
        let (l, lf) = tg
            .and_then(|r| r.llama_tps)
            .map(|p| (format!("{p:.1}"), format!("{:.2}", p / limit)))
            .unwrap_or(("n/a".into(), "-".into()));
        println!(
            "| {threads} | {:.1} | {limit:.1} | {k} | {kf} | {l} | {lf} |",
            bw / 1e9
        );
    }
    if let Some(out) = &args.json {
        let v = serde_json::json!({
            "model": path,
            "weight_bytes": weight_bytes,
            "rows": rows.iter().map(|r| serde_json::json!({
                "test": r.test, "batch": r.batch, "threads": r.threads,
                "kiln_tok_per_s": r.kiln_tps, "llama_cpp_tok_per_s": r.llama_tps,
            })).collect::<Vec<_>>(),
            "bandwidth_bytes_per_s": bandwidth,
        });
        std::fs::write(out, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

/// Runs the kiln side in a child process with `RAYON_NUM_THREADS` set: candle sizes its own CPU
/// kernels (gemm, softmax) from that variable, not from the current rayon pool, so an in-process
/// `ThreadPool::install` would let the attention matmuls use every core in a "1 thread" row.
/// Returns (batch, prompt tok/s, decode tok/s).
fn kiln_in_child(
    model: &Path,
    threads: usize,
    args: &BenchGenerateArgs,
) -> Result<Vec<(usize, f64, f64)>> {
    let batches: Vec<String> = args.batch.iter().map(|b| b.to_string()).collect();
    let mut worker_args: Vec<std::ffi::OsString> = vec![
        "bench".into(),
        "generate".into(),
        "--worker".into(),
        "--model".into(),
    ];
    worker_args.push(model.as_os_str().to_owned());
    for (flag, value) in [
        ("--prompt-tokens", args.prompt_tokens.to_string()),
        ("--gen-tokens", args.gen_tokens.to_string()),
        ("--batch", batches.join(",")),
        ("--threads", threads.to_string()),
        ("--reps", args.reps.to_string()),
    ] {
        worker_args.push(flag.into());
        worker_args.push(value.into());
    }
    let out = crate::worker::run_kiln(&worker_args, threads)?;
    let mut res = Vec::new();
    for line in out.lines() {
        let v: Value = serde_json::from_str(line).context("parsing the worker's output")?;
        let num = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
        res.push((num("batch") as usize, num("pp"), num("tg")));
    }
    Ok(res)
}

/// The child side of [`kiln_in_child`].
fn worker(path: &Path, args: &BenchGenerateArgs) -> Result<()> {
    let model = Llama::load(path).with_context(|| format!("loading {}", path.display()))?;
    let vocab = model.config().vocab_size;
    for &batch in &args.batch {
        let (pp, tg) = kiln_speed(&model, vocab, batch, args)?;
        println!(
            "{}",
            serde_json::json!({"batch": batch, "pp": pp, "tg": tg})
        );
    }
    Ok(())
}

/// Deterministic, arbitrary token ids below the vocabulary size, (batch, t).
fn ids(vocab: usize, batch: usize, t: usize, salt: usize) -> Result<Tensor> {
    let v: Vec<u32> = (0..batch * t)
        .map(|i| ((i * 7919 + salt * 104_729 + 13) % vocab) as u32)
        .collect();
    Ok(Tensor::from_vec(v, (batch, t), &Device::Cpu)?)
}

/// Best-of-`reps` (prompt tok/s, decode tok/s) at one batch size in the current pool.
fn kiln_speed(
    model: &Llama,
    vocab: usize,
    batch: usize,
    args: &BenchGenerateArgs,
) -> Result<(f64, f64)> {
    let prompt = ids(vocab, batch, args.prompt_tokens, 0)?;
    let mut best_pp = f64::MAX;
    let mut best_tg = f64::MAX;
    // One extra, untimed round warms caches and the allocator.
    for rep in 0..=args.reps {
        let mut cache = model.new_cache();
        let t0 = Instant::now();
        model.forward(&prompt, 0, &mut cache)?;
        let pp = t0.elapsed().as_secs_f64();

        let mut cache = model.new_cache();
        let steps: Vec<Tensor> = (0..args.gen_tokens)
            .map(|i| ids(vocab, batch, 1, i + 1))
            .collect::<Result<_>>()?;
        let t0 = Instant::now();
        for (pos, step) in steps.iter().enumerate() {
            model.forward(step, pos, &mut cache)?;
        }
        let tg = t0.elapsed().as_secs_f64();
        if rep > 0 {
            best_pp = best_pp.min(pp);
            best_tg = best_tg.min(tg);
        }
    }
    Ok((
        (batch * args.prompt_tokens) as f64 / best_pp,
        (batch * args.gen_tokens) as f64 / best_tg,
    ))
}

/// Bytes of all tensors in a GGUF file: what one decode step streams from memory (every weight
/// matrix once; the embedding is also the tied output projection, read in full).
fn gguf_tensor_bytes(path: &Path) -> Result<u64> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let content = gguf_file::Content::read(&mut f)
        .with_context(|| format!("reading the GGUF header of {}", path.display()))?;
    Ok(content
        .tensor_infos
        .values()
        .map(|t| {
            let elems = t.shape.elem_count();
            (elems / t.ggml_dtype.block_size() * t.ggml_dtype.type_size()) as u64
        })
        .sum())
}

/// Read bandwidth in bytes/s: a sum over 256 MB of u64s (larger than any cache), split over the
/// current pool's threads, best of 5.
fn measure_bandwidth() -> f64 {
    use rayon::prelude::*;
    let n: usize = 32 << 20; // u64s: 256 MB
    let buf: Vec<u64> = (0..n as u64).collect();
    let threads = rayon::current_num_threads();
    let chunk = n.div_ceil(threads);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t0 = Instant::now();
        let s: u64 = buf
            .par_chunks(chunk)
            .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
            .reduce(|| 0, |a, b| a.wrapping_add(b));
        std::hint::black_box(s);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    (n * 8) as f64 / best
}

/// Runs llama-bench once for all thread counts; returns (test, threads, tok/s).
fn run_llama_bench(
    bin: &Path,
    model: &Path,
    args: &BenchGenerateArgs,
) -> Result<Vec<(String, usize, f64)>> {
    let threads: Vec<String> = args.threads.iter().map(|t| t.max(&1).to_string()).collect();
    let out = Command::new(bin)
        .arg("-m")
        .arg(model)
        .args(["-p", &args.prompt_tokens.to_string()])
        .args(["-n", &args.gen_tokens.to_string()])
        .args(["-t", &threads.join(",")])
        .args(["-r", &args.reps.to_string()])
        .args(["-o", "json"])
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("parsing llama-bench's JSON")?;
    let mut res = Vec::new();
    for e in v.as_array().map(Vec::as_slice).unwrap_or_default() {
        let get = |k: &str| e.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
        let (np, ng, t) = (get("n_prompt"), get("n_gen"), get("n_threads"));
        let tps = e.get("avg_ts").and_then(Value::as_f64).unwrap_or(0.0);
        let test = if ng == 0 {
            format!("pp{np}")
        } else {
            format!("tg{ng}")
        };
        eprintln!("llama.cpp {test} threads {t}: {tps:.1} tok/s");
        res.push((test, t, tps));
    }
    Ok(res)
}

fn run_ok(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("starting {what} ({cmd:?})"))?;
    if !status.success() {
        bail!("{what} failed ({status}): {cmd:?}");
    }
    Ok(())
}

/// The cached llama-bench binary, built on first use (about 5 minutes on 2 cores).
fn ensure_llama_bench() -> Result<PathBuf> {
    let store = kiln_assets::Store::from_env()?;
    let root = store.home().join("llamacpp");
    let (isa_flags, isa) = llama_isa_flags();
    let build = root.join(format!("build-{isa}"));
    let bin = build.join("bin/llama-bench");
    if bin.is_file() {
        return Ok(bin);
    }
    eprintln!(
        "building llama.cpp's llama-bench once under {} (about 5 minutes)...",
        root.display()
    );
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    // The tokenizer-tests asset comes from the same sdist, so ensuring it leaves the verified
    // archive in the download cache.
    kiln_assets::ensure("tokenizer-tests").context("getting the llama-cpp-python sdist")?;
    let archive = store.home().join(format!(
        "downloads/PyPI-llama-cpp-python-{LLAMA_CPP_VERSION}.archive"
    ));
    if !archive.is_file() {
        bail!("expected the sdist at {}", archive.display());
    }
    let top = format!("llama_cpp_python-{LLAMA_CPP_VERSION}");
    let src = root.join(&top).join("vendor/llama.cpp");
    if !src.join("CMakeLists.txt").is_file() {
        run_ok(
            Command::new("tar")
                .arg("xzf")
                .arg(&archive)
                .arg("-C")
                .arg(&root)
                .arg("--wildcards")
                .arg(format!("{top}/vendor/llama.cpp/*"))
                // The vocab GGUFs are 70 MB the build never reads.
                .arg(format!(
                    "--exclude={top}/vendor/llama.cpp/models/ggml-vocab*"
                )),
            "extracting the sdist",
        )?;
    }
    let venv = root.join("venv");
    if !venv.join("bin/ninja").is_file() {
        run_ok(
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
            "creating the build venv",
        )?;
        run_ok(
            Command::new(venv.join("bin/pip")).args(["install", "-q", "cmake", "ninja"]),
            "installing cmake and ninja",
        )?;
    }
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    run_ok(
        Command::new(venv.join("bin/cmake"))
            .env("PATH", &path)
            .arg("-S")
            .arg(&src)
            .arg("-B")
            .arg(&build)
            .args(["-G", "Ninja"])
            .args(LLAMA_CMAKE_FLAGS)
            .args(&isa_flags),
        "configuring llama.cpp",
    )?;
    run_ok(
        Command::new(venv.join("bin/cmake"))
            .env("PATH", &path)
            .arg("--build")
            .arg(&build)
            .args(["--target", "llama-bench", "-j"])
            .arg(
                std::thread::available_parallelism()
                    .map_or(2, |n| n.get())
                    .to_string(),
            ),
        "building llama-bench",
    )?;
    if !bin.is_file() {
        bail!("the build finished but {} is missing", bin.display());
    }
    Ok(bin)
}
