//! `ffnskip convert-llama2c CHECKPOINT TOKENIZER OUT.gguf`.

use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// llama2.c checkpoint (e.g. stories260K.bin).
    pub checkpoint: PathBuf,
    /// llama2.c tokenizer (e.g. tok512.bin).
    pub tokenizer: PathBuf,
    /// Output GGUF file (written atomically; must not be an input).
    pub out: PathBuf,
}

pub fn run(a: ConvertArgs) -> anyhow::Result<()> {
    crate::outfile::ensure_not_input(
        "OUT",
        &a.out,
        &[("CHECKPOINT", &a.checkpoint), ("TOKENIZER", &a.tokenizer)],
    )?;
    crate::convert::convert_llama2c(&a.checkpoint, &a.tokenizer, &a.out)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
