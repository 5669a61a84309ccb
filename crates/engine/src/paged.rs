//! Who owns which KV block: the free list, reference counts, and the prefix cache.
//!
//! Blocks hold `block_size` positions (see [`kiln_nn::PagedKvCache`] for the storage). A block a
//! sequence filled completely is registered under a key made of a hash of every token before
//! it and its own tokens; a later sequence whose prompt starts with the same tokens takes the
//! same blocks instead of recomputing them (a shared system prompt is prefilled once). Keys, not
//! just hashes, are compared, so a hash collision cannot hand over wrong keys and values: the
//! hash covers the earlier blocks, and the block's own tokens are compared exactly.
//!
//! A block nobody references any more but whose contents are registered stays cached
//! ("evictable") until a fresh block is needed; the least recently released one goes first.
//! Sequences only write positions past their shared prefix, so a shared block is never written
//! and needs no copy-on-write.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BlockKey {
    prefix: u64,
    tokens: Vec<u32>,
}

#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    refs: Vec<u32>,
    free: Vec<u32>,
    cached: HashMap<BlockKey, u32>,
    key_of: Vec<Option<BlockKey>>,
    /// Evictable blocks by release time (oldest first), and each one's time.
    evictable: BTreeMap<u64, u32>,
    released_at: Vec<u64>,
    clock: u64,
    prefix_cache: bool,
}

/// The hash of a prefix after one more block of tokens.
pub fn chain_hash(prefix: u64, tokens: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    prefix.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize, prefix_cache: bool) -> Self {
        Self {
            block_size,
            refs: vec![0; num_blocks],
            // Popped from the end: hand out low ids first.
            free: (0..num_blocks as u32).rev().collect(),
            cached: HashMap::new(),
            key_of: vec![None; num_blocks],
            evictable: BTreeMap::new(),
            released_at: vec![0; num_blocks],
            clock: 0,
            prefix_cache,
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks a new sequence could take now (free ones and cached ones nobody uses).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks referenced by at least one sequence.
    pub fn in_use(&self) -> usize {
        self.num_blocks() - self.available()
    }

    /// A block for new positions, evicting the least recently released cached block if no
    /// block is free.
    pub fn allocate(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                if let Some(key) = self.key_of[b as usize].take() {
                    self.cached.remove(&key);
                }
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Drops one reference to each block.
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks {
            let r = &mut self.refs[b as usize];
            debug_assert!(*r > 0, "block {b} released twice");
            *r = r.saturating_sub(1);
            if *r == 0 {
                if self.key_of[b as usize].is_some() {
                    self.clock += 1;
                    self.released_at[b as usize] = self.clock;
                    self.evictable.insert(self.clock, b);
                } else {
                    self.free.push(b);
                }
            }
        }
    }

    /// The cached blocks that hold the longest prefix of `tokens` made of whole blocks, each
    /// with a new reference, and the prefix hash after them. At most `max_blocks` are taken.
    pub fn take_prefix(&mut self, tokens: &[u32], max_blocks: usize) -> (Vec<u32>, u64) {
        let mut blocks = Vec::new();
        let mut prefix = 0u64;
        if !self.prefix_cache {
            return (blocks, prefix);
        }
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let key = BlockKey {
                prefix,
                tokens: chunk.to_vec(),
            };
            let Some(&b) = self.cached.get(&key) else {
                break;
            };
            if self.refs[b as usize] == 0 {
                self.evictable.remove(&self.released_at[b as usize]);
            }
            self.refs[b as usize] += 1;
            blocks.push(b);
            prefix = chain_hash(prefix, chunk);
        }
        (blocks, prefix)
    }

    /// Records that `block` now holds exactly `tokens` (one whole block) after a prefix with
    /// hash `prefix`, so later sequences can share it. A block with the same contents already
    /// cached keeps its place (the new one stays private).
    pub fn register(&mut self, block: u32, prefix: u64, tokens: &[u32]) {
        if !self.prefix_cache || tokens.len() != self.block_size {
            return;
        }
        if self.key_of[block as usize].is_some() {
            return;
        }
        let key = BlockKey {
            prefix,
            tokens: tokens.to_vec(),
        };
        if self.cached.contains_key(&key) {
            return;
        }
        self.cached.insert(key.clone(), block);
        self.key_of[block as usize] = Some(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_counted_shared_cached_and_evicted() {
        let mut m = BlockManager::new(4, 2, true);
        let a: Vec<u32> = (0..3).map(|_| m.allocate().unwrap()).collect();
        assert_eq!(a, vec![0, 1, 2]);
        assert_eq!(m.available(), 1);
        // Blocks 0 and 1 hold tokens [1, 2] and [3, 4].
        m.register(0, 0, &[1, 2]);
        let h = chain_hash(0, &[1, 2]);
        m.register(1, h, &[3, 4]);
        m.release(&a);
        assert_eq!(m.available(), 4);
        // A prompt sharing the first block only takes block 0.
        let (got, hash) = m.take_prefix(&[1, 2, 9, 9, 5], 10);
        assert_eq!(got, vec![0]);
        assert_eq!(hash, h);
        assert_eq!(m.available(), 3);
        // The full prefix, limited to one block.
        assert_eq!(m.take_prefix(&[1, 2, 3, 4], 1).0, vec![0]);
        assert_eq!(m.take_prefix(&[1, 2, 3, 4], 2).0, vec![0, 1]);
        // Same tokens after another prefix: no match.
        assert!(m.take_prefix(&[3, 4], 1).0.is_empty());
        // Exhaust: the free blocks go first (2, released last, then 3); cached blocks 0 and 1 are
        // referenced now, so nothing is left after them.
        assert_eq!(m.allocate(), Some(2));
        assert_eq!(m.allocate(), Some(3));
        assert_eq!(m.allocate(), None);
        m.release(&[0, 0, 0, 1]);
        // 0 was released after 1? Both now evictable; 0 went first into the list.
        let first = m.allocate().unwrap();
        assert_eq!(first, 0);
        // Block 0's contents are gone, so the prefix no longer matches.
        assert!(m.take_prefix(&[1, 2], 1).0.is_empty());
    }

    #[test]
    fn without_the_prefix_cache_nothing_is_shared() {
        let mut m = BlockManager::new(2, 2, false);
        let b = m.allocate().unwrap();
        m.register(b, 0, &[1, 2]);
        m.release(&[b]);
        assert!(m.take_prefix(&[1, 2, 3], 5).0.is_empty());
        assert_eq!(m.available(), 2);
    }
}
