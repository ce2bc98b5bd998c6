//! llama.cpp's `tokenizer_st_partition`: special-token text is split out of the input before
//! either family tokenizes what is left.

use super::tables::{ATTR_CONTROL, ATTR_LSTRIP, ATTR_RSTRIP, ATTR_UNKNOWN};
use super::Tokenizer;

/// A piece of the text to tokenize: raw text `[start, end)` (byte offsets) or an
/// already-matched token.
#[derive(Clone, Copy, Debug)]
pub(super) enum Fragment {
    Text(usize, usize),
    Token(u32),
}

/// C's `isspace` in the "C" locale (includes vertical tab, unlike `is_ascii_whitespace`).
fn is_space_c(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

impl Tokenizer {
    /// Splits special-token text out of `text`, longest token first. Control and unknown
    /// tokens only with `parse_special`; user-defined tokens always.
    pub(super) fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let bytes = text.as_bytes();
        let mut frags = vec![Fragment::Text(0, text.len())];
        for &id in &self.special {
            let data = &self.vocab[id as usize];
            if !parse_special && data.attr & (ATTR_CONTROL | ATTR_UNKNOWN) != 0 {
                continue;
            }
            let needle = data.text.as_str();
            if !frags
                .iter()
                .any(|f| matches!(f, Fragment::Text(a, b) if text[*a..*b].contains(needle)))
            {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for frag in frags {
                let Fragment::Text(mut start, end) = frag else {
                    next.push(frag);
                    continue;
                };
                while start < end {
                    let Some(rel) = text[start..end].find(needle) else {
                        next.push(Fragment::Text(start, end));
                        break;
                    };
                    let m = start + rel;
                    let mut left_end = m;
                    if data.attr & ATTR_LSTRIP != 0 {
                        while left_end > start && is_space_c(bytes[left_end - 1]) {
                            left_end -= 1;
                        }
                    }
                    if left_end > start {
                        next.push(Fragment::Text(start, left_end));
                    }
                    next.push(Fragment::Token(id));
                    start = m + needle.len();
                    if data.attr & ATTR_RSTRIP != 0 {
                        while start < end && is_space_c(bytes[start]) {
                            start += 1;
                        }
                    }
                }
            }
            frags = next;
        }
        frags
    }
}
