//! [`Tokenizer::from_gguf`]: reads and validates the `tokenizer.ggml.*` keys in the order of
//! llama.cpp's `llama_vocab::impl::load` (family, vocabulary, pre-tokenizer, special ids,
//! end-of-generation detection by text, per-model attributes, then the model itself).

use std::collections::{BTreeSet, HashMap};

use super::tables::{
    attr_of_type, supported_pre, PreTokenizer, ATTR_BYTE, ATTR_CONTROL, ATTR_NORMAL, ATTR_RSTRIP,
    ATTR_UNKNOWN, ATTR_USER_DEFINED, EOG_TEXTS, EOM_TEXT, EOT_TEXTS, FIM_TOKENS,
    HARMONY_TEXT_TOKENS, PRE_TOKENIZERS,
};
use super::{bpe, spm, Model, TokenData, Tokenizer};
use crate::gguf::{ErrorKind, GgufError, GgufFile};

impl Tokenizer {
    /// Reads the vocabulary of `f`. Errors name the file and the key.
    pub fn from_gguf(f: &GgufFile) -> Result<Tokenizer, GgufError> {
        // Vocabulary: texts, scores and attributes, indexed by text.
        let is_bpe = read_is_bpe(f)?;
        let mut vocab = read_vocab(f, is_bpe)?;
        let mut token_to_id = HashMap::with_capacity(vocab.len());
        for (i, t) in vocab.iter().enumerate() {
            token_to_id.insert(t.text.clone(), i as u32);
        }

        // Family defaults, then the GGUF's special ids and flags.
        let pre = if is_bpe {
            Some(read_pre_tokenizer(f)?)
        } else {
            None
        };
        let ids = read_special_ids(f, vocab.len(), pre)?;

        // Special tokens: the end-of-generation set, attributes forced by text or model name,
        // and the partition order.
        let eog = find_eog(f, &mut vocab, &token_to_id, &ids)?;
        let special = special_longest_first(&vocab);
        apply_model_strip(f, &mut vocab, &token_to_id, &special)?;

        // The family's model, and every token's detokenized piece.
        let model = match pre {
            Some(p) => {
                let merges = f.opt_str_array("tokenizer.ggml.merges")?.ok_or_else(|| {
                    f.error(ErrorKind::MissingKey {
                        key: "tokenizer.ggml.merges".into(),
                    })
                })?;
                Model::Bpe(Box::new(bpe::build(f, &token_to_id, &merges, p)?))
            }
            None => Model::Spm {
                byte_tokens: spm::byte_tokens(&token_to_id),
            },
        };
        let char_to_byte = bpe::char_to_byte();
        let pieces = vocab
            .iter()
            .map(|t| token_piece(t, is_bpe, &char_to_byte))
            .collect();

        Ok(Tokenizer {
            model,
            vocab,
            token_to_id,
            special,
            pieces,
            bos: ids.bos,
            eos: ids.eos,
            eog,
            add_bos: ids.add_bos,
            add_eos: ids.add_eos,
            add_space_prefix: ids.add_space_prefix,
            clean_spaces: pre.is_some_and(|p| p.clean_spaces),
        })
    }
}

/// `tokenizer.ggml.model`: `true` for "gpt2" (byte-level BPE), `false` for "llama"
/// (SentencePiece).
fn read_is_bpe(f: &GgufFile) -> Result<bool, GgufError> {
    let model_name = f.opt_str("tokenizer.ggml.model")?.ok_or_else(|| {
        f.error(ErrorKind::MissingKey {
            key: "tokenizer.ggml.model".into(),
        })
    })?;
    match model_name {
        "gpt2" => Ok(true),
        "llama" => Ok(false),
        other => Err(f.error(ErrorKind::Unsupported(format!(
            "tokenizer.ggml.model = '{other}' is not supported (supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)"
        )))),
    }
}

/// `tokenizer.ggml.tokens`, `.scores` and `.token_type`: one entry per token, scores required
/// by SentencePiece.
fn read_vocab(f: &GgufFile, is_bpe: bool) -> Result<Vec<TokenData>, GgufError> {
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
    Ok(texts
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
        .collect())
}

/// `tokenizer.ggml.pre` of a gpt2 vocabulary; absent means the first table entry.
fn read_pre_tokenizer(f: &GgufFile) -> Result<&'static PreTokenizer, GgufError> {
    let name = f.opt_str("tokenizer.ggml.pre")?;
    let pre = match name {
        None => Some(&PRE_TOKENIZERS[0]),
        Some(name) => PRE_TOKENIZERS.iter().find(|p| p.names.contains(&name)),
    };
    pre.ok_or_else(|| {
        f.error(ErrorKind::BadValue {
            key: "tokenizer.ggml.pre".into(),
            expected: format!("a supported pre-tokenizer: {}", supported_pre()),
            found: format!("'{}'", name.unwrap_or_default()),
        })
    })
}

/// Special ids and the flags that say where they and the SentencePiece space go.
struct SpecialIds {
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
}

/// A token id key: absent is `None`, an id outside the vocabulary of `n` tokens an error.
fn read_token_id(f: &GgufFile, key: &str, n: usize) -> Result<Option<u32>, GgufError> {
    match f.opt_u64(key)? {
        None => Ok(None),
        Some(v) if (v as usize) < n => Ok(Some(v as u32)),
        Some(v) => Err(f.error(ErrorKind::BadValue {
            key: key.into(),
            expected: format!("a token id below the vocabulary size {n}"),
            found: v.to_string(),
        })),
    }
}

/// llama.cpp's per-family defaults (`pre` is `None` for SentencePiece), overridden by the
/// `tokenizer.ggml.*_token_id` and `add_*` keys of a vocabulary of `n` tokens.
fn read_special_ids(
    f: &GgufFile,
    n: usize,
    pre: Option<&PreTokenizer>,
) -> Result<SpecialIds, GgufError> {
    let is_bpe = pre.is_some();
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
    let add_space_prefix = f
        .opt_bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(!is_bpe);
    // Defaults outside the vocabulary are disabled, as llama.cpp does.
    let in_range = |id: Option<u32>| id.filter(|&i| (i as usize) < n);
    bos = in_range(bos);
    eos = in_range(eos);
    if let Some(id) = read_token_id(f, "tokenizer.ggml.bos_token_id", n)? {
        bos = Some(id);
    }
    if let Some(id) = read_token_id(f, "tokenizer.ggml.eos_token_id", n)? {
        eos = Some(id);
    }
    let eot = read_token_id(f, "tokenizer.ggml.eot_token_id", n)?;
    let eom = read_token_id(f, "tokenizer.ggml.eom_token_id", n)?;
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
    Ok(SpecialIds {
        bos,
        eos,
        eot,
        eom,
        add_bos,
        add_eos,
        add_space_prefix,
    })
}

/// End-of-generation tokens and control-looking tokens, found by text as llama.cpp does
/// (the auto-detection loop of `llama_vocab::impl::load`); forces their attributes in `vocab`.
fn find_eog(
    f: &GgufFile,
    vocab: &mut [TokenData],
    token_to_id: &HashMap<String, u32>,
    ids: &SpecialIds,
) -> Result<BTreeSet<u32>, GgufError> {
    let mut eog = BTreeSet::new();
    let force_control = |vocab: &mut [TokenData], id: u32| vocab[id as usize].attr |= ATTR_CONTROL;
    if ids.eot.is_none() {
        for t in EOT_TEXTS {
            if let Some(&id) = token_to_id.get(*t) {
                force_control(vocab, id);
            }
        }
    }
    if ids.eom.is_none() {
        if let Some(&id) = token_to_id.get(EOM_TEXT) {
            force_control(vocab, id);
        }
    }
    for fim in FIM_TOKENS {
        match read_token_id(f, fim.key, vocab.len())? {
            Some(id) => {
                if fim.ends_generation {
                    eog.insert(id);
                }
            }
            None => {
                for t in fim.texts {
                    if let Some(&id) = token_to_id.get(*t) {
                        force_control(vocab, id);
                        if fim.ends_generation {
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
            force_control(vocab, id);
        }
    }
    for t in HARMONY_TEXT_TOKENS {
        if let Some(&id) = token_to_id.get(*t) {
            vocab[id as usize].attr = ATTR_USER_DEFINED;
        }
    }
    eog.extend(ids.eos);
    eog.extend(ids.eot);
    eog.extend(ids.eom);
    // The id of text `t` when it is in `eog`.
    let eog_id =
        |eog: &BTreeSet<u32>, t: &str| token_to_id.get(t).copied().filter(|id| eog.contains(id));
    let has = |eog: &BTreeSet<u32>, t: &str| eog_id(eog, t).is_some();
    // o200k_harmony / solar-open: "<|end|>" is not an end of generation there.
    if has(&eog, "<|return|>") && has(&eog, "<|call|>")
        || has(&eog, "<|calls|>") && has(&eog, "<|flush|>")
    {
        if let Some(id) = eog_id(&eog, "<|end|>") {
            eog.remove(&id);
            vocab[id as usize].attr = ATTR_USER_DEFINED;
        }
    }
    if has(&eog, "<|tool_response>") || has(&eog, "<|plamo:eos|>") {
        if let Some(id) = eog_id(&eog, "</s>") {
            eog.remove(&id);
            vocab[id as usize].attr = ATTR_NORMAL;
        }
    }
    Ok(eog)
}

/// Control, user-defined and unknown tokens, longest text first (`cache_special_tokens`).
fn special_longest_first(vocab: &[TokenData]) -> Vec<u32> {
    let mut special: Vec<u32> = (0..vocab.len() as u32)
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
    special
}

/// Per-model strip attributes by `general.name` (end of `llama_vocab::impl::load`).
fn apply_model_strip(
    f: &GgufFile,
    vocab: &mut [TokenData],
    token_to_id: &HashMap<String, u32>,
    special: &[u32],
) -> Result<(), GgufError> {
    let general_name = f
        .opt_str("general.name")?
        .unwrap_or_default()
        .to_lowercase();
    if general_name.contains("phi-3") || general_name.contains("phi3") {
        for &id in special {
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
    Ok(())
}

/// `token_to_piece(id, special = false)`: control and unknown tokens are empty, user-defined
/// ones their text, normal ones their text decoded per family, byte tokens their byte.
fn token_piece(t: &TokenData, is_bpe: bool, char_to_byte: &HashMap<char, u8>) -> Vec<u8> {
    let attr = t.attr;
    if attr & (ATTR_UNKNOWN | ATTR_CONTROL) != 0 {
        Vec::new()
    } else if attr & ATTR_USER_DEFINED != 0 {
        t.text.as_bytes().to_vec()
    } else if attr & ATTR_NORMAL != 0 {
        if is_bpe {
            bpe::decode_byte_level(&t.text, char_to_byte)
        } else {
            spm::unescape_whitespace(&t.text)
        }
    } else if attr & ATTR_BYTE != 0 {
        spm::byte_token_value(&t.text)
            .map(|b| vec![b])
            .unwrap_or_default()
    } else {
        Vec::new()
    }
}
