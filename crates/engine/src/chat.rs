//! Chat templates: the Jinja template a model carries (GGUF `tokenizer.chat_template`, or
//! `chat_template` in a Hugging Face folder's `tokenizer_config.json`) rendered with `minijinja`.
//!
//! Text in, text out: the caller tokenizes the result (with special tokens recognized) and hands
//! the ids to a [`crate::Session`]. The environment mirrors transformers' `apply_chat_template`:
//! `trim_blocks` and `lstrip_blocks` on, the trailing newline dropped, loop controls, Python-style
//! string methods (`.strip()`, `.startswith()`, via minijinja-contrib's `pycompat`),
//! `raise_exception(msg)` and `strftime_now(fmt)`; the context holds `messages`,
//! `add_generation_prompt`, `bos_token` and `eos_token`.

use crate::{EngineError, Result};
use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, ErrorKind, Value};
use std::collections::BTreeMap;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Special tokens that end a turn in common template families, in the order they are tried.
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",    // ChatML: SmolLM, Qwen
    "<|eot_id|>",    // Llama 3
    "<|end|>",       // Phi-3
    "<end_of_turn>", // Gemma
    "</s>",          // Llama 2, Mistral
    "<|endoftext|>",
];

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported with its line.
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| EngineError::TemplateSyntax(describe(&e)))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| EngineError::TemplateSyntax(describe(&e)))?;
        Ok(Self {
            env,
            source: source.to_string(),
            bos_token: String::new(),
            eos_token: String::new(),
        })
    }

    /// Sets the `bos_token` and `eos_token` strings templates may print.
    pub fn with_special_tokens(mut self, bos: &str, eos: &str) -> Self {
        self.bos_token = bos.to_string();
        self.eos_token = eos.to_string();
        self
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the conversation; with `add_generation_prompt` the text ends with the header of
    /// the assistant's turn, ready to generate from.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                let mut map = BTreeMap::new();
                map.insert("role".to_string(), Value::from(m.role.as_str()));
                map.insert("content".to_string(), Value::from(m.content.as_str()));
                Value::from(map)
            })
            .collect();
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| EngineError::TemplateRender(describe(&e)))?;
        tmpl.render(minijinja::context! {
            messages => msgs,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(|e| EngineError::TemplateRender(describe(&e)))
    }

    /// The special tokens that end a turn in this template, for the caller to turn into stop ids:
    /// the first known marker the template writes (e.g. `<|im_end|>`), else the EOS token if the
    /// template prints `eos_token` (Llama 2, Mistral).
    pub fn end_of_turn_tokens(&self) -> Vec<String> {
        if let Some(t) = END_OF_TURN.iter().find(|t| self.source.contains(*t)) {
            return vec![t.to_string()];
        }
        if self.source.contains("eos_token") && !self.eos_token.is_empty() {
            return vec![self.eos_token.clone()];
        }
        Vec::new()
    }
}

/// minijinja's message plus its line and the detail, on one line.
fn describe(e: &minijinja::Error) -> String {
    let mut s = match (e.detail(), e.line()) {
        (Some(d), Some(l)) => format!("{} at line {l}: {d}", e.kind()),
        (Some(d), None) => format!("{}: {d}", e.kind()),
        (None, Some(l)) => format!("{} at line {l}", e.kind()),
        (None, None) => e.kind().to_string(),
    };
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Python's `strftime` for the current UTC time, for the directives chat templates use
/// (`%d %b %Y` in Llama 3's); others are kept verbatim.
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('b') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('H') => out.push_str(&format!("{:02}", sod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", sod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", sod % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn syntax_and_render_errors_are_typed() {
        let err = ChatTemplate::new("{% for m in messages %}{{ m.content }}").unwrap_err();
        assert!(matches!(err, EngineError::TemplateSyntax(_)), "{err}");
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}").unwrap();
        let err = t.render(&[], false).unwrap_err();
        assert!(
            matches!(&err, EngineError::TemplateRender(m) if m.contains("roles must alternate")),
            "{err}"
        );
    }

    #[test]
    fn python_string_methods_and_tokens() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}{{ m['content'].strip().upper() }}{% if loop.last %}{% break %}{% endif %}{% endfor %}{{ eos_token }}",
        )
        .unwrap()
        .with_special_tokens("<s>", "</s>");
        let out = t.render(&[Message::new("user", "  hi  ")], false).unwrap();
        assert_eq!(out, "<s>HI</s>");
        assert_eq!(t.end_of_turn_tokens(), vec!["</s>"]);
    }
}
