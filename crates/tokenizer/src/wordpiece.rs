//! BERT's WordPiece tokenizer (Wu et al. 2016, as used by Devlin et al. 2019), loaded from a
//! Hugging Face `tokenizer.json` (`model.type = "WordPiece"`) or from a bare `vocab.txt`.
//!
//! The pipeline is Hugging Face `tokenizers`' for BERT, step by step:
//!
//! 1. Added tokens (`[CLS]`, `[SEP]`, `[MASK]`, ...) are cut out of the raw text first
//!    (leftmost-longest match; tokens marked `normalized` are matched after normalization), so a
//!    literal `[SEP]` in the text is the special token, as in `tokenizers`.
//! 2. `BertNormalizer`: `clean_text` (drop NUL, U+FFFD and control characters, every whitespace
//!    character becomes a space), `handle_chinese_chars` (a space on each side of a CJK
//!    ideograph), `strip_accents` (NFD, then drop nonspacing marks; when unset it follows
//!    `lowercase`), `lowercase` (per character, so a final sigma stays `σ` as in `tokenizers`).
//! 3. `BertPreTokenizer`: split on whitespace (dropped) and on punctuation (ASCII punctuation or
//!    a Unicode `P*` category; each mark is its own word).
//! 4. WordPiece: greedy longest-match-first over each word, continuations spelled with the
//!    `##` prefix; a word longer than `max_input_chars_per_word` characters, or with a piece that
//!    is in no entry of the vocabulary, becomes the unknown token.
//! 5. The post-processor (`TemplateProcessing` or `BertProcessing`) puts `[CLS]` before and
//!    `[SEP]` after a single sequence.
//!
//! Hand-written rather than taken from the `tokenizers` crate: the whole algorithm is a page,
//! and the crate would bring onig/esaxx/rayon-cond and a large dependency tree into every
//! binary. It is also faster here (no offsets, no `NormalizedString` alignment bookkeeping):
//! the words are looked up whole first, which is the common case.
//!
//! Known difference: `tokenizers` classifies characters with the `unicode_categories` crate
//! (Unicode 9 tables), this module with current tables, so a character assigned after Unicode 9
//! (newer emoji, for instance) that `tokenizers` drops as unassigned (`Cn`) is kept here and
//! becomes `[UNK]`. The `padding` and `truncation` settings of a `tokenizer.json` are not
//! applied; [`WordPiece::encode_truncated`] truncates like `tokenizers` does for one sequence.

use crate::error::Result;
use crate::formats::{bad_file, read_file, unsupported};
use rustc_hash::FxHashMap;
use serde_json::Value;
use std::path::Path;
use unicode_general_category::{get_general_category, GeneralCategory as Gc};
use unicode_normalization::UnicodeNormalization;

/// The normalization flags of `BertNormalizer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BertNormalizer {
    pub clean_text: bool,
    pub handle_chinese_chars: bool,
    pub strip_accents: bool,
    pub lowercase: bool,
}

impl BertNormalizer {
    /// `BertNormalizer`'s defaults for an uncased model (`strip_accents` follows `lowercase`).
    pub fn uncased(lowercase: bool) -> Self {
        Self {
            clean_text: true,
            handle_chinese_chars: true,
            strip_accents: lowercase,
            lowercase,
        }
    }

    /// Appends the normalized `text` to `out`.
    pub fn normalize_into(&self, text: &str, out: &mut String) {
        let mut cleaned = String::with_capacity(text.len() + 8);
        for c in text.chars() {
            if self.clean_text {
                if c == '\0' || c == '\u{fffd}' || is_control(c) {
                    continue;
                }
                if is_whitespace(c) {
                    cleaned.push(' ');
                    continue;
                }
            }
            if self.handle_chinese_chars && is_chinese_char(c) {
                cleaned.push(' ');
                cleaned.push(c);
                cleaned.push(' ');
            } else {
                cleaned.push(c);
            }
        }
        let push = |out: &mut String, c: char| {
            if self.lowercase {
                out.extend(c.to_lowercase());
            } else {
                out.push(c);
            }
        };
        if self.strip_accents && !cleaned.is_ascii() {
            for c in cleaned.nfd() {
                if get_general_category(c) != Gc::NonspacingMark {
                    push(out, c);
                }
            }
        } else if self.lowercase && cleaned.is_ascii() {
            cleaned.make_ascii_lowercase();
            out.push_str(&cleaned);
        } else {
            for c in cleaned.chars() {
                push(out, c);
            }
        }
    }
}

/// `tokenizers`' `is_whitespace`: tab, newline and carriage return count as whitespace.
fn is_whitespace(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || c.is_whitespace()
}

/// `tokenizers`' `is_control`: any `C*` category (Cc, Cf, Cs, Co, Cn) except tab, newline, CR.
fn is_control(c: char) -> bool {
    if matches!(c, '\t' | '\n' | '\r') {
        return false;
    }
    matches!(
        get_general_category(c),
        Gc::Control | Gc::Format | Gc::Surrogate | Gc::PrivateUse | Gc::Unassigned
    )
}

/// The CJK ideograph blocks of BERT's `_is_chinese_char` (not Japanese kana or Hangul).
fn is_chinese_char(c: char) -> bool {
    matches!(
        c as u32,
        0x4E00..=0x9FFF
            | 0x3400..=0x4DBF
            | 0x20000..=0x2A6DF
            | 0x2A700..=0x2B73F
            | 0x2B740..=0x2B81F
            | 0x2B920..=0x2CEAF
            | 0xF900..=0xFAFF
            | 0x2F800..=0x2FA1F
    )
}

/// BERT's punctuation: ASCII punctuation (which includes `$`, `+`, `^`, ... that Unicode files
/// under symbols) or a Unicode punctuation category.
fn is_punctuation(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_punctuation();
    }
    matches!(
        get_general_category(c),
        Gc::ConnectorPunctuation
            | Gc::DashPunctuation
            | Gc::OpenPunctuation
            | Gc::ClosePunctuation
            | Gc::InitialPunctuation
            | Gc::FinalPunctuation
            | Gc::OtherPunctuation
    )
}

/// A token cut out of the text before normalization (or after, when `normalized`).
#[derive(Debug, Clone)]
struct AddedToken {
    content: String,
    id: u32,
    normalized: bool,
}

/// A BERT WordPiece tokenizer. Cheap to share: `encode` takes `&self`.
#[derive(Debug, Clone)]
pub struct WordPiece {
    vocab: FxHashMap<String, u32>,
    id_to_token: Vec<Option<String>>,
    unk_id: u32,
    prefix: String,
    max_input_chars_per_word: usize,
    normalizer: Option<BertNormalizer>,
    /// Longest first, so that the first match at a position is the longest.
    added: Vec<AddedToken>,
    /// The post-processor's ids before and after a single sequence (`[CLS]` / `[SEP]`).
    prefix_ids: Vec<u32>,
    suffix_ids: Vec<u32>,
    pad_id: Option<u32>,
}

impl WordPiece {
    /// A folder (its `tokenizer.json`, else its `vocab.txt`), a `tokenizer.json` or a `vocab.txt`.
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let json = path.join("tokenizer.json");
            if json.is_file() {
                return Self::from_hf_json(&json);
            }
            let vocab = path.join("vocab.txt");
            if vocab.is_file() {
                return Self::from_vocab_txt(&vocab, true);
            }
            return Err(bad_file(
                path,
                "the folder has neither tokenizer.json nor vocab.txt",
            ));
        }
        if path.extension().is_some_and(|e| e == "txt") {
            Self::from_vocab_txt(path, true)
        } else {
            Self::from_hf_json(path)
        }
    }

    /// A bare BERT `vocab.txt` (one token per line, id = line number) with `BertTokenizer`'s
    /// defaults: basic tokenization with Chinese characters split, accents stripped when
    /// lowercasing, `[UNK]`, `[CLS] ... [SEP]`, words of at most 100 characters.
    pub fn from_vocab_txt(path: &Path, do_lower_case: bool) -> Result<Self> {
        let data = read_file(path)?;
        let text =
            std::str::from_utf8(&data).map_err(|e| bad_file(path, format!("not UTF-8 ({e})")))?;
        let mut vocab = FxHashMap::default();
        let mut id_to_token = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let token = line.trim_end_matches('\r');
            let id = u32::try_from(i).map_err(|_| bad_file(path, "too many lines"))?;
            vocab.insert(token.to_string(), id);
            id_to_token.push(Some(token.to_string()));
        }
        let need = |t: &str| {
            vocab
                .get(t)
                .copied()
                .ok_or_else(|| bad_file(path, format!("the vocabulary has no {t} token")))
        };
        let unk_id = need("[UNK]")?;
        let cls = need("[CLS]")?;
        let sep = need("[SEP]")?;
        let added = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            .iter()
            .filter_map(|t| {
                vocab.get(*t).map(|&id| AddedToken {
                    content: t.to_string(),
                    id,
                    normalized: false,
                })
            })
            .collect();
        let pad_id = vocab.get("[PAD]").copied();
        Ok(Self::assemble(Parts {
            vocab,
            id_to_token,
            unk_id,
            prefix: "##".into(),
            max_input_chars_per_word: 100,
            normalizer: Some(BertNormalizer::uncased(do_lower_case)),
            added,
            prefix_ids: vec![cls],
            suffix_ids: vec![sep],
            pad_id,
        }))
    }

    /// A Hugging Face `tokenizer.json` whose model is WordPiece. Normalizer: `BertNormalizer`
    /// or none; pre-tokenizer: `BertPreTokenizer` (or `WhitespaceSplit`-free none); post-processor:
    /// `TemplateProcessing`, `BertProcessing` or none. Anything else is refused by name.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let data = read_file(path)?;
        let root: Value = serde_json::from_slice(&data)
            .map_err(|e| bad_file(path, format!("invalid JSON: {e}")))?;
        let model = root
            .get("model")
            .ok_or_else(|| bad_file(path, "no `model` field"))?;
        match model.get("type").and_then(Value::as_str) {
            Some("WordPiece") => {}
            Some(t) => {
                return Err(unsupported(
                    path,
                    format!("model type {t:?} (this loader reads WordPiece)"),
                ))
            }
            None => return Err(bad_file(path, "`model` has no `type`")),
        }
        let vocab_json = model
            .get("vocab")
            .and_then(Value::as_object)
            .ok_or_else(|| bad_file(path, "`model.vocab` is not an object"))?;
        let mut vocab = FxHashMap::default();
        let mut max_id = 0u32;
        for (token, id) in vocab_json {
            let id = id
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| bad_file(path, format!("vocab entry {token:?} has id {id}")))?;
            max_id = max_id.max(id);
            vocab.insert(token.clone(), id);
        }
        if vocab.is_empty() {
            return Err(bad_file(path, "`model.vocab` is empty"));
        }
        let str_field = |key: &str, default: &str| -> Result<String> {
            match model.get(key) {
                None | Some(Value::Null) => Ok(default.to_string()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(v) => Err(bad_file(
                    path,
                    format!("`model.{key}` is {v}, not a string"),
                )),
            }
        };
        let unk = str_field("unk_token", "[UNK]")?;
        let prefix = str_field("continuing_subword_prefix", "##")?;
        let max_input_chars_per_word = match model.get("max_input_chars_per_word") {
            None | Some(Value::Null) => 100,
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    bad_file(path, format!("`model.max_input_chars_per_word` is {v}"))
                })?,
        };

        let mut added = Vec::new();
        if let Some(list) = root.get("added_tokens").and_then(Value::as_array) {
            for t in list {
                let content = t.get("content").and_then(Value::as_str);
                let id = t
                    .get("id")
                    .and_then(Value::as_u64)
                    .and_then(|i| u32::try_from(i).ok());
                let (Some(content), Some(id)) = (content, id) else {
                    return Err(bad_file(
                        path,
                        format!("added token {t} lacks content or id"),
                    ));
                };
                if content.is_empty() {
                    continue;
                }
                max_id = max_id.max(id);
                added.push(AddedToken {
                    content: content.to_string(),
                    id,
                    normalized: t
                        .get("normalized")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                });
            }
        }
        let unk_id = vocab
            .get(&unk)
            .copied()
            .or_else(|| added.iter().find(|a| a.content == unk).map(|a| a.id))
            .ok_or_else(|| {
                bad_file(
                    path,
                    format!("the unknown token {unk:?} is not in the vocabulary"),
                )
            })?;

        let normalizer = match root.get("normalizer") {
            None | Some(Value::Null) => None,
            Some(n) => Some(bert_normalizer(n, path)?),
        };
        match root.get("pre_tokenizer") {
            None | Some(Value::Null) => {}
            Some(p) => match p.get("type").and_then(Value::as_str) {
                Some("BertPreTokenizer") => {}
                Some(t) => {
                    return Err(unsupported(
                        path,
                        format!("pre_tokenizer type {t:?} (only BertPreTokenizer)"),
                    ))
                }
                None => return Err(bad_file(path, "pre_tokenizer without a type")),
            },
        }
        let lookup = |t: &str| -> Option<u32> {
            added
                .iter()
                .find(|a| a.content == t)
                .map(|a| a.id)
                .or_else(|| vocab.get(t).copied())
        };
        let (prefix_ids, suffix_ids) = match root.get("post_processor") {
            None | Some(Value::Null) => (Vec::new(), Vec::new()),
            Some(p) => post_processor(p, path, &lookup)?,
        };
        let pad_id = root
            .get("padding")
            .and_then(|p| p.get("pad_id"))
            .and_then(Value::as_u64)
            .and_then(|i| u32::try_from(i).ok());

        let mut id_to_token = vec![None; max_id as usize + 1];
        for (t, &id) in &vocab {
            id_to_token[id as usize] = Some(t.clone());
        }
        for a in &added {
            id_to_token[a.id as usize] = Some(a.content.clone());
        }
        Ok(Self::assemble(Parts {
            vocab,
            id_to_token,
            unk_id,
            prefix,
            max_input_chars_per_word,
            normalizer,
            added,
            prefix_ids,
            suffix_ids,
            pad_id,
        }))
    }

    fn assemble(mut p: Parts) -> Self {
        p.added.sort_by_key(|a| std::cmp::Reverse(a.content.len()));
        Self {
            vocab: p.vocab,
            id_to_token: p.id_to_token,
            unk_id: p.unk_id,
            prefix: p.prefix,
            max_input_chars_per_word: p.max_input_chars_per_word,
            normalizer: p.normalizer,
            added: p.added,
            prefix_ids: p.prefix_ids,
            suffix_ids: p.suffix_ids,
            pad_id: p.pad_id,
        }
    }

    /// The ids of `text` with the post-processor's special tokens (`[CLS] ... [SEP]`).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = self.prefix_ids.clone();
        self.encode_into(text, &mut ids);
        ids.extend_from_slice(&self.suffix_ids);
        ids
    }

    /// [`Self::encode`] cut to at most `max_len` ids the way `tokenizers` truncates a single
    /// sequence: the text's own ids are cut so that they and the special tokens fit.
    pub fn encode_truncated(&self, text: &str, max_len: usize) -> Vec<u32> {
        let mut body = Vec::new();
        self.encode_into(text, &mut body);
        body.truncate(max_len.saturating_sub(self.num_special_tokens()));
        let mut ids = Vec::with_capacity(body.len() + self.num_special_tokens());
        ids.extend_from_slice(&self.prefix_ids);
        ids.extend_from_slice(&body);
        ids.extend_from_slice(&self.suffix_ids);
        ids
    }

    /// The ids of `text` without the post-processor's special tokens.
    pub fn encode_without_special(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        self.encode_into(text, &mut ids);
        ids
    }

    /// How many ids the post-processor adds to a single sequence.
    pub fn num_special_tokens(&self) -> usize {
        self.prefix_ids.len() + self.suffix_ids.len()
    }

    /// The padding id of the `tokenizer.json` (or `[PAD]` of a `vocab.txt`), if any.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// One more than the largest id.
    pub fn vocab_size(&self) -> usize {
        self.id_to_token.len()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.added
            .iter()
            .find(|a| a.content == token)
            .map(|a| a.id)
            .or_else(|| self.vocab.get(token).copied())
    }

    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.id_to_token.get(id as usize)?.as_deref()
    }

    fn encode_into(&self, text: &str, out: &mut Vec<u32>) {
        // Raw-text added tokens first; the pieces between them are normalized, then searched
        // for normalized added tokens, then pre-tokenized and split into word pieces.
        let mut normalized = String::new();
        for piece in split_added(text, &self.added, false) {
            match piece {
                Piece::Added(id) => out.push(id),
                Piece::Text(s) => {
                    normalized.clear();
                    match &self.normalizer {
                        Some(n) => n.normalize_into(s, &mut normalized),
                        None => normalized.push_str(s),
                    }
                    for piece in split_added(&normalized, &self.added, true) {
                        match piece {
                            Piece::Added(id) => out.push(id),
                            Piece::Text(s) => self.pre_tokenize_and_split(s, out),
                        }
                    }
                }
            }
        }
    }

    /// `BertPreTokenizer` then WordPiece on each word.
    fn pre_tokenize_and_split(&self, text: &str, out: &mut Vec<u32>) {
        let mut start = None;
        let mut buf = String::new();
        for (i, c) in text.char_indices() {
            let space = c.is_whitespace();
            if space || is_punctuation(c) {
                if let Some(s) = start.take() {
                    self.word(&text[s..i], &mut buf, out);
                }
                if !space {
                    self.word(&text[i..i + c.len_utf8()], &mut buf, out);
                }
            } else if start.is_none() {
                start = Some(i);
            }
        }
        if let Some(s) = start {
            self.word(&text[s..], &mut buf, out);
        }
    }

    /// Greedy longest-match-first WordPiece over one word; `buf` is scratch space for the
    /// `##`-prefixed candidates.
    fn word(&self, word: &str, buf: &mut String, out: &mut Vec<u32>) {
        if let Some(&id) = self.vocab.get(word) {
            if word.chars().count() <= self.max_input_chars_per_word {
                out.push(id);
                return;
            }
        }
        if word.chars().count() > self.max_input_chars_per_word {
            out.push(self.unk_id);
            return;
        }
        let first = out.len();
        let mut start = 0;
        while start < word.len() {
            let mut end = word.len();
            let mut found = None;
            while start < end {
                let candidate = if start == 0 {
                    &word[..end]
                } else {
                    buf.clear();
                    buf.push_str(&self.prefix);
                    buf.push_str(&word[start..end]);
                    buf.as_str()
                };
                if let Some(&id) = self.vocab.get(candidate) {
                    found = Some(id);
                    break;
                }
                // Back off by one character.
                end = word[..end]
                    .char_indices()
                    .next_back()
                    .map_or(start, |(i, _)| i);
            }
            match found {
                Some(id) => out.push(id),
                None => {
                    out.truncate(first);
                    out.push(self.unk_id);
                    return;
                }
            }
            start = end;
        }
    }
}

struct Parts {
    vocab: FxHashMap<String, u32>,
    id_to_token: Vec<Option<String>>,
    unk_id: u32,
    prefix: String,
    max_input_chars_per_word: usize,
    normalizer: Option<BertNormalizer>,
    added: Vec<AddedToken>,
    prefix_ids: Vec<u32>,
    suffix_ids: Vec<u32>,
    pad_id: Option<u32>,
}

fn bert_normalizer(v: &Value, path: &Path) -> Result<BertNormalizer> {
    match v.get("type").and_then(Value::as_str) {
        Some("BertNormalizer") => {}
        Some(t) => {
            return Err(unsupported(
                path,
                format!("normalizer type {t:?} (only BertNormalizer)"),
            ))
        }
        None => return Err(bad_file(path, "normalizer without a type")),
    }
    let flag = |key: &str, default: bool| -> Result<Option<bool>> {
        match v.get(key) {
            None => Ok(Some(default)),
            Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(x) => Err(bad_file(
                path,
                format!("normalizer.{key} is {x}, not a boolean"),
            )),
        }
    };
    let lowercase = flag("lowercase", true)?.unwrap_or(true);
    Ok(BertNormalizer {
        clean_text: flag("clean_text", true)?.unwrap_or(true),
        handle_chinese_chars: flag("handle_chinese_chars", true)?.unwrap_or(true),
        // `null` (MiniLM's value) means "follow lowercase", as in `tokenizers`.
        strip_accents: match v.get("strip_accents") {
            None => lowercase,
            _ => flag("strip_accents", lowercase)?.unwrap_or(lowercase),
        },
        lowercase,
    })
}

/// The ids a post-processor puts before and after a single sequence.
fn post_processor(
    v: &Value,
    path: &Path,
    lookup: &dyn Fn(&str) -> Option<u32>,
) -> Result<(Vec<u32>, Vec<u32>)> {
    match v.get("type").and_then(Value::as_str) {
        Some("TemplateProcessing") => {
            let single = v
                .get("single")
                .and_then(Value::as_array)
                .ok_or_else(|| bad_file(path, "TemplateProcessing without a `single` list"))?;
            let specials = v.get("special_tokens");
            let (mut before, mut after) = (Vec::new(), Vec::new());
            let mut seen_sequence = false;
            for item in single {
                if item.get("Sequence").is_some() {
                    if seen_sequence {
                        return Err(unsupported(path, "a single template with two sequences"));
                    }
                    seen_sequence = true;
                    continue;
                }
                let name = item
                    .get("SpecialToken")
                    .and_then(|s| s.get("id"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        bad_file(path, format!("template item {item} not understood"))
                    })?;
                // The template's own table gives the ids; else the vocabulary does.
                let ids: Vec<u32> = match specials
                    .and_then(|s| s.get(name))
                    .and_then(|s| s.get("ids"))
                    .and_then(Value::as_array)
                {
                    Some(list) => list
                        .iter()
                        .map(|i| i.as_u64().and_then(|i| u32::try_from(i).ok()))
                        .collect::<Option<_>>()
                        .ok_or_else(|| bad_file(path, format!("special token {name}: bad ids")))?,
                    None => vec![lookup(name).ok_or_else(|| {
                        bad_file(
                            path,
                            format!("template token {name:?} is not in the vocabulary"),
                        )
                    })?],
                };
                if seen_sequence {
                    after.extend(ids);
                } else {
                    before.extend(ids);
                }
            }
            Ok((before, after))
        }
        Some("BertProcessing") => {
            let id = |key: &str| -> Result<u32> {
                v.get(key)
                    .and_then(|p| p.get(1))
                    .and_then(Value::as_u64)
                    .and_then(|i| u32::try_from(i).ok())
                    .ok_or_else(|| bad_file(path, format!("BertProcessing without `{key}`")))
            };
            Ok((vec![id("cls")?], vec![id("sep")?]))
        }
        Some(t) => Err(unsupported(
            path,
            format!("post_processor type {t:?} (TemplateProcessing or BertProcessing)"),
        )),
        None => Err(bad_file(path, "post_processor without a type")),
    }
}

enum Piece<'a> {
    Text(&'a str),
    Added(u32),
}

/// Cuts the added tokens whose `normalized` flag equals `normalized` out of `text`,
/// leftmost-longest (`tokens` is sorted longest first).
fn split_added<'a>(text: &'a str, tokens: &[AddedToken], normalized: bool) -> Vec<Piece<'a>> {
    let mut pieces = Vec::new();
    let candidates: Vec<&AddedToken> = tokens
        .iter()
        .filter(|t| t.normalized == normalized)
        .collect();
    if candidates.is_empty() {
        pieces.push(Piece::Text(text));
        return pieces;
    }
    let bytes = text.as_bytes();
    let mut last = 0;
    let mut i = 0;
    while i < bytes.len() {
        let hit = candidates
            .iter()
            .find(|t| bytes[i..].starts_with(t.content.as_bytes()));
        match hit {
            Some(t) => {
                if last < i {
                    pieces.push(Piece::Text(&text[last..i]));
                }
                pieces.push(Piece::Added(t.id));
                i += t.content.len();
                last = i;
            }
            None => i += 1,
        }
    }
    if last < text.len() {
        pieces.push(Piece::Text(&text[last..]));
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> WordPiece {
        let tokens = [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "hello", ",",
            "!", "a", "##b", "cafe", "中",
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vocab.txt");
        std::fs::write(&path, tokens.join("\n")).unwrap();
        WordPiece::from_vocab_txt(&path, true).unwrap()
    }

    #[test]
    fn greedy_longest_match_first() {
        let wp = tiny();
        assert_eq!(wp.encode("unaffable"), vec![2, 5, 6, 7, 3]);
        assert_eq!(
            wp.encode("Hello, UNAFFABLE!"),
            vec![2, 8, 9, 5, 6, 7, 10, 3]
        );
        // One unknown piece makes the whole word unknown.
        assert_eq!(wp.encode_without_special("unaffx"), vec![1]);
        assert_eq!(wp.encode_without_special("abbb"), vec![11, 12, 12, 12]);
        assert_eq!(wp.encode_without_special("Café 中x"), vec![13, 14, 1]);
        assert_eq!(wp.encode_without_special("hello[SEP]a"), vec![8, 3, 11]);
        assert_eq!(wp.encode(""), vec![2, 3]);
        assert_eq!(wp.encode_truncated("a a a a", 4), vec![2, 11, 11, 3]);
        assert_eq!(wp.encode_truncated("a a a a", 1), vec![2, 3]);
        let long = "a".repeat(101);
        assert_eq!(wp.encode_without_special(&long), vec![1]);
    }

    #[test]
    fn vocab_without_unk_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vocab.txt");
        std::fs::write(&path, "a\nb\n").unwrap();
        let e = WordPiece::from_vocab_txt(&path, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vocab.txt") && e.contains("[UNK]"), "{e}");
    }
}
