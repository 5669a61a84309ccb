//! Hugging Face `tokenizer.json`, restricted to byte-level BPE.
//!
//! Supported: `model.type = "BPE"` (merges as `"a b"` strings or `["a", "b"]`
//! pairs, `ignore_merges`), `normalizer` null or `NFC` (or a `Sequence` of those),
//! `pre_tokenizer` = `ByteLevel` alone or a `Sequence` of `Split` (Regex or String
//! pattern, behaviour `Isolated`, not inverted), `Digits` and `ByteLevel`
//! (`add_prefix_space = false`). Anything else is refused with an error naming
//! the unsupported field, so a model never silently tokenizes differently.
//! `added_tokens` marked `special` become special tokens; the others are always
//! matched as whole strings, like Hugging Face does. The `decoder` is assumed to
//! be ByteLevel and the `post_processor` (BOS insertion) is not applied.

use super::{bad_file, byte_level_decode, is_byte_level, read_file, unsupported};
use crate::error::Result;
use crate::pretok::{DIGITS_PATTERN, GPT2_PATTERN};
use crate::{BpeModel, Normalizer, PreTokenizer, Rank, Tokenizer};
use serde_json::Value;
use std::path::Path;

/// Load a tokenizer.json file.
pub fn load(path: &Path) -> Result<Tokenizer> {
    let data = read_file(path)?;
    parse(&data, path)
}

fn normalizer(v: &Value, path: &Path) -> Result<Option<Normalizer>> {
    match v {
        Value::Null => Ok(None),
        _ => match v.get("type").and_then(Value::as_str) {
            Some("NFC") => Ok(Some(Normalizer::Nfc)),
            Some("Sequence") => {
                let list = v
                    .get("normalizers")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let mut out = None;
                for n in &list {
                    if let Some(x) = normalizer(n, path)? {
                        out = Some(x);
                    }
                }
                Ok(out)
            }
            Some(t) => Err(unsupported(
                path,
                format!("normalizer type {t:?} (only NFC is supported)"),
            )),
            None => Err(bad_file(path, "normalizer without a type")),
        },
    }
}

/// Append the split patterns of one pre-tokenizer; returns whether it was ByteLevel.
fn pre_tokenizer(v: &Value, path: &Path, out: &mut Vec<String>) -> Result<bool> {
    let ty = v
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| bad_file(path, "pre_tokenizer without a type"))?;
    match ty {
        "ByteLevel" => {
            if v.get("add_prefix_space").and_then(Value::as_bool) == Some(true) {
                return Err(unsupported(
                    path,
                    "ByteLevel pre-tokenizer with add_prefix_space = true",
                ));
            }
            if v.get("use_regex").and_then(Value::as_bool).unwrap_or(true) {
                out.push(GPT2_PATTERN.to_string());
            }
            Ok(true)
        }
        "Split" => {
            let behavior = v
                .get("behavior")
                .and_then(Value::as_str)
                .unwrap_or("Isolated");
            if behavior != "Isolated" {
                return Err(unsupported(
                    path,
                    format!("Split pre-tokenizer with behavior {behavior:?} (only Isolated)"),
                ));
            }
            if v.get("invert").and_then(Value::as_bool) == Some(true) {
                return Err(unsupported(path, "Split pre-tokenizer with invert = true"));
            }
            let pat = v
                .get("pattern")
                .ok_or_else(|| bad_file(path, "Split without a pattern"))?;
            if let Some(re) = pat.get("Regex").and_then(Value::as_str) {
                out.push(re.to_string());
            } else if let Some(s) = pat.get("String").and_then(Value::as_str) {
                out.push(fancy_regex::escape(s).into_owned());
            } else {
                return Err(bad_file(path, "Split pattern is neither Regex nor String"));
            }
            Ok(false)
        }
        "Digits" => {
            if v.get("individual_digits")
                .and_then(Value::as_bool)
                .unwrap_or(false)
            {
                out.push(DIGITS_PATTERN.to_string());
            } else {
                out.push(r"\p{N}+".to_string());
            }
            Ok(false)
        }
        "Sequence" => {
            let list = v
                .get("pretokenizers")
                .and_then(Value::as_array)
                .ok_or_else(|| bad_file(path, "Sequence pre-tokenizer without pretokenizers"))?;
            let mut byte_level = false;
            for p in list {
                byte_level |= pre_tokenizer(p, path, out)?;
            }
            Ok(byte_level)
        }
        other => Err(unsupported(path, format!("pre_tokenizer type {other:?}"))),
    }
}

/// Parse tokenizer.json contents (`path` names the file in errors).
pub fn parse(data: &[u8], path: &Path) -> Result<Tokenizer> {
    let root: Value =
        serde_json::from_slice(data).map_err(|e| bad_file(path, format!("invalid JSON: {e}")))?;
    let model = root
        .get("model")
        .ok_or_else(|| bad_file(path, "no \"model\" object"))?;
    let mtype = model.get("type").and_then(Value::as_str).unwrap_or("BPE");
    if mtype != "BPE" {
        return Err(unsupported(
            path,
            format!("model type {mtype:?} (only BPE)"),
        ));
    }
    if model.get("byte_fallback").and_then(Value::as_bool) == Some(true) {
        return Err(unsupported(
            path,
            "BPE with byte_fallback (SentencePiece-style BPE)",
        ));
    }
    for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
        if model
            .get(key)
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
        {
            return Err(unsupported(path, format!("BPE with {key}")));
        }
    }
    if model
        .get("dropout")
        .and_then(Value::as_f64)
        .is_some_and(|d| d > 0.0)
    {
        return Err(unsupported(path, "BPE dropout"));
    }
    let normalizer = normalizer(root.get("normalizer").unwrap_or(&Value::Null), path)?;
    let mut patterns = Vec::new();
    let byte_level = match root.get("pre_tokenizer") {
        None | Some(Value::Null) => false,
        Some(p) => pre_tokenizer(p, path, &mut patterns)?,
    };
    if !byte_level {
        return Err(unsupported(
            path,
            "pre_tokenizer without ByteLevel (not a byte-level BPE)",
        ));
    }

    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| bad_file(path, "model.vocab is not an object"))?;
    let mut tokens: Vec<(Vec<u8>, Rank)> = Vec::with_capacity(vocab.len());
    let mut ids = rustc_hash::FxHashMap::default();
    let mut raw_text = Vec::new();
    for (s, v) in vocab {
        let id = v
            .as_u64()
            .and_then(|x| Rank::try_from(x).ok())
            .ok_or_else(|| bad_file(path, format!("model.vocab[{s:?}] is not a token id")))?;
        ids.insert(s.as_str(), id);
        let entry = (byte_level_decode(s), id);
        if is_byte_level(s) {
            tokens.push(entry);
        } else {
            raw_text.push(entry);
        }
    }
    tokens.sort_by_key(|(_, id)| *id);
    raw_text.sort_by_key(|(_, id)| *id);
    tokens.extend(raw_text);

    let merges = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| bad_file(path, "model.merges is not an array"))?;
    let mut merge_ids = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        let (a, b) = match m {
            Value::String(s) => match s.split_once(' ') {
                Some(p) => p,
                None => {
                    return Err(bad_file(
                        path,
                        format!("model.merges[{i}] = {s:?} has no space"),
                    ))
                }
            },
            Value::Array(p) if p.len() == 2 => match (p[0].as_str(), p[1].as_str()) {
                (Some(a), Some(b)) => (a, b),
                _ => {
                    return Err(bad_file(
                        path,
                        format!("model.merges[{i}] is not a pair of strings"),
                    ))
                }
            },
            _ => {
                return Err(bad_file(
                    path,
                    format!("model.merges[{i}] is neither \"a b\" nor [a, b]"),
                ))
            }
        };
        match (ids.get(a), ids.get(b)) {
            (Some(&x), Some(&y)) => merge_ids.push((x, y)),
            _ => {
                return Err(bad_file(
                    path,
                    format!("model.merges[{i}] uses a token missing from the vocab"),
                ))
            }
        }
    }
    let ignore_merges = model
        .get("ignore_merges")
        .and_then(Value::as_bool)
        .unwrap_or(false);

    let mut specials = Vec::new();
    let mut added = Vec::new();
    if let Some(list) = root.get("added_tokens").and_then(Value::as_array) {
        for (i, t) in list.iter().enumerate() {
            let id = t
                .get("id")
                .and_then(Value::as_u64)
                .and_then(|x| Rank::try_from(x).ok());
            let content = t.get("content").and_then(Value::as_str);
            let (Some(id), Some(content)) = (id, content) else {
                return Err(bad_file(
                    path,
                    format!("added_tokens[{i}] lacks an id or content"),
                ));
            };
            if t.get("special").and_then(Value::as_bool).unwrap_or(false) {
                specials.push((content.to_string(), id));
            } else {
                added.push((content.to_string(), id));
            }
        }
    }
    let pats: Vec<&str> = patterns.iter().map(String::as_str).collect();
    let name = path
        .parent()
        .and_then(|p| p.file_name())
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tokenizer.json".into());
    let find = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| specials.iter().find(|(s, _)| s == n).map(|(_, id)| *id))
    };
    let bos = find(&["<|begin_of_text|>", "<s>", "<|im_start|>"]);
    let eos = find(&["<|end_of_text|>", "</s>", "<|endoftext|>", "<|im_end|>"]);
    Ok(Tokenizer::new(
        name,
        BpeModel::from_merges(tokens, &merge_ids, ignore_merges),
        PreTokenizer::new(&pats)?,
        &specials,
    )
    .with_added_tokens(&added)
    .with_normalizer(normalizer)
    .with_bos_eos(bos, eos))
}
