//! Stop strings over streamed text: the caller pushes the text chunks its stream decoder yields
//! and prints what comes back. Text that could still be the start of a stop string is held back
//! until the next chunk settles it, so a stop string is never printed, even in part.
//!
//! Text only: the engine's generation loop sees token ids; the caller turns ids into text and
//! stops the loop (returning `false` from its token callback) when [`Emit::stop`] is set.

/// What a push lets the caller print.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Emit {
    /// Text that is safe to print: it is not, and cannot become, part of a stop string.
    pub text: String,
    /// The index (into the stops given to [`StopStrings::new`]) of the stop string found; the
    /// text before it is in `text` and nothing after it is ever returned.
    pub stop: Option<usize>,
}

/// Finds the first of several stop strings in a stream of text chunks.
#[derive(Debug, Clone)]
pub struct StopStrings {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopStrings {
    /// Empty stop strings are ignored (they would match before any text).
    pub fn new<S: Into<String>>(stops: impl IntoIterator<Item = S>) -> Self {
        Self {
            stops: stops.into_iter().map(Into::into).collect(),
            held: String::new(),
            stopped: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.iter().all(String::is_empty)
    }

    /// Text held back because it may be the start of a stop string.
    pub fn held(&self) -> &str {
        &self.held
    }

    /// Feeds the next chunk of the continuation.
    pub fn push(&mut self, chunk: &str) -> Emit {
        if self.stopped {
            return Emit::default();
        }
        self.held.push_str(chunk);
        // The earliest match wins; at one position, the stop listed first.
        let found = self
            .stops
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.is_empty())
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|at| (at, i)))
            .min();
        if let Some((at, i)) = found {
            self.stopped = true;
            let mut text = std::mem::take(&mut self.held);
            text.truncate(at);
            return Emit {
                text,
                stop: Some(i),
            };
        }
        // Hold back the longest tail that is a proper prefix of some stop string.
        let keep = self.longest_partial();
        let text = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        Emit { text, stop: None }
    }

    /// The end of the stream: whatever was held back was not a stop string after all.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        std::mem::take(&mut self.held)
    }

    fn longest_partial(&self) -> usize {
        let h = &self.held;
        // Tails from the longest down; only char boundaries can start a stop string.
        (1..=h.len())
            .rev()
            .filter(|&k| h.is_char_boundary(h.len() - k))
            .find(|&k| {
                let tail = &h[h.len() - k..];
                self.stops
                    .iter()
                    .any(|s| s.len() > k && s.starts_with(tail))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pushes every chunk and returns (printed text, stop index).
    fn run(stops: &[&str], chunks: &[&str]) -> (String, Option<usize>) {
        let mut s = StopStrings::new(stops.iter().copied());
        let mut out = String::new();
        for c in chunks {
            let e = s.push(c);
            out.push_str(&e.text);
            if e.stop.is_some() {
                return (out, e.stop);
            }
        }
        out.push_str(&s.finish());
        (out, None)
    }

    #[test]
    fn stop_split_across_chunks_is_never_printed() {
        let mut s = StopStrings::new(["\nUser:"]);
        assert_eq!(s.push("Hello").text, "Hello");
        let e = s.push(" there\nUs");
        assert_eq!((e.text.as_str(), e.stop), (" there", None));
        assert_eq!(s.held(), "\nUs");
        let e = s.push("er: more");
        assert_eq!((e.text.as_str(), e.stop), ("", Some(0)));
        assert_eq!(s.push("after").text, "");
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn partial_prefix_that_is_not_a_stop_is_released() {
        assert_eq!(
            run(&["STOP"], &["a ST", "OR", "Y b"]),
            ("a STORY b".to_string(), None)
        );
        // Held to the end of the stream, then released by finish.
        assert_eq!(run(&["STOP"], &["x", "STO"]), ("xSTO".to_string(), None));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(
            run(&["world", "lo w", "xyz"], &["hel", "lo wor", "ld"]),
            ("hel".to_string(), Some(1))
        );
        assert_eq!(run(&["b", "ab"], &["xab"]), ("x".to_string(), Some(1)));
        assert_eq!(run(&["", "c"], &["abcd"]), ("ab".to_string(), Some(1)));
    }

    #[test]
    fn multibyte_text_and_stops() {
        assert_eq!(
            run(&["éé"], &["caf", "é", " ", "é", "é!"]),
            ("café ".to_string(), Some(0))
        );
        assert_eq!(run(&["→"], &["a", "→b"]), ("a".to_string(), Some(0)));
        assert!(StopStrings::new(Vec::<String>::new()).is_empty());
    }
}
