//! GGUF v3 writer: used by `convert-llama2c`, `quantize`, profile embedding and test fixtures.
//! Files are written to a temporary sibling and renamed into place, so a failed write never
//! leaves a half-written model under the requested name.

use std::borrow::Cow;
use std::io::{self, Write};
use std::path::Path;

use super::reader::{DEFAULT_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_DIMS, MAX_NAME_LEN};
use super::types::{GgmlType, Value, ValueType};

pub struct WriterTensor<'a> {
    pub name: String,
    pub ty: GgmlType,
    /// ggml `ne` order: `shape[0]` is the row length.
    pub shape: Vec<u64>,
    pub data: Cow<'a, [u8]>,
}

#[derive(Default)]
pub struct GgufWriter<'a> {
    metadata: Vec<(String, Value)>,
    tensors: Vec<WriterTensor<'a>>,
}

impl<'a> GgufWriter<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a key, replacing an earlier value (keys stay unique, order of first insertion).
    pub fn set(&mut self, key: &str, value: Value) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }

    pub fn remove(&mut self, key: &str) {
        self.metadata.retain(|(k, _)| k != key);
    }

    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// `general.alignment` if set (a power-of-two u32, as the reader and ggml require), else 32.
    fn alignment(&self) -> io::Result<u64> {
        match self.metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => Ok(DEFAULT_ALIGNMENT),
            Some((_, Value::U32(a))) if a.is_power_of_two() => Ok(u64::from(*a)),
            Some((_, v)) => Err(invalid(format!(
                "metadata key 'general.alignment' must be a power-of-two u32, found {} {}",
                v.type_desc(),
                v.summary(16)
            ))),
        }
    }

    /// Refuses metadata the reader (and ggml's gguf.cpp) would reject: empty keys, arrays
    /// whose items are not of the declared element type, nesting deeper than the reader takes.
    fn check_metadata(&self) -> io::Result<()> {
        fn check(key: &str, v: &Value, depth: u32) -> io::Result<()> {
            let Value::Array(elem, items) = v else {
                return Ok(());
            };
            if *elem == ValueType::Array && depth + 1 >= MAX_ARRAY_DEPTH {
                return Err(invalid(format!(
                    "metadata key '{key}' nests arrays deeper than {MAX_ARRAY_DEPTH} levels"
                )));
            }
            for (i, item) in items.iter().enumerate() {
                if item.value_type() != *elem {
                    return Err(invalid(format!(
                        "metadata key '{key}': element {i} is {}, expected {elem} (the array's element type)",
                        item.type_desc()
                    )));
                }
                check(key, item, depth + 1)?;
            }
            Ok(())
        }
        for (k, v) in &self.metadata {
            if k.is_empty() {
                return Err(invalid("metadata key is empty".into()));
            }
            check(k, v, 0)?;
        }
        Ok(())
    }

    /// Adds a tensor; its byte length must match its type and shape.
    pub fn add_tensor(
        &mut self,
        name: &str,
        ty: GgmlType,
        shape: &[u64],
        data: impl Into<Cow<'a, [u8]>>,
    ) -> io::Result<()> {
        let data = data.into();
        if name.len() >= MAX_NAME_LEN {
            return Err(invalid(format!(
                "tensor '{name}': name is {} bytes long, expected at most {}",
                name.len(),
                MAX_NAME_LEN - 1
            )));
        }
        if shape.is_empty() || shape.len() > MAX_DIMS as usize {
            return Err(invalid(format!(
                "tensor '{name}': {} dimensions, expected 1 to {MAX_DIMS}",
                shape.len()
            )));
        }
        if let Some((d, ne)) = shape
            .iter()
            .enumerate()
            .find(|(_, &ne)| ne == 0 || ne > i64::MAX as u64)
        {
            return Err(invalid(format!(
                "tensor '{name}': ne[{d}] = {ne}, expected 1 to {}",
                i64::MAX
            )));
        }
        let rows = shape[1..].iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let row = ty.row_bytes(shape[0]).ok_or_else(|| {
            invalid(format!(
                "tensor '{name}': ne[0] = {} is not a multiple of the {ty} block size {}",
                shape[0],
                ty.block_size()
            ))
        })?;
        let expected = rows.and_then(|r| r.checked_mul(row)).ok_or_else(|| {
            invalid(format!(
                "tensor '{name}': size of shape {shape:?} overflows"
            ))
        })?;
        if expected != data.len() as u64 {
            return Err(invalid(format!(
                "tensor '{name}': {} bytes of data, expected {expected} for {ty} {shape:?}",
                data.len()
            )));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(invalid(format!("duplicate tensor '{name}'")));
        }
        self.tensors.push(WriterTensor {
            name: name.to_string(),
            ty,
            shape: shape.to_vec(),
            data,
        });
        Ok(())
    }

    /// Serialises the whole file into `out`. As ggml's `gguf_write_to_file` does, every
    /// tensor's data (the last one included) is zero-padded to the alignment.
    /// Fails, before writing anything, on metadata the reader would reject.
    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        let align = self.alignment()?;
        self.check_metadata()?;
        let mut head = Vec::new();
        head.extend_from_slice(b"GGUF");
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            write_str(&mut head, k);
            head.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            write_value(&mut head, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            write_str(&mut head, &t.name);
            head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for d in &t.shape {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&(t.ty as u32).to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len() as u64).div_ceil(align) * align;
        }
        let data_start = (head.len() as u64).div_ceil(align) * align;
        head.resize(data_start as usize, 0);
        out.write_all(&head)?;
        let mut pos = 0u64; // relative to data_start
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.write_all(&vec![0u8; (off - pos) as usize])?;
            out.write_all(&t.data)?;
            pos = off + t.data.len() as u64;
        }
        // `offset` is the padded end of the last tensor.
        out.write_all(&vec![0u8; (offset - pos) as usize])?;
        Ok(())
    }

    /// The whole file in memory, or the `write_to` error (invalid metadata).
    pub fn try_to_bytes(&self) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        self.write_to(&mut v)?;
        Ok(v)
    }

    /// The whole file in memory.
    ///
    /// # Panics
    /// If the metadata is invalid (see `write_to`); use `try_to_bytes` to get the error.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.try_to_bytes()
            .unwrap_or_else(|e| panic!("GgufWriter::to_bytes: {e}"))
    }

    /// Writes atomically ([`crate::outfile::AtomicFile`]): a temporary sibling, then a rename.
    pub fn write_file(&self, path: &Path) -> io::Result<()> {
        let to_io = |e: crate::outfile::OutputError| io::Error::other(e.to_string());
        let mut f = crate::outfile::AtomicFile::create(path).map_err(to_io)?;
        self.write_to(&mut f)?;
        f.commit().map_err(to_io)
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Encodes a value without its type tag.
pub fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => write_str(out, s),
        Value::Array(t, items) => {
            out.extend_from_slice(&(*t as u32).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                write_value(out, i);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}
