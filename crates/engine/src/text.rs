//! Token ids in, printable text out, for callers that stream a generation: incremental UTF-8
//! decoding through the tokenizer's [`StreamDecoder`] plus [`StopStrings`]. Used by `kiln
//! generate`, `kiln chat` and the server, so the three print exactly the same text.

use crate::StopStrings;
use kiln_tokenizer::{StreamDecoder, Tokenizer};

/// Token ids in, printable text out: streaming UTF-8 decoding, stop ids skipped, and stop strings
/// held back until they are ruled out (so a stop string is never printed, even in part).
pub struct TextStream<'t> {
    decoder: StreamDecoder<'t>,
    stops: StopStrings,
    skip: Vec<u32>,
    /// A stop string was found; nothing more will be returned.
    pub stopped: bool,
    /// Ids that had no text (outside the tokenizer's vocabulary); they were skipped.
    pub undecodable: usize,
}

impl<'t> TextStream<'t> {
    pub fn new(tok: &'t Tokenizer, stop_strings: &[String], skip_ids: &[u32]) -> Self {
        Self {
            decoder: tok.stream_decoder(),
            stops: StopStrings::new(stop_strings.iter().cloned()),
            skip: skip_ids.to_vec(),
            stopped: false,
            undecodable: 0,
        }
    }

    /// The text that token `id` lets us print now.
    pub fn push(&mut self, id: u32) -> String {
        if self.stopped || self.skip.contains(&id) {
            return String::new();
        }
        let piece = match self.decoder.push(id) {
            Ok(p) => p,
            Err(_) => {
                // An id the tokenizer lacks (a model vocabulary padded past the tokenizer's).
                self.undecodable += 1;
                return String::new();
            }
        };
        let emit = self.stops.push(&piece);
        self.stopped = emit.stop.is_some();
        emit.text
    }

    /// The rest, at the end of the generation (nothing if a stop string was found).
    pub fn finish(mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let tail = self.decoder.finish();
        let emit = self.stops.push(&tail);
        let mut out = emit.text;
        if emit.stop.is_none() {
            out.push_str(&self.stops.finish());
        }
        out
    }
}
