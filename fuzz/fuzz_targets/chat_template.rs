//! AFL++ target: see `ffnskip_fuzz::chat_template`. Run with `scripts/fuzz.sh chat_template SECONDS`.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        ffnskip_fuzz::chat_template(data);
    });
}
