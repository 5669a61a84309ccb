//! tiktoken `.tiktoken` rank files and the OpenAI encodings' patterns and specials.
//!
//! The file has one `base64(token bytes) rank` per line. The encodings' split
//! patterns and special tokens are copied from tiktoken's
//! `tiktoken_ext/openai_public.py`; the expected number of ranks catches a file
//! truncated at a line boundary, which would otherwise parse cleanly.

use super::{bad_file, read_file};
use crate::error::{Result, TokenizerError};
use crate::pretok::{CL100K_PATTERN, O200K_PATTERN, R50K_PATTERN};
use crate::{BpeModel, PreTokenizer, Rank, Tokenizer};
use base64::Engine;
use rustc_hash::FxHashMap;
use std::path::Path;

const ENDOFTEXT: &str = "<|endoftext|>";
const FIM_PREFIX: &str = "<|fim_prefix|>";
const FIM_MIDDLE: &str = "<|fim_middle|>";
const FIM_SUFFIX: &str = "<|fim_suffix|>";
const ENDOFPROMPT: &str = "<|endofprompt|>";

/// What defines one OpenAI encoding besides its rank file.
#[derive(Debug, Clone)]
pub struct EncodingSpec {
    pub name: &'static str,
    pub pattern: &'static str,
    pub specials: &'static [(&'static str, Rank)],
    /// Number of mergeable ranks in the official file (ranks are 0..n).
    pub n_ranks: usize,
    /// The rank file this encoding reads (p50k_edit shares p50k_base's).
    pub rank_file: &'static str,
}

/// The spec of a known encoding name.
pub fn spec(encoding: &str) -> Result<EncodingSpec> {
    Ok(match encoding {
        "r50k_base" | "gpt2" => EncodingSpec {
            name: "r50k_base",
            pattern: R50K_PATTERN,
            specials: &[(ENDOFTEXT, 50256)],
            n_ranks: 50256,
            rank_file: "r50k_base",
        },
        "p50k_base" => EncodingSpec {
            name: "p50k_base",
            pattern: R50K_PATTERN,
            specials: &[(ENDOFTEXT, 50256)],
            n_ranks: 50280,
            rank_file: "p50k_base",
        },
        "p50k_edit" => EncodingSpec {
            name: "p50k_edit",
            pattern: R50K_PATTERN,
            specials: &[
                (ENDOFTEXT, 50256),
                (FIM_PREFIX, 50281),
                (FIM_MIDDLE, 50282),
                (FIM_SUFFIX, 50283),
            ],
            n_ranks: 50280,
            rank_file: "p50k_base",
        },
        "cl100k_base" => EncodingSpec {
            name: "cl100k_base",
            pattern: CL100K_PATTERN,
            specials: &[
                (ENDOFTEXT, 100257),
                (FIM_PREFIX, 100258),
                (FIM_MIDDLE, 100259),
                (FIM_SUFFIX, 100260),
                (ENDOFPROMPT, 100276),
            ],
            n_ranks: 100256,
            rank_file: "cl100k_base",
        },
        "o200k_base" => EncodingSpec {
            name: "o200k_base",
            pattern: O200K_PATTERN,
            specials: &[(ENDOFTEXT, 199999), (ENDOFPROMPT, 200018)],
            n_ranks: 199998,
            rank_file: "o200k_base",
        },
        other => return Err(TokenizerError::UnknownEncoding(other.to_string())),
    })
}

/// Parse a rank file's contents. Errors name `path` and the 1-based line.
pub fn parse_ranks(data: &[u8], path: &Path) -> Result<Vec<(Vec<u8>, Rank)>> {
    let bad = |line: usize, message: String| TokenizerError::BadLine {
        path: path.to_path_buf(),
        line,
        message,
    };
    let mut out = Vec::new();
    let mut seen_rank: FxHashMap<Rank, usize> = FxHashMap::default();
    let mut seen_token: FxHashMap<Vec<u8>, usize> = FxHashMap::default();
    for (i, raw) in data.split(|&b| b == b'\n').enumerate() {
        let lineno = i + 1;
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.is_empty() {
            continue;
        }
        let line = std::str::from_utf8(line).map_err(|e| {
            bad(
                lineno,
                format!("not UTF-8 at column {}", e.valid_up_to() + 1),
            )
        })?;
        let mut fields = line.split_ascii_whitespace();
        let (Some(tok), Some(rank), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(bad(
                lineno,
                format!("expected `<base64> <rank>`, got {:?}", truncate(line)),
            ));
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(tok)
            .map_err(|e| bad(lineno, format!("bad base64 {:?}: {e}", truncate(tok))))?;
        let rank: Rank = rank
            .parse()
            .map_err(|_| bad(lineno, format!("bad rank {:?}", truncate(rank))))?;
        if bytes.is_empty() {
            return Err(bad(lineno, "empty token".into()));
        }
        if let Some(prev) = seen_rank.insert(rank, lineno) {
            return Err(bad(
                lineno,
                format!("duplicate rank {rank} (first on line {prev})"),
            ));
        }
        if let Some(prev) = seen_token.insert(bytes.clone(), lineno) {
            return Err(bad(
                lineno,
                format!("duplicate token {tok} (first on line {prev})"),
            ));
        }
        out.push((bytes, rank));
    }
    Ok(out)
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Build a tokenizer from parsed ranks, checking they form a usable byte-level
/// vocabulary: every single byte present, the expected number of ranks, and no
/// rank shared with a special token.
pub fn from_ranks(
    path: &Path,
    ranks: &[(Vec<u8>, Rank)],
    spec: &EncodingSpec,
) -> Result<Tokenizer> {
    if ranks.len() != spec.n_ranks {
        return Err(bad_file(
            path,
            format!(
                "{} has {} ranks but {} expects {} (truncated or wrong file?)",
                spec.rank_file,
                ranks.len(),
                spec.name,
                spec.n_ranks
            ),
        ));
    }
    // Ranks are unique (checked by the parser); a special token must not reuse one.
    for (s, id) in spec.specials {
        if let Some((b, _)) = ranks.iter().find(|(_, r)| r == id) {
            return Err(bad_file(
                path,
                format!(
                    "rank {id} (token {:?}) collides with special token {s}",
                    String::from_utf8_lossy(b)
                ),
            ));
        }
    }
    let mut have = [false; 256];
    for (b, _) in ranks {
        if b.len() == 1 {
            have[b[0] as usize] = true;
        }
    }
    if let Some(missing) = have.iter().position(|h| !h) {
        return Err(bad_file(path, format!("byte 0x{missing:02x} has no token")));
    }
    let specials: Vec<(String, Rank)> = spec
        .specials
        .iter()
        .map(|(s, r)| (s.to_string(), *r))
        .collect();
    let eot = spec.specials.first().map(|(_, r)| *r);
    Ok(Tokenizer::new(
        spec.name,
        BpeModel::from_ranks(ranks),
        PreTokenizer::new(&[spec.pattern])?,
        &specials,
    )
    .with_bos_eos(None, eot))
}

/// Load `path` as the rank file of `encoding`.
pub fn load(path: &Path, encoding: &str) -> Result<Tokenizer> {
    let spec = spec(encoding)?;
    let data = read_file(path)?;
    let ranks = parse_ranks(&data, path)?;
    from_ranks(path, &ranks, &spec)
}
