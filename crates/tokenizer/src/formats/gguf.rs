//! GGUF tokenizer metadata: a small, defensive metadata reader (versions 2 and 3)
//! and the `tokenizer.ggml.*` keys as llama.cpp interprets them.
//!
//! The reader never trusts a length: every string or array length is checked
//! against the bytes left in the file before anything is allocated, so a
//! truncated or hostile file yields an error naming the byte offset, never a
//! panic or a huge allocation. Tensor data is never read.
//!
//! The pre-tokenizer is chosen from `tokenizer.ggml.pre` with the same regex lists
//! as llama.cpp's `llm_tokenizer_bpe` (see [`pre_patterns`]).

use super::{byte_level_decode, unsupported};
use crate::error::{Result, TokenizerError};
use crate::pretok::{DIGITS_PATTERN, GPT2_PATTERN, LLAMA3_CPP_PATTERN, QWEN2_CPP_PATTERN};
use crate::{BpeModel, PreTokenizer, Rank, Tokenizer};
use rustc_hash::FxHashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// A metadata value. Arrays of arrays are allowed by the format and supported.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }
}

/// The metadata section of a GGUF file.
#[derive(Debug, Clone)]
pub struct GgufMetadata {
    pub version: u32,
    pub tensor_count: u64,
    pub kv: Vec<(String, GgufValue)>,
}

impl GgufMetadata {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.kv.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

/// The deepest array nesting accepted; real files use one level.
const MAX_DEPTH: usize = 4;

struct Reader<'a, R: Read> {
    r: &'a mut R,
    pos: u64,
    len: u64,
    path: &'a Path,
}

impl<R: Read> Reader<'_, R> {
    fn err(&self, message: impl Into<String>) -> TokenizerError {
        TokenizerError::BadGguf {
            path: self.path.to_path_buf(),
            offset: self.pos,
            message: message.into(),
        }
    }

    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>> {
        if n > self.left() {
            return Err(self.err(format!(
                "{what} needs {n} bytes but only {} remain (truncated file?)",
                self.left()
            )));
        }
        let mut buf = vec![0u8; n as usize];
        self.r
            .read_exact(&mut buf)
            .map_err(|e| self.err(format!("reading {what}: {e}")))?;
        self.pos += n;
        Ok(buf)
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        if n > self.left() {
            return Err(self.err(format!(
                "{what} needs {n} bytes but only {} remain (truncated file?)",
                self.left()
            )));
        }
        let copied = std::io::copy(&mut (&mut *self.r).take(n), &mut std::io::sink())
            .map_err(|e| self.err(format!("reading {what}: {e}")))?;
        if copied != n {
            return Err(self.err(format!("{what}: file ended early")));
        }
        self.pos += n;
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let v = self.bytes(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(&v);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let at = self.pos;
        let b = self.bytes(n, what)?;
        String::from_utf8(b).map_err(|e| TokenizerError::BadGguf {
            path: self.path.to_path_buf(),
            offset: at + e.utf8_error().valid_up_to() as u64,
            message: format!("{what} is not valid UTF-8"),
        })
    }

    /// Size in bytes of one element of a fixed-size type, or None.
    fn fixed_size(ty: u32) -> Option<u64> {
        match ty {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }

    fn value(&mut self, ty: u32, depth: usize, keep: bool) -> Result<Option<GgufValue>> {
        let what = "metadata value";
        if !keep {
            if let Some(sz) = Self::fixed_size(ty) {
                self.skip(sz, what)?;
                return Ok(None);
            }
        }
        Ok(Some(match ty {
            0 => GgufValue::U8(self.array::<1>(what)?[0]),
            1 => GgufValue::I8(self.array::<1>(what)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(what)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(self.err(format!("bool value {b} is neither 0 nor 1"))),
            },
            8 => {
                if keep {
                    GgufValue::String(self.string("string value")?)
                } else {
                    let n = self.u64("string length")?;
                    self.skip(n, "string value")?;
                    return Ok(None);
                }
            }
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(self.err(format!("arrays nested deeper than {MAX_DEPTH}")));
                }
                let ety = self.u32("array element type")?;
                let count = self.u64("array length")?;
                // Every element takes at least one byte (strings at least eight),
                // so a count larger than the bytes left is corrupt.
                let min = Self::fixed_size(ety).unwrap_or(8);
                if count.saturating_mul(min) > self.left() {
                    return Err(self.err(format!(
                        "array of {count} elements of type {ety} cannot fit in the {} bytes left",
                        self.left()
                    )));
                }
                if !keep {
                    if let Some(sz) = Self::fixed_size(ety) {
                        self.skip(count * sz, "array data")?;
                        return Ok(None);
                    }
                }
                let mut v = Vec::with_capacity(if keep { count as usize } else { 0 });
                for _ in 0..count {
                    if let Some(x) = self.value(ety, depth + 1, keep)? {
                        v.push(x);
                    }
                }
                if !keep {
                    return Ok(None);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(what)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            t => return Err(self.err(format!("unknown metadata value type {t}"))),
        }))
    }
}

/// Read the metadata from `r`, which holds `len` bytes. Only keys for which
/// `keep` returns true are stored; the others are skipped (but still validated
/// for length). `path` is used in error messages.
pub fn read_metadata<R: Read>(
    r: &mut R,
    len: u64,
    path: &Path,
    keep: &dyn Fn(&str) -> bool,
) -> Result<GgufMetadata> {
    let mut rd = Reader {
        r,
        pos: 0,
        len,
        path,
    };
    let magic = rd.array::<4>("magic")?;
    if &magic != b"GGUF" {
        return Err(TokenizerError::BadGguf {
            path: path.to_path_buf(),
            offset: 0,
            message: format!("bad magic {magic:02x?}, expected \"GGUF\""),
        });
    }
    let version = rd.u32("version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(unsupported(
                path,
                "GGUF version 1 (32-bit lengths); convert the file to v3",
            ))
        }
        v if v.swap_bytes() <= 3 => return Err(unsupported(path, "big-endian GGUF")),
        v => {
            return Err(unsupported(
                path,
                format!("GGUF version {v} (this reader knows 2 and 3)"),
            ))
        }
    }
    let tensor_count = rd.u64("tensor count")?;
    let kv_count = rd.u64("metadata count")?;
    // A key-value pair takes at least 8 (key length) + 4 (type) + 1 bytes.
    if kv_count.saturating_mul(13) > rd.left() {
        return Err(rd.err(format!(
            "{kv_count} metadata entries cannot fit in the file"
        )));
    }
    let mut kv = Vec::new();
    for _ in 0..kv_count {
        let key = rd.string("metadata key")?;
        let ty = rd.u32("metadata value type")?;
        let k = keep(&key);
        if let Some(v) = rd.value(ty, 0, k)? {
            kv.push((key, v));
        }
    }
    Ok(GgufMetadata {
        version,
        tensor_count,
        kv,
    })
}

/// Read the tokenizer-related metadata of a GGUF file.
pub fn read_file_metadata(path: &Path) -> Result<GgufMetadata> {
    let io = |source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut r = std::io::BufReader::with_capacity(1 << 16, f);
    read_metadata(&mut r, len, path, &|k| {
        k.starts_with("tokenizer.ggml.") || k == "general.architecture" || k == "general.name"
    })
}

/// The `tokenizer.ggml.pre` values this crate supports.
pub const SUPPORTED_PRE: &[&str] = &[
    "default",
    "gpt2",
    "mpt",
    "olmo",
    "jais",
    "trillion",
    "gpt-2",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "dbrx",
    "smaug-bpe",
    "qwen2",
    "stablelm2",
    "deepseek-r1-qwen",
    "starcoder",
    "refact",
    "command-r",
    "smollm",
    "codeshell",
    "exaone",
    "minerva-7b",
    "falcon",
    "deepseek-llm",
    "deepseek-coder",
];

/// The split patterns for a llama.cpp pre-tokenizer name, and whether whole
/// words are looked up before merging (`ignore_merges`, Llama 3 family).
pub fn pre_patterns(pre: &str) -> Option<(Vec<&'static str>, bool)> {
    // Copied from llama.cpp's llm_tokenizer_bpe constructor. DeepSeek LLM's letter
    // class is written with code point escapes: the original source contains
    // characters (U+1F7D, U+1FBE, U+212A, ...) that Unicode normalization of the
    // source text would silently replace, corrupting the ranges.
    const FALCON_PUNCT: &str = r"[\p{P}\$\+<=>\^~\|`]+";
    const FALCON_MAIN: &str =
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
    const DEEPSEEK_LLM_LETTERS: &str = concat!(
        "\\s?[",
        "\\x{41}-\\x{5A}\\x{61}-\\x{7A}\\x{B5}\\x{C0}-\\x{D6}\\x{D8}-\\x{F6}",
        "\\x{F8}-\\x{1BA}\\x{1BC}-\\x{1BF}\\x{1C4}-\\x{293}\\x{295}-\\x{2AF}",
        "\\x{370}-\\x{373}\\x{376}-\\x{377}\\x{37B}-\\x{37D}\\x{37F}\\x{386}",
        "\\x{388}-\\x{38A}\\x{38C}\\x{38E}-\\x{3A1}\\x{3A3}-\\x{3F5}\\x{3F7}-\\x{481}",
        "\\x{48A}-\\x{52F}\\x{531}-\\x{556}\\x{10A0}-\\x{10C5}\\x{13A0}-\\x{13F5}",
        "\\x{13F8}-\\x{13FD}\\x{1C90}-\\x{1CBA}\\x{1CBD}-\\x{1CBF}\\x{1D00}-\\x{1D2B}",
        "\\x{1D6B}-\\x{1D77}\\x{1D79}-\\x{1D9A}\\x{1E00}-\\x{1F15}\\x{1F18}-\\x{1F1D}",
        "\\x{1F20}-\\x{1F45}\\x{1F48}-\\x{1F4D}\\x{1F50}-\\x{1F57}\\x{1F59}\\x{1F5B}",
        "\\x{1F5D}\\x{1F5F}-\\x{1F7D}\\x{1F80}-\\x{1FB4}\\x{1FB6}-\\x{1FBC}\\x{1FBE}",
        "\\x{1FC2}-\\x{1FC4}\\x{1FC6}-\\x{1FCC}\\x{1FD0}-\\x{1FD3}\\x{1FD6}-\\x{1FDB}",
        "\\x{1FE0}-\\x{1FEC}\\x{1FF2}-\\x{1FF4}\\x{1FF6}-\\x{1FFC}\\x{2102}\\x{2107}",
        "\\x{210A}-\\x{2113}\\x{2115}\\x{2119}-\\x{211D}\\x{2124}\\x{2126}\\x{2128}",
        "\\x{212A}-\\x{212D}\\x{212F}-\\x{2134}\\x{2139}\\x{213C}-\\x{213F}",
        "\\x{2145}-\\x{2149}\\x{214E}\\x{2183}-\\x{2184}\\x{2C00}-\\x{2C7B}",
        "\\x{2C7E}-\\x{2CE4}\\x{2CEB}-\\x{2CEE}\\x{2CF2}-\\x{2CF3}\\x{A640}-\\x{A66D}",
        "\\x{A680}-\\x{A69B}\\x{A722}-\\x{A76F}\\x{A771}-\\x{A787}\\x{A78B}-\\x{A78E}",
        "\\x{AB70}-\\x{ABBF}\\x{FB00}-\\x{FB06}\\x{FB13}-\\x{FB17}\\x{FF21}-\\x{FF3A}",
        "\\x{FF41}-\\x{FF5A}\\x{10400}-\\x{1044F}\\x{104B0}-\\x{104D3}",
        "\\x{104D8}-\\x{104FB}\\x{10C80}-\\x{10CB2}\\x{10CC0}-\\x{10CF2}",
        "\\x{118A0}-\\x{118DF}\\x{1E900}-\\x{1E943}",
        "]+"
    );
    Some(match pre {
        "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" | "trillion" => {
            (vec![GPT2_PATTERN], false)
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" => {
            (vec![LLAMA3_CPP_PATTERN], true)
        }
        "dbrx" | "smaug-bpe" => (vec![LLAMA3_CPP_PATTERN], false),
        "qwen2" | "stablelm2" | "deepseek-r1-qwen" => (vec![QWEN2_CPP_PATTERN], false),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            (vec![DIGITS_PATTERN, GPT2_PATTERN], false)
        }
        "falcon" => (vec![FALCON_PUNCT, FALCON_MAIN, "[0-9][0-9][0-9]"], false),
        "deepseek-llm" => (
            vec![
                "[\r\n]",
                DEEPSEEK_LLM_LETTERS,
                "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
                "\\s+$",
                "[一-龥ࠀ-一가-퟿]+",
                "\\p{N}+",
            ],
            false,
        ),
        "deepseek-coder" => (
            vec![
                "[\r\n]",
                "\\s?\\p{L}+",
                "\\s?\\p{P}+",
                "[一-龥ࠀ-一가-퟿]+",
                "\\p{N}",
            ],
            false,
        ),
        _ => return None,
    })
}

// llama.cpp token types.
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;
const TYPE_UNUSED: i64 = 5;

/// Load the tokenizer of a GGUF file.
pub fn load(path: &Path) -> Result<Tokenizer> {
    let md = read_file_metadata(path)?;
    from_metadata(&md, path)
}

/// Build a tokenizer from already-read metadata (`path` names it in errors).
pub fn from_metadata(md: &GgufMetadata, path: &Path) -> Result<Tokenizer> {
    let p = || PathBuf::from(path);
    let bad = |m: String| TokenizerError::BadFile {
        path: p(),
        message: m,
    };
    let model = md
        .get("tokenizer.ggml.model")
        .and_then(GgufValue::as_str)
        .ok_or_else(|| bad("no tokenizer.ggml.model string (not a tokenizer GGUF?)".into()))?;
    if model != "gpt2" {
        let kind = match model {
            "llama" => "SentencePiece (tokenizer.ggml.model = \"llama\")",
            "bert" => "WordPiece (tokenizer.ggml.model = \"bert\")",
            "t5" => "Unigram (tokenizer.ggml.model = \"t5\")",
            "rwkv" => "RWKV tokenizer",
            _ => "this tokenizer.ggml.model",
        };
        return Err(unsupported(
            path,
            format!("{kind}: only byte-level BPE (\"gpt2\") is supported; got {model:?}"),
        ));
    }
    let pre = md
        .get("tokenizer.ggml.pre")
        .and_then(GgufValue::as_str)
        .unwrap_or("default");
    let Some((patterns, ignore_merges)) = pre_patterns(pre) else {
        return Err(unsupported(
            path,
            format!(
                "pre-tokenizer tokenizer.ggml.pre = {pre:?}; supported: {}",
                SUPPORTED_PRE.join(", ")
            ),
        ));
    };
    let strings = |key: &str| -> Result<Vec<&str>> {
        match md.get(key) {
            Some(GgufValue::Array(v)) => v
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    x.as_str()
                        .ok_or_else(|| bad(format!("{key}[{i}] is not a string")))
                })
                .collect(),
            Some(_) => Err(bad(format!("{key} is not an array"))),
            None => Err(bad(format!("missing {key}"))),
        }
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
        Some(GgufValue::Array(v)) => v.iter().map(|x| x.as_i64().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(bad(format!(
            "tokenizer.ggml.token_type has {} entries but there are {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    if u32::try_from(tokens.len()).is_err() {
        return Err(bad("too many tokens".into()));
    }

    // Normal (and byte/unknown) tokens are byte-level encoded and take part in
    // merging; control and user-defined tokens are stored as raw text and are
    // matched in the input as whole strings, like llama.cpp does.
    let mut ordinary = Vec::with_capacity(tokens.len());
    let mut specials = Vec::new();
    let mut added = Vec::new();
    let mut ids: FxHashMap<&str, Rank> = FxHashMap::default();
    for (i, (&t, &ty)) in tokens.iter().zip(&types).enumerate() {
        let id = i as Rank;
        ids.entry(t).or_insert(id);
        match ty {
            TYPE_CONTROL => specials.push((t.to_string(), id)),
            TYPE_USER_DEFINED => added.push((t.to_string(), id)),
            TYPE_UNUSED => {}
            _ => ordinary.push((byte_level_decode(t), id)),
        }
    }
    // Tokens stored as raw text (outside the byte-level alphabet) go last so that
    // merges resolve to the byte-level spelling when both exist.
    ordinary.sort_by_key(|(_, id)| !super::is_byte_level(tokens[*id as usize]));
    let mut merge_ids = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        // llama.cpp splits at the first space after the first character.
        let split = m
            .char_indices()
            .skip(1)
            .find(|&(_, c)| c == ' ')
            .map(|(j, _)| j);
        let Some(j) = split else {
            return Err(bad(format!(
                "tokenizer.ggml.merges[{i}] = {m:?} has no space"
            )));
        };
        if let (Some(&a), Some(&b)) = (ids.get(&m[..j]), ids.get(&m[j + 1..])) {
            merge_ids.push((a, b));
        } else {
            // Keep ranks aligned: an unusable merge still takes its rank.
            merge_ids.push((Rank::MAX, Rank::MAX));
        }
    }
    let id_of = |key: &str| {
        md.get(key)
            .and_then(GgufValue::as_u64)
            .and_then(|v| Rank::try_from(v).ok())
    };
    let bos = id_of("tokenizer.ggml.bos_token_id");
    let eos = id_of("tokenizer.ggml.eos_token_id");
    let name = md
        .get("general.name")
        .and_then(GgufValue::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| {
            path.file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
    Ok(Tokenizer::new(
        name,
        BpeModel::from_merges(ordinary, &merge_ids, ignore_merges),
        PreTokenizer::new(&patterns)?,
        &specials,
    )
    .with_added_tokens(&added)
    .with_bos_eos(bos, eos))
}
