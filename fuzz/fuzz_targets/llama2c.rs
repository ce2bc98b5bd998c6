//! AFL++ target: see `ffnskip_fuzz::llama2c`. Run with `scripts/fuzz.sh llama2c SECONDS`.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        ffnskip_fuzz::llama2c(data);
    });
}
