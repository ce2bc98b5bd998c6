//! AFL++ target: see `ffnskip_fuzz::tokenizer`. Run with `scripts/fuzz.sh tokenizer SECONDS`.

fn main() {
    // The vocabularies are loaded once, before AFL's fork server starts: every input runs
    // on the same tokenizers. No thread may exist at the fork, so keep `tokenizers` serial.
    std::env::set_var("TOKENIZERS_PARALLELISM", "false");
    let toks = ffnskip_fuzz::load_tokenizers();
    afl::fuzz!(|data: &[u8]| {
        ffnskip_fuzz::tokenizer(&toks, data);
    });
}
