//! Converting any loaded byte-level vocabulary into a Hugging Face `tokenizer.json`.
//!
//! tiktoken rank files and GGUF vocabularies store ranks, not merges. Hugging Face's BPE needs the
//! merge list, so each multi-byte token's merge is recovered the way tiktoken's own converters do:
//! run BPE on the token's bytes allowing only tokens of lower rank; it must end in exactly two
//! parts, and those are the merge. Listing merges in the order of the tokens they produce makes
//! Hugging Face's "lowest merge index first" equal to tiktoken's "lowest rank first".
//! Used by the benchmark to run HF `tokenizers` on the same vocabulary as kiln.

use crate::error::{Result, TokenizerError};
use crate::export::byte_to_unicode;
use crate::{Rank, Tokenizer};
use serde_json::{json, Map, Value};

/// The two tokens whose merge produces token `rank`, found by BPE restricted to lower ranks.
fn split_token(tok: &Tokenizer, bytes: &[u8], rank: Rank) -> Option<(Rank, Rank)> {
    let bpe = tok.bpe();
    let mut parts: Vec<Vec<u8>> = bytes.iter().map(|&b| vec![b]).collect();
    loop {
        let mut best: Option<(Rank, usize)> = None;
        for i in 0..parts.len().saturating_sub(1) {
            let mut joined = parts[i].clone();
            joined.extend_from_slice(&parts[i + 1]);
            if let Some(r) = bpe.token_id(&joined) {
                if r < rank && best.is_none_or(|(b, _)| r < b) {
                    best = Some((r, i));
                }
            }
        }
        let Some((_, i)) = best else { break };
        let right = parts.remove(i + 1);
        parts[i].extend_from_slice(&right);
    }
    match parts.as_slice() {
        [a, b] => Some((bpe.token_id(a)?, bpe.token_id(b)?)),
        _ => None,
    }
}

/// A `tokenizer.json` that Hugging Face `tokenizers` loads and that encodes like `tok`
/// (ordinary text; special tokens become `added_tokens`).
pub fn to_hf_json(tok: &Tokenizer) -> Result<String> {
    let table = byte_to_unicode();
    let show = |b: &[u8]| -> String { b.iter().map(|&x| table[x as usize]).collect() };
    let bpe = tok.bpe();
    let mut vocab = Map::new();
    let mut merges: Vec<(Rank, String)> = Vec::new();
    for id in 0..bpe.len() as Rank {
        let Some(bytes) = bpe.token_bytes(id) else {
            continue;
        };
        vocab.insert(show(bytes), json!(id));
        if bytes.len() > 1 {
            let (a, b) = split_token(tok, bytes, id).ok_or_else(|| TokenizerError::BadFile {
                path: tok.name().into(),
                message: format!("token {id} cannot be built from two lower-ranked tokens"),
            })?;
            let (Some(ab), Some(bb)) = (bpe.token_bytes(a), bpe.token_bytes(b)) else {
                continue;
            };
            merges.push((id, format!("{} {}", show(ab), show(bb))));
        }
    }
    merges.sort_by_key(|m| m.0);
    let mut pre: Vec<Value> = tok
        .pre_tokenizer()
        .splits()
        .iter()
        .map(|s| {
            json!({"type": "Split", "pattern": {"Regex": crate::pretok::hf_compatible_pattern(s.pattern())},
                   "behavior": "Isolated", "invert": false})
        })
        .collect();
    pre.push(json!({"type": "ByteLevel", "add_prefix_space": false,
                    "trim_offsets": true, "use_regex": false}));
    let added: Vec<Value> = tok
        .special_tokens()
        .into_iter()
        .map(|(s, id)| {
            json!({"id": id, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab,
            "merges": merges.into_iter().map(|m| m.1).collect::<Vec<_>>(),
        }
    });
    Ok(doc.to_string())
}
