//! Streaming detokenization: token ids to text one at a time, never splitting a UTF-8
//! character.

use super::Tokenizer;

/// Turns token ids into text one at a time without ever splitting a UTF-8 character:
/// incomplete byte sequences are held back until the token that completes them arrives.
/// Pieces are [`Tokenizer::token_bytes`] (no space clean-up, no leading-space removal), so the
/// concatenated output equals the bytes of all pieces, with invalid bytes as U+FFFD.
pub struct StreamDecoder<'t> {
    tok: &'t Tokenizer,
    pending: Vec<u8>,
}

impl<'t> StreamDecoder<'t> {
    pub fn new(tok: &'t Tokenizer) -> Self {
        StreamDecoder {
            tok,
            pending: Vec::new(),
        }
    }

    /// Adds one token; returns the text completed by it (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        self.pending.extend_from_slice(self.tok.token_bytes_ref(id));
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // `..valid` was just validated, so this never falls back to "".
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // Incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Bytes held back for an unfinished character.
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// Ends the stream: whatever is held back, as text (U+FFFD for a truncated character).
    pub fn flush(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::super::tiny_spm;
    use super::*;

    #[test]
    fn holds_back_a_split_character() {
        let tok = tiny_spm();
        let mut s = StreamDecoder::new(&tok);
        assert_eq!(s.push(7), " ab");
        assert_eq!(s.push(8), "");
        assert_eq!(s.pending(), &[0xC3]);
        assert_eq!(s.push(9), "é");
        assert_eq!(s.push(8), "");
        assert_eq!(s.flush(), "\u{FFFD}");
        assert!(s.pending().is_empty());
    }
}
