//! `ffnskip tokenize`: token ids of a text as a JSON array.

use clap::Args;

use super::{model_path, open_gguf};
use crate::tokenizer::Tokenizer;

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// GGUF model file (default: the default model).
    #[arg(short = 'm', long = "model")]
    pub model: Option<std::path::PathBuf>,
    /// Text to tokenize.
    #[arg(short = 'p', long = "prompt")]
    pub prompt: String,
    /// Do not add BOS/EOS even if the model's metadata asks for them.
    #[arg(long)]
    pub no_special: bool,
}

pub fn run(a: TokenizeArgs) -> anyhow::Result<()> {
    let path = model_path(&a.model)?;
    let (file, _) = open_gguf(&path)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let ids = tokenizer.encode(&a.prompt, !a.no_special, true);
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}
