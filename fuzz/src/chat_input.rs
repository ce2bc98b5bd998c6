//! The `chat_template` target's input format, shared with `tests/fuzz_regressions.rs` (which
//! includes this file) so a saved finding replays exactly as the harness ran it.
//!
//! First byte: bit 0 add_generation_prompt. The rest (lossy UTF-8) split at NUL: the
//! template source, then role, content, role, content, … (at most 8 messages).

use ffnskip::chat::Message;

pub struct ChatInput {
    pub add_generation_prompt: bool,
    pub source: String,
    pub messages: Vec<Message>,
}

pub fn parse(data: &[u8]) -> Option<ChatInput> {
    let (&flags, rest) = data.split_first()?;
    let text = String::from_utf8_lossy(rest);
    let mut parts = text.split('\0');
    let source = parts.next().unwrap_or_default().to_string();
    let rest: Vec<&str> = parts.collect();
    let messages = rest
        .chunks(2)
        .take(8)
        .map(|m| Message::new(m[0], m.get(1).copied().unwrap_or_default()))
        .collect();
    Some(ChatInput {
        add_generation_prompt: flags & 1 != 0,
        source,
        messages,
    })
}
