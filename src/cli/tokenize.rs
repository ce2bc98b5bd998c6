//! `ffnskip tokenize`: token ids of a text as a JSON array.

use std::path::PathBuf;

use clap::Args;

use super::{model_path, open_gguf, outln, read_prompt};
use crate::tokenizer::Tokenizer;

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// GGUF model file, or a catalogue name fetched on first use (`ffnskip models`; default:
    /// the default model).
    #[arg(short = 'm', long = "model")]
    pub model: Option<PathBuf>,
    /// Text to tokenize.
    #[arg(short = 'p', long = "prompt")]
    pub prompt: Option<String>,
    /// Read the text from a file (`-` reads stdin; at most 16 MiB).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Do not add BOS/EOS even if the model's metadata asks for them.
    #[arg(long)]
    pub no_special: bool,
}

pub fn run(a: TokenizeArgs) -> anyhow::Result<()> {
    let text = read_prompt(&a.prompt, &a.file)?;
    let path = model_path(&a.model)?;
    let (file, _) = open_gguf(&path)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let ids = tokenizer.encode(&text, !a.no_special, true);
    outln(&serde_json::to_string(&ids)?)
}
