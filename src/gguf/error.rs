//! Errors of the GGUF layer. Every error carries the file it is about and names the
//! key or tensor concerned, with the expected and the actual value.

use std::path::PathBuf;

use super::types::GgmlType;

#[derive(Debug, thiserror::Error)]
#[error("{}: {kind}", file.display())]
pub struct GgufError {
    pub file: PathBuf,
    pub kind: ErrorKind,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ErrorKind {
    #[error("cannot read file: {0}")]
    Io(String),
    #[error("cannot offload to the device: {0}")]
    Device(String),
    #[error("truncated file: {what} at offset {offset} needs {need} bytes, only {have} remain")]
    Truncated {
        what: String,
        offset: u64,
        need: u64,
        have: u64,
    },
    #[error("not a GGUF file: magic is {found:?}, expected \"GGUF\"")]
    BadMagic { found: String },
    #[error("unsupported GGUF version {found} (supported: 2, 3){hint}")]
    UnsupportedVersion { found: u32, hint: &'static str },
    #[error("{what} is {count}, but the file has room for at most {max}")]
    AbsurdCount { what: String, count: u64, max: u64 },
    #[error("{what} is not valid UTF-8")]
    BadUtf8 { what: String },
    #[error("metadata entry {index} has an empty key")]
    EmptyKey { index: u64 },
    #[error("tensor '{tensor}': name is {len} bytes long, expected at most {max} (ggml's GGML_MAX_NAME - 1)")]
    NameTooLong {
        tensor: String,
        len: usize,
        max: usize,
    },
    #[error("duplicate metadata key '{key}'")]
    DuplicateKey { key: String },
    #[error("metadata key '{key}' has unknown value type {found} (known: 0..=12)")]
    UnknownValueType { key: String, found: u32 },
    #[error("metadata key 'general.alignment' must be a u32, found {found}")]
    AlignmentType { found: String },
    #[error("metadata key 'general.alignment' = {found} is not a power of two")]
    BadAlignment { found: u64 },
    #[error("duplicate tensor '{tensor}'")]
    DuplicateTensor { tensor: String },
    #[error("tensor '{tensor}' has {found} dimensions, expected 1 to 4")]
    BadDimCount { tensor: String, found: u32 },
    #[error("tensor '{tensor}' has unknown type {found}")]
    UnknownTensorType { tensor: String, found: u32 },
    #[error("tensor '{tensor}' has ne[{dim}] = {found}, expected 1 to {max}")]
    BadDim {
        tensor: String,
        dim: usize,
        found: u64,
        max: u64,
    },
    #[error(
        "tensor '{tensor}' of type {ty}: ne[0] = {ne0} is not a multiple of the block size {block}"
    )]
    NotBlockMultiple {
        tensor: String,
        ty: GgmlType,
        ne0: u64,
        block: u64,
    },
    #[error("tensor '{tensor}': size of shape {shape:?} overflows")]
    SizeOverflow { tensor: String, shape: Vec<u64> },
    #[error(
        "tensor '{tensor}': data offset {offset} is not a multiple of the alignment {alignment}"
    )]
    Misaligned {
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    #[error(
        "tensor '{tensor}': data [{start}, {end}) lies outside the data section of {size} bytes"
    )]
    OutOfFile {
        tensor: String,
        start: u64,
        end: u64,
        size: u64,
    },
    #[error("tensor '{tensor}': data [{start}, {end}) overlaps tensor '{other}' which starts at {other_start}")]
    Overlap {
        tensor: String,
        start: u64,
        end: u64,
        other: String,
        other_start: u64,
    },
    #[error("required metadata key '{key}' is missing")]
    MissingKey { key: String },
    #[error("metadata key '{key}' has type {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: String,
        found: String,
    },
    #[error("metadata key '{key}' = {found} is out of range: expected {expected}")]
    BadValue {
        key: String,
        expected: String,
        found: String,
    },
    #[error("required tensor '{tensor}' is missing")]
    MissingTensor { tensor: String },
    #[error("tensor '{tensor}' has shape {found:?}, expected {expected:?}")]
    WrongShape {
        tensor: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
    #[error("tensor '{tensor}' has type {found}, expected {expected}")]
    WrongTensorType {
        tensor: String,
        expected: String,
        found: GgmlType,
    },
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;
