//! Prompt prefixes kept across sessions of one model: the keys and values a prompt left in the
//! cache and its last row's logits. FFN-SkipLLM runs prompts in full, so every policy whose
//! prompt rows are policy-free (all but ShortGPT's layer removal) would compute these same
//! bits; an evaluation prefills each prompt once and restores it for the other policies.

use std::collections::HashMap;

use crate::model::KvPrefix;

pub struct PromptEntry {
    pub kv: KvPrefix,
    /// The last prompt row's logits `[n_vocab]`.
    pub logits: Vec<f32>,
}

impl PromptEntry {
    fn bytes(&self) -> usize {
        self.kv.bytes() + self.logits.len() * 4
    }
}

/// Prompts by their token ids, up to a byte budget (later prompts are not kept once it is
/// spent).
pub struct PromptCache {
    entries: HashMap<Vec<u32>, PromptEntry>,
    bytes: usize,
    budget: usize,
    /// The prefill batch shape the entries were computed with: (rows per call, exact).
    shape: Option<(usize, bool)>,
    /// Prompt tokens served from the cache instead of prefilled.
    pub reused_tokens: usize,
}

impl PromptCache {
    pub fn new(budget_bytes: usize) -> Self {
        PromptCache {
            entries: HashMap::new(),
            bytes: 0,
            budget: budget_bytes,
            shape: None,
            reused_tokens: 0,
        }
    }

    /// Ties the cache to sessions prefilling in `shape`; entries of another shape are dropped.
    pub fn bind(&mut self, shape: (usize, bool)) {
        if self.shape != Some(shape) {
            self.entries.clear();
            self.bytes = 0;
            self.shape = Some(shape);
        }
    }

    pub fn get(&self, tokens: &[u32]) -> Option<&PromptEntry> {
        self.entries.get(tokens)
    }

    /// Keeps `entry` for `tokens` unless the budget would be exceeded.
    pub fn insert(&mut self, tokens: &[u32], entry: PromptEntry) {
        let b = entry.bytes();
        if self.bytes + b <= self.budget && !self.entries.contains_key(tokens) {
            self.bytes += b;
            self.entries.insert(tokens.to_vec(), entry);
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}
