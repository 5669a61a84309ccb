//! Atomic, self-checking checkpoints.
//!
//! Layout of a run folder:
//! ```text
//! RUN/run.json                        the run's settings (a resume must match them)
//! RUN/metrics.jsonl                   one JSON object per step
//! RUN/checkpoints/step-000120/        one checkpoint:
//!     model.safetensors, config.json  the weights under Hugging Face names (`kiln generate -m` loads the folder)
//!     tokenizer.json                  the run's tokenizer, so the folder is a complete model
//!     optimizer.safetensors           every optimizer buffer
//!     state.json                      step, data-loader state, sha256 of the files above
//! RUN/checkpoints/LATEST              the name of the newest complete checkpoint
//! RUN/model/                          the final model (same files as a checkpoint, minus optimizer/state)
//! ```
//! **Invariant:** a checkpoint folder only appears by renaming a staging folder whose files were
//! all written and fsynced; `LATEST` is replaced by rename after that. A process killed at any
//! moment leaves the previous `LATEST` pointing at a complete checkpoint, and loading rehashes
//! every file against `state.json`, so a damaged checkpoint is reported, never half-loaded.

use crate::{Result, TrainError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Files of a checkpoint, with their sha256.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileSum {
    pub name: String,
    pub sha256: String,
    pub bytes: u64,
}

pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let data = fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let mut h = Sha256::new();
    h.update(&data);
    Ok((format!("{:x}", h.finalize()), data.len() as u64))
}

/// Writes `bytes` to `path` through a temporary file in the same folder, fsynced, then renamed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
    {
        let mut f = fs::File::create(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| TrainError::io(&tmp, e))?;
        f.sync_all().map_err(|e| TrainError::io(&tmp, e))?;
    }
    fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))?;
    sync_dir(dir)
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    // Directory fsync makes the rename durable; it is a no-op where the OS does not allow it.
    if let Ok(f) = fs::File::open(dir) {
        let _ = f.sync_all();
    }
    Ok(())
}

fn fsync_file(path: &Path) -> Result<()> {
    let f = fs::File::open(path).map_err(|e| TrainError::io(path, e))?;
    f.sync_all().map_err(|e| TrainError::io(path, e))
}

/// Publishes the folder `staging` (already filled) as `final_dir`: fsyncs every file, renames,
/// and replaces an older folder of the same name.
pub fn publish_dir(staging: &Path, final_dir: &Path) -> Result<()> {
    for entry in fs::read_dir(staging).map_err(|e| TrainError::io(staging, e))? {
        let entry = entry.map_err(|e| TrainError::io(staging, e))?;
        fsync_file(&entry.path())?;
    }
    sync_dir(staging)?;
    if final_dir.exists() {
        let old = final_dir.with_file_name(format!(
            ".old-{}-{}",
            final_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        fs::rename(final_dir, &old).map_err(|e| TrainError::io(final_dir, e))?;
        fs::rename(staging, final_dir).map_err(|e| TrainError::io(final_dir, e))?;
        let _ = fs::remove_dir_all(&old);
    } else {
        fs::rename(staging, final_dir).map_err(|e| TrainError::io(final_dir, e))?;
    }
    sync_dir(final_dir.parent().unwrap_or(Path::new(".")))
}

/// A fresh, empty staging folder beside `final_dir`.
pub fn staging_dir(final_dir: &Path) -> Result<PathBuf> {
    let parent = final_dir.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| TrainError::io(parent, e))?;
    let name = final_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(|e| TrainError::io(&staging, e))?;
    }
    fs::create_dir_all(&staging).map_err(|e| TrainError::io(&staging, e))?;
    Ok(staging)
}

/// Checks every file listed against its recorded sha256 and size.
pub fn verify_files(dir: &Path, files: &[FileSum]) -> Result<()> {
    for f in files {
        let path = dir.join(&f.name);
        if !path.exists() {
            return Err(TrainError::Checkpoint {
                path: dir.to_path_buf(),
                reason: format!("{} is missing", f.name),
            });
        }
        let (sum, bytes) = sha256_file(&path)?;
        if sum != f.sha256 || bytes != f.bytes {
            return Err(TrainError::Checkpoint {
                path: dir.to_path_buf(),
                reason: format!(
                    "{} is damaged ({} bytes, sha256 {}; state.json records {} bytes, sha256 {})",
                    f.name,
                    bytes,
                    &sum[..16],
                    f.bytes,
                    &f.sha256[..16.min(f.sha256.len())]
                ),
            });
        }
    }
    Ok(())
}

/// The newest complete checkpoint of a run, from `RUN/checkpoints/LATEST`.
pub fn latest(run: &Path) -> Result<Option<PathBuf>> {
    let latest = run.join("checkpoints").join("LATEST");
    match fs::read_to_string(&latest) {
        Ok(name) => {
            let name = name.trim();
            if name.is_empty() || name.contains('/') || name.contains("..") {
                return Err(TrainError::Checkpoint {
                    path: latest,
                    reason: format!("LATEST holds `{name}`, not a checkpoint name"),
                });
            }
            Ok(Some(run.join("checkpoints").join(name)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TrainError::io(&latest, e)),
    }
}
