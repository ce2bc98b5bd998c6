//! GGUF: bytes → typed metadata and tensor views. Knows nothing of models or kernels.

mod error;
mod metadata;
mod reader;
mod types;
mod writer;

pub use error::{ErrorKind, GgufError, Result};
pub use reader::{
    GgufFile, TensorInfo, DEFAULT_ALIGNMENT, MAGIC, MAX_ARRAY_DEPTH, MAX_DIMS, MAX_NAME_LEN,
};
pub use types::{GgmlType, Value, ValueType};
pub use writer::{write_value, GgufWriter, WriterTensor};
