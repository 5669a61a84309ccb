//! GPT-2's original vocabulary files: `encoder.json` (byte-level token string to
//! id) and `vocab.bpe` (merges in rank order, after a `#version` line).
//!
//! The result splits text with the r50k pattern and merges with the listed merges
//! only, as GPT-2 and Hugging Face do; `tests/gpt2_files.rs` checks that it equals
//! tiktoken's r50k_base.

use super::{bad_file, byte_level_decode, read_file};
use crate::error::{Result, TokenizerError};
use crate::pretok::R50K_PATTERN;
use crate::{BpeModel, PreTokenizer, Rank, Tokenizer};
use rustc_hash::FxHashMap;
use std::path::Path;

/// Parse `encoder.json` into `(token string, id)` pairs.
pub fn parse_encoder(data: &[u8], path: &Path) -> Result<Vec<(String, Rank)>> {
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(data)
        .map_err(|e| bad_file(path, format!("not a JSON object of token -> id: {e}")))?;
    map.into_iter()
        .map(|(k, v)| {
            let id = v
                .as_u64()
                .and_then(|x| Rank::try_from(x).ok())
                .ok_or_else(|| bad_file(path, format!("token {k:?} has a non-integer id {v}")))?;
            Ok((k, id))
        })
        .collect()
}

/// Parse `vocab.bpe` into merges of token strings, in rank order.
pub fn parse_merges(data: &[u8], path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::str::from_utf8(data).map_err(|e| {
        bad_file(
            path,
            format!("not UTF-8 at byte offset {}", e.valid_up_to()),
        )
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() || (i == 0 && line.starts_with("#version")) {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                out.push((a.to_string(), b.to_string()))
            }
            _ => {
                return Err(TokenizerError::BadLine {
                    path: path.to_path_buf(),
                    line: i + 1,
                    message: format!("expected a merge `left right`, got {line:?}"),
                })
            }
        }
    }
    Ok(out)
}

/// Load the two files.
pub fn load(encoder_json: &Path, vocab_bpe: &Path) -> Result<Tokenizer> {
    let vocab = parse_encoder(&read_file(encoder_json)?, encoder_json)?;
    let merges = parse_merges(&read_file(vocab_bpe)?, vocab_bpe)?;
    let ids: FxHashMap<&str, Rank> = vocab.iter().map(|(s, id)| (s.as_str(), *id)).collect();
    let mut merge_ids = Vec::with_capacity(merges.len());
    for (n, (a, b)) in merges.iter().enumerate() {
        let (Some(&ia), Some(&ib)) = (ids.get(a.as_str()), ids.get(b.as_str())) else {
            return Err(TokenizerError::BadLine {
                path: vocab_bpe.to_path_buf(),
                line: n + 2,
                message: format!("merge {a:?} {b:?} uses a token missing from encoder.json"),
            });
        };
        merge_ids.push((ia, ib));
    }
    let eot = ids.get("<|endoftext|>").copied();
    let tokens: Vec<(Vec<u8>, Rank)> = vocab
        .iter()
        .map(|(s, id)| (byte_level_decode(s), *id))
        .collect();
    let specials: Vec<(String, Rank)> = eot
        .map(|id| ("<|endoftext|>".to_string(), id))
        .into_iter()
        .collect();
    Ok(Tokenizer::new(
        "gpt2",
        BpeModel::from_merges(tokens, &merge_ids, false),
        PreTokenizer::new(&[R50K_PATTERN])?,
        &specials,
    )
    .with_bos_eos(eot, eot))
}
