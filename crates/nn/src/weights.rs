//! Weight sources behind one interface: a GGUF file (quantized tensors stay quantized) or one or
//! more safetensors files (a Hugging Face folder, sharded or not). Models ask for tensors by name
//! and shape; this module turns file problems into [`NnError`]s that name the file and tensor.

use crate::{Embedding, Linear, NnError, OpContext, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Seek};
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

/// Reads a GGUF header ahead of candle, tracking the position itself (no seek per value).
struct HeaderScan<'a> {
    reader: &'a mut BufReader<File>,
    pos: u64,
    len: u64,
}

impl HeaderScan<'_> {
    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        use std::io::Read;
        let mut b = [0u8; N];
        self.reader.read_exact(&mut b).ok()?;
        self.pos += N as u64;
        Some(b)
    }

    fn u32(&mut self) -> Option<u32> {
        self.bytes().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.bytes().map(u64::from_le_bytes)
    }

    /// Skips `n` bytes if the file has them.
    fn skip(&mut self, n: u64) -> Option<()> {
        if n > self.len.saturating_sub(self.pos) {
            return None;
        }
        self.reader.seek_relative(i64::try_from(n).ok()?).ok()?;
        self.pos += n;
        Some(())
    }

    /// Skips one value of GGUF type `ty`. Accepts everything candle's reader accepts (arrays nest
    /// 64 deep there), so that a header this rejects is one candle rejects too.
    fn skip_value(&mut self, ty: u32, depth: usize) -> Option<()> {
        let fixed = |ty: u32| match ty {
            0 | 1 | 7 => Some(1u64), // u8, i8, bool
            2 | 3 => Some(2),        // u16, i16
            4..=6 => Some(4),        // u32, i32, f32
            10..=12 => Some(8),      // u64, i64, f64
            _ => None,
        };
        if let Some(n) = fixed(ty) {
            return self.skip(n);
        }
        match ty {
            8 => {
                let len = self.u64()?;
                self.skip(len)
            }
            9 if depth <= 64 => {
                let elem = self.u32()?;
                let len = self.u64()?;
                match fixed(elem) {
                    Some(n) => self.skip(len.checked_mul(n)?),
                    // Strings and arrays take at least 8 bytes each, so this loop ends within
                    // the file's length.
                    None => (0..len).try_for_each(|_| self.skip_value(elem, depth + 1)),
                }
            }
            _ => None,
        }
    }
}

/// What candle's `gguf_file::Content::read` cannot be given: it divides by `general.alignment`
/// (a file that sets it to 0 panics it), and kiln refuses v1 files, so they are refused before
/// candle parses them. Walks the metadata of a v2/v3 file without allocating (values are skipped,
/// every length is checked against the bytes left). A header it cannot walk is one candle
/// cannot read either, and candle's error names the problem, so that is left to candle.
fn check_gguf_header(
    reader: &mut BufReader<File>,
    file_len: u64,
) -> std::result::Result<(), String> {
    let mut h = HeaderScan {
        reader,
        pos: 0,
        len: file_len,
    };
    let (Some(magic), Some(version)) = (h.bytes::<4>(), h.u32()) else {
        return Ok(());
    };
    if &magic != b"GGUF" && &magic != b"FUGG" {
        return Ok(());
    }
    if version == 1 {
        return Err("GGUF version 1 is not supported (re-convert to v2 or v3)".into());
    }
    if version != 2 && version != 3 {
        return Ok(());
    }
    let (Some(_tensor_count), Some(kv_count)) = (h.u64(), h.u64()) else {
        return Ok(());
    };
    const KEY: &[u8] = b"general.alignment";
    let mut alignment = None;
    // Each entry takes at least 13 bytes, so this loop ends within the file's length.
    for _ in 0..kv_count {
        let Some(key_len) = h.u64() else {
            return Ok(());
        };
        // candle drops trailing NULs from keys, so `general.alignment\0\0` is the same key.
        // Compares byte by byte and skips the rest of the key at the first difference.
        let mut is_alignment = key_len >= KEY.len() as u64;
        let mut read = 0u64;
        while is_alignment && read < key_len {
            let Some([b]) = h.bytes::<1>() else {
                return Ok(());
            };
            is_alignment = b == KEY.get(read as usize).copied().unwrap_or(0);
            read += 1;
        }
        if h.skip(key_len - read).is_none() {
            return Ok(());
        }
        let Some(ty) = h.u32() else {
            return Ok(());
        };
        if !is_alignment {
            if h.skip_value(ty, 0).is_none() {
                return Ok(());
            }
            continue;
        }
        // The types candle takes the alignment from; for any other type or a negative value it
        // uses the default. The last occurrence of the key wins, as in candle's map.
        let value = match ty {
            0 => h.bytes::<1>().map(|[b]| Some(b as u64)),
            1 => h.bytes::<1>().map(|[b]| u64::try_from(b as i8).ok()),
            2 => h.bytes().map(|b| Some(u16::from_le_bytes(b) as u64)),
            3 => h.bytes().map(|b| u64::try_from(i16::from_le_bytes(b)).ok()),
            4 => h.u32().map(|v| Some(v as u64)),
            5 => h.bytes().map(|b| u64::try_from(i32::from_le_bytes(b)).ok()),
            _ => h.skip_value(ty, 0).map(|()| None),
        };
        match value {
            Some(v) => alignment = v,
            None => return Ok(()),
        }
    }
    if alignment == Some(0) {
        return Err(
            "general.alignment is 0: the tensor data alignment must be positive (llama.cpp writes 32)"
                .into(),
        );
    }
    Ok(())
}

/// Checks every tensor of a GGUF header against the file before anything is read, so that a
/// corrupt header is reported at open time, by tensor name, and never reaches arithmetic that
/// panics or allocations the file's size does not bound.
fn check_gguf_tensors(
    content: &gguf_file::Content,
    file_len: u64,
) -> std::result::Result<(), String> {
    let mut extents = Vec::with_capacity(content.tensor_infos.len());
    for (name, info) in &content.tensor_infos {
        let dims = info.shape.dims();
        let dtype = info.ggml_dtype;
        // candle multiplies the dimensions (`Shape::elem_count`) and then the block count by the
        // block's byte size without checking; dimensions like 2^40 x 2^40 overflow both (a panic
        // with overflow checks, a wrong small size without).
        let elems = dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| format!("tensor `{name}`: dimensions {dims:?} overflow"))?;
        // ggml stores whole blocks per row: a row length (the innermost dimension) that is not a
        // multiple of the block size cannot be a real tensor, and the dequantize and matmul
        // kernels assume it is one.
        let row = dims.last().copied().unwrap_or(1);
        let block = dtype.block_size();
        if !row.is_multiple_of(block) {
            return Err(format!(
                "tensor `{name}` ({dtype:?}, shape {dims:?}): a row of {row} elements is not a \
                 whole number of {block}-element blocks"
            ));
        }
        let bytes = (elems / block)
            .checked_mul(dtype.type_size())
            .and_then(|b| u64::try_from(b).ok())
            .ok_or_else(|| format!("tensor `{name}`: {dims:?} {dtype:?} is too large"))?;
        // Whether the data lies inside the file is checked when the tensor is read (candle's
        // `TensorInfo::read`, sound once the size above cannot overflow): a truncated file still
        // opens, and names the first tensor it cannot read.
        let start = content.tensor_data_offset.checked_add(info.offset);
        if let Some((start, end)) = start.and_then(|s| Some((s, s.checked_add(bytes)?))) {
            if bytes > 0 && end <= file_len {
                extents.push((start, end, name));
            }
        }
    }
    // Tensors must not share bytes (llama.cpp requires them back to back): otherwise thousands
    // of tensor entries could name the same megabytes and the loader would allocate far more
    // than the file holds.
    extents.sort_unstable();
    for pair in extents.windows(2) {
        let ((_, end_a, a), (start_b, _, b)) = (pair[0], pair[1]);
        if start_b < end_a {
            return Err(format!("tensors `{a}` and `{b}` overlap in the file"));
        }
    }
    Ok(())
}

impl Weights {
    /// Opens a GGUF file (v2 or v3) and reads its header; tensors are read when asked for. The
    /// header is validated first (see `check_gguf_header`, `check_gguf_tensors`), so a corrupt
    /// file fails here with an error that names the problem.
    pub fn open_gguf(path: &Path) -> Result<Self> {
        let io = |source| NnError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut reader = BufReader::new(file);
        check_gguf_header(&mut reader, file_len).map_err(|e| bad(path, "GGUF", e))?;
        reader.rewind().map_err(io)?;
        let content = gguf_file::Content::read(&mut reader)
            .map_err(|e| bad(path, "GGUF", explain_gguf(e)))?;
        if matches!(content.magic, gguf_file::VersionedMagic::GgufV1) {
            return Err(bad(
                path,
                "GGUF",
                "GGUF version 1 is not supported (re-convert to v2 or v3)",
            ));
        }
        check_gguf_tensors(&content, file_len).map_err(|e| bad(path, "GGUF", e))?;
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
