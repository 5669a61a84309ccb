//! Byte-level BPE tokenizers for kiln: encode, decode and the common vocabulary
//! formats. This crate knows nothing about tensors.
//!
//! # Main types
//!
//! * [`Tokenizer`]: a vocabulary ([`BpeModel`]), a [`PreTokenizer`], special
//!   tokens and optional BOS/EOS ids. Encode with [`Tokenizer::encode_ordinary`]
//!   (special-token strings are plain text), [`Tokenizer::encode`] (tiktoken's
//!   allowed/disallowed semantics, see [`AllowedSpecial`]),
//!   [`Tokenizer::encode_with_special_tokens`] and [`Tokenizer::encode_batch`]
//!   (parallel). Decode with [`Tokenizer::decode_bytes`], [`Tokenizer::decode`]
//!   (lossy UTF-8) or incrementally with [`StreamDecoder`].
//! * [`BpeModel`] (in [`bpe`]): the fast merge loop and the slow reference encoder
//!   that the tests use as the oracle.
//! * [`PreTokenizer`] (in [`pretok`]): split patterns, hand-written for the known
//!   patterns, fancy-regex for anything else.
//! * [`TokenizerError`]: the one error type; every loader error names the file.
//!
//! # Formats
//!
//! * tiktoken `.tiktoken` rank files ([`Tokenizer::from_tiktoken_file`]) for
//!   r50k_base, p50k_base, p50k_edit, cl100k_base and o200k_base, with the split
//!   patterns and special tokens of tiktoken's `openai_public.py`.
//! * GPT-2 `encoder.json` + `vocab.bpe` ([`Tokenizer::from_gpt2_files`]).
//! * Hugging Face `tokenizer.json` ([`Tokenizer::from_hf_json`]): model type BPE
//!   with byte-level pre-tokenization (`ByteLevel`, optionally behind `Split`
//!   and/or `Digits` in a `Sequence`), optional `NFC` normalizer. `added_tokens`
//!   become special tokens. Their `lstrip`/`rstrip`/`single_word` flags and the
//!   `post_processor` (BOS insertion) are not applied; BOS/EOS ids are exposed.
//! * GGUF metadata ([`Tokenizer::from_gguf`]), `tokenizer.ggml.model = "gpt2"`, with
//!   the pre-tokenizer chosen from `tokenizer.ggml.pre` like llama.cpp. Supported
//!   `pre` values: see [`formats::gguf::SUPPORTED_PRE`]. llama.cpp's vocab tests
//!   pass for gpt-2, llama-bpe, qwen2, starcoder, refact, command-r, mpt, falcon,
//!   deepseek-coder and deepseek-llm (`tests/llama_vocab.rs`). Not supported:
//!   SentencePiece (`model = "llama"`: llama-spm, phi-3, baichuan), WordPiece
//!   (`"bert"`: bert-bge), Unigram (`"t5"`: nomic-bert-moe), Gemma 4
//!   (`"gemma4"`), and the `qwen35` pre-tokenizer. aquila and gpt-neox load but
//!   have no test pair.
//!
//! [`Tokenizer::load`] detects the format from the path.
//!
//! BERT's WordPiece (a `tokenizer.json` with `model.type = "WordPiece"`, or a bare
//! `vocab.txt`) is a separate type, [`WordPiece`] (in [`wordpiece`]), since it shares nothing
//! with byte-level BPE but the vocabulary file formats.
//!
//! # Decoding is lossy
//!
//! [`Tokenizer::decode`] replaces invalid UTF-8 (a byte sequence cut in the middle
//! of a character) with U+FFFD, like tiktoken's `decode(errors="replace")`. Use
//! [`Tokenizer::decode_bytes`] for the exact bytes.

pub mod bpe;
pub mod convert;
pub mod decode;
pub mod error;
pub mod export;
pub mod formats;
mod parallel;
pub mod pretok;
pub mod train;
pub mod wordpiece;

pub use bpe::{BpeModel, Rank};
pub use decode::{validate_utf8, StreamDecoder};
pub use error::TokenizerError;
pub use pretok::PreTokenizer;
pub use wordpiece::WordPiece;

use error::Result;
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use std::borrow::Cow;
use std::collections::HashSet;
use std::path::Path;
use std::sync::OnceLock;

/// Which special tokens `encode` may produce. Special token strings that appear in
/// the text and are *not* allowed make `encode` fail (tiktoken's default
/// `disallowed_special="all"`); use `encode_ordinary` to treat them as text.
#[derive(Debug, Clone, Default)]
pub enum AllowedSpecial {
    /// Every special token of the tokenizer.
    All,
    /// None: any special token string in the text is an error.
    #[default]
    None,
    /// Only these special token strings.
    Set(HashSet<String>),
}

impl AllowedSpecial {
    fn allows(&self, s: &str) -> bool {
        match self {
            AllowedSpecial::All => true,
            AllowedSpecial::None => false,
            AllowedSpecial::Set(set) => set.contains(s),
        }
    }
}

/// Text normalization applied before pre-tokenization (Hugging Face normalizers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalizer {
    /// Unicode NFC (Qwen2's tokenizer.json).
    Nfc,
}

/// Special tokens and a fast finder for their strings in text.
#[derive(Debug, Clone, Default)]
struct Specials {
    by_str: FxHashMap<String, Rank>,
    by_id: FxHashMap<Rank, Box<[u8]>>,
    /// Candidate strings for each first byte, longest first.
    by_first: Vec<Vec<(String, Rank)>>,
    first_bytes: Vec<u8>,
}

impl Specials {
    fn new(list: &[(String, Rank)]) -> Specials {
        let mut s = Specials {
            by_first: vec![Vec::new(); 256],
            ..Default::default()
        };
        for (text, id) in list {
            if text.is_empty() {
                continue;
            }
            s.by_str.insert(text.clone(), *id);
            s.by_id.insert(*id, text.as_bytes().into());
            let fb = text.as_bytes()[0];
            if s.by_first[fb as usize].is_empty() {
                s.first_bytes.push(fb);
            }
            s.by_first[fb as usize].push((text.clone(), *id));
        }
        for v in &mut s.by_first {
            v.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        }
        s
    }

    /// The leftmost occurrence at or after `from` of a special token accepted by
    /// `ok` (the longest one at that position): `(start, end, id)`.
    fn find(
        &self,
        text: &str,
        from: usize,
        ok: &dyn Fn(&str) -> bool,
    ) -> Option<(usize, usize, Rank)> {
        if self.first_bytes.is_empty() {
            return None;
        }
        let b = text.as_bytes();
        let mut i = from;
        while i < b.len() {
            let cand = match self.first_bytes.as_slice() {
                [a] => memchr::memchr(*a, &b[i..]),
                [a, c] => memchr::memchr2(*a, *c, &b[i..]),
                [a, c, d] => memchr::memchr3(*a, *c, *d, &b[i..]),
                _ => b[i..]
                    .iter()
                    .position(|&x| !self.by_first[x as usize].is_empty()),
            };
            let off = cand?;
            let at = i + off;
            for (s, id) in &self.by_first[b[at] as usize] {
                if b[at..].starts_with(s.as_bytes()) && ok(s) {
                    return Some((at, at + s.len(), *id));
                }
            }
            i = at + 1;
        }
        None
    }
}

/// A byte-level BPE tokenizer. See the crate documentation.
#[derive(Debug)]
pub struct Tokenizer {
    name: String,
    bpe: BpeModel,
    pretok: PreTokenizer,
    specials: Specials,
    /// Tokens matched as whole strings even by `encode_ordinary` (GGUF
    /// user-defined tokens, Hugging Face added tokens that are not special).
    added: Specials,
    normalizer: Option<Normalizer>,
    bos: Option<Rank>,
    eos: Option<Rank>,
    reference_pretok: OnceLock<Option<PreTokenizer>>,
}

impl Tokenizer {
    /// Assemble a tokenizer from its parts. `specials` are `(string, id)` pairs.
    pub fn new(
        name: impl Into<String>,
        bpe: BpeModel,
        pretok: PreTokenizer,
        specials: &[(String, Rank)],
    ) -> Tokenizer {
        Tokenizer {
            name: name.into(),
            bpe,
            pretok,
            specials: Specials::new(specials),
            added: Specials::default(),
            normalizer: None,
            bos: None,
            eos: None,
            reference_pretok: OnceLock::new(),
        }
    }

    /// Set the normalizer applied to ordinary text before splitting.
    pub fn with_normalizer(mut self, n: Option<Normalizer>) -> Tokenizer {
        self.normalizer = n;
        self
    }

    /// Set the tokens that are always matched as whole strings, even by
    /// `encode_ordinary` (they are vocabulary, not control tokens).
    pub fn with_added_tokens(mut self, added: &[(String, Rank)]) -> Tokenizer {
        self.added = Specials::new(added);
        self
    }

    /// Set the beginning/end-of-sequence ids (informational: never added by encode).
    pub fn with_bos_eos(mut self, bos: Option<Rank>, eos: Option<Rank>) -> Tokenizer {
        self.bos = bos;
        self.eos = eos;
        self
    }

    /// Load any supported format, detected from the path:
    /// a `.tiktoken` file (encoding from the file stem, e.g. `cl100k_base.tiktoken`),
    /// a `.json` file (Hugging Face tokenizer.json), a `.gguf` file, or a directory
    /// holding `tokenizer.json` or `encoder.json` + `vocab.bpe`.
    pub fn load(path: &Path) -> Result<Tokenizer> {
        formats::load(path)
    }

    /// Load a tiktoken rank file with the named OpenAI encoding's pattern and specials.
    pub fn from_tiktoken_file(path: &Path, encoding: &str) -> Result<Tokenizer> {
        formats::tiktoken::load(path, encoding)
    }

    /// Load GPT-2's `encoder.json` and `vocab.bpe` (equivalent to r50k_base).
    pub fn from_gpt2_files(encoder_json: &Path, vocab_bpe: &Path) -> Result<Tokenizer> {
        formats::gpt2::load(encoder_json, vocab_bpe)
    }

    /// Load a Hugging Face `tokenizer.json`.
    pub fn from_hf_json(path: &Path) -> Result<Tokenizer> {
        formats::hf_json::load(path)
    }

    /// Load the tokenizer stored in a GGUF file's metadata.
    pub fn from_gguf(path: &Path) -> Result<Tokenizer> {
        formats::gguf::load(path)
    }

    /// A short name (the encoding or the file it came from).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The merge model.
    pub fn bpe(&self) -> &BpeModel {
        &self.bpe
    }

    /// The pre-tokenizer.
    pub fn pre_tokenizer(&self) -> &PreTokenizer {
        &self.pretok
    }

    /// The normalizer, if any.
    pub fn normalizer(&self) -> Option<Normalizer> {
        self.normalizer
    }

    /// Beginning-of-sequence id, when the format records one.
    pub fn bos_id(&self) -> Option<Rank> {
        self.bos
    }

    /// End-of-sequence id, when the format records one.
    pub fn eos_id(&self) -> Option<Rank> {
        self.eos
    }

    /// One more than the largest id (ordinary or special), like tiktoken's `n_vocab`.
    pub fn vocab_size(&self) -> usize {
        let max_special = (self.specials.by_id.keys())
            .chain(self.added.by_id.keys())
            .map(|&id| id as usize + 1)
            .max();
        self.bpe.len().max(max_special.unwrap_or(0))
    }

    /// The bytes of a token (ordinary or special).
    pub fn token_bytes(&self, id: Rank) -> Option<&[u8]> {
        self.bpe
            .token_bytes(id)
            .or_else(|| self.specials.by_id.get(&id).map(|b| &b[..]))
            .or_else(|| self.added.by_id.get(&id).map(|b| &b[..]))
    }

    /// Special tokens as `(string, id)`, sorted by id.
    pub fn special_tokens(&self) -> Vec<(String, Rank)> {
        let mut v: Vec<_> = self
            .specials
            .by_str
            .iter()
            .map(|(s, &id)| (s.clone(), id))
            .collect();
        v.sort_by_key(|(s, id)| (*id, s.clone()));
        v
    }

    /// Added (always matched, non-special) tokens as `(string, id)`, sorted by id.
    pub fn added_tokens(&self) -> Vec<(String, Rank)> {
        let mut v: Vec<_> = self
            .added
            .by_str
            .iter()
            .map(|(s, &id)| (s.clone(), id))
            .collect();
        v.sort_by_key(|(s, id)| (*id, s.clone()));
        v
    }

    /// The id of a special token string.
    pub fn id_of_special(&self, s: &str) -> Option<Rank> {
        self.specials.by_str.get(s).copied()
    }

    fn normalize<'a>(&self, text: &'a str) -> Cow<'a, str> {
        match self.normalizer {
            None => Cow::Borrowed(text),
            Some(Normalizer::Nfc) => {
                use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};
                if is_nfc_quick(text.chars()) == IsNormalized::Yes {
                    Cow::Borrowed(text)
                } else {
                    Cow::Owned(text.nfc().collect())
                }
            }
        }
    }

    fn encode_segment(&self, text: &str, out: &mut Vec<Rank>, scratch: &mut bpe::Scratch) {
        let mut pos = 0;
        while let Some((start, end, id)) = self.added.find(text, pos, &|_| true) {
            self.encode_plain(&text[pos..start], out, scratch);
            out.push(id);
            pos = end;
        }
        self.encode_plain(&text[pos..], out, scratch);
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<Rank>, scratch: &mut bpe::Scratch) {
        let text = self.normalize(text);
        self.pretok.for_each_piece(&text, &mut |piece: &str| {
            self.bpe.encode_piece(piece.as_bytes(), out, scratch)
        });
    }

    /// Encode treating special-token strings as plain text.
    pub fn encode_ordinary(&self, text: &str) -> Vec<Rank> {
        let mut out = Vec::with_capacity(text.len() / 4 + 1);
        let mut scratch = bpe::Scratch::default();
        self.encode_segment(text, &mut out, &mut scratch);
        out
    }

    /// Encode with tiktoken's semantics: special tokens in `allowed` become their
    /// ids; any other special token string present in the text is an error.
    pub fn encode(&self, text: &str, allowed: &AllowedSpecial) -> Result<Vec<Rank>> {
        if !matches!(allowed, AllowedSpecial::All) {
            if let Some((start, end, _)) = self.specials.find(text, 0, &|s| !allowed.allows(s)) {
                return Err(TokenizerError::DisallowedSpecial {
                    token: text[start..end].to_string(),
                    offset: start,
                });
            }
        }
        Ok(self.encode_allowing(text, &|s| allowed.allows(s)))
    }

    /// Encode with every special token string recognised as its special id.
    pub fn encode_with_special_tokens(&self, text: &str) -> Vec<Rank> {
        self.encode_allowing(text, &|_| true)
    }

    fn encode_allowing(&self, text: &str, ok: &dyn Fn(&str) -> bool) -> Vec<Rank> {
        let mut out = Vec::with_capacity(text.len() / 4 + 1);
        let mut scratch = bpe::Scratch::default();
        let mut pos = 0;
        while let Some((start, end, id)) = self.specials.find(text, pos, ok) {
            self.encode_segment(&text[pos..start], &mut out, &mut scratch);
            out.push(id);
            pos = end;
        }
        self.encode_segment(&text[pos..], &mut out, &mut scratch);
        out
    }

    /// `encode_ordinary` over many texts in parallel (rayon).
    pub fn encode_batch(&self, texts: &[&str]) -> Vec<Vec<Rank>> {
        texts.par_iter().map(|t| self.encode_ordinary(t)).collect()
    }

    /// The slow, obviously-correct path: fancy-regex splitting and the reference
    /// merge loop. Tests compare the fast path against it.
    pub fn encode_ordinary_reference(&self, text: &str) -> Result<Vec<Rank>> {
        let reference = self
            .reference_pretok
            .get_or_init(|| self.pretok.reference().ok());
        let Some(reference) = reference else {
            // The patterns compiled once for the fast path, so this cannot fail.
            return self.pretok.reference().map(|_| Vec::new());
        };
        let mut segments = Vec::new();
        let mut pos = 0;
        while let Some((start, end, id)) = self.added.find(text, pos, &|_| true) {
            segments.push((&text[pos..start], Some(id)));
            pos = end;
        }
        segments.push((&text[pos..], None));
        let mut out = Vec::new();
        for (segment, added) in segments {
            for piece in reference.split(&self.normalize(segment)) {
                out.extend(self.bpe.encode_piece_reference(piece.as_bytes()));
            }
            out.extend(added);
        }
        Ok(out)
    }

    /// The exact bytes of a sequence of ids; an unknown id is an error naming it.
    pub fn decode_bytes(&self, ids: &[Rank]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let b = self.token_bytes(id).ok_or(TokenizerError::UnknownId {
                id,
                vocab_size: self.vocab_size(),
            })?;
            out.extend_from_slice(b);
        }
        Ok(out)
    }

    /// Decode to a `String`. Lossy: invalid UTF-8 becomes U+FFFD (tiktoken's
    /// `errors="replace"`); use [`Tokenizer::decode_bytes`] for the exact bytes.
    pub fn decode(&self, ids: &[Rank]) -> Result<String> {
        let bytes = self.decode_bytes(ids)?;
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// A streaming decoder that emits only complete characters.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self)
    }
}
