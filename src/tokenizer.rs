//! Tokenizer built from a GGUF's `tokenizer.ggml.*` keys, giving exactly llama.cpp's token ids.
//!
//! Two families, as in llama.cpp's `src/llama-vocab.cpp`:
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE over `tokenizer.ggml.merges`. The
//!   pre-tokenizer regexes come from `tokenizer.ggml.pre` (table [`PRE_TOKENIZERS`], copied from
//!   `llm_tokenizer_bpe`); pre-tokenization and the merges run in a `tokenizers::Tokenizer`
//!   (onig regexes, `Split` → `ByteLevel` → `BPE`).
//! - `tokenizer.ggml.model = "llama"`: SentencePiece-style merging driven by
//!   `tokenizer.ggml.scores` with `<0xXX>` byte fallback. llama.cpp's `llm_tokenizer_spm` merges
//!   the highest-scoring adjacent pair first, which no merge list reproduces exactly, so that
//!   algorithm is implemented here directly ([`spm_tokenize`]).
//!
//! Shared by both: special/control tokens are split out of the text first
//! (`tokenizer_st_partition`), BOS/EOS follow `add_bos_token`/`add_eos_token` with llama.cpp's
//! defaults, and pieces/detokenization follow `token_to_piece` / `detokenize`.

use std::collections::{BTreeSet, HashMap};

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;

use crate::gguf::{ErrorKind, GgufError, GgufFile};

// llama.cpp `llama_token_attr` bits (include/llama.h).
const ATTR_UNKNOWN: u32 = 1 << 0;
const ATTR_UNUSED: u32 = 1 << 1;
const ATTR_NORMAL: u32 = 1 << 2;
const ATTR_CONTROL: u32 = 1 << 3;
const ATTR_USER_DEFINED: u32 = 1 << 4;
const ATTR_BYTE: u32 = 1 << 5;
const ATTR_LSTRIP: u32 = 1 << 7;
const ATTR_RSTRIP: u32 = 1 << 8;

/// GGUF `tokenizer.ggml.token_type` values → attributes (`llama_vocab::impl::load`).
fn attr_of_type(t: i64) -> u32 {
    match t {
        1 => ATTR_NORMAL,
        2 => ATTR_UNKNOWN,
        3 => ATTR_CONTROL,
        4 => ATTR_USER_DEFINED,
        5 => ATTR_UNUSED,
        6 => ATTR_BYTE,
        _ => 0, // undefined
    }
}

/// One pre-tokenizer of the gpt2 family: llama.cpp's regexes (applied one after the other,
/// each splitting the pieces of the previous one, matches and gaps both kept) and the flags
/// its loader sets for that `tokenizer.ggml.pre`.
struct PreTokenizer {
    names: &'static [&'static str],
    regexes: &'static [&'static str],
    /// `clean_up_tokenization_spaces` in detokenize.
    clean_spaces: bool,
    /// A whole pre-token that is in the vocabulary is emitted without merging.
    ignore_merges: bool,
    /// Default of `add_bos_token` when the key is absent.
    add_bos: bool,
}

const GPT2_RE: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const PORO_RE: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";

/// Supported `tokenizer.ggml.pre` values (llama.cpp `llm_tokenizer_bpe` and the
/// `tokenizer_pre` chain of `llama_vocab::impl::load`). The first entry is what an absent key
/// means.
const PRE_TOKENIZERS: &[PreTokenizer] = &[
    PreTokenizer {
        names: &["default"],
        regexes: &[
            r"[\p{P}\$\+<=>\^~\|]+",
            GPT2_RE,
            r"\p{N}+",
            r"[0-9][0-9][0-9]",
        ],
        clean_spaces: true,
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &[
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
        ],
        regexes: &[LLAMA3_RE],
        clean_spaces: true,
        ignore_merges: true,
        add_bos: true,
    },
    PreTokenizer {
        names: &["dbrx", "smaug-bpe", "chatglm-bpe"],
        regexes: &[LLAMA3_RE],
        clean_spaces: true,
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["falcon"],
        regexes: &[
            r"[\p{P}\$\+<=>\^~\|`]+",
            r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
            r"[0-9][0-9][0-9]",
        ],
        clean_spaces: true,
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &[
            "starcoder",
            "refact",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
        ],
        regexes: &[r"\p{N}", GPT2_RE],
        clean_spaces: true,
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["smollm", "command-r"],
        regexes: &[r"\p{N}", GPT2_RE],
        clean_spaces: false,
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &[
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "mpt",
            "olmo",
            "jais",
            "exaone4",
            "jina-v1-en",
            "jina-v2-code",
            "roberta-bpe",
        ],
        regexes: &[GPT2_RE],
        clean_spaces: true,
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["trillion", "granite-docling"],
        regexes: &[GPT2_RE],
        clean_spaces: false,
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["stablelm2", "megrez"],
        regexes: &[QWEN2_RE],
        clean_spaces: true,
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &[
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "f2llmv2",
            "hunyuan",
            "solar-open",
            "grok-2",
        ],
        regexes: &[QWEN2_RE],
        clean_spaces: false,
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["qwen35"],
        regexes: &[QWEN35_RE],
        clean_spaces: false,
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["bloom", "gpt3-finnish"],
        regexes: &[PORO_RE],
        clean_spaces: true,
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["poro-chat"],
        regexes: &[PORO_RE],
        clean_spaces: false,
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["viking"],
        regexes: &[PORO_RE, r"\p{N}"],
        clean_spaces: false,
        ignore_merges: false,
        add_bos: false,
    },
];

fn supported_pre() -> String {
    PRE_TOKENIZERS
        .iter()
        .flat_map(|p| p.names.iter().copied())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Token texts llama.cpp treats as end of generation (`special_eog_ids`, matched by text);
/// they are forced to control tokens.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// FIM token texts llama.cpp detects when the id key is absent (forced to control); the
/// pad/repo/sep ones also end generation.
const FIM_TEXTS: &[(&str, &[&str], bool)] = &[
    (
        "tokenizer.ggml.fim_pre_token_id",
        &[
            "<|fim_prefix|>",
            "<fim-prefix>",
            "<fim_prefix>",
            "<｜fim▁begin｜>",
            "<PRE>",
            "▁<PRE>",
            "<|code_prefix|>",
            "<|prefix|>",
        ],
        false,
    ),
    (
        "tokenizer.ggml.fim_suf_token_id",
        &[
            "<|fim_suffix|>",
            "<fim-suffix>",
            "<fim_suffix>",
            "<｜fim▁hole｜>",
            "<SUF>",
            "▁<SUF>",
            "<|code_suffix|>",
            "<|suffix|>",
        ],
        false,
    ),
    (
        "tokenizer.ggml.fim_mid_token_id",
        &[
            "<|fim_middle|>",
            "<fim-middle>",
            "<fim_middle>",
            "<｜fim▁end｜>",
            "<MID>",
            "▁<MID>",
            "<|code_middle|>",
            "<|middle|>",
        ],
        false,
    ),
    (
        "tokenizer.ggml.fim_pad_token_id",
        &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
        true,
    ),
    (
        "tokenizer.ggml.fim_rep_token_id",
        &[
            "<|fim_repo|>",
            "<|repo_name|>",
            "<fim-repo>",
            "<REPO>",
            "<reponame>",
        ],
        true,
    ),
    ("tokenizer.ggml.fim_sep_token_id", &["<|file_sep|>"], true),
];

const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];

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

/// llama.cpp's `llama_decode_text`: byte-level token text back to bytes.
fn decode_byte_level(text: &str, char_to_byte: &HashMap<char, u8>) -> Vec<u8> {
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

/// Parses `<0xXX>`.
fn byte_token_value(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// A piece of the text to tokenize: raw text `[start, end)` or an already-matched token.
#[derive(Clone, Copy, Debug)]
enum Fragment {
    Text(usize, usize),
    Token(u32),
}

impl Tokenizer {
    /// Reads the vocabulary of `f`. Errors name the file and the key.
    pub fn from_gguf(f: &GgufFile) -> Result<Tokenizer, GgufError> {
        let model_name = f.opt_str("tokenizer.ggml.model")?.ok_or_else(|| {
            f.error(ErrorKind::MissingKey {
                key: "tokenizer.ggml.model".into(),
            })
        })?;
        let is_bpe = match model_name {
            "gpt2" => true,
            "llama" => false,
            other => {
                return Err(f.error(ErrorKind::Unsupported(format!(
                    "tokenizer.ggml.model = '{other}' is not supported (supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)"
                ))))
            }
        };
        let texts = f.opt_str_array("tokenizer.ggml.tokens")?.ok_or_else(|| {
            f.error(ErrorKind::MissingKey {
                key: "tokenizer.ggml.tokens".into(),
            })
        })?;
        let n = texts.len();
        if n == 0 || n > i32::MAX as usize {
            return Err(f.error(ErrorKind::BadValue {
                key: "tokenizer.ggml.tokens".into(),
                expected: "1 to 2^31-1 tokens".into(),
                found: n.to_string(),
            }));
        }
        let scores = f.opt_f32_array("tokenizer.ggml.scores")?;
        let types = f.opt_i64_array("tokenizer.ggml.token_type")?;
        for (key, len) in [
            ("tokenizer.ggml.scores", scores.as_ref().map(Vec::len)),
            ("tokenizer.ggml.token_type", types.as_ref().map(Vec::len)),
        ] {
            if let Some(len) = len {
                if len < n {
                    return Err(f.error(ErrorKind::BadValue {
                        key: key.into(),
                        expected: format!("at least one entry per token ({n})"),
                        found: format!("{len} entries"),
                    }));
                }
            }
        }
        if !is_bpe && scores.is_none() {
            return Err(f.error(ErrorKind::MissingKey {
                key: "tokenizer.ggml.scores".into(),
            }));
        }

        let mut vocab: Vec<TokenData> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| TokenData {
                // llama.cpp renames empty tokens so that every text is unique and non-empty.
                text: if t.is_empty() {
                    format!("[EMPTY_{i}]")
                } else {
                    t.to_string()
                },
                score: scores.as_ref().map_or(0.0, |s| s[i]),
                attr: types.as_ref().map_or(ATTR_NORMAL, |t| attr_of_type(t[i])),
            })
            .collect();
        let mut token_to_id = HashMap::with_capacity(n);
        for (i, t) in vocab.iter().enumerate() {
            token_to_id.insert(t.text.clone(), i as u32);
        }

        // Family defaults (llama_vocab::impl::load).
        let pre = if is_bpe {
            let name = f.opt_str("tokenizer.ggml.pre")?;
            let pre = match name {
                None => Some(&PRE_TOKENIZERS[0]),
                Some(name) => PRE_TOKENIZERS.iter().find(|p| p.names.contains(&name)),
            };
            Some(pre.ok_or_else(|| {
                f.error(ErrorKind::BadValue {
                    key: "tokenizer.ggml.pre".into(),
                    expected: format!("a supported pre-tokenizer: {}", supported_pre()),
                    found: format!("'{}'", name.unwrap_or_default()),
                })
            })?)
        } else {
            None
        };
        // llama.cpp's defaults when the id keys are absent.
        let (mut bos, mut eos) = if is_bpe {
            (Some(11u32), Some(11u32))
        } else {
            (Some(1), Some(2))
        };
        let chatglm = matches!(
            f.opt_str("tokenizer.ggml.pre")?,
            Some("chatglm-bpe" | "glm4" | "glm5")
        );
        if chatglm {
            bos = None;
        }
        let (mut add_bos, mut add_eos) = match pre {
            Some(p) => (p.add_bos, false),
            None => (true, false),
        };
        let clean_spaces = pre.is_some_and(|p| p.clean_spaces);
        let add_space_prefix = f
            .opt_bool("tokenizer.ggml.add_space_prefix")?
            .unwrap_or(!is_bpe);
        // Defaults outside the vocabulary are disabled, as llama.cpp does.
        let in_range = |id: Option<u32>| id.filter(|&i| (i as usize) < n);
        bos = in_range(bos);
        eos = in_range(eos);
        let id_key = |key: &str| -> Result<Option<u32>, GgufError> {
            match f.opt_u64(key)? {
                None => Ok(None),
                Some(v) if (v as usize) < n => Ok(Some(v as u32)),
                Some(v) => Err(f.error(ErrorKind::BadValue {
                    key: key.into(),
                    expected: format!("a token id below the vocabulary size {n}"),
                    found: v.to_string(),
                })),
            }
        };
        if let Some(id) = id_key("tokenizer.ggml.bos_token_id")? {
            bos = Some(id);
        }
        if let Some(id) = id_key("tokenizer.ggml.eos_token_id")? {
            eos = Some(id);
        }
        let eot = id_key("tokenizer.ggml.eot_token_id")?;
        let eom = id_key("tokenizer.ggml.eom_token_id")?;
        if let Some(b) = f.opt_bool("tokenizer.ggml.add_bos_token")? {
            add_bos = b;
        }
        if let Some(b) = f.opt_bool("tokenizer.ggml.add_eos_token")? {
            add_eos = b;
        }
        if add_bos && bos.is_none() {
            return Err(f.error(ErrorKind::BadValue {
                key: "tokenizer.ggml.add_bos_token".into(),
                expected: "false when the vocabulary has no BOS token".into(),
                found: "true".into(),
            }));
        }
        if add_eos && eos.is_none() {
            return Err(f.error(ErrorKind::BadValue {
                key: "tokenizer.ggml.add_eos_token".into(),
                expected: "false when the vocabulary has no EOS token".into(),
                found: "true".into(),
            }));
        }

        // End-of-generation tokens and control-looking tokens, found by text as llama.cpp does.
        let mut eog = BTreeSet::new();
        let force_control =
            |vocab: &mut Vec<TokenData>, id: u32| vocab[id as usize].attr |= ATTR_CONTROL;
        if eot.is_none() {
            for t in EOT_TEXTS {
                if let Some(&id) = token_to_id.get(*t) {
                    force_control(&mut vocab, id);
                }
            }
        }
        if eom.is_none() {
            if let Some(&id) = token_to_id.get("<|eom_id|>") {
                force_control(&mut vocab, id);
            }
        }
        for (key, texts, ends) in FIM_TEXTS {
            match id_key(key)? {
                Some(id) => {
                    if *ends {
                        eog.insert(id);
                    }
                }
                None => {
                    for t in *texts {
                        if let Some(&id) = token_to_id.get(*t) {
                            force_control(&mut vocab, id);
                            if *ends {
                                eog.insert(id);
                            }
                        }
                    }
                }
            }
        }
        for t in EOG_TEXTS {
            if let Some(&id) = token_to_id.get(*t) {
                eog.insert(id);
                force_control(&mut vocab, id);
            }
        }
        // gpt-oss: these render as text.
        for t in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
            if let Some(&id) = token_to_id.get(t) {
                vocab[id as usize].attr = ATTR_USER_DEFINED;
            }
        }
        eog.extend(eos);
        eog.extend(eot);
        eog.extend(eom);
        // o200k_harmony / solar-open: "<|end|>" is not an end of generation there.
        let has =
            |eog: &BTreeSet<u32>, t: &str| token_to_id.get(t).is_some_and(|id| eog.contains(id));
        if (has(&eog, "<|return|>") && has(&eog, "<|call|>")
            || has(&eog, "<|calls|>") && has(&eog, "<|flush|>"))
            && has(&eog, "<|end|>")
        {
            let id = token_to_id["<|end|>"];
            eog.remove(&id);
            vocab[id as usize].attr = ATTR_USER_DEFINED;
        }
        if (has(&eog, "<|tool_response>") || has(&eog, "<|plamo:eos|>")) && has(&eog, "</s>") {
            let id = token_to_id["</s>"];
            eog.remove(&id);
            vocab[id as usize].attr = ATTR_NORMAL;
        }

        let mut special: Vec<u32> = (0..n as u32)
            .filter(|&i| {
                vocab[i as usize].attr & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0
            })
            .collect();
        special.sort_by(|&a, &b| {
            vocab[b as usize]
                .text
                .len()
                .cmp(&vocab[a as usize].text.len())
        });

        // Per-model strip attributes (end of llama_vocab::impl::load).
        let general_name = f
            .opt_str("general.name")?
            .unwrap_or_default()
            .to_lowercase();
        if general_name.contains("phi-3") || general_name.contains("phi3") {
            for &id in &special {
                vocab[id as usize].attr |= ATTR_RSTRIP;
            }
            if let Some(&id) = token_to_id.get("</s>") {
                vocab[id as usize].attr |= ATTR_RSTRIP;
            }
            for t in ["<unk>", "<s>", "<|endoftext|>"] {
                if let Some(&id) = token_to_id.get(t) {
                    vocab[id as usize].attr &= !ATTR_RSTRIP;
                }
            }
        }

        let model = match pre {
            Some(p) => {
                let merges = f.opt_str_array("tokenizer.ggml.merges")?.ok_or_else(|| {
                    f.error(ErrorKind::MissingKey {
                        key: "tokenizer.ggml.merges".into(),
                    })
                })?;
                Model::Bpe(Box::new(build_bpe(f, &token_to_id, &merges, p)?))
            }
            None => {
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
                Model::Spm { byte_tokens }
            }
        };

        let char_to_byte: HashMap<char, u8> = byte_to_char_table()
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let pieces = vocab
            .iter()
            .map(|t| {
                let attr = t.attr;
                if attr & (ATTR_UNKNOWN | ATTR_CONTROL) != 0 {
                    Vec::new()
                } else if attr & ATTR_USER_DEFINED != 0 {
                    t.text.as_bytes().to_vec()
                } else if attr & ATTR_NORMAL != 0 {
                    if is_bpe {
                        decode_byte_level(&t.text, &char_to_byte)
                    } else {
                        t.text.replace('\u{2581}', " ").into_bytes()
                    }
                } else if attr & ATTR_BYTE != 0 {
                    byte_token_value(&t.text)
                        .map(|b| vec![b])
                        .unwrap_or_default()
                } else {
                    Vec::new()
                }
            })
            .collect();

        Ok(Tokenizer {
            model,
            vocab,
            token_to_id,
            special,
            pieces,
            bos,
            eos,
            eog,
            add_bos,
            add_eos,
            add_space_prefix,
            clean_spaces,
        })
    }

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
            Model::Spm { byte_tokens } => {
                // A space goes before the first text and before text after a special token.
                let mut prev_special = true;
                let mut buf = String::new();
                for frag in fragments {
                    match frag {
                        Fragment::Text(a, b) => {
                            buf.clear();
                            if self.add_space_prefix && prev_special {
                                buf.push(' ');
                            }
                            buf.push_str(&text[a..b]);
                            let escaped = buf.replace(' ', "\u{2581}");
                            self.spm_tokenize(&escaped, byte_tokens, &mut out);
                            prev_special = false;
                        }
                        Fragment::Token(t) => {
                            out.push(t);
                            prev_special = true;
                        }
                    }
                }
            }
            Model::Bpe(tok) => {
                for frag in fragments {
                    match frag {
                        Fragment::Text(a, b) => {
                            // Cannot fail: no normalizer, no unknown token, and the split
                            // regexes were compiled at load.
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
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        out
    }

    /// `tokenizer_st_partition`: splits special-token text out of `text`, longest token first.
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
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
                        while left_end > start && bytes[left_end - 1].is_ascii_whitespace_c() {
                            left_end -= 1;
                        }
                    }
                    if left_end > start {
                        next.push(Fragment::Text(start, left_end));
                    }
                    next.push(Fragment::Token(id));
                    start = m + needle.len();
                    if data.attr & ATTR_RSTRIP != 0 {
                        while start < end && bytes[start].is_ascii_whitespace_c() {
                            start += 1;
                        }
                    }
                }
            }
            frags = next;
        }
        frags
    }

    /// llama.cpp's `llm_tokenizer_spm_session::tokenize` on whitespace-escaped text: start from
    /// UTF-8 characters, repeatedly merge the adjacent pair whose concatenation is the
    /// highest-scoring token (ties: leftmost), then emit tokens, unknown characters as bytes.
    fn spm_tokenize(&self, text: &str, byte_tokens: &[Option<u32>; 256], out: &mut Vec<u32>) {
        #[derive(Clone, Copy)]
        struct Sym {
            prev: isize,
            next: isize,
            start: usize,
            len: usize,
        }
        struct Bigram {
            left: usize,
            right: usize,
            score: f32,
            size: usize,
        }
        impl PartialEq for Bigram {
            fn eq(&self, o: &Self) -> bool {
                self.cmp(o) == std::cmp::Ordering::Equal
            }
        }
        impl Eq for Bigram {}
        impl PartialOrd for Bigram {
            fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(o))
            }
        }
        impl Ord for Bigram {
            // Max-heap: higher score first, then the smaller left index.
            fn cmp(&self, o: &Self) -> std::cmp::Ordering {
                self.score
                    .partial_cmp(&o.score)
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(o.left.cmp(&self.left))
            }
        }
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
        let mut queue = std::collections::BinaryHeap::new();
        let try_add = |syms: &[Sym],
                       queue: &mut std::collections::BinaryHeap<Bigram>,
                       left: isize,
                       right: isize| {
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
            clean_up_spaces(&mut out);
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

trait CSpace {
    fn is_ascii_whitespace_c(&self) -> bool;
}

impl CSpace for u8 {
    /// C's `isspace` in the "C" locale (includes vertical tab, unlike `is_ascii_whitespace`).
    fn is_ascii_whitespace_c(&self) -> bool {
        matches!(*self, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
    }
}

/// `clean_up_tokenization_spaces` exactly as llama.cpp's `detokenize` does it (three passes
/// over bytes).
fn clean_up_spaces(text: &mut Vec<u8>) {
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

fn build_bpe(
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
                    // SAFETY-free: the prefix was just validated.
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
