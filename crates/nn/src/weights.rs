//! Weight sources behind one interface: a GGUF file (quantized tensors stay quantized) or one or
//! more safetensors files (a Hugging Face folder, sharded or not). Models ask for tensors by name
//! and shape; this module turns file problems into [`NnError`]s that name the file and tensor.

use crate::{Embedding, Linear, NnError, OpContext, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const SUPPORTED_GGML: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q2_K..Q8_K";

/// A model's weights, read from a GGUF file or from safetensors files.
pub struct Weights {
    source: Source,
    device: Device,
    dequantize: bool,
}

enum Source {
    Gguf {
        path: PathBuf,
        content: gguf_file::Content,
        reader: BufReader<File>,
        cache: HashMap<String, Arc<QTensor>>,
    },
    Safetensors {
        path: PathBuf,
        tensors: HashMap<String, Tensor>,
    },
    /// Tensors made on request by a function of (name, shape): a fresh model's initialisation.
    Generated { path: PathBuf, make: MakeTensor },
}

/// Makes the tensor `name` of the given shape (see [`Weights::generated`]).
pub type MakeTensor = Box<dyn FnMut(&str, &[usize]) -> Result<Tensor>>;

/// The key/value metadata of a GGUF file, with typed getters that fail with the key's name.
pub struct GgufMetadata<'a> {
    path: &'a Path,
    map: &'a HashMap<String, Value>,
}

impl<'a> GgufMetadata<'a> {
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    fn err(&self, key: &str, reason: impl Into<String>) -> NnError {
        NnError::Metadata {
            key: key.to_string(),
            path: self.path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub fn string(&self, key: &str) -> Result<&'a str> {
        let v = self.get(key).ok_or_else(|| self.err(key, "missing"))?;
        v.to_string()
            .map(|s| s.as_str())
            .map_err(|e| self.err(key, e.to_string()))
    }

    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                let n = match v {
                    Value::U8(x) => *x as u64,
                    Value::U16(x) => *x as u64,
                    Value::U32(x) => *x as u64,
                    Value::U64(x) => *x,
                    Value::I8(x) if *x >= 0 => *x as u64,
                    Value::I16(x) if *x >= 0 => *x as u64,
                    Value::I32(x) if *x >= 0 => *x as u64,
                    Value::I64(x) if *x >= 0 => *x as u64,
                    other => {
                        return Err(self.err(
                            key,
                            format!("expected a non-negative integer, got {other:?}"),
                        ))
                    }
                };
                Ok(Some(n))
            }
        }
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.err(key, "missing"))
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.opt_u64(key)?
            .map(|n| usize::try_from(n).map_err(|_| self.err(key, "too large")))
            .transpose()
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(other) => Err(self.err(key, format!("expected a float, got {other:?}"))),
        }
    }

    pub fn opt_string(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.string(key).map(Some),
        }
    }
}

fn bad(path: &Path, format: &'static str, reason: impl Into<String>) -> NnError {
    NnError::BadFile {
        path: path.to_path_buf(),
        format,
        reason: reason.into(),
    }
}

/// candle appends a backtrace to its messages when RUST_BACKTRACE is set; a user-facing error
/// keeps the first line.
fn first_line(e: &candle_core::Error) -> String {
    e.to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .trim_end()
        .to_string()
}

fn explain_gguf(e: candle_core::Error) -> String {
    let s = first_line(&e);
    if s.contains("unknown dtype") {
        format!("{s}: unsupported tensor type (kiln reads {SUPPORTED_GGML})")
    } else if s.contains("failed to fill whole buffer") || s.contains("remaining") {
        format!("truncated or corrupt ({s})")
    } else {
        s
    }
}

impl Weights {
    /// Opens a GGUF file (v2 or v3) and reads its header; tensors are read when asked for.
    pub fn open_gguf(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| NnError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader)
            .map_err(|e| bad(path, "GGUF", explain_gguf(e)))?;
        if matches!(content.magic, gguf_file::VersionedMagic::GgufV1) {
            return Err(bad(
                path,
                "GGUF",
                "GGUF version 1 is not supported (re-convert to v2 or v3)",
            ));
        }
        Ok(Self {
            source: Source::Gguf {
                path: path.to_path_buf(),
                content,
                reader,
                cache: HashMap::new(),
            },
            device: Device::Cpu,
            dequantize: false,
        })
    }

    /// Reads safetensors files (all shards of one checkpoint) into memory.
    pub fn open_safetensors(paths: &[PathBuf]) -> Result<Self> {
        let mut tensors = HashMap::new();
        let first = paths.first().cloned().unwrap_or_default();
        for p in paths {
            let t = candle_core::safetensors::load(p, &Device::Cpu)
                .map_err(|e| bad(p, "safetensors", first_line(&e)))?;
            tensors.extend(t);
        }
        let path = if paths.len() == 1 {
            first
        } else {
            first.parent().map(Path::to_path_buf).unwrap_or(first)
        };
        Ok(Self {
            source: Source::Safetensors { path, tensors },
            device: Device::Cpu,
            dequantize: false,
        })
    }

    /// Tensors already in memory under checkpoint names (e.g. the variables of a training run);
    /// `label` names the source in errors.
    pub fn in_memory(label: &Path, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            source: Source::Safetensors {
                path: label.to_path_buf(),
                tensors,
            },
            device: Device::Cpu,
            dequantize: false,
        }
    }

    /// A source that asks `make(name, shape)` for each tensor the model names, with the shape the
    /// config implies: how a new model is initialised through the same code that loads one.
    pub fn generated(label: &Path, make: MakeTensor) -> Self {
        Self {
            source: Source::Generated {
                path: label.to_path_buf(),
                make,
            },
            device: Device::Cpu,
            dequantize: false,
        }
    }

    /// Makes [`Self::linear`] and [`Self::embedding`] return dense f32 weights even for
    /// quantized GGUF tensors: the f32 reference path used by parity tests.
    pub fn set_dequantize(&mut self, dequantize: bool) {
        self.dequantize = dequantize;
    }

    pub fn path(&self) -> &Path {
        match &self.source {
            Source::Gguf { path, .. }
            | Source::Safetensors { path, .. }
            | Source::Generated { path, .. } => path,
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// GGUF metadata; `None` for safetensors.
    pub fn gguf_metadata(&self) -> Option<GgufMetadata<'_>> {
        match &self.source {
            Source::Gguf { path, content, .. } => Some(GgufMetadata {
                path,
                map: &content.metadata,
            }),
            Source::Safetensors { .. } | Source::Generated { .. } => None,
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::Gguf { content, .. } => content.tensor_infos.contains_key(name),
            Source::Safetensors { tensors, .. } => tensors.contains_key(name),
            Source::Generated { .. } => false,
        }
    }

    /// The shape of a tensor in PyTorch order (out, in), if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match &self.source {
            Source::Gguf { content, .. } => content
                .tensor_infos
                .get(name)
                .map(|i| i.shape.dims().to_vec()),
            Source::Safetensors { tensors, .. } => tensors.get(name).map(|t| t.dims().to_vec()),
            Source::Generated { .. } => None,
        }
    }

    fn check_shape(&self, name: &str, expected: &[usize]) -> Result<()> {
        if matches!(self.source, Source::Generated { .. }) {
            return Ok(());
        }
        let got = self.shape(name).ok_or_else(|| NnError::MissingTensor {
            name: name.into(),
            path: self.path().into(),
        })?;
        if got != expected {
            return Err(NnError::TensorShape {
                name: name.into(),
                path: self.path().into(),
                expected: format!("{expected:?}"),
                got: format!("{got:?}"),
            });
        }
        Ok(())
    }

    fn qtensor(&mut self, name: &str) -> Result<Arc<QTensor>> {
        match &mut self.source {
            Source::Gguf {
                path,
                content,
                reader,
                cache,
            } => {
                if let Some(t) = cache.get(name) {
                    return Ok(t.clone());
                }
                let info =
                    content
                        .tensor_infos
                        .get(name)
                        .ok_or_else(|| NnError::MissingTensor {
                            name: name.into(),
                            path: path.clone(),
                        })?;
                let t = info
                    .read(reader, content.tensor_data_offset, &self.device)
                    .map_err(|e| {
                        bad(
                            path,
                            "GGUF",
                            format!("tensor `{name}`: {}", explain_gguf(e)),
                        )
                    })?;
                let t = Arc::new(t);
                cache.insert(name.to_string(), t.clone());
                Ok(t)
            }
            Source::Safetensors { path, .. } | Source::Generated { path, .. } => {
                Err(NnError::UnsupportedDtype {
                    name: name.into(),
                    path: path.clone(),
                    dtype: "quantized (safetensors holds dense tensors only)".into(),
                })
            }
        }
    }

    fn dense(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = match &mut self.source {
            Source::Generated { make, .. } => make(name, shape)?,
            Source::Safetensors { path, tensors } => {
                tensors
                    .get(name)
                    .cloned()
                    .ok_or_else(|| NnError::MissingTensor {
                        name: name.into(),
                        path: path.clone(),
                    })?
            }
            Source::Gguf { .. } => {
                let q = self.qtensor(name)?;
                q.dequantize(&self.device).op("dequantize")?
            }
        };
        match t.dtype() {
            DType::F32 | DType::F16 | DType::BF16 | DType::F64 => {
                t.to_dtype(DType::F32).op("to f32")
            }
            other => Err(NnError::UnsupportedDtype {
                name: name.into(),
                path: self.path().into(),
                dtype: format!("{other:?}"),
            }),
        }
    }

    /// A dense f32 tensor of the given shape (dequantized if stored quantized).
    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.check_shape(name, shape)?;
        self.dense(name, shape)
    }

    /// A projection with weight `name` of shape (out, in) and an optional bias (out,).
    pub fn linear(
        &mut self,
        name: &str,
        bias: Option<&str>,
        out_in: (usize, usize),
    ) -> Result<Linear> {
        self.check_shape(name, &[out_in.0, out_in.1])?;
        let bias = bias.map(|b| self.tensor(b, &[out_in.0])).transpose()?;
        if matches!(self.source, Source::Gguf { .. }) && !self.dequantize {
            let q = self.qtensor(name)?;
            Linear::from_qtensor(q, bias)
        } else {
            Linear::dense(self.dense(name, &[out_in.0, out_in.1])?, bias)
        }
    }

    /// Token embeddings of shape (vocab, hidden).
    pub fn embedding(&mut self, name: &str, vocab_hidden: (usize, usize)) -> Result<Embedding> {
        self.check_shape(name, &[vocab_hidden.0, vocab_hidden.1])?;
        if matches!(self.source, Source::Gguf { .. }) && !self.dequantize {
            Embedding::from_qtensor(self.qtensor(name)?)
        } else {
            Embedding::dense(self.dense(name, &[vocab_hidden.0, vocab_hidden.1])?)
        }
    }
}
