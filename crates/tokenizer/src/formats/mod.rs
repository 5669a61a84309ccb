//! Vocabulary file formats and format detection for [`crate::Tokenizer::load`].
//!
//! Each submodule turns one file format into a [`crate::Tokenizer`]. They share
//! GPT-2's byte-to-character mapping ([`byte_level_decode`]), which `encoder.json`,
//! `tokenizer.json` and GGUF use to store arbitrary bytes as printable text.

pub mod gguf;
pub mod gpt2;
pub mod hf_json;
pub mod tiktoken;

use crate::error::{Result, TokenizerError};
use crate::Tokenizer;
use std::path::Path;
use std::sync::OnceLock;

/// Read a whole file, naming it in the error.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn bad_file(path: &Path, message: impl Into<String>) -> TokenizerError {
    TokenizerError::BadFile {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

pub(crate) fn unsupported(path: &Path, what: impl Into<String>) -> TokenizerError {
    TokenizerError::Unsupported {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// GPT-2's `bytes_to_unicode`: printable Latin-1 bytes map to themselves, the
/// other 68 bytes to U+0100.. in order. Returns the inverse table, indexed by
/// code point (all mapped code points are below 0x144).
fn char_to_byte() -> &'static [i16; 0x144] {
    static T: OnceLock<[i16; 0x144]> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = [-1i16; 0x144];
        let mut n = 0u32;
        for b in 0u32..256 {
            let printable = (0x21..=0x7E).contains(&b)
                || (0xA1..=0xAC).contains(&b)
                || (0xAE..=0xFF).contains(&b);
            let c = if printable {
                b
            } else {
                n += 1;
                255 + n
            };
            t[c as usize] = b as i16;
        }
        t
    })
}

/// The byte for one character of GPT-2's byte-level alphabet.
pub fn byte_of_char(c: char) -> Option<u8> {
    let t = char_to_byte();
    t.get(c as usize).and_then(|&b| u8::try_from(b).ok())
}

/// The character that stands for byte `b` in GPT-2's byte-level alphabet.
pub fn char_of_byte(b: u8) -> char {
    let t = char_to_byte();
    // Every byte has exactly one character; the search is over a small table.
    t.iter()
        .position(|&x| x == i16::from(b))
        .and_then(|i| char::from_u32(i as u32))
        .unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// Whether every character of `s` is in the byte-level alphabet.
pub fn is_byte_level(s: &str) -> bool {
    s.chars().all(|c| byte_of_char(c).is_some())
}

/// Decode a byte-level token string to its bytes. A string containing a character
/// outside the alphabet is taken as raw UTF-8 (Hugging Face's ByteLevel decoder
/// does the same for added tokens).
pub fn byte_level_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    for c in s.chars() {
        match byte_of_char(c) {
            Some(b) => out.push(b),
            None => return s.as_bytes().to_vec(),
        }
    }
    out
}

/// Detect the format from the path; see [`Tokenizer::load`].
pub fn load(path: &Path) -> Result<Tokenizer> {
    if path.is_dir() {
        let hf = path.join("tokenizer.json");
        if hf.is_file() {
            return hf_json::load(&hf);
        }
        let enc = path.join("encoder.json");
        let bpe = path.join("vocab.bpe");
        if enc.is_file() && bpe.is_file() {
            return gpt2::load(&enc, &bpe);
        }
        return Err(TokenizerError::UnknownFormat {
            path: path.to_path_buf(),
            hint: "directory has neither tokenizer.json nor encoder.json + vocab.bpe".into(),
        });
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    match ext {
        "tiktoken" => {
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            tiktoken::load(path, stem)
        }
        "json" => hf_json::load(path),
        "gguf" => gguf::load(path),
        _ => {
            // Fall back to sniffing the first bytes.
            let head = {
                use std::io::Read;
                let mut buf = [0u8; 4];
                let mut f = std::fs::File::open(path).map_err(|source| TokenizerError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
                let n = f.read(&mut buf).unwrap_or(0);
                buf[..n].to_vec()
            };
            if head == b"GGUF" {
                gguf::load(path)
            } else if head.first() == Some(&b'{') {
                hf_json::load(path)
            } else {
                Err(TokenizerError::UnknownFormat {
                    path: path.to_path_buf(),
                    hint: "expected .tiktoken, .json, .gguf or a directory".into(),
                })
            }
        }
    }
}
