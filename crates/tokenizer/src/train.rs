//! Byte-level BPE training.
//!
//! # Algorithm
//!
//! Training runs in two phases.
//!
//! 1. **Counting.** The input is read in blocks, cut only at "safe" line breaks (a
//!    `\n` with a printable ASCII byte on both sides, where none of the GPT-2,
//!    cl100k, o200k or Llama-3 split patterns can join text across the break), and
//!    validated as UTF-8. Special-token strings are cut out of the text first so
//!    that no piece (and therefore no merge) ever spans one. The text is then cut
//!    into ~1 MiB chunks at the same kind of safe break and the chunks are
//!    pre-tokenized and counted in parallel with rayon, each worker filling its own
//!    hash map of distinct pieces, and the maps are summed. Chunk boundaries depend
//!    only on the bytes, never on the thread count, and the merged counts are sums,
//!    so the result is identical for any number of threads.
//! 2. **Merging.** Each distinct piece becomes a word of byte symbols with its
//!    count. One pass counts every adjacent pair and records, per pair, the list of
//!    words that contain it. A max-heap keyed on `(count, smallest pair first)`
//!    picks the next merge with lazy invalidation: counts of existing pairs only ever
//!    go down during training (a merge only creates pairs that contain the new
//!    token), so a popped entry whose stored count is stale is simply re-pushed with
//!    the current count, and the first entry whose stored count is current is the
//!    true maximum under the tie rule. Applying a merge touches only the words in
//!    that pair's list, updating the neighbouring pair counts in place; nothing is
//!    ever recounted.
//!
//! Ties between equal counts go to the lexicographically smallest `(left, right)`
//! token-id pair, so the output is fully deterministic.
//!
//! A pair whose concatenated bytes already exist as a token (for example `a`+`bc`
//! after `ab`+`c` produced `abc`) is never merged: merging it would either
//! duplicate a byte string in the vocabulary (which tiktoken files and
//! `tokenizer.json` vocab maps cannot represent) or make the token id of a merge
//! differ from `256 + rank`. Such a pair stays split in the words. The check is
//! defensive: no corpus tried (Shakespeare, the test corpora, a random search over
//! two- and three-letter alphabets) ever produced one, since left-to-right merging
//! makes it very hard for two different splits of the same bytes to both appear.
//!
//! # What was measured or rejected
//!
//! * Recounting all pairs per merge (what the reference trainer in
//!   `tests/train.rs` does) is quadratic in practice; it is kept only as the test
//!   oracle.
//! * Parallelising the merge loop itself (as Hugging Face `tokenizers` does) was
//!   not worth it: after counting, a merge touches few words and the work is
//!   dominated by hash-map updates that would need locking or a merge step.
//!   Counting (regex splitting) dominates the run time, and that is parallel.
//! * Measured (2-core shared machine, release, `examples/train_bench.rs` vs
//!   `bench/train_hf.py` with `tokenizers` 0.23.3, same split regex, min_frequency
//!   2): Shakespeare (5 MB, 42 files), vocab 4096: kiln 0.07 s vs Hugging Face
//!   1.58 s (1 thread) / 0.95 s (2 threads); vocab 16384: kiln 0.09-0.12 s vs
//!   1.92 s / 1.15 s. Shakespeare x8 (40 MB, one file), vocab 32768: 0.27 s vs
//!   5.8 s. Counting is ~0.04 s of the 5 MB runs, thanks to the hand-written
//!   cl100k splitter in `pretok.rs`.
//! * Per-pair word *sets* (`HashSet`) were replaced by append-only lists with a
//!   per-word "last merge seen" stamp to skip duplicates and stale entries, which is
//!   cheaper to build and to iterate.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::Read;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use rustc_hash::{FxHashMap, FxHashSet};

pub use crate::error::TokenizerError;
use crate::pretok::PreTokenizer;

/// The cl100k_base (GPT-4) split pattern, copied from tiktoken's `openai_public.py`.
/// The same string as [`crate::pretok::CL100K_PATTERN`], so the hand-written
/// splitter is used for it.
pub const GPT4_PATTERN: &str = crate::pretok::CL100K_PATTERN;

/// Bytes of input read per block when streaming a file; a block is cut at the last
/// safe line break so that pre-tokenization never sees a cut it would not make.
const READ_BLOCK: usize = 64 << 20;
/// Text accumulated before a parallel counting round (and a progress report).
const BATCH_BYTES: usize = 64 << 20;
/// Target size of one unit of parallel work during counting.
const CHUNK_BYTES: usize = 1 << 20;

/// Shorthand for results of this module.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// How to train.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainerConfig {
    /// Target vocabulary size including the 256 byte tokens and the special tokens.
    /// It is an upper bound: a corpus too small to supply enough merges yields a
    /// smaller vocabulary (see [`TrainedBpe::stopped_early`]).
    pub vocab_size: u32,
    /// Split (pre-tokenization) regex; pieces are never merged across.
    pub pattern: String,
    /// Special tokens, appended after the merges with the next ids. Their strings
    /// are cut out of the training text, so no merge learns from or across them.
    pub special_tokens: Vec<String>,
    /// A pair must occur at least this many times to be merged. The default is 2:
    /// a pair seen once only memorises one word, which wastes vocabulary slots and
    /// makes the result depend on noise; training stops early instead.
    pub min_frequency: u64,
    /// Worker threads for counting; `None` uses rayon's global pool. The result does
    /// not depend on this.
    pub threads: Option<usize>,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            vocab_size: 32_768,
            pattern: GPT4_PATTERN.to_owned(),
            special_tokens: Vec::new(),
            min_frequency: 2,
            threads: None,
        }
    }
}

/// Progress reports, for drawing a progress bar. Always delivered on the calling
/// thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainProgress {
    /// Reading and pre-tokenizing input; `bytes_total` is the sum of the input file
    /// sizes when training from files.
    Counting { bytes_done: u64, bytes_total: u64 },
    /// Counting finished.
    Counted {
        unique_pieces: usize,
        total_pieces: u64,
    },
    /// Merge loop progress; `merges_target` is the number of merges the vocabulary
    /// size asks for.
    Merging {
        merges_done: usize,
        merges_target: usize,
    },
    /// Training finished.
    Finished { merges: usize, stopped_early: bool },
}

/// A trained byte-level BPE vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainedBpe {
    /// The split regex the vocabulary was trained with.
    pub pattern: String,
    /// Merges in rank order; merge `i` produces token id `256 + i`.
    pub merges: Vec<(u32, u32)>,
    /// Token id -> bytes: the 256 single bytes (id = byte value), then one token per
    /// merge. Special tokens are not in here.
    pub vocab: Vec<Vec<u8>>,
    /// Special tokens and their ids, which follow the last merge.
    pub special_tokens: Vec<(String, u32)>,
    /// True when the corpus ran out of pairs (or of pairs reaching `min_frequency`)
    /// before the requested vocabulary size was reached.
    pub stopped_early: bool,
}

impl TrainedBpe {
    /// Total number of ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len() + self.special_tokens.len()
    }

    /// Encodes text without special-token handling by splitting with the pattern and
    /// applying the merges in rank order. This is a simple, obviously-correct
    /// encoder for checking exports and training results, not a fast one.
    pub fn encode_ordinary(&self, text: &str) -> Result<Vec<u32>> {
        let splitter = make_splitter(&self.pattern)?;
        let ranks: FxHashMap<u64, u32> = self
            .merges
            .iter()
            .enumerate()
            .map(|(i, &(a, b))| (pair_key(a, b), i as u32))
            .collect();
        let mut out = Vec::new();
        splitter.for_each_piece(text, &mut |piece| {
            let mut syms: Vec<u32> = piece.bytes().map(u32::from).collect();
            apply_merges(&mut syms, &ranks);
            out.extend_from_slice(&syms);
        })?;
        Ok(out)
    }
}

/// Applies ranked merges to one piece: repeatedly merges the leftmost occurrence of
/// the lowest-ranked adjacent pair.
fn apply_merges(syms: &mut Vec<u32>, ranks: &FxHashMap<u64, u32>) {
    loop {
        let mut best: Option<(u32, usize)> = None;
        for i in 0..syms.len().saturating_sub(1) {
            if let Some(&r) = ranks.get(&pair_key(syms[i], syms[i + 1])) {
                if best.is_none_or(|(br, _)| r < br) {
                    best = Some((r, i));
                }
            }
        }
        let Some((rank, i)) = best else { return };
        syms[i] = 256 + rank;
        syms.remove(i + 1);
    }
}

// ---------------------------------------------------------------------------
// Pre-tokenization

/// Splits text into pieces. A trait so that the regex engine can be swapped for a
/// hand-written splitter without touching the trainer.
pub(crate) trait PieceSplitter: Sync {
    /// Calls `f` with every piece of `text`, in order.
    fn for_each_piece<'a>(&self, text: &'a str, f: &mut dyn FnMut(&'a str)) -> Result<()>;
}

impl PieceSplitter for PreTokenizer {
    fn for_each_piece<'a>(&self, text: &'a str, f: &mut dyn FnMut(&'a str)) -> Result<()> {
        PreTokenizer::for_each_piece(self, text, &mut |p: &'a str| f(p));
        Ok(())
    }
}

/// The splitter for a pattern: the crate's pre-tokenizer, which runs hand-written
/// state machines for the well-known patterns (cl100k among them) and fancy-regex
/// for anything else, keeping unmatched gaps as pieces like Hugging Face's
/// `Split` with `Isolated` behaviour.
pub(crate) fn make_splitter(pattern: &str) -> Result<Box<dyn PieceSplitter>> {
    let pretok = PreTokenizer::new(&[pattern]).map_err(|e| TokenizerError::BadRegex {
        pattern: pattern.to_owned(),
        message: e.to_string(),
    })?;
    Ok(Box::new(pretok))
}

// ---------------------------------------------------------------------------
// Counting

/// A byte that can sit next to a chunk boundary: printable, non-space ASCII.
fn is_graphic(b: u8) -> bool {
    (0x21..=0x7e).contains(&b)
}

/// True when `text` may be cut at `i` without changing how any standard split
/// pattern splits it: `text[i-1]` is a newline between two printable ASCII bytes.
fn is_safe_cut(text: &[u8], i: usize) -> bool {
    i >= 2
        && i < text.len()
        && text[i - 1] == b'\n'
        && is_graphic(text[i - 2])
        && is_graphic(text[i])
}

/// First safe cut at or after `from`, if any.
fn next_safe_cut(text: &[u8], from: usize) -> Option<usize> {
    let mut pos = from.max(1) - 1;
    while let Some(off) = memchr::memchr(b'\n', &text[pos..]) {
        let i = pos + off + 1;
        if is_safe_cut(text, i) {
            return Some(i);
        }
        pos = i;
    }
    None
}

/// Last safe cut in `text`, if any.
fn last_safe_cut(text: &[u8]) -> Option<usize> {
    let mut end = text.len();
    while let Some(nl) = memchr::memrchr(b'\n', &text[..end]) {
        if is_safe_cut(text, nl + 1) {
            return Some(nl + 1);
        }
        end = nl;
    }
    None
}

/// Cuts `text` around occurrences of the special tokens (leftmost, longest first).
fn split_specials<'a>(text: &'a str, specials: &[String], out: &mut Vec<&'a str>) {
    if specials.is_empty() {
        out.push(text);
        return;
    }
    let finders: Vec<memchr::memmem::Finder<'_>> = specials
        .iter()
        .map(|s| memchr::memmem::Finder::new(s.as_bytes()))
        .collect();
    let bytes = text.as_bytes();
    let mut start = 0;
    loop {
        let mut best: Option<(usize, usize)> = None;
        for f in &finders {
            if let Some(p) = f.find(&bytes[start..]) {
                let len = f.needle().len();
                if best.is_none_or(|(bp, bl)| p < bp || (p == bp && len > bl)) {
                    best = Some((p, len));
                }
            }
        }
        match best {
            // Special strings are valid UTF-8 and so are the surrounding slices.
            Some((p, len)) => {
                if p > 0 {
                    out.push(&text[start..start + p]);
                }
                start += p + len;
            }
            None => {
                if start < text.len() {
                    out.push(&text[start..]);
                }
                return;
            }
        }
    }
}

/// Cuts text into ~`CHUNK_BYTES` chunks at safe cuts.
fn chunk_text<'a>(text: &'a str, out: &mut Vec<&'a str>) {
    let bytes = text.as_bytes();
    let mut start = 0;
    while start < bytes.len() {
        let end = if bytes.len() - start <= CHUNK_BYTES {
            bytes.len()
        } else {
            next_safe_cut(bytes, start + CHUNK_BYTES).unwrap_or(bytes.len())
        };
        // Safe cuts sit right after an ASCII newline, so they are char boundaries.
        out.push(&text[start..end]);
        start = end;
    }
}

/// Distinct pieces and their counts, accumulated over the whole corpus.
struct PieceCounts {
    map: FxHashMap<Box<str>, u64>,
    total: u64,
}

impl PieceCounts {
    fn new() -> Self {
        Self {
            map: FxHashMap::default(),
            total: 0,
        }
    }

    /// Pre-tokenizes and counts a batch of texts in parallel.
    fn add_batch(
        &mut self,
        texts: &[String],
        specials: &[String],
        splitter: &dyn PieceSplitter,
    ) -> Result<()> {
        let mut segments = Vec::new();
        for t in texts {
            split_specials(t, specials, &mut segments);
        }
        let mut chunks = Vec::new();
        for s in segments {
            chunk_text(s, &mut chunks);
        }
        let batch: FxHashMap<&str, u64> = chunks
            .par_iter()
            .try_fold(FxHashMap::default, |mut m: FxHashMap<&str, u64>, chunk| {
                splitter.for_each_piece(chunk, &mut |p| *m.entry(p).or_insert(0) += 1)?;
                Ok(m)
            })
            .try_reduce(FxHashMap::default, |a, b| {
                let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
                for (k, v) in small {
                    *big.entry(k).or_insert(0) += v;
                }
                Ok(big)
            })?;
        self.map.reserve(batch.len());
        for (k, v) in batch {
            self.total += v;
            match self.map.get_mut(k) {
                Some(c) => *c += v,
                None => {
                    self.map.insert(k.into(), v);
                }
            }
        }
        Ok(())
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TokenizerError + '_ {
    move |source| TokenizerError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Streams one file into `pending`, cut at safe line breaks and validated as UTF-8,
/// flushing full batches through `flush`.
fn read_file_into(
    path: &Path,
    block: usize,
    pending: &mut Vec<String>,
    pending_bytes: &mut usize,
    flush: &mut dyn FnMut(&mut Vec<String>, &mut usize) -> Result<()>,
) -> Result<()> {
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut buf: Vec<u8> = Vec::new();
    // File offset of buf[0], for error messages.
    let mut base: u64 = 0;
    loop {
        let want = block as u64;
        let n = (&mut file)
            .take(want)
            .read_to_end(&mut buf)
            .map_err(io_err(path))?;
        let eof = (n as u64) < want;
        let cut = if eof {
            buf.len()
        } else {
            match last_safe_cut(&buf) {
                Some(c) => c,
                // One enormous line: keep reading until a safe cut or the end.
                None => continue,
            }
        };
        let rest = buf.split_off(cut);
        let text = String::from_utf8(std::mem::replace(&mut buf, rest)).map_err(|e| {
            TokenizerError::InvalidUtf8File {
                path: path.to_owned(),
                offset: base + e.utf8_error().valid_up_to() as u64,
            }
        })?;
        base += cut as u64;
        *pending_bytes += text.len();
        pending.push(text);
        if *pending_bytes >= BATCH_BYTES {
            flush(pending, pending_bytes)?;
        }
        if eof {
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------
// Public entry points

/// Checks the configuration and returns the number of merges it asks for.
fn check_config(cfg: &TrainerConfig) -> Result<usize> {
    let minimum = 256 + cfg.special_tokens.len() as u64;
    if u64::from(cfg.vocab_size) < minimum {
        return Err(TokenizerError::VocabTooSmall {
            vocab_size: cfg.vocab_size,
            specials: cfg.special_tokens.len(),
            minimum,
        });
    }
    let mut seen = FxHashSet::default();
    for s in &cfg.special_tokens {
        if s.is_empty() {
            return Err(TokenizerError::BadSpecialTokens(
                "a special token is the empty string".into(),
            ));
        }
        if !seen.insert(s.as_str()) {
            return Err(TokenizerError::BadSpecialTokens(format!(
                "{s:?} is listed twice"
            )));
        }
    }
    Ok((u64::from(cfg.vocab_size) - minimum) as usize)
}

/// The thread pool for the configured thread count; `None` means rayon's global
/// pool. Built once per training run, not per counting round.
fn make_pool(cfg: &TrainerConfig) -> Result<Option<rayon::ThreadPool>> {
    let Some(threads) = cfg.threads else {
        return Ok(None);
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map(Some)
        .map_err(|e| TokenizerError::ThreadPool {
            threads,
            message: e.to_string(),
        })
}

/// Runs `f` on `pool`, or on rayon's global pool.
fn with_pool<T: Send>(
    pool: &Option<rayon::ThreadPool>,
    f: impl FnOnce() -> Result<T> + Send,
) -> Result<T> {
    match pool {
        None => f(),
        Some(pool) => pool.install(f),
    }
}

/// Trains on UTF-8 text files. `progress` is called on this thread.
pub fn train_from_files(
    paths: &[PathBuf],
    cfg: &TrainerConfig,
    progress: &dyn Fn(TrainProgress),
) -> Result<TrainedBpe> {
    let n_merges = check_config(cfg)?;
    let splitter = make_splitter(&cfg.pattern)?;
    let pool = make_pool(cfg)?;
    let mut bytes_total = 0u64;
    for p in paths {
        bytes_total += std::fs::metadata(p).map_err(io_err(p))?.len();
    }
    progress(TrainProgress::Counting {
        bytes_done: 0,
        bytes_total,
    });
    // The progress callback is not Sync, so everything that reports runs here and
    // only the counting rounds run on the pool.
    let mut counts = PieceCounts::new();
    let mut bytes_done = 0u64;
    let mut pending = Vec::new();
    let mut pending_bytes = 0usize;
    let mut flush = |pending: &mut Vec<String>, pending_bytes: &mut usize| -> Result<()> {
        with_pool(&pool, || {
            counts.add_batch(pending, &cfg.special_tokens, &*splitter)
        })?;
        bytes_done += *pending_bytes as u64;
        pending.clear();
        *pending_bytes = 0;
        progress(TrainProgress::Counting {
            bytes_done,
            bytes_total: bytes_total.max(bytes_done),
        });
        Ok(())
    };
    for p in paths {
        read_file_into(p, READ_BLOCK, &mut pending, &mut pending_bytes, &mut flush)?;
    }
    flush(&mut pending, &mut pending_bytes)?;
    finish_training(counts, cfg, n_merges, progress)
}

/// Trains on in-memory texts; each text is pre-tokenized on its own.
pub fn train_from_texts(texts: &[&str], cfg: &TrainerConfig) -> Result<TrainedBpe> {
    let n_merges = check_config(cfg)?;
    let splitter = make_splitter(&cfg.pattern)?;
    let owned: Vec<String> = texts.iter().map(|t| (*t).to_owned()).collect();
    let mut counts = PieceCounts::new();
    let pool = make_pool(cfg)?;
    with_pool(&pool, || {
        counts.add_batch(&owned, &cfg.special_tokens, &*splitter)
    })?;
    finish_training(counts, cfg, n_merges, &|_| {})
}

/// Trains on already-counted pieces (each piece is pre-tokenized text as bytes).
/// Useful when the counts come from elsewhere, and for testing the merge loop.
pub fn train_from_counts(pieces: &[(&[u8], u64)], cfg: &TrainerConfig) -> Result<TrainedBpe> {
    let n_merges = check_config(cfg)?;
    let words: Vec<(Vec<u32>, u64)> = pieces
        .iter()
        .filter(|(_, c)| *c > 0)
        .map(|(p, c)| (p.iter().map(|&b| u32::from(b)).collect(), *c))
        .collect();
    Ok(run_training(words, cfg, n_merges, &|_| {}))
}

fn finish_training(
    counts: PieceCounts,
    cfg: &TrainerConfig,
    n_merges: usize,
    progress: &dyn Fn(TrainProgress),
) -> Result<TrainedBpe> {
    progress(TrainProgress::Counted {
        unique_pieces: counts.map.len(),
        total_pieces: counts.total,
    });
    let words: Vec<(Vec<u32>, u64)> = counts
        .map
        .into_iter()
        .map(|(k, c)| (k.bytes().map(u32::from).collect(), c))
        .collect();
    Ok(run_training(words, cfg, n_merges, progress))
}

// ---------------------------------------------------------------------------
// Merge loop

#[inline]
fn pair_key(a: u32, b: u32) -> u64 {
    (u64::from(a) << 32) | u64::from(b)
}

#[inline]
fn unpack(k: u64) -> (u32, u32) {
    ((k >> 32) as u32, k as u32)
}

/// Count of one adjacent pair and the words it (may) occur in. The word list is
/// append-only and may hold words that no longer contain the pair.
#[derive(Default)]
struct PairInfo {
    count: i64,
    words: Vec<u32>,
}

fn run_training(
    mut words: Vec<(Vec<u32>, u64)>,
    cfg: &TrainerConfig,
    n_merges: usize,
    progress: &dyn Fn(TrainProgress),
) -> TrainedBpe {
    // Single-symbol words have no pairs and never change.
    words.retain(|(w, _)| w.len() >= 2);
    let (mut syms, counts): (Vec<Vec<u32>>, Vec<i64>) = words
        .into_iter()
        .map(|(w, c)| (w, c.min(i64::MAX as u64) as i64))
        .unzip();

    let mut pairs: FxHashMap<u64, PairInfo> = FxHashMap::default();
    for (wi, w) in syms.iter().enumerate() {
        let wi = wi as u32;
        for win in w.windows(2) {
            let e = pairs.entry(pair_key(win[0], win[1])).or_default();
            e.count += counts[wi as usize];
            // Within one word the last entry of any list it touched is itself.
            if e.words.last() != Some(&wi) {
                e.words.push(wi);
            }
        }
    }
    let mut heap: BinaryHeap<(i64, Reverse<u64>)> =
        pairs.iter().map(|(&k, i)| (i.count, Reverse(k))).collect();

    let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    let mut known: FxHashSet<Vec<u8>> = vocab.iter().cloned().collect();
    let mut merges: Vec<(u32, u32)> = Vec::with_capacity(n_merges);
    let mut stamp: Vec<u32> = vec![u32::MAX; syms.len()];
    let mut new_pairs: Vec<u64> = Vec::new();
    let min_count = cfg.min_frequency.max(1).min(i64::MAX as u64) as i64;
    let report_every = (n_merges / 200).max(64);
    let mut stopped_early = false;

    progress(TrainProgress::Merging {
        merges_done: 0,
        merges_target: n_merges,
    });
    while merges.len() < n_merges {
        let Some((stored, Reverse(key))) = heap.pop() else {
            stopped_early = true;
            break;
        };
        let current = pairs.get(&key).map_or(0, |i| i.count);
        if current <= 0 {
            pairs.remove(&key);
            continue;
        }
        if current != stored {
            heap.push((current, Reverse(key)));
            continue;
        }
        if current < min_count {
            stopped_early = true;
            break;
        }
        let (a, b) = unpack(key);
        let mut bytes = vocab[a as usize].clone();
        bytes.extend_from_slice(&vocab[b as usize]);
        let Some(info) = pairs.remove(&key) else {
            continue;
        };
        if known.contains(&bytes) {
            // See the module docs: never create a second token with the same bytes.
            continue;
        }
        let t = vocab.len() as u32;
        let m = merges.len() as u32;
        for &wi in &info.words {
            if stamp[wi as usize] == m {
                continue;
            }
            stamp[wi as usize] = m;
            merge_word(
                &mut syms[wi as usize],
                a,
                b,
                t,
                wi,
                counts[wi as usize],
                &mut pairs,
                &mut new_pairs,
            );
        }
        for k in new_pairs.drain(..) {
            if let Some(i) = pairs.get(&k) {
                if i.count > 0 {
                    heap.push((i.count, Reverse(k)));
                }
            }
        }
        merges.push((a, b));
        known.insert(bytes.clone());
        vocab.push(bytes);
        if merges.len().is_multiple_of(report_every) {
            progress(TrainProgress::Merging {
                merges_done: merges.len(),
                merges_target: n_merges,
            });
        }
    }
    progress(TrainProgress::Merging {
        merges_done: merges.len(),
        merges_target: n_merges,
    });
    progress(TrainProgress::Finished {
        merges: merges.len(),
        stopped_early,
    });

    let first_special = vocab.len() as u32;
    let special_tokens = cfg
        .special_tokens
        .iter()
        .enumerate()
        .map(|(i, s)| (s.clone(), first_special + i as u32))
        .collect();
    TrainedBpe {
        pattern: cfg.pattern.clone(),
        merges,
        vocab,
        special_tokens,
        stopped_early,
    }
}

/// Replaces every non-overlapping occurrence (left to right) of `(a, b)` in one
/// word by `t` and updates the neighbouring pair counts.
///
/// The left neighbour is read from the already-rewritten prefix, so for runs like
/// `a b a b` the pair `(t, a)` added by the first occurrence is taken back by the
/// second, leaving exactly the pairs of the new word.
#[allow(clippy::too_many_arguments)]
fn merge_word(
    sym: &mut Vec<u32>,
    a: u32,
    b: u32,
    t: u32,
    wi: u32,
    count: i64,
    pairs: &mut FxHashMap<u64, PairInfo>,
    new_pairs: &mut Vec<u64>,
) {
    let n = sym.len();
    let (mut i, mut j) = (0, 0);
    while i < n {
        if i + 1 < n && sym[i] == a && sym[i + 1] == b {
            if j > 0 {
                let prev = sym[j - 1];
                dec(pairs, pair_key(prev, a), count);
                inc(pairs, new_pairs, pair_key(prev, t), count, wi);
            }
            if i + 2 < n {
                let next = sym[i + 2];
                dec(pairs, pair_key(b, next), count);
                inc(pairs, new_pairs, pair_key(t, next), count, wi);
            }
            sym[j] = t;
            i += 2;
        } else {
            sym[j] = sym[i];
            i += 1;
        }
        j += 1;
    }
    sym.truncate(j);
}

#[inline]
fn dec(pairs: &mut FxHashMap<u64, PairInfo>, key: u64, count: i64) {
    // The merged pair itself was already removed; its count is irrelevant.
    if let Some(i) = pairs.get_mut(&key) {
        i.count -= count;
    }
}

#[inline]
fn inc(
    pairs: &mut FxHashMap<u64, PairInfo>,
    new_pairs: &mut Vec<u64>,
    key: u64,
    count: i64,
    wi: u32,
) {
    let i = pairs.entry(key).or_insert_with(|| {
        new_pairs.push(key);
        PairInfo::default()
    });
    i.count += count;
    if i.words.last() != Some(&wi) {
        i.words.push(wi);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_cuts() {
        let t = b"ab\ncd\n\nx\n y";
        assert_eq!(next_safe_cut(t, 0), Some(3));
        assert_eq!(next_safe_cut(t, 4), None);
        assert_eq!(last_safe_cut(t), Some(3));
    }

    #[test]
    fn streaming_reads_cut_at_safe_breaks_and_report_utf8_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.txt");
        let text = "line one\nline two\n\n  spaced\nx\ny\nüber\nend".repeat(20);
        std::fs::write(&path, &text).unwrap();
        for block in [1, 7, 64, 1 << 20] {
            let mut pending = Vec::new();
            let mut bytes = 0;
            let mut flushes = 0;
            let mut flush = |_: &mut Vec<String>, _: &mut usize| -> Result<()> {
                flushes += 1;
                Ok(())
            };
            read_file_into(&path, block, &mut pending, &mut bytes, &mut flush).unwrap();
            assert_eq!(pending.concat(), text);
            assert_eq!(bytes, text.len());
            assert_eq!(flushes, 0);
            // Every cut but the end of the file is a safe one.
            let mut at = 0;
            for piece in &pending[..pending.len() - 1] {
                at += piece.len();
                assert!(is_safe_cut(text.as_bytes(), at), "cut at {at}");
            }
        }
        let mut bad = text.clone().into_bytes();
        bad[100] = 0xC3;
        bad[101] = b'(';
        std::fs::write(&path, &bad).unwrap();
        for block in [5, 64, 1 << 20] {
            let mut pending = Vec::new();
            let mut bytes = 0;
            let err = read_file_into(&path, block, &mut pending, &mut bytes, &mut |_, _| Ok(()))
                .unwrap_err();
            assert!(
                matches!(err, TokenizerError::InvalidUtf8File { offset: 100, .. }),
                "{err:?}"
            );
        }
    }

    #[test]
    fn specials_are_cut_out() {
        let mut out = Vec::new();
        split_specials("a<s>b<s><ss>c", &["<s>".into(), "<ss>".into()], &mut out);
        assert_eq!(out, vec!["a", "b", "c"]);
    }
}
