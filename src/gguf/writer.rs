//! GGUF v3 writer: used by `convert-llama2c`, `quantize`, profile embedding and test fixtures.
//! Files are written to a temporary sibling and renamed into place, so a failed write never
//! leaves a half-written model under the requested name.

use std::borrow::Cow;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use super::reader::DEFAULT_ALIGNMENT;
use super::types::{GgmlType, Value};

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

    fn alignment(&self) -> u64 {
        match self.metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, Value::U32(a))) if a.is_power_of_two() => u64::from(*a),
            _ => DEFAULT_ALIGNMENT,
        }
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
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        if shape.is_empty() || shape.len() > 4 {
            return Err(invalid(format!(
                "tensor '{name}': {} dimensions, expected 1 to 4",
                shape.len()
            )));
        }
        let rows: u64 = shape[1..].iter().product();
        let expected = ty.row_bytes(shape[0]).map(|b| b * rows).ok_or_else(|| {
            invalid(format!(
                "tensor '{name}': ne[0] = {} is not a multiple of the {ty} block size {}",
                shape[0],
                ty.block_size()
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

    /// Serialises the whole file into `out`.
    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        let align = self.alignment();
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
        Ok(())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = self.write_to(&mut v);
        v
    }

    /// Writes atomically: `path.partial` first, then renamed to `path`.
    pub fn write_file(&self, path: &Path) -> io::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".partial");
        let tmp = std::path::PathBuf::from(tmp);
        let result = (|| {
            let mut f = BufWriter::new(std::fs::File::create(&tmp)?);
            self.write_to(&mut f)?;
            f.into_inner().map_err(|e| e.into_error())?.sync_all()
        })();
        match result {
            Ok(()) => std::fs::rename(&tmp, path),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }
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
