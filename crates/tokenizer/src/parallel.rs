//! Encoding one long text on several threads with exactly the ids of the serial encoder.
//!
//! The text is cut into chunks at places where every supported split pattern is known to end a
//! piece, each chunk is encoded on the current rayon pool, and the ids are concatenated. A safe cut
//! is a position just before an ASCII letter that follows a single `\n` which itself follows a
//! character that is not whitespace. Why that is safe for the hand-written patterns (GPT-2, cl100k,
//! o200k, Llama 3, Qwen2, digits): no piece starts with a newline and continues into a letter (the
//! letter-run alternatives exclude `\r\n` from their optional prefix), a lone newline is its own
//! piece or the tail of a punctuation piece, and because the newline is not preceded by whitespace,
//! `\s+(?!\S)` and `\s++$` cannot treat it differently at the end of a chunk than before the
//! letter. Patterns from user files (fancy-regex) get no such guarantee, so they are encoded
//! serially; so is normalized text. `tests/parallel.rs` checks equality on real corpora.

use crate::{Rank, Tokenizer};
use rayon::prelude::*;

/// Chunks smaller than this are not worth a task.
const MIN_CHUNK: usize = 64 * 1024;

impl Tokenizer {
    /// [`Tokenizer::encode_ordinary`] on the current rayon pool: the same ids, faster on long
    /// texts when the pool has more than one thread.
    pub fn encode_ordinary_parallel(&self, text: &str) -> Vec<Rank> {
        let threads = rayon::current_num_threads();
        let parallel_ok = self.normalizer().is_none()
            && self
                .pre_tokenizer()
                .splits()
                .iter()
                .all(|s| s.is_hand_written());
        if threads < 2 || text.len() < 2 * MIN_CHUNK || !parallel_ok {
            return self.encode_ordinary(text);
        }
        // A few chunks per thread balances uneven text without many tiny tasks.
        let target = (text.len() / (threads * 4)).max(MIN_CHUNK);
        let chunks = safe_chunks(text, target);
        let parts: Vec<Vec<Rank>> = chunks.par_iter().map(|c| self.encode_ordinary(c)).collect();
        let mut out = Vec::with_capacity(parts.iter().map(Vec::len).sum());
        for p in parts {
            out.extend(p);
        }
        out
    }
}

/// Splits `text` into pieces of roughly `target` bytes at safe cut points (see the module docs).
pub(crate) fn safe_chunks(text: &str, target: usize) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < bytes.len() {
        let mut cut = None;
        let mut p = start + target;
        while p < bytes.len() {
            if is_safe_cut(bytes, p) {
                cut = Some(p);
                break;
            }
            p += 1;
        }
        match cut {
            Some(c) => {
                chunks.push(&text[start..c]);
                start = c;
            }
            None => {
                chunks.push(&text[start..]);
                break;
            }
        }
    }
    chunks
}

fn is_safe_cut(b: &[u8], p: usize) -> bool {
    p >= 2
        && p < b.len()
        && b[p].is_ascii_alphabetic()
        && b[p - 1] == b'\n'
        && (b[p - 2].is_ascii_alphanumeric() || b[p - 2].is_ascii_punctuation())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_text_and_cut_only_at_safe_points() {
        let text = "Hello world.\nNext line\n  indented\nx\n\nblank\n".repeat(5000);
        let chunks = safe_chunks(&text, 1000);
        assert!(chunks.len() > 10);
        assert_eq!(chunks.concat(), text);
        let mut pos = 0;
        for c in &chunks[..chunks.len() - 1] {
            pos += c.len();
            assert!(is_safe_cut(text.as_bytes(), pos));
        }
    }
}
