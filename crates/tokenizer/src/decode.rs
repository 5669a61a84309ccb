//! Decoding helpers: UTF-8 validation with offsets and the streaming decoder.
//!
//! Tokens are byte strings, and one character can be split across tokens, so a
//! single token may not decode to valid UTF-8 on its own. [`StreamDecoder`] holds
//! back an incomplete trailing sequence until the next token completes it, which is
//! what a chat UI or a server streaming tokens needs.

use crate::error::{Result, TokenizerError};
use crate::{Rank, Tokenizer};

/// Check that `bytes` is UTF-8; the error names the byte offset of the first
/// invalid (or truncated) sequence.
pub fn validate_utf8(bytes: &[u8]) -> Result<&str, TokenizerError> {
    std::str::from_utf8(bytes).map_err(|e| {
        let offset = e.valid_up_to();
        match e.error_len() {
            Some(_) => TokenizerError::InvalidUtf8 {
                offset,
                byte: bytes[offset],
            },
            None => TokenizerError::TruncatedUtf8 { offset },
        }
    })
}

/// Append the valid UTF-8 prefix of `buf` to `out`, replacing invalid sequences
/// with U+FFFD, and return how many bytes were consumed. An incomplete sequence at
/// the very end is left unconsumed unless `flush` is set, in which case it is
/// replaced too.
pub(crate) fn drain_utf8(buf: &[u8], out: &mut String, flush: bool) -> usize {
    let mut p = 0;
    while p < buf.len() {
        match std::str::from_utf8(&buf[p..]) {
            Ok(s) => {
                out.push_str(s);
                return buf.len();
            }
            Err(e) => {
                let good = e.valid_up_to();
                // `good` bytes from `p` were just validated by from_utf8.
                out.push_str(std::str::from_utf8(&buf[p..p + good]).unwrap_or_default());
                p += good;
                match e.error_len() {
                    Some(bad) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        p += bad;
                    }
                    None => {
                        if flush {
                            out.push(char::REPLACEMENT_CHARACTER);
                            return buf.len();
                        }
                        return p;
                    }
                }
            }
        }
    }
    p
}

/// Incremental decoder: feed ids one by one, get text as soon as it is complete.
///
/// `push` returns only whole characters; bytes of a character not yet complete
/// are kept until a later token completes it. Bytes that can never become valid
/// UTF-8 are replaced by U+FFFD immediately. `finish` flushes the rest, replacing
/// an incomplete trailing sequence with U+FFFD (lossy, like `decode`).
pub struct StreamDecoder<'t> {
    tok: &'t Tokenizer,
    pending: Vec<u8>,
}

impl<'t> StreamDecoder<'t> {
    pub(crate) fn new(tok: &'t Tokenizer) -> Self {
        StreamDecoder {
            tok,
            pending: Vec::new(),
        }
    }

    /// Add one token; returns the newly completed text (possibly empty).
    pub fn push(&mut self, id: Rank) -> Result<String> {
        let bytes = self.tok.token_bytes(id).ok_or(TokenizerError::UnknownId {
            id,
            vocab_size: self.tok.vocab_size(),
        })?;
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let used = drain_utf8(&self.pending, &mut out, false);
        self.pending.drain(..used);
        Ok(out)
    }

    /// Bytes held back waiting for the rest of a character.
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// Flush everything left, lossily.
    pub fn finish(mut self) -> String {
        let mut out = String::new();
        drain_utf8(&self.pending, &mut out, true);
        self.pending.clear();
        out
    }
}
