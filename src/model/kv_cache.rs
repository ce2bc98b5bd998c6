//! Per-layer key/value cache in f16 (llama.cpp's default cache type), sized by `--ctx`.
//!
//! Layout, per layer and KV head, for keys and values alike: `[n_ctx, head_dim]`, one row per
//! position, as llama.cpp stores both when flash attention is on. Attention reads positions
//! `0..n` only, so nothing past `len` is ever read.

use half::f16;

pub struct KvCache {
    pub n_ctx: usize,
    pub n_layer: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// `[n_layer][n_head_kv][n_ctx][head_dim]`
    k: Vec<f16>,
    /// `[n_layer][n_head_kv][n_ctx][head_dim]`
    v: Vec<f16>,
    /// Positions `0..len` hold valid entries.
    pub len: usize,
}

impl KvCache {
    pub fn new(n_layer: usize, n_head_kv: usize, head_dim: usize, n_ctx: usize) -> Self {
        let n = n_layer * n_head_kv * head_dim * n_ctx;
        KvCache {
            n_ctx,
            n_layer,
            n_head_kv,
            head_dim,
            // Zeroed allocations are mapped lazily: pages count in RSS once written.
            k: vec![f16::ZERO; n],
            v: vec![f16::ZERO; n],
            len: 0,
        }
    }

    pub fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * 2
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Drops positions `n..` (e.g. to rewind a chat turn); they are overwritten before use.
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    fn head_base(&self, layer: usize, kvh: usize) -> usize {
        (layer * self.n_head_kv + kvh) * self.n_ctx * self.head_dim
    }

    /// Stores one position's keys and values (`[n_head_kv * head_dim]` each, f32).
    pub fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let hd = self.head_dim;
        for h in 0..self.n_head_kv {
            let base = self.head_base(layer, h);
            for (d, &x) in k[h * hd..(h + 1) * hd].iter().enumerate() {
                self.k[base + pos * hd + d] = f16::from_f32(x);
            }
            for (d, &x) in v[h * hd..(h + 1) * hd].iter().enumerate() {
                self.v[base + pos * hd + d] = f16::from_f32(x);
            }
        }
    }

    /// A copy of positions `0..n` (`n ≤ len`) of every layer and head.
    pub fn prefix(&self, n: usize) -> KvPrefix {
        let n = n.min(self.len);
        let (hd, heads) = (self.head_dim, self.n_layer * self.n_head_kv);
        let mut k = Vec::with_capacity(heads * n * hd);
        let mut v = Vec::with_capacity(heads * n * hd);
        for head in 0..heads {
            let base = head * self.n_ctx * hd;
            k.extend_from_slice(&self.k[base..base + n * hd]);
            v.extend_from_slice(&self.v[base..base + n * hd]);
        }
        KvPrefix { len: n, k, v }
    }

    /// Replaces the cache's contents with `p` (from a cache of the same model and at least
    /// `p.len` positions); `None` when it does not fit.
    pub fn restore(&mut self, p: &KvPrefix) -> Option<()> {
        let (hd, heads) = (self.head_dim, self.n_layer * self.n_head_kv);
        let n = p.len;
        if n > self.n_ctx || p.k.len() != heads * n * hd || p.v.len() != p.k.len() {
            return None;
        }
        for head in 0..heads {
            let (dst, src) = (head * self.n_ctx * hd, head * n * hd);
            self.k[dst..dst + n * hd].copy_from_slice(&p.k[src..src + n * hd]);
            self.v[dst..dst + n * hd].copy_from_slice(&p.v[src..src + n * hd]);
        }
        self.len = n;
        Some(())
    }

    /// Keys of positions `0..n` for one KV head: `[n, head_dim]`.
    pub fn keys(&self, layer: usize, kvh: usize, n: usize) -> &[f16] {
        let base = self.head_base(layer, kvh);
        &self.k[base..base + n * self.head_dim]
    }

    /// Values of positions `0..n` for one KV head: `[n, head_dim]`.
    pub fn values(&self, layer: usize, kvh: usize, n: usize) -> &[f16] {
        let base = self.head_base(layer, kvh);
        &self.v[base..base + n * self.head_dim]
    }
}

/// Positions `0..len` of a [`KvCache`]: `[n_layer][n_head_kv][len][head_dim]` f16, keys and
/// values alike.
#[derive(Clone, Debug)]
pub struct KvPrefix {
    pub len: usize,
    k: Vec<f16>,
    v: Vec<f16>,
}

impl KvPrefix {
    pub fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * 2
    }
}
