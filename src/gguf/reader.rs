//! Strict, zero-copy GGUF reader (versions 2 and 3, little-endian).
//!
//! Layout (ggml `docs/gguf.md`): magic "GGUF", u32 version, u64 tensor_count, u64 kv_count,
//! kv_count × (string key, u32 value type, value), tensor_count × (string name, u32 n_dims,
//! n_dims × u64 ne, u32 type, u64 offset), padding to `general.alignment` (default 32),
//! then the tensor data section. Validation follows ggml's `gguf.cpp` (non-empty unique keys,
//! known types, power-of-two u32 alignment, unique tensor names shorter than GGML_MAX_NAME,
//! 1–4 dims, `ne[0] % block_size == 0`, checked sizes); beyond it, tensors may come in any
//! order but must lie inside the file without overlapping, and `ne` must be ≥ 1.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use super::error::{ErrorKind, GgufError, Result};
use super::types::{GgmlType, Value, ValueType};

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Deepest array nesting we accept (arrays of arrays of …); real files use at most 2.
pub const MAX_ARRAY_DEPTH: u32 = 8;
/// ggml's GGML_MAX_NAME: tensor names must be shorter (gguf.cpp rejects `len >= 64`).
pub const MAX_NAME_LEN: usize = 64;
/// Entries pre-allocated from a count read from the file; larger counts grow as they are
/// read, so a count that passed the room check still cannot force a huge allocation upfront.
const PREALLOC_MAX: u64 = 4096;
/// ggml's GGML_MAX_DIMS.
pub const MAX_DIMS: u32 = 4;

/// One tensor's header entry. `shape` is ggml's `ne`: `shape[0]` is the contiguous (row)
/// dimension, so a weight `[n_out, n_in]` in PyTorch terms has `shape = [n_in, n_out]`.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub ty: GgmlType,
    pub shape: Vec<u64>,
    /// Byte offset relative to the start of the data section.
    pub offset: u64,
    /// Bytes of data.
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.shape.iter().product()
    }
    /// Elements per row (`ne[0]`).
    pub fn row_len(&self) -> u64 {
        self.shape[0]
    }
    /// Number of rows (product of `ne[1..]`).
    pub fn n_rows(&self) -> u64 {
        self.shape[1..].iter().product()
    }
}

enum Bytes {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mmap(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file: typed metadata, tensor infos, and borrowed views of tensor data.
pub struct GgufFile {
    path: PathBuf,
    bytes: Bytes,
    pub version: u32,
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and validates `path`. Tensor data is never copied.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |e: std::io::Error| GgufError {
            file: path.clone(),
            kind: ErrorKind::Io(e.to_string()),
        };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: memmap2's `map` is unsafe only because another process could
        // truncate or modify the file while mapped; GGUF files are read-only inputs and we
        // accept that (as llama.cpp does with its mmap loader).
        #[allow(unsafe_code)]
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, Bytes::Mmap(mmap))
    }

    /// Parses an in-memory file; `name` stands in for the path in error messages.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(name.into(), Bytes::Owned(bytes))
    }

    fn parse(path: PathBuf, bytes: Bytes) -> Result<Self> {
        match parse_header(&bytes) {
            Ok(h) => Ok(GgufFile {
                path,
                bytes,
                version: h.version,
                alignment: h.alignment,
                data_offset: h.data_offset,
                key_index: h.key_index,
                metadata: h.metadata,
                tensor_index: h.tensor_index,
                tensors: h.tensors,
            }),
            Err(kind) => Err(GgufError { file: path, kind }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Builds an error about this file.
    pub fn error(&self, kind: ErrorKind) -> GgufError {
        GgufError {
            file: self.path.clone(),
            kind,
        }
    }

    pub fn file_size(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// Tells the kernel that the mapped pages wholly inside `data` (a slice of this file's
    /// tensor data) will not be needed soon, so they leave the process's resident set (for
    /// weights used only through a repacked copy). They stay mapped: a later read faults them
    /// back in from the file. No-op for in-memory files or a slice from elsewhere.
    pub fn release(&self, data: &[u8]) {
        let Bytes::Mmap(m) = &self.bytes else {
            return;
        };
        let base = m.as_ptr() as usize;
        let (start, end) = (data.as_ptr() as usize, data.as_ptr() as usize + data.len());
        if start < base || end > base + m.len() {
            return;
        }
        let page = 4096; // x86-64 and most aarch64 kernels; larger pages only make this a no-op
        let (lo, hi) = (
            (start - base).div_ceil(page) * page,
            (end - base) / page * page,
        );
        if lo < hi {
            // SAFETY: MADV_DONTNEED on a read-only, file-backed private mapping that was never
            // written drops the pages; later reads fault them back in from the file with the
            // same contents (under the assumption `open` already makes: the file is not
            // modified while mapped), so every borrowed slice stays valid.
            #[allow(unsafe_code)]
            let _ = unsafe {
                m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo, hi - lo)
            };
        }
    }

    /// The bytes of a tensor, borrowed from the mapping. Bounds were validated at open.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + info.offset) as usize;
        &self.bytes[start..start + info.n_bytes as usize]
    }
}

struct Header {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], ErrorKind> {
        if n > self.remaining() {
            return Err(ErrorKind::Truncated {
                what: what(),
                offset: self.pos as u64,
                need: n,
                have: self.remaining(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], ErrorKind> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, ErrorKind> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, ErrorKind> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, ErrorKind> {
        let len = self.u64(&|| format!("length of {}", what()))?;
        let raw = self.take(len, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| ErrorKind::BadUtf8 { what: what() })
    }

    /// Reads one value of type `ty`; `what` names it in errors ("value of metadata key 'k'",
    /// "element 3 of metadata key 'k'").
    fn value(
        &mut self,
        ty: ValueType,
        key: &str,
        depth: u32,
        what: &dyn Fn() -> String,
    ) -> Result<Value, ErrorKind> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(what)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(what)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(what)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(what)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Bool => {
                let b = self.array::<1>(what)?[0];
                if b > 1 {
                    return Err(ErrorKind::BadValue {
                        key: key.to_string(),
                        expected: "a bool (0 or 1)".into(),
                        found: b.to_string(),
                    });
                }
                Value::Bool(b == 1)
            }
            ValueType::String => Value::String(self.string(what)?),
            ValueType::Array => {
                let raw = self.u32(&|| format!("array type of metadata key '{key}'"))?;
                let elem = ValueType::from_u32(raw).ok_or(ErrorKind::UnknownValueType {
                    key: key.to_string(),
                    found: raw,
                })?;
                if elem == ValueType::Array && depth + 1 >= MAX_ARRAY_DEPTH {
                    return Err(ErrorKind::Unsupported(format!(
                        "metadata key '{key}' nests arrays deeper than {MAX_ARRAY_DEPTH} levels"
                    )));
                }
                let n = self.u64(&|| format!("array length of metadata key '{key}'"))?;
                let max = self.remaining() / elem.min_bytes();
                if n > max {
                    return Err(ErrorKind::AbsurdCount {
                        what: format!("array length of metadata key '{key}'"),
                        count: n,
                        max,
                    });
                }
                let mut items = Vec::with_capacity(n.min(PREALLOC_MAX) as usize);
                for i in 0..n {
                    let what = || match depth {
                        0 => format!("element {i} of metadata key '{key}'"),
                        _ => format!("element {i} of {}", what()),
                    };
                    items.push(self.value(elem, key, depth + 1, &what)?);
                }
                Value::Array(elem, items)
            }
        })
    }
}

/// Reads and validates the whole header of `buf` (the complete file): the preamble, the
/// metadata, the tensor infos, and where the tensors lie in the data section.
fn parse_header(buf: &[u8]) -> Result<Header, ErrorKind> {
    let mut c = Cursor { buf, pos: 0 };
    let Preamble {
        version,
        n_tensors,
        n_kv,
    } = read_preamble(&mut c)?;
    let metadata = read_metadata(&mut c, n_kv)?;
    let alignment = alignment(&metadata)?;
    let tensors = read_tensor_infos(&mut c, n_tensors, alignment)?;

    // The data section starts at the first multiple of the alignment after the header.
    let header_end = c.pos as u64;
    let data_offset = header_end.div_ceil(alignment) * alignment;
    let data_size = (buf.len() as u64).saturating_sub(data_offset);
    check_placement(&tensors.infos, data_size)?;

    Ok(Header {
        version,
        alignment,
        data_offset,
        metadata: metadata.entries,
        key_index: metadata.index,
        tensors: tensors.infos,
        tensor_index: tensors.index,
    })
}

/// The fixed-size start of a GGUF file (24 bytes).
struct Preamble {
    version: u32,
    /// Tensor infos that follow the metadata (not yet checked against the file size).
    n_tensors: u64,
    /// Metadata key/value pairs (checked against the bytes that remain).
    n_kv: u64,
}

/// Magic "GGUF", u32 version (2 or 3), u64 tensor count, u64 metadata key/value count.
fn read_preamble(c: &mut Cursor<'_>) -> Result<Preamble, ErrorKind> {
    let magic = c.array::<4>(&|| "magic".into())?;
    if &magic != MAGIC {
        return Err(ErrorKind::BadMagic {
            found: String::from_utf8_lossy(&magic).into_owned(),
        });
    }
    let version = c.u32(&|| "version".into())?;
    if version != 2 && version != 3 {
        let hint = if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            "; the byte order looks swapped: big-endian GGUF files are not supported"
        } else if version == 1 {
            "; GGUF v1 files predate 64-bit counts: convert them with a current llama.cpp"
        } else {
            ""
        };
        return Err(ErrorKind::UnsupportedVersion {
            found: version,
            hint,
        });
    }
    let n_tensors = c.u64(&|| "tensor count".into())?;
    let n_kv = c.u64(&|| "metadata key/value count".into())?;
    let max_kv = c.remaining() / MIN_KV_BYTES;
    if n_kv > max_kv {
        return Err(ErrorKind::AbsurdCount {
            what: "metadata key/value count".into(),
            count: n_kv,
            max: max_kv,
        });
    }
    Ok(Preamble {
        version,
        n_tensors,
        n_kv,
    })
}

/// Smallest metadata pair: 8 (key length) + 4 (value type) + 1 (a u8 value) bytes.
const MIN_KV_BYTES: u64 = 13;
/// Smallest tensor info: 8 (name length) + 4 (n_dims) + 8 (ne[0]) + 4 (type) + 8 (offset).
const MIN_TENSOR_INFO_BYTES: u64 = 32;

/// Metadata pairs in file order, and key → index into them.
struct Metadata {
    entries: Vec<(String, Value)>,
    index: HashMap<String, usize>,
}

/// Tensor infos in file order, and name → index into them.
struct TensorInfos {
    infos: Vec<TensorInfo>,
    index: HashMap<String, usize>,
}

/// `n_kv` × (string key, u32 value type, value). Keys must be non-empty and unique.
fn read_metadata(c: &mut Cursor<'_>, n_kv: u64) -> Result<Metadata, ErrorKind> {
    let mut metadata = Vec::with_capacity(n_kv.min(PREALLOC_MAX) as usize);
    let mut key_index = HashMap::with_capacity(n_kv.min(PREALLOC_MAX) as usize);
    for i in 0..n_kv {
        let key = c.string(&|| format!("key of metadata entry {i}"))?;
        if key.is_empty() {
            return Err(ErrorKind::EmptyKey { index: i });
        }
        let raw = c.u32(&|| format!("value type of metadata key '{key}'"))?;
        let ty = ValueType::from_u32(raw).ok_or_else(|| ErrorKind::UnknownValueType {
            key: key.clone(),
            found: raw,
        })?;
        let value = c.value(ty, &key, 0, &|| format!("value of metadata key '{key}'"))?;
        if key_index.insert(key.clone(), metadata.len()).is_some() {
            return Err(ErrorKind::DuplicateKey { key });
        }
        metadata.push((key, value));
    }
    Ok(Metadata {
        entries: metadata,
        index: key_index,
    })
}

/// `general.alignment` in bytes: a power-of-two u32, [`DEFAULT_ALIGNMENT`] when absent.
fn alignment(metadata: &Metadata) -> Result<u64, ErrorKind> {
    let value = metadata.index.get("general.alignment");
    match value.map(|&i| &metadata.entries[i].1) {
        None => Ok(DEFAULT_ALIGNMENT),
        Some(Value::U32(a)) => {
            let a = u64::from(*a);
            if !a.is_power_of_two() {
                return Err(ErrorKind::BadAlignment { found: a });
            }
            Ok(a)
        }
        Some(other) => Err(ErrorKind::AlignmentType {
            found: other.type_desc(),
        }),
    }
}

/// `n_tensors` tensor infos. Names must be unique.
fn read_tensor_infos(
    c: &mut Cursor<'_>,
    n_tensors: u64,
    alignment: u64,
) -> Result<TensorInfos, ErrorKind> {
    let max_tensors = c.remaining() / MIN_TENSOR_INFO_BYTES;
    if n_tensors > max_tensors {
        return Err(ErrorKind::AbsurdCount {
            what: "tensor count".into(),
            count: n_tensors,
            max: max_tensors,
        });
    }
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors.min(PREALLOC_MAX) as usize);
    let mut tensor_index = HashMap::with_capacity(n_tensors.min(PREALLOC_MAX) as usize);
    for i in 0..n_tensors {
        let info = read_tensor_info(c, i, alignment)?;
        if tensor_index
            .insert(info.name.clone(), tensors.len())
            .is_some()
        {
            return Err(ErrorKind::DuplicateTensor { tensor: info.name });
        }
        tensors.push(info);
    }
    Ok(TensorInfos {
        infos: tensors,
        index: tensor_index,
    })
}

/// Tensor info number `index`: string name (< [`MAX_NAME_LEN`] bytes), u32 n_dims (1 to
/// [`MAX_DIMS`]), n_dims × u64 ne (each 1 to i64::MAX), u32 ggml type, u64 data offset
/// (relative to the data section, a multiple of `alignment`). `ne[0]` must be a whole number
/// of blocks; the byte size must fit in a u64.
fn read_tensor_info(
    c: &mut Cursor<'_>,
    index: u64,
    alignment: u64,
) -> Result<TensorInfo, ErrorKind> {
    let name = c.string(&|| format!("name of tensor {index}"))?;
    if name.len() >= MAX_NAME_LEN {
        return Err(ErrorKind::NameTooLong {
            len: name.len(),
            tensor: name,
            max: MAX_NAME_LEN - 1,
        });
    }
    let n_dims = c.u32(&|| format!("dimension count of tensor '{name}'"))?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(ErrorKind::BadDimCount {
            tensor: name,
            found: n_dims,
        });
    }
    let mut shape = Vec::with_capacity(n_dims as usize);
    for d in 0..n_dims {
        let ne = c.u64(&|| format!("ne[{d}] of tensor '{name}'"))?;
        if ne == 0 || ne > i64::MAX as u64 {
            return Err(ErrorKind::BadDim {
                tensor: name,
                dim: d as usize,
                found: ne,
                max: i64::MAX as u64,
            });
        }
        shape.push(ne);
    }
    let raw_ty = c.u32(&|| format!("type of tensor '{name}'"))?;
    let ty = GgmlType::from_u32(raw_ty).ok_or_else(|| ErrorKind::UnknownTensorType {
        tensor: name.clone(),
        found: raw_ty,
    })?;
    let offset = c.u64(&|| format!("data offset of tensor '{name}'"))?;
    if shape[0] % ty.block_size() != 0 {
        return Err(ErrorKind::NotBlockMultiple {
            tensor: name,
            ty,
            ne0: shape[0],
            block: ty.block_size(),
        });
    }
    // Bytes = elements / block size × block bytes (exact: ne[0] is a whole number of blocks).
    let n_bytes = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64)
        .and_then(|n| (n / ty.block_size()).checked_mul(ty.block_bytes()));
    let Some(n_bytes) = n_bytes else {
        return Err(ErrorKind::SizeOverflow {
            tensor: name,
            shape,
        });
    };
    if offset % alignment != 0 {
        return Err(ErrorKind::Misaligned {
            tensor: name,
            offset,
            alignment,
        });
    }
    Ok(TensorInfo {
        name,
        ty,
        shape,
        offset,
        n_bytes,
    })
}

/// Every tensor's bytes `[offset, offset + n_bytes)` lie inside the data section of
/// `data_size` bytes, and no two tensors overlap (checked in offset order, so the first
/// error is about the lowest offending offset).
fn check_placement(tensors: &[TensorInfo], data_size: u64) -> Result<(), ErrorKind> {
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
    by_offset.sort_by_key(|t| t.offset);
    for t in &by_offset {
        let end = t.offset.saturating_add(t.n_bytes);
        if end > data_size {
            return Err(ErrorKind::OutOfFile {
                tensor: t.name.clone(),
                start: t.offset,
                end,
                size: data_size,
            });
        }
    }
    // Ends are ≤ data_size from here on, so `offset + n_bytes` cannot overflow.
    for w in by_offset.windows(2) {
        let (a, b) = (w[0], w[1]);
        if a.offset + a.n_bytes > b.offset {
            return Err(ErrorKind::Overlap {
                tensor: a.name.clone(),
                start: a.offset,
                end: a.offset + a.n_bytes,
                other: b.name.clone(),
                other_start: b.offset,
            });
        }
    }
    Ok(())
}
