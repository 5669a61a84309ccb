//! Byte-level BPE merging: the fast encoder and the slow reference encoder.
//!
//! A [`BpeModel`] turns one pre-tokenized piece (a byte string) into token ids by
//! repeatedly merging the adjacent pair with the lowest merge rank, leftmost
//! first. Merges are stored as a table from a pair of token ids to
//! `(rank, merged id)`, which expresses both conventions in use:
//!
//! * tiktoken: any two adjacent tokens merge if their concatenation is a token,
//!   and the rank is that token's rank. The pair table holds every split of every
//!   token into two tokens, so it reproduces `byte_pair_merge` exactly.
//! * Hugging Face / llama.cpp: only the listed merges apply, rank = line number.
//!
//! tiktoken (and Hugging Face with `ignore_merges`) first looks the whole piece up
//! in the vocabulary; `ignore_merges` turns that on.
//!
//! [`BpeModel::encode_piece_reference`] is the obviously-correct oracle: a loop
//! over a `Vec` that scans all pairs, merges the best one and starts again. The
//! fast path must produce the same ids for every input (see `tests/bpe_props.rs`).
//!
//! # Performance notes
//!
//! Measured on this crate's `examples/throughput.rs` (cl100k_base, Shakespeare,
//! one thread, 2-core shared machine), see the numbers in the crate report:
//!
//! * Pre-tokenization dominated with fancy-regex; the hand-written splitters in
//!   `pretok.rs` are what makes the big difference.
//! * Most pieces of English text are whole tokens, so the whole-piece lookup runs
//!   first (when `ignore_merges`), and single bytes go straight to a 256-entry
//!   table. A miss costs one hash of the piece.
//! * The merge table is keyed on `(left id, right id)` packed into a `u64` in an
//!   `FxHashMap`; hashing two integers is far cheaper than hashing byte slices
//!   the way tiktoken does for every candidate pair.
//! * Short pieces (the overwhelming majority of misses) use a linear scan over a
//!   reused scratch array: O(n²) but tiny and branch-predictable. Pieces longer
//!   than [`HEAP_THRESHOLD`] bytes use a binary heap over a linked list of symbols,
//!   O(n log n), so adversarial inputs (one 1 MB "word") stay fast.
//! * Scratch buffers are allocated once per `encode` call, not per piece.

use rustc_hash::FxHashMap;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// A token id. Ids and tiktoken ranks coincide for tiktoken vocabularies.
pub type Rank = u32;

/// "No id": marks a byte missing from the vocabulary or a pair that never merges.
const NONE: u32 = u32::MAX;

/// Pieces longer than this many bytes use the heap-based merge.
pub const HEAP_THRESHOLD: usize = 128;

/// The merge model of a byte-level BPE vocabulary (no specials, no pre-tokenizer).
#[derive(Debug, Clone)]
pub struct BpeModel {
    /// Id of each single byte, or [`NONE`].
    byte_ids: [u32; 256],
    /// `(left << 32 | right)` to `(rank << 32 | merged id)`.
    pairs: FxHashMap<u64, u64>,
    /// Whole-token lookup, used when `ignore_merges` is set.
    whole: FxHashMap<Box<[u8]>, Rank>,
    ignore_merges: bool,
    /// Bytes of each ordinary token, indexed by id.
    tokens: Vec<Option<Box<[u8]>>>,
}

/// Reused buffers for one `encode` call.
#[derive(Default)]
pub struct Scratch {
    syms: Vec<u32>,
    ranks: Vec<u32>,
    heap: BinaryHeap<Reverse<(u32, u32)>>,
    next: Vec<u32>,
    prev: Vec<u32>,
}

#[inline(always)]
fn key(a: u32, b: u32) -> u64 {
    (u64::from(a) << 32) | u64::from(b)
}

impl BpeModel {
    /// A model with tiktoken semantics from `(token bytes, rank)` pairs; the rank
    /// is also the id. Every pair of tokens whose concatenation is a token merges
    /// into it with that token's rank. The caller guarantees unique bytes and ranks.
    pub fn from_ranks(ranks: &[(Vec<u8>, Rank)]) -> BpeModel {
        let mut whole: FxHashMap<Box<[u8]>, Rank> = FxHashMap::default();
        whole.reserve(ranks.len());
        for (bytes, r) in ranks {
            whole.insert(bytes.clone().into_boxed_slice(), *r);
        }
        let mut pairs: FxHashMap<u64, u64> = FxHashMap::default();
        for (bytes, r) in ranks {
            for i in 1..bytes.len() {
                if let (Some(&a), Some(&b)) = (whole.get(&bytes[..i]), whole.get(&bytes[i..])) {
                    pairs.insert(key(a, b), key(*r, *r));
                }
            }
        }
        let mut m = BpeModel::with_tokens(ranks.iter().map(|(b, r)| (b.clone(), *r)));
        m.pairs = pairs;
        m.whole = whole;
        m.ignore_merges = true;
        m
    }

    /// A model with Hugging Face semantics: `tokens` are `(bytes, id)` (on equal
    /// bytes the earlier entry is the one merges produce), `merges` are pairs of
    /// ids in rank order. A merge whose concatenation is not a token,
    /// or that repeats an earlier pair, is skipped (the earlier rank wins), which
    /// is what llama.cpp does with such vocabularies.
    pub fn from_merges(
        tokens: Vec<(Vec<u8>, Rank)>,
        merges: &[(Rank, Rank)],
        ignore_merges: bool,
    ) -> BpeModel {
        let mut whole: FxHashMap<Box<[u8]>, Rank> = FxHashMap::default();
        for (t, id) in &tokens {
            // On duplicate byte strings the first in `tokens` wins: loaders list
            // properly byte-level-encoded tokens before raw-text ones, because a
            // merge produces the byte-level string (llama.cpp looks it up by text).
            whole.entry(t.clone().into_boxed_slice()).or_insert(*id);
        }
        let m = BpeModel::with_tokens(tokens.into_iter());
        let mut m = m;
        let mut pairs: FxHashMap<u64, u64> = FxHashMap::default();
        let mut buf = Vec::new();
        for (rank, &(a, b)) in merges.iter().enumerate() {
            let (Some(ta), Some(tb)) = (m.token_bytes(a), m.token_bytes(b)) else {
                continue;
            };
            buf.clear();
            buf.extend_from_slice(ta);
            buf.extend_from_slice(tb);
            if let Some(&id) = whole.get(buf.as_slice()) {
                pairs.entry(key(a, b)).or_insert(key(rank as u32, id));
            }
        }
        m.pairs = pairs;
        m.whole = whole;
        m.ignore_merges = ignore_merges;
        m
    }

    fn with_tokens(tokens: impl Iterator<Item = (Vec<u8>, Rank)>) -> BpeModel {
        let mut v: Vec<Option<Box<[u8]>>> = Vec::new();
        let mut byte_ids = [NONE; 256];
        for (bytes, id) in tokens {
            let i = id as usize;
            if v.len() <= i {
                v.resize(i + 1, None);
            }
            if bytes.len() == 1 && byte_ids[bytes[0] as usize] == NONE {
                byte_ids[bytes[0] as usize] = id;
            }
            v[i] = Some(bytes.into_boxed_slice());
        }
        BpeModel {
            byte_ids,
            pairs: FxHashMap::default(),
            whole: FxHashMap::default(),
            ignore_merges: false,
            tokens: v,
        }
    }

    /// One more than the largest ordinary token id.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the model has no tokens at all.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The bytes of an ordinary token.
    pub fn token_bytes(&self, id: Rank) -> Option<&[u8]> {
        self.tokens.get(id as usize)?.as_deref()
    }

    /// The id of a whole byte string, if it is an ordinary token.
    pub fn token_id(&self, bytes: &[u8]) -> Option<Rank> {
        self.whole.get(bytes).copied()
    }

    /// Number of merge rules.
    pub fn merge_count(&self) -> usize {
        self.pairs.len()
    }

    /// Whether the whole piece is looked up before merging.
    pub fn ignore_merges(&self) -> bool {
        self.ignore_merges
    }

    /// `(rank, merged id)` of an adjacent pair, if it merges.
    #[inline(always)]
    fn pair(&self, a: u32, b: u32) -> Option<(u32, u32)> {
        self.pairs
            .get(&key(a, b))
            .map(|&v| ((v >> 32) as u32, v as u32))
    }

    #[inline(always)]
    fn pair_rank(&self, a: u32, b: u32) -> u32 {
        match self.pairs.get(&key(a, b)) {
            Some(&v) => (v >> 32) as u32,
            None => NONE,
        }
    }

    /// The reference encoder: obviously correct, slow. Bytes missing from the
    /// vocabulary are dropped (they cannot be represented).
    pub fn encode_piece_reference(&self, piece: &[u8]) -> Vec<Rank> {
        if self.ignore_merges {
            if let Some(&id) = self.whole.get(piece) {
                return vec![id];
            }
        }
        let mut parts: Vec<Rank> = piece.iter().map(|&b| self.byte_ids[b as usize]).collect();
        loop {
            // Find the lowest-ranked adjacent pair, the leftmost one on ties.
            let mut best: Option<(u32, usize, u32)> = None;
            for i in 0..parts.len().saturating_sub(1) {
                if let Some((rank, id)) = self.pair(parts[i], parts[i + 1]) {
                    if best.is_none_or(|(r, _, _)| rank < r) {
                        best = Some((rank, i, id));
                    }
                }
            }
            match best {
                None => break,
                Some((_, i, id)) => {
                    parts[i] = id;
                    parts.remove(i + 1);
                }
            }
        }
        parts.retain(|&id| id != NONE);
        parts
    }

    /// The fast encoder: appends the ids of `piece` to `out`.
    #[inline]
    pub fn encode_piece(&self, piece: &[u8], out: &mut Vec<Rank>, scratch: &mut Scratch) {
        match piece {
            [] => return,
            [b] => {
                let id = self.byte_ids[*b as usize];
                if id != NONE {
                    out.push(id);
                }
                return;
            }
            _ => {}
        }
        if self.ignore_merges {
            if let Some(&id) = self.whole.get(piece) {
                out.push(id);
                return;
            }
        }
        if piece.len() <= HEAP_THRESHOLD {
            self.merge_linear(piece, out, scratch);
        } else {
            self.merge_heap(piece, out, scratch);
        }
    }

    /// Short pieces: a scan for the minimum over a small array of pair ranks.
    fn merge_linear(&self, piece: &[u8], out: &mut Vec<Rank>, s: &mut Scratch) {
        let syms = &mut s.syms;
        let ranks = &mut s.ranks;
        syms.clear();
        ranks.clear();
        syms.extend(piece.iter().map(|&b| self.byte_ids[b as usize]));
        for i in 0..syms.len() - 1 {
            ranks.push(self.pair_rank(syms[i], syms[i + 1]));
        }
        loop {
            let mut best = NONE;
            let mut at = 0;
            for (i, &r) in ranks.iter().enumerate() {
                if r < best {
                    best = r;
                    at = i;
                }
            }
            if best == NONE {
                break;
            }
            // The pair exists (its rank was found), so its merged id does too.
            let merged = match self.pair(syms[at], syms[at + 1]) {
                Some((_, id)) => id,
                None => break,
            };
            syms[at] = merged;
            syms.remove(at + 1);
            ranks.remove(at);
            if at < ranks.len() {
                ranks[at] = self.pair_rank(syms[at], syms[at + 1]);
            }
            if at > 0 {
                ranks[at - 1] = self.pair_rank(syms[at - 1], syms[at]);
            }
        }
        out.extend(syms.iter().copied().filter(|&id| id != NONE));
    }

    /// Long pieces: a min-heap of `(rank, position)` over a doubly linked list of
    /// symbols. Entries go stale when a neighbour merges; a popped entry is used
    /// only if its pair still has the rank it was pushed with, so the result is
    /// the same leftmost-lowest-first order as the linear scan.
    fn merge_heap(&self, piece: &[u8], out: &mut Vec<Rank>, s: &mut Scratch) {
        let n = piece.len();
        s.syms.clear();
        s.syms
            .extend(piece.iter().map(|&b| self.byte_ids[b as usize]));
        s.next.clear();
        s.next
            .extend((1..=n as u32).map(|i| if i as usize == n { NONE } else { i }));
        s.prev.clear();
        s.prev
            .extend((0..n as u32).map(|i| if i == 0 { NONE } else { i - 1 }));
        s.heap.clear();
        for i in 0..n - 1 {
            let r = self.pair_rank(s.syms[i], s.syms[i + 1]);
            if r != NONE {
                s.heap.push(Reverse((r, i as u32)));
            }
        }
        // A removed symbol is marked by `syms == DEAD`; ids never reach it.
        const DEAD: u32 = NONE - 1;
        while let Some(Reverse((r, i))) = s.heap.pop() {
            let i = i as usize;
            let a = s.syms[i];
            if a == DEAD {
                continue;
            }
            let j = s.next[i];
            if j == NONE {
                continue;
            }
            let j = j as usize;
            let Some((cur, merged)) = self.pair(a, s.syms[j]) else {
                continue;
            };
            if cur != r {
                continue;
            }
            s.syms[i] = merged;
            s.syms[j] = DEAD;
            let k = s.next[j];
            s.next[i] = k;
            if k != NONE {
                s.prev[k as usize] = i as u32;
                let r2 = self.pair_rank(merged, s.syms[k as usize]);
                if r2 != NONE {
                    s.heap.push(Reverse((r2, i as u32)));
                }
            }
            let p = s.prev[i];
            if p != NONE {
                let r0 = self.pair_rank(s.syms[p as usize], merged);
                if r0 != NONE {
                    s.heap.push(Reverse((r0, p)));
                }
            }
        }
        let mut i = 0u32;
        while i != NONE {
            let id = s.syms[i as usize];
            if id != NONE {
                out.push(id);
            }
            i = s.next[i as usize];
        }
    }
}
