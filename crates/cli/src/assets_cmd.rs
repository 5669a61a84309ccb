//! `kiln assets ...`: the reference-asset cache.

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use kiln_assets::{FetchOutcome, Store, CATALOGUE};
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum AssetsCommand {
    /// Download, check and cache assets (all of them when no NAME is given). Cached assets that
    /// verify are left alone; damaged ones are fetched again.
    Fetch {
        /// Asset names, as `kiln assets list` shows them.
        names: Vec<String>,
    },
    /// List the catalogue and which assets are in the cache.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the path of a cached asset's main file or folder.
    Path {
        name: String,
        /// Fetch the asset first if it is not cached.
        #[arg(long)]
        fetch: bool,
    },
    /// Rehash cached assets against their manifests and the catalogue's checksums (all cached
    /// assets when no NAME is given). Exits non-zero if any is damaged.
    Verify { names: Vec<String> },
}

pub fn run(cmd: AssetsCommand) -> Result<()> {
    let store = Store::from_env()?;
    match cmd {
        AssetsCommand::Fetch { names } => {
            let names = if names.is_empty() {
                CATALOGUE.iter().map(|a| a.name.to_string()).collect()
            } else {
                names
            };
            // Check every name before downloading anything, so a typo fails fast.
            for n in &names {
                kiln_assets::spec(n)?;
            }
            for n in &names {
                let outcome = store
                    .fetch(n)
                    .with_context(|| format!("fetching asset `{n}`"))?;
                let what = match outcome {
                    FetchOutcome::AlreadyPresent => "already cached",
                    FetchOutcome::Fetched => "fetched",
                    FetchOutcome::Repaired => "repaired (the cached copy was damaged)",
                };
                eprintln!("{n}: {what}");
                println!("{}", store.path(n)?.display());
            }
            Ok(())
        }
        AssetsCommand::List { json } => {
            let rows: Vec<(String, bool, PathBuf, &str, &str)> = CATALOGUE
                .iter()
                .map(|a| {
                    let cached = store.path(a.name).is_ok();
                    let path = store.asset_dir(a.name);
                    (a.name.to_string(), cached, path, a.description, a.licence)
                })
                .collect();
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .zip(CATALOGUE)
                    .map(|((name, cached, path, desc, lic), spec)| {
                        serde_json::json!({
                            "name": name,
                            "cached": cached,
                            "path": path,
                            "description": desc,
                            "licence": lic,
                            "sources": spec.parts.iter().map(|p| format!("{} {}", p.source.registry.label(), p.source.spec())).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("cache: {}", store.home().display());
                for (name, cached, _, desc, _) in &rows {
                    let mark = if *cached { "cached " } else { "       " };
                    println!("{mark} {name:<16} {desc}");
                }
            }
            Ok(())
        }
        AssetsCommand::Path { name, fetch } => {
            let path = if fetch {
                store.ensure(&name)?
            } else {
                store.path(&name)?
            };
            println!("{}", path.display());
            Ok(())
        }
        AssetsCommand::Verify { names } => {
            let names: Vec<String> = if names.is_empty() {
                CATALOGUE
                    .iter()
                    .filter(|a| store.asset_dir(a.name).exists())
                    .map(|a| a.name.to_string())
                    .collect()
            } else {
                names
            };
            let mut bad = 0;
            for n in &names {
                let report = store.verify(n)?;
                if report.ok() {
                    println!("ok      {n}");
                } else {
                    bad += 1;
                    println!("BAD     {n}");
                    for p in &report.problems {
                        println!("        {p}");
                    }
                }
            }
            if bad > 0 {
                bail!(
                    "{bad} of {} assets failed verification; `kiln assets fetch NAME` repairs them",
                    names.len()
                );
            }
            Ok(())
        }
    }
}
