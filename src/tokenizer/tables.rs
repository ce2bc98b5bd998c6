//! Tables copied from llama.cpp's `src/llama-vocab.cpp` and `include/llama.h`: token
//! attribute bits, the gpt2-family pre-tokenizers by `tokenizer.ggml.pre`, and the token
//! texts its loader recognises as end of generation, end of turn or fill-in-the-middle.

// llama.cpp `llama_token_attr` bits (include/llama.h).
pub(super) const ATTR_UNKNOWN: u32 = 1 << 0;
pub(super) const ATTR_UNUSED: u32 = 1 << 1;
pub(super) const ATTR_NORMAL: u32 = 1 << 2;
pub(super) const ATTR_CONTROL: u32 = 1 << 3;
pub(super) const ATTR_USER_DEFINED: u32 = 1 << 4;
pub(super) const ATTR_BYTE: u32 = 1 << 5;
pub(super) const ATTR_LSTRIP: u32 = 1 << 7;
pub(super) const ATTR_RSTRIP: u32 = 1 << 8;

/// GGUF `tokenizer.ggml.token_type` values → attributes (`llama_vocab::impl::load`).
pub(super) fn attr_of_type(t: i64) -> u32 {
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
pub(super) struct PreTokenizer {
    pub(super) names: &'static [&'static str],
    pub(super) regexes: &'static [&'static str],
    /// `clean_up_tokenization_spaces` in detokenize.
    pub(super) clean_spaces: bool,
    /// A whole pre-token that is in the vocabulary is emitted without merging.
    pub(super) ignore_merges: bool,
    /// Default of `add_bos_token` when the key is absent.
    pub(super) add_bos: bool,
}

impl PreTokenizer {
    /// The common case: every pre-token merged, `add_bos_token` false by default.
    const fn new(
        names: &'static [&'static str],
        regexes: &'static [&'static str],
        clean_spaces: bool,
    ) -> Self {
        PreTokenizer {
            names,
            regexes,
            clean_spaces,
            ignore_merges: false,
            add_bos: false,
        }
    }
}

const GPT2_RE: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const PORO_RE: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";

/// Supported `tokenizer.ggml.pre` values (llama.cpp `llm_tokenizer_bpe` and the
/// `tokenizer_pre` chain of `llama_vocab::impl::load`). The first entry is what an absent key
/// means. Rows are `PreTokenizer::new(names, regexes, clean_spaces)` unless they set more.
pub(super) const PRE_TOKENIZERS: &[PreTokenizer] = &[
    PreTokenizer::new(
        &["default"],
        &[
            r"[\p{P}\$\+<=>\^~\|]+",
            GPT2_RE,
            r"\p{N}+",
            r"[0-9][0-9][0-9]",
        ],
        true,
    ),
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
    PreTokenizer::new(&["dbrx", "smaug-bpe", "chatglm-bpe"], &[LLAMA3_RE], true),
    PreTokenizer::new(
        &["falcon"],
        &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2_RE, r"[0-9][0-9][0-9]"],
        true,
    ),
    PreTokenizer::new(
        &[
            "starcoder",
            "refact",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
        ],
        &[r"\p{N}", GPT2_RE],
        true,
    ),
    PreTokenizer::new(&["smollm", "command-r"], &[r"\p{N}", GPT2_RE], false),
    PreTokenizer::new(
        &[
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
        &[GPT2_RE],
        true,
    ),
    PreTokenizer::new(&["trillion", "granite-docling"], &[GPT2_RE], false),
    PreTokenizer::new(&["stablelm2", "megrez"], &[QWEN2_RE], true),
    PreTokenizer::new(
        &[
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "f2llmv2",
            "hunyuan",
            "solar-open",
            "grok-2",
        ],
        &[QWEN2_RE],
        false,
    ),
    PreTokenizer::new(&["qwen35"], &[QWEN35_RE], false),
    PreTokenizer::new(&["bloom", "gpt3-finnish"], &[PORO_RE], true),
    PreTokenizer::new(&["poro-chat"], &[PORO_RE], false),
    PreTokenizer::new(&["viking"], &[PORO_RE, r"\p{N}"], false),
];

pub(super) fn supported_pre() -> String {
    PRE_TOKENIZERS
        .iter()
        .flat_map(|p| p.names.iter().copied())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Token texts llama.cpp treats as end of generation (`special_eog_ids`, matched by text);
/// they are forced to control tokens.
pub(super) const EOG_TEXTS: &[&str] = &[
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

/// One fill-in-the-middle token: its id key and the texts llama.cpp looks for when that key
/// is absent.
pub(super) struct FimToken {
    pub(super) key: &'static str,
    pub(super) texts: &'static [&'static str],
    /// pad/repo/sep also end generation.
    pub(super) ends_generation: bool,
}

/// FIM token texts llama.cpp detects when the id key is absent (forced to control).
pub(super) const FIM_TOKENS: &[FimToken] = &[
    FimToken {
        key: "tokenizer.ggml.fim_pre_token_id",
        texts: &[
            "<|fim_prefix|>",
            "<fim-prefix>",
            "<fim_prefix>",
            "<｜fim▁begin｜>",
            "<PRE>",
            "▁<PRE>",
            "<|code_prefix|>",
            "<|prefix|>",
        ],
        ends_generation: false,
    },
    FimToken {
        key: "tokenizer.ggml.fim_suf_token_id",
        texts: &[
            "<|fim_suffix|>",
            "<fim-suffix>",
            "<fim_suffix>",
            "<｜fim▁hole｜>",
            "<SUF>",
            "▁<SUF>",
            "<|code_suffix|>",
            "<|suffix|>",
        ],
        ends_generation: false,
    },
    FimToken {
        key: "tokenizer.ggml.fim_mid_token_id",
        texts: &[
            "<|fim_middle|>",
            "<fim-middle>",
            "<fim_middle>",
            "<｜fim▁end｜>",
            "<MID>",
            "▁<MID>",
            "<|code_middle|>",
            "<|middle|>",
        ],
        ends_generation: false,
    },
    FimToken {
        key: "tokenizer.ggml.fim_pad_token_id",
        texts: &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
        ends_generation: true,
    },
    FimToken {
        key: "tokenizer.ggml.fim_rep_token_id",
        texts: &[
            "<|fim_repo|>",
            "<|repo_name|>",
            "<fim-repo>",
            "<REPO>",
            "<reponame>",
        ],
        ends_generation: true,
    },
    FimToken {
        key: "tokenizer.ggml.fim_sep_token_id",
        texts: &["<|file_sep|>"],
        ends_generation: true,
    },
];

/// Token texts llama.cpp takes as EOT when `tokenizer.ggml.eot_token_id` is absent (forced to
/// control).
pub(super) const EOT_TEXTS: &[&str] = &[
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

/// The EOM text llama.cpp looks for when `tokenizer.ggml.eom_token_id` is absent.
pub(super) const EOM_TEXT: &str = "<|eom_id|>";

/// gpt-oss (o200k_harmony) tokens that render as text: forced to user-defined.
pub(super) const HARMONY_TEXT_TOKENS: &[&str] =
    &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];
