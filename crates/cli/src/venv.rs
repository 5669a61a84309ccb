//! The Python virtual environments of the benchmarks' peers (tiktoken, HF tokenizers, PyTorch),
//! made once under `$KILN_HOME` with pinned packages and reused while the pins match.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;

/// The folder and interpreter of `$KILN_HOME/<name>`, created (or re-created when `packages` changed) with
/// `python3 -m venv` and `pip install packages`. `note` is printed before a (re)install; `quiet`
/// hides pip's own progress (keep it for long installs).
pub fn ensure(
    name: &str,
    packages: &[&str],
    note: &str,
    quiet: bool,
) -> Result<(PathBuf, PathBuf)> {
    let store = kiln_assets::Store::from_env()?;
    let venv = store.home().join(name);
    let python = venv.join("bin").join("python");
    let stamp = venv.join(".kiln-packages");
    let want = packages.join(" ");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return Ok((venv, python));
    }
    eprintln!("setting up {} ({want}){note}", venv.display());
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .context("running `python3 -m venv` (is Python 3 installed?)")?;
    if !ok.success() {
        bail!("`python3 -m venv {}` failed", venv.display());
    }
    let mut pip = Command::new(&python);
    pip.args(["-m", "pip", "install", "--disable-pip-version-check"]);
    if quiet {
        pip.arg("--quiet");
    }
    let ok = pip
        .args(packages)
        .status()
        .with_context(|| format!("installing {want} with pip"))?;
    if !ok.success() {
        bail!("pip could not install {want} into {}", venv.display());
    }
    std::fs::write(&stamp, &want).with_context(|| format!("writing {}", stamp.display()))?;
    Ok((venv, python))
}
