//! Pre-tokenizers: split text into the pieces that BPE encodes independently.
//!
//! Every split is defined by a regular expression string, because that is how the
//! reference implementations (tiktoken, Hugging Face `tokenizers`, llama.cpp)
//! define them. For arbitrary patterns we run the regex with `fancy-regex`, which
//! is what tiktoken's own Rust core uses and which handles the look-ahead
//! (`\s+(?!\S)`) and possessive quantifiers these patterns contain.
//!
//! Regex matching dominates tokenization time, so the patterns that matter in
//! practice (GPT-2/r50k/p50k, cl100k, o200k, Llama 3, Qwen2, and the digit split of
//! StarCoder/SmolLM2) are recognised by their *exact* pattern string and replaced
//! by hand-written state machines over characters. Each state machine mirrors
//! the backtracking semantics of its pattern alternative by alternative; the
//! comments spell out why each shortcut is equivalent. The property tests in
//! `tests/pretok_props.rs` check every hand-written splitter against fancy-regex
//! on the same pattern string, which stays the oracle.
//!
//! A [`PreTokenizer`] is a sequence of splits applied one after another, each to
//! every piece produced by the previous one, keeping the unmatched gaps as pieces
//! of their own (Hugging Face's `Split` with `Isolated` behaviour, and what
//! llama.cpp's `unicode_regex_split` does with several expressions).

use crate::error::{Result, TokenizerError};
use fancy_regex::Regex;
use std::sync::OnceLock;
use unicode_general_category::{get_general_category, GeneralCategory as Gc};

/// tiktoken's pattern for r50k_base, p50k_base and gpt2 (`openai_public.py`).
pub const R50K_PATTERN: &str =
    r"'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s";

/// The original GPT-2 pattern, as used by Hugging Face's ByteLevel pre-tokenizer
/// and llama.cpp's "gpt2" pre-tokenizer. It splits exactly like [`R50K_PATTERN`].
pub const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// tiktoken's cl100k_base pattern.
pub const CL100K_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";

/// cl100k_base's pattern as kiln writes it into a Hugging Face `tokenizer.json`. Hugging Face's
/// regex engine (Oniguruma) does not read `{1,3}+` as a possessive bounded repeat, so it splits
/// digit runs differently ("1314151" became "13", "14", "151"). Dropping that `+` changes nothing
/// for tiktoken's semantics: the digits branch ends its alternative, so it never backtracks.
pub const CL100K_HF_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";

/// The spelling of `pattern` that Hugging Face `tokenizers` reads with the same meaning.
pub fn hf_compatible_pattern(pattern: &str) -> &str {
    if pattern == CL100K_PATTERN {
        CL100K_HF_PATTERN
    } else {
        pattern
    }
}

/// tiktoken's o200k_base pattern (the alternatives joined with `|`).
pub const O200K_PATTERN: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|",
    r"\p{N}{1,3}",
    "|",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    "|",
    r"\s*[\r\n]+",
    "|",
    r"\s+(?!\S)",
    "|",
    r"\s+",
);

/// Llama 3's pattern as written in its `tokenizer.json`.
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Llama 3's pattern as llama.cpp spells it ("llama-bpe"): the case-insensitive
/// group is written out, so `ſ` (U+017F) does not count as `s`.
pub const LLAMA3_CPP_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's pattern as written in its `tokenizer.json` (single digits).
pub const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's pattern as llama.cpp spells it ("qwen2").
pub const QWEN2_CPP_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Every numeric character on its own (Hugging Face `Digits(individual_digits)`,
/// llama.cpp's first split for StarCoder, Refact, SmolLM, ...).
pub const DIGITS_PATTERN: &str = r"\p{N}";

// Character class bits. `\s` in these patterns is Unicode White_Space (what the
// regex crate uses), `\p{L}` and `\p{N}` are general categories.
const LET: u8 = 1; // \p{L}
const NUM: u8 = 2; // \p{N}
const SPC: u8 = 4; // \s
const UPS: u8 = 8; // [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]  (o200k's "upper-ish")
const LOWS: u8 = 16; // [\p{Ll}\p{Lm}\p{Lo}\p{M}]      (o200k's "lower-ish")
const CRLF: u8 = 32; // [\r\n]
/// The bits that decide the coarse group: letter, number, space or other.
const GROUP: u8 = LET | NUM | SPC;

fn is_white_space(c: u32) -> bool {
    matches!(c, 0x09..=0x0D | 0x20 | 0x85 | 0xA0 | 0x1680 | 0x2000..=0x200A | 0x2028 | 0x2029 | 0x202F | 0x205F | 0x3000)
}

fn compute_class(c: u32) -> u8 {
    let Some(ch) = char::from_u32(c) else {
        return 0;
    };
    let mut f = 0;
    if is_white_space(c) {
        f |= SPC;
        if c == 0x0A || c == 0x0D {
            f |= CRLF;
        }
    }
    f | match get_general_category(ch) {
        Gc::UppercaseLetter | Gc::TitlecaseLetter => LET | UPS,
        Gc::LowercaseLetter => LET | LOWS,
        Gc::ModifierLetter | Gc::OtherLetter => LET | UPS | LOWS,
        Gc::NonspacingMark | Gc::SpacingMark | Gc::EnclosingMark => UPS | LOWS,
        Gc::DecimalNumber | Gc::LetterNumber | Gc::OtherNumber => NUM,
        _ => 0,
    }
}

/// Class bits for the whole Basic Multilingual Plane, computed once (64 KiB):
/// a table lookup is several times faster than the category crate's search.
fn bmp_table() -> &'static [u8] {
    static TABLE: OnceLock<Box<[u8]>> = OnceLock::new();
    TABLE.get_or_init(|| (0u32..0x10000).map(compute_class).collect())
}

/// A cursor over the bytes of a `&str` that decodes characters and classifies them.
struct Scan<'a> {
    b: &'a [u8],
    t: &'static [u8],
}

impl<'a> Scan<'a> {
    fn new(text: &'a str) -> Self {
        Scan {
            b: text.as_bytes(),
            t: bmp_table(),
        }
    }

    /// The character at byte `p` (which must be a char boundary below `len`):
    /// `(code point, class bits, length in bytes)`. The input is a `&str`, so the
    /// sequence is valid UTF-8 and the continuation bytes exist.
    #[inline(always)]
    fn at(&self, p: usize) -> (u32, u8, usize) {
        let b = self.b;
        let b0 = b[p] as u32;
        if b0 < 0x80 {
            return (b0, self.t[b0 as usize], 1);
        }
        let (c, l) = if b0 < 0xE0 {
            (((b0 & 0x1F) << 6) | (b[p + 1] as u32 & 0x3F), 2)
        } else if b0 < 0xF0 {
            (
                ((b0 & 0x0F) << 12) | ((b[p + 1] as u32 & 0x3F) << 6) | (b[p + 2] as u32 & 0x3F),
                3,
            )
        } else {
            (
                ((b0 & 0x07) << 18)
                    | ((b[p + 1] as u32 & 0x3F) << 12)
                    | ((b[p + 2] as u32 & 0x3F) << 6)
                    | (b[p + 3] as u32 & 0x3F),
                4,
            )
        };
        let cl = if c < 0x10000 {
            self.t[c as usize]
        } else {
            compute_class(c)
        };
        (c, cl, l)
    }

    /// The class bits at `p`; past the end it reports a bare space, which has no
    /// letter, number or "other" bits, so every look-ahead test fails there.
    #[inline(always)]
    fn class(&self, p: usize) -> u8 {
        if p < self.b.len() {
            self.at(p).1
        } else {
            SPC
        }
    }

    /// Advance from `p` while the coarse group equals `g` (0 means "other").
    #[inline(always)]
    fn run_group(&self, mut p: usize, g: u8) -> usize {
        let n = self.b.len();
        while p < n {
            let (_, cl, l) = self.at(p);
            if cl & GROUP != g {
                break;
            }
            p += l;
        }
        p
    }

    /// Advance from `p` while any bit of `mask` is set.
    #[inline(always)]
    fn run_mask(&self, mut p: usize, mask: u8) -> usize {
        let n = self.b.len();
        while p < n {
            let (_, cl, l) = self.at(p);
            if cl & mask == 0 {
                break;
            }
            p += l;
        }
        p
    }

    /// Advance from `p` over at most `max` numeric characters.
    #[inline(always)]
    fn run_digits(&self, mut p: usize, max: usize) -> usize {
        let n = self.b.len();
        let mut k = 0;
        while p < n && k < max {
            let (_, cl, l) = self.at(p);
            if cl & NUM == 0 {
                break;
            }
            p += l;
            k += 1;
        }
        p
    }

    /// Advance from `p` over ASCII bytes contained in `set`.
    #[inline(always)]
    fn run_bytes(&self, mut p: usize, set: &[u8]) -> usize {
        while p < self.b.len() && set.contains(&self.b[p]) {
            p += 1;
        }
        p
    }

    /// A contraction suffix after an apostrophe at `p - 1`: `s|t|m|d|re|ve|ll`.
    /// `ci` allows upper case; `long_s` additionally lets `ſ` (U+017F) count as
    /// `s`, as the regex crate's Unicode case folding does for `(?i)s`.
    #[inline(always)]
    fn contraction(&self, p: usize, ci: bool, long_s: bool) -> Option<usize> {
        let b = self.b;
        let c1 = *b.get(p)?;
        let fold = |x: u8| if ci { x.to_ascii_lowercase() } else { x };
        match fold(c1) {
            b's' | b't' | b'm' | b'd' => Some(p + 1),
            b'r' | b'v' => (b.get(p + 1).map(|&x| fold(x)) == Some(b'e')).then_some(p + 2),
            b'l' => (b.get(p + 1).map(|&x| fold(x)) == Some(b'l')).then_some(p + 2),
            0xC5 if long_s && b.get(p + 1) == Some(&0xBF) => Some(p + 2),
            _ => None,
        }
    }

    /// Where a whitespace run starting at `p` ends for the given pattern family.
    ///
    /// `\s+(?!\S)` backtracks to leave the last whitespace character for the next
    /// piece (so that " word" stays together) unless the run reaches the end; a
    /// single space before a non-space falls through to `\s`/`\s+`. The
    /// `\s*[\r\n]` / `\s*[\r\n]+` alternatives (cl100k family) backtrack to just
    /// after the last CR/LF of the run. `\s++$` (tiktoken patterns) takes a run
    /// that reaches the end of the text first.
    #[inline(always)]
    fn ws_end(&self, p: usize, crlf_alt: bool, end_first: bool) -> usize {
        let n = self.b.len();
        let mut q = p;
        let mut k = 0usize;
        let mut last_start = p;
        let mut last_crlf_end = None;
        while q < n {
            let (_, cl, l) = self.at(q);
            if cl & SPC == 0 {
                break;
            }
            if cl & CRLF != 0 {
                last_crlf_end = Some(q + l);
            }
            last_start = q;
            q += l;
            k += 1;
        }
        if end_first && q == n {
            return n;
        }
        if crlf_alt {
            if let Some(e) = last_crlf_end {
                return e;
            }
        }
        if q == n {
            n
        } else if k >= 2 {
            last_start
        } else {
            q
        }
    }
}

/// How one split is carried out.
#[derive(Debug, Clone)]
enum Imp {
    /// r50k/p50k/GPT-2.
    Gpt2,
    /// cl100k, Llama 3 and Qwen2 differ only in these knobs.
    Cl100k {
        long_s: bool,
        max_digits: usize,
        ws_end_first: bool,
    },
    O200k,
    /// `\p{N}`: every numeric character isolated.
    Digits,
    /// Anything else: fancy-regex, gaps between matches kept as pieces.
    Regex(Box<Regex>),
}

/// One split of a [`PreTokenizer`]: a pattern and how it is executed.
#[derive(Debug, Clone)]
pub struct Split {
    pattern: String,
    imp: Imp,
}

impl Split {
    /// A split by `pattern`, hand-written when the pattern string is one we know.
    pub fn new(pattern: &str) -> Result<Split> {
        let imp = match pattern {
            R50K_PATTERN | GPT2_PATTERN => Imp::Gpt2,
            CL100K_PATTERN | CL100K_HF_PATTERN => Imp::Cl100k {
                long_s: true,
                max_digits: 3,
                ws_end_first: true,
            },
            LLAMA3_PATTERN => Imp::Cl100k {
                long_s: true,
                max_digits: 3,
                ws_end_first: false,
            },
            LLAMA3_CPP_PATTERN => Imp::Cl100k {
                long_s: false,
                max_digits: 3,
                ws_end_first: false,
            },
            QWEN2_PATTERN => Imp::Cl100k {
                long_s: true,
                max_digits: 1,
                ws_end_first: false,
            },
            QWEN2_CPP_PATTERN => Imp::Cl100k {
                long_s: false,
                max_digits: 1,
                ws_end_first: false,
            },
            O200K_PATTERN => Imp::O200k,
            DIGITS_PATTERN => Imp::Digits,
            _ => return Split::regex(pattern),
        };
        Ok(Split {
            pattern: pattern.to_string(),
            imp,
        })
    }

    /// A split that always runs `pattern` with fancy-regex (the test oracle).
    pub fn regex(pattern: &str) -> Result<Split> {
        let re = Regex::new(pattern).map_err(|e| TokenizerError::BadRegex {
            pattern: pattern.to_string(),
            message: e.to_string(),
        })?;
        Ok(Split {
            pattern: pattern.to_string(),
            imp: Imp::Regex(Box::new(re)),
        })
    }

    /// The pattern string.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Whether this split runs a hand-written state machine.
    pub fn is_hand_written(&self) -> bool {
        !matches!(self.imp, Imp::Regex(_))
    }

    /// Call `f` on each piece of `text`, in order; the pieces concatenate to `text`.
    #[inline]
    pub fn split<'a, F: FnMut(&'a str)>(&self, text: &'a str, f: &mut F) {
        match &self.imp {
            Imp::Gpt2 => split_gpt2(text, f),
            Imp::Cl100k {
                long_s,
                max_digits,
                ws_end_first,
            } => split_cl100k(text, *long_s, *max_digits, *ws_end_first, f),
            Imp::O200k => split_o200k(text, f),
            Imp::Digits => split_digits(text, f),
            Imp::Regex(re) => split_regex(re, text, f),
        }
    }
}

fn split_regex<'a, F: FnMut(&'a str)>(re: &Regex, text: &'a str, f: &mut F) {
    let mut last = 0;
    for m in re.find_iter(text) {
        match m {
            Ok(m) => {
                if m.start() > last {
                    f(&text[last..m.start()]);
                }
                if m.end() > m.start() {
                    f(m.as_str());
                }
                last = m.end();
            }
            // The backtracking limit was hit (pathological input for a custom
            // pattern): keep the rest as one piece rather than fail or drop text.
            Err(_) => break,
        }
    }
    if last < text.len() {
        f(&text[last..]);
    }
}

fn split_digits<'a, F: FnMut(&'a str)>(text: &'a str, f: &mut F) {
    let s = Scan::new(text);
    let n = text.len();
    let mut p = 0;
    while p < n {
        let (_, cl, l) = s.at(p);
        let end = if cl & NUM != 0 {
            p + l
        } else {
            let mut q = p + l;
            while q < n {
                let (_, cl, l) = s.at(q);
                if cl & NUM != 0 {
                    break;
                }
                q += l;
            }
            q
        };
        f(&text[p..end]);
        p = end;
    }
}

/// `'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
/// (and tiktoken's possessive variant with `\s++$`, which splits identically).
fn split_gpt2<'a, F: FnMut(&'a str)>(text: &'a str, f: &mut F) {
    let s = Scan::new(text);
    let n = text.len();
    let mut p = 0;
    while p < n {
        let (c, cl, l) = s.at(p);
        let mut end = None;
        if c == u32::from(b'\'') {
            end = s.contraction(p + 1, false, false);
        }
        let end = match end {
            Some(e) => e,
            None => {
                let next = if c == u32::from(b' ') {
                    s.class(p + 1)
                } else {
                    SPC
                };
                if next & SPC == 0 {
                    // ` ?X+` with the optional space taken: a run of the next
                    // character's group (letter, number or other).
                    s.run_group(p + 1, next & GROUP)
                } else if cl & SPC == 0 {
                    s.run_group(p + l, cl & GROUP)
                } else {
                    s.ws_end(p, false, false)
                }
            }
        };
        f(&text[p..end]);
        p = end;
    }
}

/// cl100k_base, Llama 3 and Qwen2:
/// `'(?i:..)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|..whitespace..`
fn split_cl100k<'a, F: FnMut(&'a str)>(
    text: &'a str,
    long_s: bool,
    max_digits: usize,
    ws_end_first: bool,
    f: &mut F,
) {
    let s = Scan::new(text);
    let n = text.len();
    let mut p = 0;
    while p < n {
        let (c, cl, l) = s.at(p);
        let mut end = None;
        if c == u32::from(b'\'') {
            end = s.contraction(p + 1, true, long_s);
        }
        let end = match end {
            Some(e) => e,
            None => {
                if cl & LET != 0 {
                    s.run_mask(p + l, LET)
                } else if cl & (CRLF | NUM) == 0 && s.class(p + l) & LET != 0 {
                    // One non-letter, non-digit, non-newline character glued to
                    // the following letters (" word", "\tword", "'word").
                    s.run_mask(p + l, LET)
                } else if cl & NUM != 0 {
                    s.run_digits(p, max_digits)
                } else if c == u32::from(b' ') && s.class(p + 1) & GROUP == 0 {
                    let e = s.run_group(p + 1, 0);
                    s.run_bytes(e, b"\r\n")
                } else if cl & GROUP == 0 {
                    let e = s.run_group(p + l, 0);
                    s.run_bytes(e, b"\r\n")
                } else {
                    s.ws_end(p, true, ws_end_first)
                }
            }
        };
        f(&text[p..end]);
        p = end;
    }
}

/// o200k_base's first alternative from `st` (after the optional prefix):
/// `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|..)?`.
///
/// The greedy "upper" run backtracks until a "lower" character follows. The two
/// sets share Lm, Lo and M, and the only "lower" characters outside "upper" are
/// Ll; so either an Ll follows the upper run (and the lower run continues from
/// there), or the match ends just after the last shared character inside the run.
#[inline(always)]
fn o200k_alt1(s: &Scan, st: usize) -> Option<usize> {
    let n = s.b.len();
    let mut q = st;
    let mut last_lower_end = None;
    while q < n {
        let (_, cl, l) = s.at(q);
        if cl & UPS == 0 {
            break;
        }
        if cl & LOWS != 0 {
            last_lower_end = Some(q + l);
        }
        q += l;
    }
    let e = if s.class(q) & LOWS != 0 {
        s.run_mask(q, LOWS)
    } else {
        last_lower_end?
    };
    Some(o200k_contraction(s, e))
}

/// o200k_base's second alternative from `st`:
/// `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|..)?`.
#[inline(always)]
fn o200k_alt2(s: &Scan, st: usize) -> Option<usize> {
    let q = s.run_mask(st, UPS);
    if q == st {
        return None;
    }
    let e = s.run_mask(q, LOWS);
    Some(o200k_contraction(s, e))
}

#[inline(always)]
fn o200k_contraction(s: &Scan, e: usize) -> usize {
    if s.b.get(e) == Some(&b'\'') {
        if let Some(x) = s.contraction(e + 1, true, true) {
            return x;
        }
    }
    e
}

fn split_o200k<'a, F: FnMut(&'a str)>(text: &'a str, f: &mut F) {
    let s = Scan::new(text);
    let n = text.len();
    let mut p = 0;
    while p < n {
        let (c, cl, l) = s.at(p);
        // `[^\r\n\p{L}\p{N}]?` can take this character (note: marks qualify).
        let pre = cl & (CRLF | LET | NUM) == 0 && p + l < n;
        // Alternatives in order, each trying "with prefix" before "without".
        let end = (if pre { o200k_alt1(&s, p + l) } else { None })
            .or_else(|| o200k_alt1(&s, p))
            .or_else(|| if pre { o200k_alt2(&s, p + l) } else { None })
            .or_else(|| o200k_alt2(&s, p))
            .unwrap_or_else(|| {
                if cl & NUM != 0 {
                    s.run_digits(p, 3)
                } else if c == u32::from(b' ') && s.class(p + 1) & GROUP == 0 {
                    let e = s.run_group(p + 1, 0);
                    s.run_bytes(e, b"\r\n/")
                } else if cl & GROUP == 0 {
                    let e = s.run_group(p + l, 0);
                    s.run_bytes(e, b"\r\n/")
                } else {
                    s.ws_end(p, true, false)
                }
            });
        f(&text[p..end]);
        p = end;
    }
}

/// A sequence of splits; see the module documentation.
#[derive(Debug, Clone)]
pub struct PreTokenizer {
    splits: Vec<Split>,
}

impl PreTokenizer {
    /// A pre-tokenizer from split patterns applied in order.
    pub fn new(patterns: &[&str]) -> Result<PreTokenizer> {
        Ok(PreTokenizer {
            splits: patterns
                .iter()
                .map(|p| Split::new(p))
                .collect::<Result<_>>()?,
        })
    }

    /// The same patterns, all executed by fancy-regex: the reference splitter.
    pub fn reference(&self) -> Result<PreTokenizer> {
        Ok(PreTokenizer {
            splits: self
                .splits
                .iter()
                .map(|s| Split::regex(&s.pattern))
                .collect::<Result<_>>()?,
        })
    }

    /// The splits, in order.
    pub fn splits(&self) -> &[Split] {
        &self.splits
    }

    /// Call `f` on each piece of `text`, in order.
    #[inline]
    pub fn for_each_piece<'a, F: FnMut(&'a str)>(&self, text: &'a str, f: &mut F) {
        match self.splits.as_slice() {
            [] => {
                if !text.is_empty() {
                    f(text)
                }
            }
            [one] => one.split(text, f),
            many => split_seq(many, text, f),
        }
    }

    /// All pieces of `text` (convenient for tests and tools).
    pub fn split(&self, text: &str) -> Vec<String> {
        let mut v = Vec::new();
        self.for_each_piece(text, &mut |p: &str| v.push(p.to_string()));
        v
    }
}

fn split_seq<'a>(splits: &[Split], text: &'a str, f: &mut dyn FnMut(&'a str)) {
    match splits {
        [] => f(text),
        [first, rest @ ..] => first.split(text, &mut |piece: &'a str| split_seq(rest, piece, f)),
    }
}
