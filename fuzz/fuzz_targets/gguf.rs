//! AFL++ target: see `ffnskip_fuzz::gguf`. Run with `scripts/fuzz.sh gguf SECONDS`.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        ffnskip_fuzz::gguf(data);
    });
}
