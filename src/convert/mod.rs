//! Converters from other checkpoint formats into GGUF (written with `gguf::GgufWriter`).

pub mod llama2c;
pub mod quantize;

pub use llama2c::{
    convert_llama2c, read_checkpoint_header, read_llama2c_tokenizer, vocab_only_gguf,
    Llama2cHeader, Llama2cToken,
};
