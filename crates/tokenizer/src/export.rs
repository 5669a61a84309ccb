//! Writing and reading trained vocabularies.
//!
//! * [`TrainedBpe::write_tiktoken`]: tiktoken's rank file, `base64(bytes) rank` per
//!   line with rank = token id. Special tokens are not part of that format.
//! * [`TrainedBpe::write_hf_json`]: a Hugging Face `tokenizer.json` (BPE model with
//!   GPT-2 byte-to-unicode strings, `Split(pattern, Isolated)` + `ByteLevel`
//!   pre-tokenizer, `ByteLevel` decoder, specials as `added_tokens`).
//! * [`TrainedBpe::save`] / [`TrainedBpe::load`]: kiln's own format *is* that
//!   `tokenizer.json`, so a file kiln trained loads in Hugging Face `tokenizers`,
//!   in kiln's `Tokenizer::from_hf_json`, and back into a [`TrainedBpe`].
//!
//! Every write goes to a temporary file in the target directory, is fsynced and
//! then renamed over the target, so a crash never leaves a half-written vocabulary.

use std::io::Write;
use std::path::Path;

use base64::Engine as _;
use rustc_hash::FxHashMap;

use crate::error::TokenizerError;
use crate::train::{Result, TrainedBpe};

/// GPT-2's byte-to-unicode table: printable Latin-1 bytes map to themselves, the
/// others to code points from U+0100 on, so every byte has a visible character.
pub fn byte_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let cp = if printable {
            u32::from(b)
        } else {
            let cp = next;
            next += 1;
            cp
        };
        // Every value here is below U+0200, so it is a valid scalar value.
        table[b as usize] = char::from_u32(cp).unwrap_or('\u{FFFD}');
    }
    table
}

fn bytes_to_unicode_string(bytes: &[u8], table: &[char; 256]) -> String {
    bytes.iter().map(|&b| table[b as usize]).collect()
}

/// Writes `contents` to `path` atomically: temp file in the same directory, fsync,
/// rename, then fsync the directory where the platform allows it.
fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let io = |source| TokenizerError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => std::path::PathBuf::from("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".kiln-tmp-")
        .tempfile_in(&dir)
        .map_err(io)?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        write(&mut w).map_err(io)?;
        w.flush().map_err(io)?;
    }
    // Temp files are created private (0600); a vocabulary is not a secret, so give
    // it the target's existing permissions, or the usual 0644 for a new file.
    let perms = match std::fs::metadata(path) {
        Ok(m) => m.permissions(),
        Err(_) => default_permissions(tmp.as_file()).map_err(io)?,
    };
    tmp.as_file().set_permissions(perms).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    // Make the rename itself durable. Opening a directory fails on some platforms,
    // where the rename is the best we can do.
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(unix)]
fn default_permissions(_file: &std::fs::File) -> std::io::Result<std::fs::Permissions> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::Permissions::from_mode(0o644))
}

#[cfg(not(unix))]
fn default_permissions(file: &std::fs::File) -> std::io::Result<std::fs::Permissions> {
    Ok(file.metadata()?.permissions())
}

impl TrainedBpe {
    /// Writes the tiktoken rank file (no special tokens: tiktoken keeps those in
    /// code, not in the file).
    pub fn write_tiktoken(&self, path: &Path) -> Result<()> {
        let b64 = base64::engine::general_purpose::STANDARD;
        write_atomic(path, |w| {
            for (rank, bytes) in self.vocab.iter().enumerate() {
                writeln!(w, "{} {}", b64.encode(bytes), rank)?;
            }
            Ok(())
        })
    }

    /// The Hugging Face `tokenizer.json` text.
    pub fn to_hf_json(&self) -> String {
        let table = byte_to_unicode();
        let js = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
        let mut out = String::with_capacity(self.vocab.len() * 24);
        out.push_str("{\n  \"version\": \"1.0\",\n  \"truncation\": null,\n  \"padding\": null,\n");
        out.push_str("  \"added_tokens\": [");
        for (i, (s, id)) in self.special_tokens.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&format!(
                "\n    {{\"id\": {id}, \"content\": {}, \"single_word\": false, \"lstrip\": false, \"rstrip\": false, \"normalized\": false, \"special\": true}}",
                js(s)
            ));
        }
        if !self.special_tokens.is_empty() {
            out.push_str("\n  ");
        }
        out.push_str("],\n  \"normalizer\": null,\n");
        out.push_str(&format!(
            "  \"pre_tokenizer\": {{\"type\": \"Sequence\", \"pretokenizers\": [{{\"type\": \"Split\", \"pattern\": {{\"Regex\": {}}}, \"behavior\": \"Isolated\", \"invert\": false}}, {{\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": true, \"use_regex\": false}}]}},\n",
            js(crate::pretok::hf_compatible_pattern(&self.pattern))
        ));
        out.push_str("  \"post_processor\": null,\n");
        out.push_str("  \"decoder\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"trim_offsets\": true, \"use_regex\": true},\n");
        // `ignore_merges` must stay false: looking whole pieces up first would not
        // change results for a vocabulary trained this way in most cases, but only
        // "apply the merges in rank order" is guaranteed to match training.
        out.push_str("  \"model\": {\n    \"type\": \"BPE\",\n    \"dropout\": null,\n    \"unk_token\": null,\n    \"continuing_subword_prefix\": null,\n    \"end_of_word_suffix\": null,\n    \"fuse_unk\": false,\n    \"byte_fallback\": false,\n    \"ignore_merges\": false,\n    \"vocab\": {");
        for (id, bytes) in self.vocab.iter().enumerate() {
            if id > 0 {
                out.push(',');
            }
            out.push_str(&format!(
                "\n      {}: {id}",
                js(&bytes_to_unicode_string(bytes, &table))
            ));
        }
        out.push_str("\n    },\n    \"merges\": [");
        for (i, &(a, b)) in self.merges.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            // The byte-level strings never contain a space (it maps to U+0120), so
            // the classic "left right" string form is unambiguous and is read by
            // every version of `tokenizers`.
            let l = bytes_to_unicode_string(&self.vocab[a as usize], &table);
            let r = bytes_to_unicode_string(&self.vocab[b as usize], &table);
            out.push_str(&format!("\n      {}", js(&format!("{l} {r}"))));
        }
        out.push_str("\n    ]\n  }\n}\n");
        out
    }

    /// Writes a Hugging Face `tokenizer.json`.
    pub fn write_hf_json(&self, path: &Path) -> Result<()> {
        let text = self.to_hf_json();
        write_atomic(path, |w| w.write_all(text.as_bytes()))
    }

    /// Saves in kiln's native format, which is the Hugging Face `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.write_hf_json(path)
    }

    /// Loads a vocabulary written by [`TrainedBpe::save`] (or any byte-level BPE
    /// `tokenizer.json` whose first 256 ids are the single bytes in order and whose
    /// merge `i` produces id `256 + i`). `stopped_early` is not stored and reads as
    /// false.
    pub fn load(path: &Path) -> Result<TrainedBpe> {
        let bad = |message: String| TokenizerError::BadFile {
            path: path.to_owned(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
            path: path.to_owned(),
            source,
        })?;
        let root: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let model = root
            .get("model")
            .ok_or_else(|| bad("no \"model\"".into()))?;
        if model.get("type").and_then(|t| t.as_str()) != Some("BPE") {
            return Err(bad("model type is not BPE".into()));
        }

        let pattern = find_split_pattern(root.get("pre_tokenizer"))
            .ok_or_else(|| bad("pre_tokenizer has no Split with a Regex pattern".into()))?;

        let mut unicode_to_byte: FxHashMap<char, u8> = FxHashMap::default();
        for (b, c) in byte_to_unicode().iter().enumerate() {
            unicode_to_byte.insert(*c, b as u8);
        }
        let decode = |s: &str| -> Option<Vec<u8>> {
            s.chars()
                .map(|c| unicode_to_byte.get(&c).copied())
                .collect()
        };

        let vocab_map = model
            .get("vocab")
            .and_then(|v| v.as_object())
            .ok_or_else(|| bad("model has no vocab object".into()))?;
        let mut vocab: Vec<Option<Vec<u8>>> = vec![None; vocab_map.len()];
        let mut id_of: FxHashMap<&str, u32> = FxHashMap::default();
        for (s, id) in vocab_map {
            let id = id
                .as_u64()
                .filter(|&id| (id as usize) < vocab.len())
                .ok_or_else(|| {
                    bad(format!(
                        "vocab entry {s:?} has an id outside 0..{}",
                        vocab.len()
                    ))
                })?;
            let bytes = decode(s)
                .ok_or_else(|| bad(format!("vocab entry {s:?} is not a byte-level string")))?;
            if vocab[id as usize].replace(bytes).is_some() {
                return Err(bad(format!("id {id} appears twice in the vocab")));
            }
            id_of.insert(s.as_str(), id as u32);
        }
        let vocab: Vec<Vec<u8>> = vocab
            .into_iter()
            .enumerate()
            .map(|(id, b)| b.ok_or_else(|| bad(format!("id {id} is missing from the vocab"))))
            .collect::<Result<_>>()?;
        if vocab.len() < 256 || (0..256).any(|b| vocab[b] != [b as u8]) {
            return Err(bad(
                "ids 0..255 are not the 256 single bytes in order".into()
            ));
        }

        let merges_json = model
            .get("merges")
            .and_then(|m| m.as_array())
            .ok_or_else(|| bad("model has no merges array".into()))?;
        let mut merges = Vec::with_capacity(merges_json.len());
        for (i, m) in merges_json.iter().enumerate() {
            let (l, r) = match m {
                serde_json::Value::String(s) => s
                    .split_once(' ')
                    .ok_or_else(|| bad(format!("merge {i} {s:?} has no space")))?,
                serde_json::Value::Array(a) => match (
                    a.first().and_then(|v| v.as_str()),
                    a.get(1).and_then(|v| v.as_str()),
                    a.len(),
                ) {
                    (Some(l), Some(r), 2) => (l, r),
                    _ => return Err(bad(format!("merge {i} is not a pair of strings"))),
                },
                _ => return Err(bad(format!("merge {i} is neither a string nor a pair"))),
            };
            let (Some(&a), Some(&b)) = (id_of.get(l), id_of.get(r)) else {
                return Err(bad(format!(
                    "merge {i} ({l:?}, {r:?}) names a token not in the vocab"
                )));
            };
            let want = 256 + i;
            let mut cat = vocab[a as usize].clone();
            cat.extend_from_slice(&vocab[b as usize]);
            if vocab.get(want) != Some(&cat) {
                return Err(bad(format!("merge {i} does not produce token id {want}")));
            }
            merges.push((a, b));
        }
        if vocab.len() != 256 + merges.len() {
            return Err(bad(format!(
                "{} vocab entries but {} merges (expected 256 + merges)",
                vocab.len(),
                merges.len()
            )));
        }

        let mut special_tokens = Vec::new();
        if let Some(added) = root.get("added_tokens").and_then(|a| a.as_array()) {
            for t in added {
                let content = t.get("content").and_then(|c| c.as_str());
                let id = t.get("id").and_then(|c| c.as_u64());
                let (Some(content), Some(id)) = (content, id) else {
                    return Err(bad("an added token lacks content or id".into()));
                };
                special_tokens.push((content.to_owned(), id as u32));
            }
        }
        special_tokens.sort_by_key(|(_, id)| *id);
        // The file holds the Hugging Face spelling of the pattern; give back the original.
        let pattern = if pattern == crate::pretok::CL100K_HF_PATTERN {
            crate::pretok::CL100K_PATTERN.to_string()
        } else {
            pattern
        };
        Ok(TrainedBpe {
            pattern,
            merges,
            vocab,
            special_tokens,
            stopped_early: false,
        })
    }
}

/// The regex of the first `Split` pre-tokenizer, alone or inside a `Sequence`.
fn find_split_pattern(pre: Option<&serde_json::Value>) -> Option<String> {
    let pre = pre?;
    match pre.get("type")?.as_str()? {
        "Split" => pre
            .get("pattern")?
            .get("Regex")?
            .as_str()
            .map(str::to_owned),
        "Sequence" => pre
            .get("pretokenizers")?
            .as_array()?
            .iter()
            .find_map(|p| find_split_pattern(Some(p))),
        _ => None,
    }
}
