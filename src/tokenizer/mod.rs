//! Tokenizer built from a GGUF's `tokenizer.ggml.*` keys, giving exactly llama.cpp's token ids.
//!
//! Two families, as in llama.cpp's `src/llama-vocab.cpp`:
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE over `tokenizer.ggml.merges` (`bpe`). The
//!   pre-tokenizer regexes come from `tokenizer.ggml.pre` (`tables::PRE_TOKENIZERS`, copied
//!   from `llm_tokenizer_bpe`); pre-tokenization and the merges run in a
//!   `tokenizers::Tokenizer` (onig regexes, `Split` → `ByteLevel` → `BPE`).
//! - `tokenizer.ggml.model = "llama"`: SentencePiece-style merging driven by
//!   `tokenizer.ggml.scores` with `<0xXX>` byte fallback (`spm`). llama.cpp's
//!   `llm_tokenizer_spm` merges the highest-scoring adjacent pair first, which no merge list
//!   reproduces exactly, so that algorithm is implemented directly.
//!
//! Shared by both: special/control tokens are split out of the text first (`partition`,
//! `tokenizer_st_partition`), BOS/EOS follow `add_bos_token`/`add_eos_token` with llama.cpp's
//! defaults (`load`), and pieces/detokenization follow `token_to_piece` / `detokenize`
//! (here and, one token at a time, `stream`).

mod bpe;
mod load;
mod partition;
mod spm;
mod stream;
mod tables;

use std::collections::{BTreeSet, HashMap};

pub use stream::StreamDecoder;

use tables::ATTR_CONTROL;

enum Model {
    /// gpt2-style byte-level BPE: pre-tokenizer + merges in a `tokenizers::Tokenizer`.
    Bpe(Box<tokenizers::Tokenizer>),
    /// SentencePiece-style score-driven merging; `byte_tokens[b]` is the token of byte `b`.
    Spm {
        byte_tokens: Box<[Option<u32>; 256]>,
    },
}

struct TokenData {
    text: String,
    score: f32,
    /// `tables::ATTR_*` bits.
    attr: u32,
}

/// A GGUF vocabulary with llama.cpp's tokenization and detokenization.
pub struct Tokenizer {
    model: Model,
    vocab: Vec<TokenData>,
    /// Text → id; a text that occurs twice maps to its last id, as in llama.cpp.
    token_to_id: HashMap<String, u32>,
    /// Control, user-defined and unknown tokens, longest text first (`cache_special_tokens`).
    special: Vec<u32>,
    /// `token_to_piece(id, special = false)` of every token.
    pieces: Vec<Vec<u8>>,
    bos: Option<u32>,
    eos: Option<u32>,
    eog: BTreeSet<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    clean_spaces: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field(
                "kind",
                &if matches!(self.model, Model::Bpe(_)) {
                    "gpt2"
                } else {
                    "llama"
                },
            )
            .field("n_vocab", &self.vocab.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

impl Tokenizer {
    /// llama.cpp's `llama_tokenize`: `add_special` adds BOS/EOS as the metadata asks;
    /// `parse_special` turns the text of control tokens into those tokens (user-defined tokens
    /// are always matched, as in llama.cpp).
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let fragments = if text.is_empty() {
            Vec::new()
        } else {
            self.partition(text, parse_special)
        };
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        match &self.model {
            Model::Spm { byte_tokens } => self.spm_encode(text, &fragments, byte_tokens, &mut out),
            Model::Bpe(tok) => bpe::encode(tok, text, &fragments, &mut out),
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        out
    }

    /// llama.cpp's `llama_detokenize(tokens, remove_special = false, unparse_special = false)`:
    /// control tokens render as nothing, a SentencePiece vocabulary drops the first token's
    /// leading space, and gpt2 vocabularies with `clean_spaces` tidy " ," / " 's" and the like.
    /// Invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned()
    }

    /// [`Tokenizer::decode`] without the UTF-8 conversion.
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut remove_space = self.add_space_prefix;
        for &id in ids {
            let mut piece = self.token_bytes_ref(id);
            if remove_space && piece.first() == Some(&b' ') {
                piece = &piece[1..];
            }
            remove_space = false;
            out.extend_from_slice(piece);
        }
        if self.clean_spaces {
            bpe::clean_up_spaces(&mut out);
        }
        out
    }

    fn token_bytes_ref(&self, id: u32) -> &[u8] {
        self.pieces.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// The raw bytes of one token (`token_to_piece` with `special = false`: control tokens
    /// are empty). May be part of a UTF-8 character.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.token_bytes_ref(id).to_vec()
    }

    /// The token's text as stored in the vocabulary (`▁` for spaces, byte-level characters).
    pub fn token_text(&self, id: u32) -> &str {
        self.vocab.get(id as usize).map_or("", |t| t.text.as_str())
    }

    /// The id of a token with exactly this vocabulary text.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// End of generation: EOS, EOT, EOM and the end-of-turn tokens llama.cpp finds by text.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    pub fn eog_tokens(&self) -> impl Iterator<Item = u32> + '_ {
        self.eog.iter().copied()
    }

    /// Control tokens (rendered as nothing by [`Tokenizer::decode`]).
    pub fn is_control(&self, id: u32) -> bool {
        self.vocab
            .get(id as usize)
            .is_some_and(|t| t.attr & ATTR_CONTROL != 0)
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    pub fn n_vocab(&self) -> usize {
        self.vocab.len()
    }

    /// Whether `encode(.., add_special = true, ..)` starts with BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// The `tokenizers` model behind a gpt2-style vocabulary (`None` for SentencePiece).
    pub fn hf_tokenizer(&self) -> Option<&tokenizers::Tokenizer> {
        match &self.model {
            Model::Bpe(t) => Some(t),
            Model::Spm { .. } => None,
        }
    }
}

/// A 10-token SentencePiece vocabulary: `<unk> <s> </s> ▁ a b ab ▁ab <0xC3> <0xA9>`.
#[cfg(test)]
fn tiny_spm() -> Tokenizer {
    use crate::gguf::{GgufFile, GgufWriter, Value, ValueType};
    let tokens = [
        "<unk>", "<s>", "</s>", "▁", "a", "b", "ab", "▁ab", "<0xC3>", "<0xA9>",
    ];
    let types = [2, 3, 3, 1, 1, 1, 1, 1, 6, 6];
    let mut w = GgufWriter::new();
    w.set("tokenizer.ggml.model", Value::String("llama".into()));
    let strings = tokens.map(|s| Value::String(s.into())).to_vec();
    w.set(
        "tokenizer.ggml.tokens",
        Value::Array(ValueType::String, strings),
    );
    let scores = (0..tokens.len()).map(|i| Value::F32(i as f32)).collect();
    w.set(
        "tokenizer.ggml.scores",
        Value::Array(ValueType::F32, scores),
    );
    let types = types.map(Value::I32).to_vec();
    w.set(
        "tokenizer.ggml.token_type",
        Value::Array(ValueType::I32, types),
    );
    let f = GgufFile::from_bytes("tiny-spm.gguf", w.to_bytes()).unwrap();
    Tokenizer::from_gguf(&f).unwrap()
}
