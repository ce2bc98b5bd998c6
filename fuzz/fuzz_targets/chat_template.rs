//! AFL++ target: see `ffnskip_fuzz::chat_template`. Run with `scripts/fuzz.sh chat_template SECONDS`.
//!
//! `fuzz_nohook!`: `ChatTemplate::render` turns a panic inside minijinja into an error
//! (`catch_unwind`), which afl's default panic hook (abort at once) would pre-empt. A panic
//! that escapes the harness still aborts, so it is still a crash.

fn main() {
    afl::fuzz_nohook!(|data: &[u8]| {
        ffnskip_fuzz::chat_template(data);
    });
}
