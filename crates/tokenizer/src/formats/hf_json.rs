//! Hugging Face tokenizer.json (placeholder).
use crate::error::Result;
use crate::Tokenizer;
use std::path::Path;
pub fn load(path: &Path) -> Result<Tokenizer> { Err(super::unsupported(path, "todo")) }
