//! SentencePiece-style tokenization (`tokenizer.ggml.model = "llama"`): llama.cpp's
//! `llm_tokenizer_spm_session`, which merges the highest-scoring adjacent pair first (no merge
//! list reproduces that exactly), with `<0xXX>` byte fallback.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use super::partition::Fragment;
use super::Tokenizer;

/// SentencePiece's whitespace escape (U+2581, "▁").
const ESCAPED_SPACE: &str = "\u{2581}";

/// `byte_tokens[b]`: the token of byte `b`, `<0xXX>` or else the one-byte text itself.
pub(super) fn byte_tokens(token_to_id: &HashMap<String, u32>) -> Box<[Option<u32>; 256]> {
    let mut byte_tokens = Box::new([None; 256]);
    for (b, slot) in byte_tokens.iter_mut().enumerate() {
        *slot = token_to_id
            .get(&format!("<0x{b:02X}>"))
            .or_else(|| {
                std::str::from_utf8(&[b as u8])
                    .ok()
                    .and_then(|s| token_to_id.get(s))
            })
            .copied();
    }
    byte_tokens
}

/// Parses `<0xXX>`.
pub(super) fn byte_token_value(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// llama.cpp's `llama_unescape_whitespace`: "▁" back to " ".
pub(super) fn unescape_whitespace(text: &str) -> Vec<u8> {
    text.replace(ESCAPED_SPACE, " ").into_bytes()
}

impl Tokenizer {
    /// Appends the tokens of `fragments` (parts of `text`) to `out`. A space goes before the
    /// first text and before text after a special token when `add_space_prefix` is set.
    pub(super) fn spm_encode(
        &self,
        text: &str,
        fragments: &[Fragment],
        byte_tokens: &[Option<u32>; 256],
        out: &mut Vec<u32>,
    ) {
        let mut prev_special = true;
        let mut buf = String::new();
        for &frag in fragments {
            match frag {
                Fragment::Text(a, b) => {
                    buf.clear();
                    if self.add_space_prefix && prev_special {
                        buf.push(' ');
                    }
                    buf.push_str(&text[a..b]);
                    let escaped = buf.replace(' ', ESCAPED_SPACE);
                    self.spm_tokenize(&escaped, byte_tokens, out);
                    prev_special = false;
                }
                Fragment::Token(t) => {
                    out.push(t);
                    prev_special = true;
                }
            }
        }
    }

    /// llama.cpp's `llm_tokenizer_spm_session::tokenize` on whitespace-escaped text: start from
    /// UTF-8 characters, repeatedly merge the adjacent pair whose concatenation is the
    /// highest-scoring token (ties: leftmost), then emit tokens, unknown characters as bytes.
    fn spm_tokenize(&self, text: &str, byte_tokens: &[Option<u32>; 256], out: &mut Vec<u32>) {
        let mut syms: Vec<Sym> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            let len = c.len_utf8();
            syms.push(Sym {
                prev: i as isize - 1,
                next: if start + len == text.len() {
                    -1
                } else {
                    i as isize + 1
                },
                start,
                len,
            });
        }
        let mut queue = BinaryHeap::new();
        let try_add = |syms: &[Sym], queue: &mut BinaryHeap<Bigram>, left: isize, right: isize| {
            if left < 0 || right < 0 {
                return;
            }
            let (l, r) = (syms[left as usize], syms[right as usize]);
            let piece = &text[l.start..l.start + l.len + r.len];
            if let Some(&id) = self.token_to_id.get(piece) {
                queue.push(Bigram {
                    left: left as usize,
                    right: right as usize,
                    score: self.vocab[id as usize].score,
                    size: piece.len(),
                });
            }
        };
        for i in 1..syms.len() {
            try_add(&syms, &mut queue, i as isize - 1, i as isize);
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (syms[b.left], syms[b.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue;
            }
            syms[b.left].len += r.len;
            syms[b.right].len = 0;
            syms[b.left].next = r.next;
            if r.next >= 0 {
                syms[r.next as usize].prev = b.left as isize;
            }
            let prev = syms[b.left].prev;
            let next = syms[b.left].next;
            try_add(&syms, &mut queue, prev, b.left as isize);
            try_add(&syms, &mut queue, b.left as isize, next);
        }
        let mut i = if syms.is_empty() { -1 } else { 0 };
        while i >= 0 {
            let s = syms[i as usize];
            let piece = &text[s.start..s.start + s.len];
            match self.token_to_id.get(piece) {
                Some(&id) => out.push(id),
                None => out.extend(piece.bytes().filter_map(|b| byte_tokens[b as usize])),
            }
            i = s.next;
        }
    }
}

/// `llm_symbol`: a run of `text[start..start + len]` in a doubly linked list (indices into the
/// symbol vector, -1 at the ends); `len == 0` once merged into its left neighbour.
#[derive(Clone, Copy)]
struct Sym {
    prev: isize,
    next: isize,
    start: usize,
    len: usize,
}

/// `llm_bigram_spm`: adjacent symbols whose concatenation (`size` bytes) is a token.
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for Bigram {
    // Max-heap: higher score first, then the smaller left index.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .partial_cmp(&o.score)
            .unwrap_or(Ordering::Equal)
            .then(o.left.cmp(&self.left))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tiny_spm;
    use super::*;

    #[test]
    fn merges_by_score_and_falls_back_to_bytes() {
        let tok = tiny_spm();
        assert_eq!(tok.encode("ab ab", true, false), vec![1, 7, 7]);
        // "é" is U+00E9, bytes C3 A9: not a token, so its byte tokens.
        assert_eq!(tok.encode("é", false, false), vec![3, 8, 9]);
        assert_eq!(tok.encode("<s>ab", false, true), vec![1, 7]);
        assert_eq!(tok.decode(&[7, 7]), "ab ab");
    }

    #[test]
    fn byte_token_text() {
        assert_eq!(byte_token_value("<0x0A>"), Some(b'\n'));
        assert_eq!(byte_token_value("<0xa>"), None);
        assert_eq!(byte_token_value("<0xZZ>"), None);
    }
}
