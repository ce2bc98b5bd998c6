//! gpt2-style byte-level BPE (`tokenizer.ggml.model = "gpt2"`): llama.cpp's
//! `llm_tokenizer_bpe_session`, run by a `tokenizers::Tokenizer` (onig regexes,
//! `Split` → `ByteLevel` → `BPE`), and the byte-level detokenization of its pieces.

use std::collections::HashMap;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;

use super::partition::Fragment;
use super::tables::PreTokenizer;
use crate::gguf::{ErrorKind, GgufError, GgufFile};

/// The `tokenizers` model for `tokenizer.ggml.merges` ("left right" strings) over
/// `token_to_id`, pre-tokenized by `pre`.
pub(super) fn build(
    f: &GgufFile,
    token_to_id: &HashMap<String, u32>,
    merges: &[&str],
    pre: &PreTokenizer,
) -> Result<tokenizers::Tokenizer, GgufError> {
    let vocab: Vocab = token_to_id.iter().map(|(k, &v)| (k.clone(), v)).collect();
    // llama.cpp splits each merge at the first space after position 0. Merges whose parts or
    // result are not tokens can never produce a token in llama.cpp's BPE either.
    let merges: Vec<(String, String)> = merges
        .iter()
        .filter_map(|m| {
            // Byte offset, as llama.cpp's `word.find(' ', 1)` (the first character may be
            // longer than one byte, or be a space itself).
            let pos = m.bytes().skip(1).position(|b| b == b' ')? + 1;
            let (a, b) = (&m[..pos], &m[pos + 1..]);
            let ok = token_to_id.contains_key(a)
                && token_to_id.contains_key(b)
                && token_to_id.contains_key(&format!("{a}{b}"));
            ok.then(|| (a.to_string(), b.to_string()))
        })
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(|e| {
            f.error(ErrorKind::BadValue {
                key: "tokenizer.ggml.merges".into(),
                expected: "merges of vocabulary tokens".into(),
                found: e.to_string(),
            })
        })?;
    let mut steps = Vec::with_capacity(pre.regexes.len() + 1);
    for re in pre.regexes {
        let split = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| {
            f.error(ErrorKind::Unsupported(format!(
                "pre-tokenizer regex {re:?}: {e}"
            )))
        })?;
        steps.push(PreTokenizerWrapper::Split(split));
    }
    steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
        false, false, false,
    )));
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(Sequence::new(steps)));
    Ok(tok)
}

/// Appends the tokens of `fragments` (parts of `text`) to `out`.
pub(super) fn encode(
    tok: &tokenizers::Tokenizer,
    text: &str,
    fragments: &[Fragment],
    out: &mut Vec<u32>,
) {
    for &frag in fragments {
        match frag {
            Fragment::Text(a, b) => {
                // Cannot fail: no normalizer, no unknown token, and the split regexes were
                // compiled at load.
                let enc = tok.encode_fast(&text[a..b], false);
                debug_assert!(enc.is_ok(), "{enc:?}");
                if let Ok(enc) = enc {
                    out.extend_from_slice(enc.get_ids());
                }
            }
            Fragment::Token(t) => out.push(t),
        }
    }
}

/// GPT-2's `bytes_to_unicode`: printable bytes map to themselves, the rest to U+0100 onwards.
fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    table
}

/// The inverse of [`byte_to_char_table`].
pub(super) fn char_to_byte() -> HashMap<char, u8> {
    byte_to_char_table()
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect()
}

/// llama.cpp's `llama_decode_text`: byte-level token text back to bytes.
pub(super) fn decode_byte_level(text: &str, char_to_byte: &HashMap<char, u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match char_to_byte.get(&c) {
            Some(&b) => out.push(b),
            None => {
                // llama.cpp renders an unmappable character this way.
                let mut buf = [0u8; 4];
                out.extend_from_slice(b"[UNK_BYTE_0x");
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
    out
}

/// `clean_up_tokenization_spaces` exactly as llama.cpp's `detokenize` does it (three passes
/// over bytes); only gpt2 pre-tokenizers with `clean_spaces` ask for it.
pub(super) fn clean_up_spaces(text: &mut Vec<u8>) {
    // " ?", " !", " .", " ," lose their space.
    let mut out: Vec<u8> = Vec::with_capacity(text.len());
    for (i, &x) in text.iter().enumerate() {
        if i > 0 && text[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            out.pop();
        }
        out.push(x);
    }
    // " ' " between spaces becomes "'".
    let mut t = std::mem::take(&mut out);
    let mut i = 0;
    while i < t.len() {
        let x = t[i];
        if i > 0 && x == b'\'' && i + 1 < t.len() && t[i - 1] == b' ' && t[i + 1] == b' ' {
            out.pop();
            out.push(x);
            // The next space is dropped; llama.cpp overwrites it with NUL, which the next
            // check then sees.
            t[i + 1] = 0;
            i += 2;
            continue;
        }
        out.push(x);
        i += 1;
    }
    // " 's", " 'm", " 're", " 've" lose their space.
    let t = std::mem::take(&mut out);
    for (i, &x) in t.iter().enumerate() {
        if i > 0 && t[i - 1] == b' ' && x == b'\'' && i + 1 < t.len() {
            let x1 = t[i + 1];
            let drop = match x1 {
                b's' | b'm' => true,
                b't' | b'd' => false,
                _ => i + 2 < t.len() && matches!((x1, t[i + 2]), (b'r', b'e') | (b'v', b'e')),
            };
            if drop {
                out.pop();
            }
        }
        out.push(x);
    }
    *text = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_round_trips_every_byte() {
        let table = byte_to_char_table();
        let inverse = char_to_byte();
        assert_eq!(inverse.len(), 256);
        let text: String = table.iter().collect();
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(decode_byte_level(&text, &inverse), bytes);
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
    }

    #[test]
    fn unmappable_character_renders_like_llama_cpp() {
        assert_eq!(
            decode_byte_level("€", &char_to_byte()),
            b"[UNK_BYTE_0xe282ac\xe2\x82\xac]"
        );
    }

    #[test]
    fn clean_up_spaces_follows_detokenize() {
        let clean = |s: &str| {
            let mut v = s.as_bytes().to_vec();
            clean_up_spaces(&mut v);
            String::from_utf8(v).unwrap()
        };
        assert_eq!(clean("Hi , there ! ok ?"), "Hi, there! ok?");
        assert_eq!(
            clean("it 's I 'm we 're they 've"),
            "it's I'm we're they've"
        );
        assert_eq!(clean("don 't I 'd"), "don 't I 'd");
        assert_eq!(clean("a ' b"), "a'b");
    }
}
