//! The benchmarks' child processes: each thread count is measured in its own `kiln` process with
//! `RAYON_NUM_THREADS` set, because candle sizes its gemm and element-wise pools from that
//! variable at first use, so an in-process `ThreadPool::install` would not limit them.

use anyhow::{bail, Context, Result};
use std::process::Command;

/// Runs `kiln ARGS` with `threads` rayon threads and returns its stdout; a failed child is an
/// error carrying its stderr.
pub fn run_kiln<S: AsRef<std::ffi::OsStr>>(args: &[S], threads: usize) -> Result<String> {
    let exe = std::env::current_exe().context("locating the kiln binary")?;
    let out = Command::new(&exe)
        .args(args)
        .env("RAYON_NUM_THREADS", threads.to_string())
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    if !out.status.success() {
        bail!(
            "the kiln worker ({threads} threads) failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`run_kiln`] for a worker that prints one JSON document.
pub fn run_kiln_json<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    threads: usize,
) -> Result<serde_json::Value> {
    let out = run_kiln(args, threads)?;
    serde_json::from_str(&out).context("parsing the kiln worker's JSON")
}
