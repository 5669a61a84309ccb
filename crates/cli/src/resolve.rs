//! Turning user-facing names into things: an argument that names a model, tokenizer or corpus may
//! be an asset name (`smollm2`, `cl100k_base`, `shakespeare`) or a path.

use anyhow::{bail, Context, Result};
use kiln_tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

/// An asset name becomes its cached path (fetched on first use); anything else must exist on disk.
pub fn path_arg(spec: &str) -> Result<PathBuf> {
    if kiln_assets::is_asset_name(spec) && !Path::new(spec).exists() {
        return kiln_assets::ensure(spec).with_context(|| format!("getting asset `{spec}`"));
    }
    let p = PathBuf::from(spec);
    if !p.exists() {
        bail!("`{spec}` is neither a file or folder nor an asset name (see `kiln assets list`)");
    }
    Ok(p)
}

/// Loads a tokenizer from an asset name, a `.tiktoken` rank file, a `tokenizer.json`, a `.gguf`,
/// a folder holding `encoder.json` + `vocab.bpe`, or a tokenizer kiln trained.
pub fn tokenizer(spec: &str) -> Result<Tokenizer> {
    let path = path_arg(spec)?;
    let tok = match spec {
        "r50k_base" | "p50k_base" | "cl100k_base" | "o200k_base" if !Path::new(spec).exists() => {
            Tokenizer::from_tiktoken_file(&path, spec)
        }
        _ => Tokenizer::load(&path),
    };
    tok.with_context(|| format!("loading tokenizer `{spec}`"))
}

/// Expands inputs: files stay, folders become their regular files (sorted, hidden ones skipped),
/// asset names become their cached files or folders.
pub fn input_files(inputs: &[String]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for spec in inputs {
        let p = path_arg(spec)?;
        if p.is_dir() {
            let mut inner: Vec<PathBuf> = std::fs::read_dir(&p)
                .with_context(|| format!("reading folder {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.is_file()
                        && !f
                            .file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with('.'))
                })
                .collect();
            inner.sort();
            if inner.is_empty() {
                bail!("folder {} has no files", p.display());
            }
            files.extend(inner);
        } else {
            files.push(p);
        }
    }
    Ok(files)
}
