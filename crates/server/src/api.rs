//! Request parsing for the OpenAI endpoints. Fields are read one by one from the JSON value
//! (instead of a derived struct) so every wrong type or value gets a message naming the field,
//! as OpenAI's own errors do. Unknown fields are ignored: clients send extras.

use crate::error::ApiError;
use crate::Limits;
use kiln_engine::{Message, SamplingParams};
use serde_json::{Map, Value};

/// What chat and text completions share after parsing.
#[derive(Debug, Clone)]
pub struct Common {
    pub model: String,
    /// `None`: as many as fit (up to the server's limit).
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub n: usize,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// vLLM's extension: keep generating past end-of-sequence tokens (for benchmarks).
    pub ignore_eos: bool,
}

pub struct ChatRequest {
    pub common: Common,
    pub messages: Vec<Message>,
}

pub struct CompletionRequest {
    pub common: Common,
    pub prompts: Vec<String>,
}

pub struct EmbeddingRequest {
    pub model: String,
    pub inputs: Vec<String>,
    pub base64: bool,
    pub dimensions: Option<usize>,
}

/// The body as a JSON object, with errors for bytes that are not UTF-8 or not JSON.
pub fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the request body is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    if text.trim().is_empty() {
        return Err(ApiError::bad_request(
            "the request body is empty; send a JSON object",
        ));
    }
    let v: Value = serde_json::from_str(text)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    match v {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::bad_request(format!(
            "the request body must be a JSON object, not {}",
            kind(&other)
        ))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn present<'a>(m: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    m.get(key).filter(|v| !v.is_null())
}

fn string(m: &Map<String, Value>, key: &str) -> Result<Option<String>, ApiError> {
    match present(m, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(ApiError::invalid(
            key,
            format!("'{key}' must be a string, not {}", kind(v)),
        )),
    }
}

fn required_string(m: &Map<String, Value>, key: &str) -> Result<String, ApiError> {
    string(m, key)?.ok_or_else(|| {
        ApiError::invalid(key, format!("'{key}' is required"))
            .with_code("missing_required_parameter")
    })
}

fn number(m: &Map<String, Value>, key: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match present(m, key) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if !(x >= lo && x <= hi) {
                return Err(ApiError::invalid(
                    key,
                    format!("'{key}' must be between {lo} and {hi}, got {n}"),
                ));
            }
            Ok(Some(x))
        }
        Some(v) => Err(ApiError::invalid(
            key,
            format!("'{key}' must be a number, not {}", kind(v)),
        )),
    }
}

fn integer(m: &Map<String, Value>, key: &str, lo: u64, hi: u64) -> Result<Option<u64>, ApiError> {
    match present(m, key) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
            _ => Err(ApiError::invalid(
                key,
                format!("'{key}' must be an integer between {lo} and {hi}, got {n}"),
            )),
        },
        Some(v) => Err(ApiError::invalid(
            key,
            format!("'{key}' must be an integer, not {}", kind(v)),
        )),
    }
}

fn boolean(m: &Map<String, Value>, key: &str) -> Result<bool, ApiError> {
    match present(m, key) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ApiError::invalid(
            key,
            format!("'{key}' must be a boolean, not {}", kind(v)),
        )),
    }
}

fn common(m: &Map<String, Value>, limits: &Limits) -> Result<Common, ApiError> {
    let model = required_string(m, "model")?;
    let max_tokens = match integer(m, "max_completion_tokens", 1, u32::MAX as u64)? {
        Some(x) => Some(x),
        None => integer(m, "max_tokens", 1, u32::MAX as u64)?,
    };
    if let Some(x) = max_tokens {
        if x as usize > limits.max_output_tokens {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "'max_tokens' is {x}, but this server generates at most {} tokens per request",
                    limits.max_output_tokens
                ),
            ));
        }
    }
    let temperature = number(m, "temperature", 0.0, 2.0)?.unwrap_or(1.0) as f32;
    let top_p = number(m, "top_p", f64::MIN_POSITIVE, 1.0)
        .map_err(|_| ApiError::invalid("top_p", "'top_p' must be a number in (0, 1]"))?;
    let sampling = SamplingParams {
        temperature,
        top_p: top_p.unwrap_or(1.0) as f32,
        top_k: integer(m, "top_k", 0, 1 << 20)?.unwrap_or(0) as usize,
        min_p: number(m, "min_p", 0.0, 1.0)?.unwrap_or(0.0) as f32,
        repetition_penalty: number(m, "repetition_penalty", 0.01, 100.0)?.unwrap_or(1.0) as f32,
        frequency_penalty: number(m, "frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0) as f32,
        presence_penalty: number(m, "presence_penalty", -2.0, 2.0)?.unwrap_or(0.0) as f32,
        seed: match present(m, "seed") {
            None => random_seed(),
            Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => u,
                (None, Some(i)) => i as u64,
                _ => {
                    return Err(ApiError::invalid(
                        "seed",
                        format!("'seed' must be an integer, got {n}"),
                    ))
                }
            },
            Some(v) => {
                return Err(ApiError::invalid(
                    "seed",
                    format!("'seed' must be an integer, not {}", kind(v)),
                ))
            }
        },
    };
    let n = integer(m, "n", 1, limits.max_n as u64)?.unwrap_or(1) as usize;
    let stop = match present(m, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            if a.len() > 4 {
                return Err(ApiError::invalid(
                    "stop",
                    format!("'stop' holds at most 4 sequences, got {}", a.len()),
                ));
            }
            a.iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    v => Err(ApiError::invalid(
                        "stop",
                        format!("'stop' entries must be strings, not {}", kind(v)),
                    )),
                })
                .collect::<Result<_, _>>()?
        }
        Some(v) => {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "'stop' must be a string or an array of strings, not {}",
                    kind(v)
                ),
            ))
        }
    };
    let stream = boolean(m, "stream")?;
    let include_usage = match present(m, "stream_options") {
        None => false,
        Some(Value::Object(o)) => boolean(o, "include_usage")?,
        Some(v) => {
            return Err(ApiError::invalid(
                "stream_options",
                format!("'stream_options' must be an object, not {}", kind(v)),
            ))
        }
    };
    if boolean(m, "logprobs")? {
        return Err(ApiError::invalid(
            "logprobs",
            "'logprobs' is not supported by this server",
        ));
    }
    Ok(Common {
        model,
        max_tokens: max_tokens.map(|x| x as usize),
        sampling,
        n,
        stop,
        stream,
        include_usage,
        ignore_eos: boolean(m, "ignore_eos")?,
    })
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// Message content: a string, or an array of `{"type": "text", "text": ...}` parts.
fn content(v: Option<&Value>, i: usize) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    (Some(other), _) if other != "text" => {
                        return Err(ApiError::invalid(&param, format!("'{param}' has a part of type '{other}'; this server reads text parts only")))
                    }
                    _ => return Err(ApiError::invalid(&param, format!("'{param}' parts must be objects {{\"type\": \"text\", \"text\": ...}}"))),
                }
            }
            Ok(out)
        }
        Some(v) => Err(ApiError::invalid(
            &param,
            format!(
                "'{param}' must be a string or an array of text parts, not {}",
                kind(v)
            ),
        )),
    }
}

/// The `"model"` field, read first so that a request for a model the server lacks gets a 404
/// whatever else is wrong with it.
pub fn model(m: &Map<String, Value>) -> Result<String, ApiError> {
    required_string(m, "model")
}

pub fn chat(m: Map<String, Value>, limits: &Limits) -> Result<ChatRequest, ApiError> {
    let common = common(&m, limits)?;
    let msgs = match present(&m, "messages") {
        None => {
            return Err(ApiError::invalid("messages", "'messages' is required")
                .with_code("missing_required_parameter"))
        }
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(ApiError::invalid(
                "messages",
                format!("'messages' must be an array, not {}", kind(v)),
            ))
        }
    };
    if msgs.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "'messages' is empty; send at least one message",
        ));
    }
    let mut messages = Vec::with_capacity(msgs.len());
    for (i, msg) in msgs.iter().enumerate() {
        let Value::Object(o) = msg else {
            return Err(ApiError::invalid(
                &format!("messages[{i}]"),
                format!("'messages[{i}]' must be an object, not {}", kind(msg)),
            ));
        };
        let role = string(o, "role")
            .map_err(|_| {
                ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!("'messages[{i}].role' must be a string"),
                )
            })?
            .ok_or_else(|| {
                ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!("'messages[{i}].role' is required"),
                )
            })?;
        let role = match role.as_str() {
            "developer" => "system".to_string(),
            "system" | "user" | "assistant" | "tool" => role,
            other => {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!("'messages[{i}].role' is '{other}'; expected system, developer, user, assistant or tool"),
                ))
            }
        };
        messages.push(Message::new(&role, &content(o.get("content"), i)?));
    }
    if messages.iter().all(|m| m.content.trim().is_empty()) {
        return Err(ApiError::invalid(
            "messages",
            "every message is empty; send some text",
        ));
    }
    Ok(ChatRequest { common, messages })
}

/// `field` as one text or a non-empty array of texts. A non-empty array that `is_token_ids`
/// recognises as token ids is refused by name (this server takes text only).
fn texts(
    m: &Map<String, Value>,
    field: &'static str,
    is_token_ids: impl Fn(&[Value]) -> bool,
) -> Result<Vec<String>, ApiError> {
    let bad = |what: String| ApiError::invalid(field, what);
    match present(m, field) {
        None => Err(bad(format!("'{field}' is required")).with_code("missing_required_parameter")),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_string) => Ok(a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()),
        Some(Value::Array(a)) if !a.is_empty() && is_token_ids(a) => Err(bad(format!(
            "'{field}' as token ids is not supported; send text"
        ))),
        Some(v) => Err(bad(format!(
            "'{field}' must be a string or a non-empty array of strings, not {}",
            kind(v)
        ))),
    }
}

pub fn completion(m: Map<String, Value>, limits: &Limits) -> Result<CompletionRequest, ApiError> {
    let common = common(&m, limits)?;
    let bad = |what: String| ApiError::invalid("prompt", what);
    let prompts = texts(&m, "prompt", |a| a.iter().all(Value::is_number))?;
    if prompts.iter().any(|p| p.is_empty()) {
        return Err(bad("'prompt' is empty; send some text".into()));
    }
    if prompts.len() * common.n > limits.max_n {
        return Err(bad(format!(
            "{} prompts x n = {} asks for {} completions; this server gives at most {} per request",
            prompts.len(),
            common.n,
            prompts.len() * common.n,
            limits.max_n
        )));
    }
    if boolean(&m, "echo")? {
        return Err(ApiError::invalid(
            "echo",
            "'echo' is not supported by this server",
        ));
    }
    Ok(CompletionRequest { common, prompts })
}

pub fn embeddings(m: Map<String, Value>, limits: &Limits) -> Result<EmbeddingRequest, ApiError> {
    let model = required_string(&m, "model")?;
    let bad = |what: String| ApiError::invalid("input", what);
    let inputs = texts(&m, "input", |a| {
        a.iter().all(|v| v.is_number() || v.is_array())
    })?;
    if let Some(i) = inputs.iter().position(|s| s.is_empty()) {
        return Err(bad(format!(
            "'input[{i}]' is empty; every input must hold some text"
        )));
    }
    if inputs.len() > limits.max_embedding_inputs {
        return Err(bad(format!(
            "'input' holds {} texts; this server embeds at most {} per request",
            inputs.len(),
            limits.max_embedding_inputs
        )));
    }
    let base64 = match string(&m, "encoding_format")?.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("'encoding_format' is '{other}'; expected float or base64"),
            ))
        }
    };
    let dimensions = integer(&m, "dimensions", 1, 1 << 16)?.map(|d| d as usize);
    Ok(EmbeddingRequest {
        model,
        inputs,
        base64,
        dimensions,
    })
}
