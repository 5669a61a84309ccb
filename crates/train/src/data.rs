//! Pretraining data: text files to token shards ([`prepare`]), the prepared folder
//! ([`Dataset`]), resumable training batches ([`Loader`]) and fixed evaluation windows
//! ([`eval_windows`]).
//!
//! # Preparing
//!
//! [`prepare`] reads UTF-8 text files and cuts them into documents: one per file
//! ([`DocSplit::File`]) or one per run of non-blank lines ([`DocSplit::BlankLines`]; a blank line
//! holds only whitespace, and a document keeps its last line's newline). Empty documents are
//! skipped. Documents are tokenized in parallel with `encode_ordinary` semantics (a special-token
//! string in the text stays plain text; long documents are themselves encoded on several threads
//! with identical ids), and each is followed by the end-of-text token: the tokenizer's
//! `<|endoftext|>` if it has one, else its end-of-sequence id.
//!
//! The validation split is made of whole documents: the document indices are shuffled with
//! [`Rng`] seeded by `seed` and the first `ceil(val_fraction * n_docs)` (at least one, leaving at
//! least one for training) go to validation. Inside each split documents keep corpus order.
//!
//! Memory: one batch of input files (32 MiB of text, or one larger file) and its tokens are held
//! at a time, plus 16 bytes per document. The tokens go first to a temporary file in the output
//! folder, which is then split into the two shards in one sequential pass.
//!
//! # The prepared folder
//!
//! `DIR/train.bin` and `DIR/val.bin` (shards, below), `DIR/tokenizer.json` (a copy of the
//! tokenizer.json the tokenizer came from, or an export of it in that format, checked to encode
//! like the original) and `DIR/meta.json` ([`DataMeta`]: format version, tokenizer file and
//! sha256, vocab size, end-of-text id, per-split token, document and UTF-8 byte counts, the
//! inputs, seed and fraction).
//!
//! **Invariant:** a folder with `meta.json` is complete. Every file is written as `DIR/.tmp-*`,
//! fsynced and renamed into place, `meta.json` last; `force` removes the old `meta.json` before
//! the first rename.
//!
//! # Shard format, version 1
//!
//! All integers little-endian.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"KILNTOKS"` |
//! | 8 | 4 | `u32` version = 1 |
//! | 12 | 4 | `u32` bytes per token: 2 when `vocab_size <= 65536`, else 4 |
//! | 16 | 8 | `u64` n_tokens |
//! | 24 | 8 | `u64` n_docs |
//! | 32 | n_tokens x bytes per token | the token ids |
//! | ... | n_docs x 8 | `u64` token index of each document's first token |
//!
//! The file is exactly that long. Document starts are strictly increasing from 0, and every
//! document ends with the end-of-text token. [`Dataset::open`] checks all of this, and that every
//! id is below `meta.json`'s vocab size, once (a parallel scan, a few ms per 100M tokens), so
//! reads afterwards need no checks.
//!
//! # Sampling
//!
//! Training windows are `seq_len + 1` consecutive tokens anywhere in the split, inputs the first
//! `seq_len` and targets the last `seq_len`. They may cross document boundaries: the end-of-text
//! token between documents tells the model a new one starts, as in GPT-2 and nanoGPT training.
//! Window `i` of a run starts at `hash(seed, i)` reduced to the valid starts (see [`crate::rng`]),
//! so a [`Loader`]'s whole state is [`LoaderState`] `{ seed, next_window }` and restoring it
//! continues exactly, even with a different batch size.

use crate::rng::{self, Rng};
use crate::TrainError;
use kiln_tokenizer::{Rank, Tokenizer};
use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The first 8 bytes of every shard.
pub const SHARD_MAGIC: [u8; 8] = *b"KILNTOKS";
/// The shard format version this code writes and reads.
pub const SHARD_VERSION: u32 = 1;
/// Bytes before the first token id.
pub const SHARD_HEADER_LEN: usize = 32;
/// The `meta.json` format version.
pub const META_VERSION: u32 = 1;
/// The special token preferred as the separator between documents.
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// The prepared folder's index file, renamed into place last.
pub const META_FILE: &str = "meta.json";
/// The tokenizer's file name in a prepared folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Input text gathered before one parallel tokenization round.
const BATCH_BYTES: usize = 32 << 20;
/// How much of the first document is encoded again with the saved tokenizer.json as a check.
const CHECK_SAMPLE_BYTES: usize = 64 << 10;

/// How input files are cut into documents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DocSplit {
    /// Each file is one document.
    #[default]
    File,
    /// Each run of non-blank lines is one document.
    BlankLines,
}

/// How to prepare a dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct PrepareConfig {
    /// The share of documents that go to validation, strictly between 0 and 1.
    pub val_fraction: f64,
    /// Chooses the validation documents.
    pub seed: u64,
    /// How files are cut into documents.
    pub doc_split: DocSplit,
    /// Replace a dataset already in the output folder.
    pub force: bool,
    /// Tokenizer threads; `None` uses rayon's global pool. The output does not depend on it.
    pub threads: Option<usize>,
}

impl Default for PrepareConfig {
    fn default() -> Self {
        PrepareConfig {
            val_fraction: 0.1,
            seed: 0,
            doc_split: DocSplit::File,
            force: false,
            threads: None,
        }
    }
}

/// Progress of [`prepare`], reported on the calling thread after each batch of files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrepareProgress {
    /// Input bytes read and tokenized so far.
    pub bytes_done: u64,
    /// The sum of the input file sizes.
    pub bytes_total: u64,
}

/// One split's totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitMeta {
    /// Tokens in the shard, end-of-text tokens included.
    pub n_tokens: u64,
    /// Documents in the shard.
    pub n_docs: u64,
    /// UTF-8 bytes of the documents' text (separators excluded), for bits per byte.
    pub n_bytes: u64,
}

/// `meta.json`: what a prepared folder holds and how it was made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataMeta {
    /// [`META_VERSION`].
    pub format_version: u32,
    /// One more than the largest token id the tokenizer can produce.
    pub vocab_size: usize,
    /// The token after every document.
    pub eot_id: u32,
    /// Bytes per token id in the shards (2 or 4).
    pub bytes_per_token: u32,
    /// The tokenizer's file name in the folder ([`TOKENIZER_FILE`]).
    pub tokenizer_file: String,
    /// The sha256 of that file, lowercase hex.
    pub tokenizer_sha256: String,
    /// The training split.
    pub train: SplitMeta,
    /// The validation split.
    pub val: SplitMeta,
    /// The input files, in the order they were read.
    pub inputs: Vec<String>,
    /// How the files were cut into documents.
    pub doc_split: DocSplit,
    /// The seed that chose the validation documents.
    pub seed: u64,
    /// The requested validation fraction.
    pub val_fraction: f64,
}

impl DataMeta {
    /// The totals of one split.
    pub fn split(&self, split: Split) -> &SplitMeta {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }
}

/// The two splits of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

impl Split {
    /// `"train"` or `"val"`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }

    /// The shard's file name in a prepared folder.
    pub fn file_name(self) -> &'static str {
        match self {
            Split::Train => "train.bin",
            Split::Val => "val.bin",
        }
    }
}

/// 2 bytes per id when every id fits in a `u16`, else 4.
pub fn bytes_per_token(vocab_size: usize) -> u32 {
    if vocab_size <= 1 << 16 {
        2
    } else {
        4
    }
}

/// The token put after every document: `<|endoftext|>` if the tokenizer has it, else its
/// end-of-sequence id.
pub fn end_of_text_id(tok: &Tokenizer) -> Result<Rank, TrainError> {
    tok.id_of_special(END_OF_TEXT)
        .or(tok.eos_id())
        .ok_or_else(|| TrainError::NoEndOfText {
            tokenizer: tok.name().to_string(),
        })
}

// ---------------------------------------------------------------------------
// Preparing

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::io(path, source)
}

/// What pass 1 keeps per document.
struct DocInfo {
    n_tokens: u64,
    n_bytes: u64,
}

/// The documents of one file's text, as byte ranges.
fn documents(text: &str, how: DocSplit) -> Vec<Range<usize>> {
    match how {
        DocSplit::File if text.is_empty() => Vec::new(),
        DocSplit::File => std::iter::once(0..text.len()).collect(),
        DocSplit::BlankLines => {
            let mut docs = Vec::new();
            let (mut start, mut end, mut pos) = (None, 0, 0);
            for line in text.split_inclusive('\n') {
                let line_end = pos + line.len();
                if line.trim().is_empty() {
                    if let Some(s) = start.take() {
                        docs.push(s..end);
                    }
                } else {
                    start.get_or_insert(pos);
                    end = line_end;
                }
                pos = line_end;
            }
            if let Some(s) = start {
                docs.push(s..end);
            }
            docs
        }
    }
}

fn push_ids(buf: &mut Vec<u8>, ids: &[Rank], bpt: u32) {
    if bpt == 2 {
        for &id in ids {
            // `vocab_size <= 65536` here, so every id fits.
            buf.extend_from_slice(&(id as u16).to_le_bytes());
        }
    } else {
        for &id in ids {
            buf.extend_from_slice(&id.to_le_bytes());
        }
    }
}

/// A file being written as `DIR/.tmp-*`, renamed into place by [`TmpFile::persist`].
struct TmpFile {
    file: tempfile::NamedTempFile,
    out: BufWriter<File>,
}

impl TmpFile {
    fn create(dir: &Path, prefix: &str) -> Result<TmpFile, TrainError> {
        let file = tempfile::Builder::new()
            .prefix(prefix)
            .tempfile_in(dir)
            .map_err(io_err(dir))?;
        let out = file.as_file().try_clone().map_err(io_err(file.path()))?;
        Ok(TmpFile {
            out: BufWriter::with_capacity(1 << 20, out),
            file,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), TrainError> {
        self.out.write_all(bytes).map_err(io_err(self.file.path()))
    }

    /// Flushes and fsyncs; the file stays under its temporary name.
    fn finish(&mut self) -> Result<(), TrainError> {
        let path = self.file.path().to_owned();
        self.out.flush().map_err(io_err(&path))?;
        // Temporary files are created private (0600); data is not a secret.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            self.file
                .as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o644))
                .map_err(io_err(&path))?;
        }
        self.file.as_file().sync_all().map_err(io_err(&path))
    }

    fn persist(self, to: &Path) -> Result<(), TrainError> {
        drop(self.out);
        self.file.persist(to).map(drop).map_err(|e| TrainError::Io {
            path: to.to_owned(),
            source: e.error,
        })
    }
}

/// The shard header for `meta`'s totals.
fn shard_header(bpt: u32, split: &SplitMeta) -> [u8; SHARD_HEADER_LEN] {
    let mut h = [0u8; SHARD_HEADER_LEN];
    h[0..8].copy_from_slice(&SHARD_MAGIC);
    h[8..12].copy_from_slice(&SHARD_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&bpt.to_le_bytes());
    h[16..24].copy_from_slice(&split.n_tokens.to_le_bytes());
    h[24..32].copy_from_slice(&split.n_docs.to_le_bytes());
    h
}

fn thread_pool(threads: Option<usize>) -> Result<Option<rayon::ThreadPool>, TrainError> {
    let Some(n) = threads else { return Ok(None) };
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .map(Some)
        .map_err(|e| TrainError::ThreadPool {
            threads: n,
            message: e.to_string(),
        })
}

/// Tokenizes `inputs` into `out` (see the module documentation for the layout and guarantees).
///
/// `tokenizer_json` is the `tokenizer.json` that `tok` was loaded from, copied byte for byte; with
/// `None` the tokenizer is exported to that format. Either way the saved file is loaded back and
/// must give the same vocabulary size, end-of-text token and ids on a sample of the corpus.
pub fn prepare(
    tok: &Tokenizer,
    tokenizer_json: Option<&Path>,
    inputs: &[PathBuf],
    out: &Path,
    cfg: &PrepareConfig,
    progress: &dyn Fn(PrepareProgress),
) -> Result<DataMeta, TrainError> {
    // `!(a && b)` also rejects NaN.
    if !(cfg.val_fraction > 0.0 && cfg.val_fraction < 1.0) {
        return Err(TrainError::BadValFraction(cfg.val_fraction));
    }
    if inputs.is_empty() {
        return Err(TrainError::NoInputs);
    }
    let eot = end_of_text_id(tok)?;
    let vocab_size = tok.vocab_size();
    let bpt = bytes_per_token(vocab_size);
    let meta_path = out.join(META_FILE);
    if meta_path.exists() && !cfg.force {
        return Err(TrainError::AlreadyPrepared {
            dir: out.to_owned(),
        });
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let pool = thread_pool(cfg.threads)?;

    // Pass 1: every document's tokens, in corpus order, into one temporary file.
    let mut bytes_total = 0u64;
    for p in inputs {
        bytes_total += std::fs::metadata(p).map_err(io_err(p))?.len();
    }
    let mut bytes_done = 0u64;
    progress(PrepareProgress {
        bytes_done,
        bytes_total,
    });
    let mut all = TmpFile::create(out, ".tmp-tokens-")?;
    let mut docs: Vec<DocInfo> = Vec::new();
    let mut sample: Option<String> = None;
    let mut batch: Vec<(String, Vec<Range<usize>>)> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut ids_buf = Vec::new();
    for (i, path) in inputs.iter().enumerate() {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        let text = String::from_utf8(bytes).map_err(|e| TrainError::InvalidUtf8 {
            path: path.clone(),
            offset: e.utf8_error().valid_up_to() as u64,
        })?;
        let ranges = documents(&text, cfg.doc_split);
        if sample.is_none() {
            if let Some(r) = ranges.first() {
                let mut end = (r.start + CHECK_SAMPLE_BYTES).min(r.end);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                sample = Some(text[r.start..end].to_string());
            }
        }
        batch_bytes += text.len();
        batch.push((text, ranges));
        if batch_bytes < BATCH_BYTES && i + 1 < inputs.len() {
            continue;
        }
        let texts: Vec<&str> = batch
            .iter()
            .flat_map(|(t, rs)| rs.iter().map(move |r| &t[r.clone()]))
            .collect();
        let encode = || -> Vec<Vec<Rank>> {
            texts
                .par_iter()
                .map(|t| tok.encode_ordinary_parallel(t))
                .collect()
        };
        let encoded = match &pool {
            Some(p) => p.install(encode),
            None => encode(),
        };
        for (text, ids) in texts.iter().zip(&encoded) {
            ids_buf.clear();
            push_ids(&mut ids_buf, ids, bpt);
            push_ids(&mut ids_buf, &[eot], bpt);
            all.write(&ids_buf)?;
            docs.push(DocInfo {
                n_tokens: ids.len() as u64 + 1,
                n_bytes: text.len() as u64,
            });
        }
        bytes_done += batch_bytes as u64;
        progress(PrepareProgress {
            bytes_done,
            bytes_total: bytes_total.max(bytes_done),
        });
        batch.clear();
        batch_bytes = 0;
    }
    all.finish()?;

    // The split.
    let n_docs = docs.len();
    if n_docs < 2 {
        return Err(TrainError::TooFewDocuments { n_docs });
    }
    // The epsilon keeps 0.1 * 30 = 3.0000000000000004 from rounding up to 4.
    let n_val = ((cfg.val_fraction * n_docs as f64 - 1e-9).ceil() as usize).clamp(1, n_docs - 1);
    let mut order: Vec<usize> = (0..n_docs).collect();
    Rng::new(cfg.seed).shuffle(&mut order);
    let mut is_val = vec![false; n_docs];
    for &d in &order[..n_val] {
        is_val[d] = true;
    }
    let mut splits = [SplitMeta::default(); 2];
    for (d, v) in docs.iter().zip(&is_val) {
        let s = &mut splits[usize::from(*v)];
        s.n_tokens += d.n_tokens;
        s.n_docs += 1;
        s.n_bytes += d.n_bytes;
    }

    // The tokenizer file, checked against the tokenizer that made the ids.
    let tok_bytes = match tokenizer_json {
        Some(p) => std::fs::read(p).map_err(io_err(p))?,
        None => kiln_tokenizer::convert::to_hf_json(tok)?.into_bytes(),
    };
    let mut tok_file = TmpFile::create(out, ".tmp-tokenizer-")?;
    tok_file.write(&tok_bytes)?;
    tok_file.finish()?;
    check_saved_tokenizer(
        tok,
        tok_file.file.path(),
        eot,
        sample.as_deref().unwrap_or(""),
    )?;

    // Pass 2: route each document's tokens to its shard.
    let mut shards = [
        TmpFile::create(out, ".tmp-train-")?,
        TmpFile::create(out, ".tmp-val-")?,
    ];
    for (shard, split) in shards.iter_mut().zip(&splits) {
        shard.write(&shard_header(bpt, split))?;
    }
    let all_path = all.file.path().to_owned();
    let mut reader = all.file.reopen().map_err(io_err(&all_path))?;
    reader.rewind().map_err(io_err(&all_path))?;
    let mut reader = BufReader::with_capacity(1 << 20, reader);
    let mut starts: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut next_start = [0u64; 2];
    let mut buf = Vec::new();
    for (d, v) in docs.iter().zip(&is_val) {
        let s = usize::from(*v);
        starts[s].extend_from_slice(&next_start[s].to_le_bytes());
        next_start[s] += d.n_tokens;
        buf.resize(d.n_tokens as usize * bpt as usize, 0);
        reader.read_exact(&mut buf).map_err(io_err(&all_path))?;
        shards[s].write(&buf)?;
    }
    drop(all);
    for (shard, starts) in shards.iter_mut().zip(&starts) {
        shard.write(starts)?;
        shard.finish()?;
    }

    let meta = DataMeta {
        format_version: META_VERSION,
        vocab_size,
        eot_id: eot,
        bytes_per_token: bpt,
        tokenizer_file: TOKENIZER_FILE.to_string(),
        tokenizer_sha256: format!("{:x}", Sha256::digest(&tok_bytes)),
        train: splits[0],
        val: splits[1],
        inputs: inputs.iter().map(|p| p.display().to_string()).collect(),
        doc_split: cfg.doc_split,
        seed: cfg.seed,
        val_fraction: cfg.val_fraction,
    };
    let mut json = serde_json::to_vec_pretty(&meta).map_err(|e| TrainError::BadMeta {
        path: meta_path.clone(),
        message: e.to_string(),
    })?;
    json.push(b'\n');
    let mut meta_file = TmpFile::create(out, ".tmp-meta-")?;
    meta_file.write(&json)?;
    meta_file.finish()?;

    // Everything is on disk under temporary names; now the renames, meta.json last.
    if meta_path.exists() {
        std::fs::remove_file(&meta_path).map_err(io_err(&meta_path))?;
        sync_dir(out);
    }
    let [train, val] = shards;
    train.persist(&out.join(Split::Train.file_name()))?;
    val.persist(&out.join(Split::Val.file_name()))?;
    tok_file.persist(&out.join(TOKENIZER_FILE))?;
    sync_dir(out);
    meta_file.persist(&meta_path)?;
    sync_dir(out);
    Ok(meta)
}

/// Makes renames in `dir` durable. Opening a folder fails on some platforms, where the rename is
/// the best we can do.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Loads the tokenizer.json about to be saved and checks it against the tokenizer in use.
fn check_saved_tokenizer(
    tok: &Tokenizer,
    saved: &Path,
    eot: Rank,
    sample: &str,
) -> Result<(), TrainError> {
    let mismatch = |message: String| Err(TrainError::TokenizerExport { message });
    let back = Tokenizer::from_hf_json(saved)?;
    if back.vocab_size() != tok.vocab_size() {
        return mismatch(format!(
            "it has {} ids where the tokenizer has {}",
            back.vocab_size(),
            tok.vocab_size()
        ));
    }
    if back.token_bytes(eot) != tok.token_bytes(eot) {
        return mismatch(format!("the end-of-text token {eot} differs"));
    }
    if back.encode_ordinary(sample) != tok.encode_ordinary(sample) {
        return mismatch("it encodes the start of the first document differently".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Reading

/// One memory-mapped, checked shard.
struct Shard {
    map: Mmap,
    wide: bool,
    n_tokens: usize,
    n_docs: usize,
}

impl Shard {
    fn open(path: &Path, meta: &DataMeta, expected: &SplitMeta) -> Result<Shard, TrainError> {
        let bad = |message: String| TrainError::BadShard {
            path: path.to_owned(),
            message,
        };
        let file = File::open(path).map_err(io_err(path))?;
        let len = file.metadata().map_err(io_err(path))?.len();
        if len < SHARD_HEADER_LEN as u64 {
            return Err(bad(format!(
                "truncated: {len} bytes, shorter than the {SHARD_HEADER_LEN}-byte header"
            )));
        }
        // SAFETY: the map is read-only and shards are never modified in place: `prepare` writes
        // new files and renames them over old ones, which leaves this mapping on the old inode.
        // Another program truncating the file while it is open would make reads fault; that is
        // the usual contract of memory-mapped data and not something kiln does.
        let map = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
        let u32_at = |o: usize| u32::from_le_bytes([map[o], map[o + 1], map[o + 2], map[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&map[o..o + 8]);
            u64::from_le_bytes(b)
        };
        if map[0..8] != SHARD_MAGIC {
            return Err(bad(format!(
                "not a kiln token shard (the first bytes are {:?}, not \"KILNTOKS\")",
                String::from_utf8_lossy(&map[0..8])
            )));
        }
        let version = u32_at(8);
        if version != SHARD_VERSION {
            return Err(bad(format!(
                "shard format version {version}, but this kiln reads version {SHARD_VERSION}"
            )));
        }
        let bpt = u32_at(12);
        if bpt != meta.bytes_per_token {
            return Err(bad(format!(
                "{bpt} bytes per token, but meta.json says {}",
                meta.bytes_per_token
            )));
        }
        let (n_tokens, n_docs) = (u64_at(16), u64_at(24));
        if n_tokens != expected.n_tokens || n_docs != expected.n_docs {
            return Err(bad(format!(
                "the header says {n_tokens} tokens in {n_docs} documents, but meta.json says {} in {}",
                expected.n_tokens, expected.n_docs
            )));
        }
        let want = n_tokens
            .checked_mul(u64::from(bpt))
            .and_then(|t| t.checked_add(n_docs.checked_mul(8)?))
            .and_then(|b| b.checked_add(SHARD_HEADER_LEN as u64));
        match want {
            Some(w) if w == len => {}
            Some(w) if w > len => {
                return Err(bad(format!(
                    "truncated: {n_tokens} tokens and {n_docs} documents need {w} bytes, the file has {len}"
                )))
            }
            Some(w) => {
                return Err(bad(format!(
                    "corrupt: {n_tokens} tokens and {n_docs} documents need {w} bytes, the file has {} more",
                    len - w
                )))
            }
            None => return Err(bad("corrupt: the header's sizes overflow".into())),
        }
        let shard = Shard {
            wide: bpt == 4,
            // Both fit in usize: the file with all of them is mapped in memory.
            n_tokens: n_tokens as usize,
            n_docs: n_docs as usize,
            map,
        };
        let view = shard.view();
        shard.check(path, &view, meta)?;
        Ok(shard)
    }

    fn view(&self) -> TokenView<'_> {
        let bpt = if self.wide { 4 } else { 2 };
        let tokens_end = SHARD_HEADER_LEN + self.n_tokens * bpt;
        TokenView {
            tokens: &self.map[SHARD_HEADER_LEN..tokens_end],
            starts: &self.map[tokens_end..tokens_end + self.n_docs * 8],
            wide: self.wide,
        }
    }

    /// Document starts, separators and the id range: the checks that make reads safe to trust.
    fn check(&self, path: &Path, view: &TokenView<'_>, meta: &DataMeta) -> Result<(), TrainError> {
        let bad = |message: String| TrainError::BadShard {
            path: path.to_owned(),
            message,
        };
        if (self.n_tokens == 0) != (self.n_docs == 0) {
            return Err(bad(format!(
                "corrupt: {} tokens but {} documents",
                self.n_tokens, self.n_docs
            )));
        }
        let mut prev = None;
        for d in 0..self.n_docs {
            let s = view.doc_start(d);
            let ok = match prev {
                None => s == 0,
                Some(p) => s > p && s < self.n_tokens as u64,
            };
            if !ok {
                return Err(bad(format!(
                    "corrupt: document {d} starts at token {s} (after {prev:?}, of {} tokens)",
                    self.n_tokens
                )));
            }
            // The token before each later document start is its predecessor's separator.
            if s > 0 && view.get(s as usize - 1) != meta.eot_id {
                return Err(bad(format!(
                    "corrupt: document {} does not end with the end-of-text token {}",
                    d - 1,
                    meta.eot_id
                )));
            }
            prev = Some(s);
        }
        if self.n_tokens > 0 && view.get(self.n_tokens - 1) != meta.eot_id {
            return Err(bad(format!(
                "corrupt: the last document does not end with the end-of-text token {}",
                meta.eot_id
            )));
        }
        const CHUNK: usize = 1 << 20;
        let vocab = meta.vocab_size;
        let first_bad = (0..self.n_tokens.div_ceil(CHUNK))
            .into_par_iter()
            .find_map_first(|c| {
                (c * CHUNK..((c + 1) * CHUNK).min(self.n_tokens))
                    .find(|&i| view.get(i) as usize >= vocab)
            });
        if let Some(i) = first_bad {
            return Err(TrainError::TokenOutOfRange {
                path: path.to_owned(),
                index: i as u64,
                id: view.get(i),
                vocab_size: vocab,
            });
        }
        Ok(())
    }
}

/// A prepared folder: its `meta.json` and its two shards, memory-mapped and checked.
pub struct Dataset {
    dir: PathBuf,
    meta: DataMeta,
    train: Shard,
    val: Shard,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("dir", &self.dir)
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

impl Dataset {
    /// Opens a folder written by [`prepare`], checking `meta.json`, the tokenizer's sha256 and
    /// both shards (see the module documentation).
    pub fn open(dir: &Path) -> Result<Dataset, TrainError> {
        let meta_path = dir.join(META_FILE);
        let bad = |message: String| TrainError::BadMeta {
            path: meta_path.clone(),
            message,
        };
        let text = match std::fs::read(&meta_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(TrainError::NotADataset {
                    dir: dir.to_owned(),
                })
            }
            Err(e) => return Err(io_err(&meta_path)(e)),
        };
        let meta: DataMeta = serde_json::from_slice(&text)
            .map_err(|e| bad(format!("not a valid meta.json: {e}")))?;
        if meta.format_version != META_VERSION {
            return Err(bad(format!(
                "format version {}, but this kiln reads version {META_VERSION}",
                meta.format_version
            )));
        }
        if meta.bytes_per_token != bytes_per_token(meta.vocab_size) {
            return Err(bad(format!(
                "bytes_per_token {} does not fit vocab_size {}",
                meta.bytes_per_token, meta.vocab_size
            )));
        }
        if meta.eot_id as usize >= meta.vocab_size {
            return Err(bad(format!(
                "eot_id {} is outside the vocabulary of {}",
                meta.eot_id, meta.vocab_size
            )));
        }
        if Path::new(&meta.tokenizer_file).file_name() != Some(meta.tokenizer_file.as_ref()) {
            return Err(bad(format!(
                "tokenizer_file {:?} is not a file name in the folder",
                meta.tokenizer_file
            )));
        }
        let tok_path = dir.join(&meta.tokenizer_file);
        let tok_bytes = std::fs::read(&tok_path).map_err(io_err(&tok_path))?;
        let found = format!("{:x}", Sha256::digest(&tok_bytes));
        if found != meta.tokenizer_sha256 {
            return Err(TrainError::TokenizerChanged {
                path: tok_path,
                expected: meta.tokenizer_sha256.clone(),
                found,
            });
        }
        let train = Shard::open(&dir.join(Split::Train.file_name()), &meta, &meta.train)?;
        let val = Shard::open(&dir.join(Split::Val.file_name()), &meta, &meta.val)?;
        Ok(Dataset {
            dir: dir.to_owned(),
            meta,
            train,
            val,
        })
    }

    /// The folder's `meta.json`.
    pub fn meta(&self) -> &DataMeta {
        &self.meta
    }

    /// The folder it was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `DIR/tokenizer.json`, the tokenizer the ids belong to (its sha256 was checked at open).
    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join(&self.meta.tokenizer_file)
    }

    /// The tokens of one split.
    pub fn tokens(&self, split: Split) -> TokenView<'_> {
        match split {
            Split::Train => self.train.view(),
            Split::Val => self.val.view(),
        }
    }
}

/// A split's token ids, read straight from the mapped shard. Indexing past the end panics, like
/// a slice: the ids were range-checked at open, positions are the caller's.
#[derive(Clone, Copy, Debug)]
pub struct TokenView<'a> {
    tokens: &'a [u8],
    starts: &'a [u8],
    wide: bool,
}

impl TokenView<'_> {
    /// The number of tokens.
    pub fn len(&self) -> usize {
        self.tokens.len() >> if self.wide { 2 } else { 1 }
    }

    /// True when the split has no tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Token `i`.
    #[inline]
    pub fn get(&self, i: usize) -> u32 {
        if self.wide {
            let b = &self.tokens[4 * i..4 * i + 4];
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        } else {
            let b = &self.tokens[2 * i..2 * i + 2];
            u32::from(u16::from_le_bytes([b[0], b[1]]))
        }
    }

    /// Copies tokens `start..start + out.len()` into `out`.
    pub fn copy_range(&self, start: usize, out: &mut [u32]) {
        if self.wide {
            let src = &self.tokens[4 * start..4 * (start + out.len())];
            for (o, b) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        } else {
            let src = &self.tokens[2 * start..2 * (start + out.len())];
            for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = u32::from(u16::from_le_bytes([b[0], b[1]]));
            }
        }
    }

    /// All tokens as a vector (for small splits and tests).
    pub fn to_vec(&self) -> Vec<u32> {
        let mut v = vec![0; self.len()];
        self.copy_range(0, &mut v);
        v
    }

    /// The number of documents.
    pub fn n_docs(&self) -> usize {
        self.starts.len() / 8
    }

    /// The token index of document `d`'s first token.
    pub fn doc_start(&self, d: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.starts[8 * d..8 * d + 8]);
        u64::from_le_bytes(b)
    }
}

// ---------------------------------------------------------------------------
// Sampling

/// Samples training windows reproducibly: window i of the run starts at an offset drawn from a
/// counter-based RNG keyed by (seed, i), so the loader's whole state is one counter and resuming
/// is exact.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoaderState {
    /// The run's seed.
    pub seed: u64,
    /// The index of the next window to draw (batches so far times the batch size).
    pub next_window: u64,
}

/// Random training batches from one split (see the module documentation).
#[derive(Clone, Debug)]
pub struct Loader<'a> {
    tokens: TokenView<'a>,
    seq_len: usize,
    batch: usize,
    seed: u64,
    next_window: u64,
    /// Valid window starts: `0..n_tokens - seq_len`.
    n_starts: u64,
}

impl<'a> Loader<'a> {
    /// A loader at the start of a run. Errors if the split has fewer than `seq_len + 1` tokens.
    pub fn new(
        ds: &'a Dataset,
        split: Split,
        seq_len: usize,
        batch: usize,
        seed: u64,
    ) -> Result<Self, TrainError> {
        Self::restore(
            ds,
            split,
            seq_len,
            batch,
            LoaderState {
                seed,
                next_window: 0,
            },
        )
    }

    /// A loader that continues from a saved [`Loader::state`]. The batch size may differ from the
    /// saved run's: windows are numbered, not batches.
    pub fn restore(
        ds: &'a Dataset,
        split: Split,
        seq_len: usize,
        batch: usize,
        state: LoaderState,
    ) -> Result<Self, TrainError> {
        if seq_len == 0 || batch == 0 {
            return Err(TrainError::BadLoaderShape { seq_len, batch });
        }
        let tokens = ds.tokens(split);
        if tokens.len() <= seq_len {
            return Err(TrainError::SplitTooShort {
                split: split.name(),
                n_tokens: tokens.len() as u64,
                seq_len,
            });
        }
        Ok(Loader {
            n_starts: (tokens.len() - seq_len) as u64,
            tokens,
            seq_len,
            batch,
            seed: state.seed,
            next_window: state.next_window,
        })
    }

    /// Everything needed to resume: save it with the checkpoint.
    pub fn state(&self) -> LoaderState {
        LoaderState {
            seed: self.seed,
            next_window: self.next_window,
        }
    }

    /// The first token of window `i` of this run.
    pub fn window_start(&self, i: u64) -> usize {
        rng::below(rng::hash(self.seed, i), self.n_starts) as usize
    }

    /// inputs and targets, each batch*seq_len ids row-major (target = next token).
    pub fn next_batch(&mut self) -> (Vec<u32>, Vec<u32>) {
        let t = self.seq_len;
        let mut inputs = vec![0; self.batch * t];
        let mut targets = vec![0; self.batch * t];
        for (x, y) in inputs.chunks_exact_mut(t).zip(targets.chunks_exact_mut(t)) {
            let start = self.window_start(self.next_window);
            self.tokens.copy_range(start, x);
            self.tokens.copy_range(start + 1, y);
            self.next_window += 1;
        }
        (inputs, targets)
    }
}

/// Deterministic evaluation windows: the split cut into consecutive non-overlapping windows of seq_len+1
/// tokens (stride seq_len), at most `max_windows` of them spread evenly over the split; same every call.
///
/// Window `w` covers tokens `w * seq_len ..= (w + 1) * seq_len`; with `n` windows available and
/// `k = min(n, max_windows)` wanted, window `j * n / k` is taken for `j` in `0..k`. Empty when
/// the split is shorter than one window or `seq_len` or `max_windows` is 0.
pub fn eval_windows(
    ds: &Dataset,
    split: Split,
    seq_len: usize,
    max_windows: usize,
) -> Vec<(Vec<u32>, Vec<u32>)> {
    let tokens = ds.tokens(split);
    if seq_len == 0 || tokens.is_empty() {
        return Vec::new();
    }
    let n = (tokens.len() - 1) / seq_len;
    let k = n.min(max_windows);
    (0..k)
        .map(|j| {
            let start = (j as u128 * n as u128 / k as u128) as usize * seq_len;
            let mut x = vec![0; seq_len];
            let mut y = vec![0; seq_len];
            tokens.copy_range(start, &mut x);
            tokens.copy_range(start + 1, &mut y);
            (x, y)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs_of(text: &str, how: DocSplit) -> Vec<&str> {
        documents(text, how).into_iter().map(|r| &text[r]).collect()
    }

    #[test]
    fn blank_lines_cut_documents() {
        let text = "\n\na b\nc\n \t\n\nd\r\n\r\ne";
        assert_eq!(
            docs_of(text, DocSplit::BlankLines),
            ["a b\nc\n", "d\r\n", "e"]
        );
        assert_eq!(docs_of(text, DocSplit::File), [text]);
        assert!(docs_of("", DocSplit::File).is_empty());
        assert!(docs_of(" \n\n", DocSplit::BlankLines).is_empty());
    }

    #[test]
    fn header_layout() {
        let h = shard_header(
            2,
            &SplitMeta {
                n_tokens: 0x0102,
                n_docs: 3,
                n_bytes: 9,
            },
        );
        assert_eq!(&h[..8], b"KILNTOKS");
        assert_eq!(h[8..16], [1, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(h[16..24], [2, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(h[24..32], [3, 0, 0, 0, 0, 0, 0, 0]);
    }
}
