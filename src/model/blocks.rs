//! The blocks the forward loop calls, behind one interface: attention, FFN (returning the
//! cosine the controller observes) and head, with an implementation on the CPU (`forward.rs`,
//! ggml's CPU kernels driven by us) and one on a ggml backend device (`device.rs`). The loop,
//! the controller hooks and the row bookkeeping in [`Scratch`] are shared; a block reads the
//! rows it works on from there (`positions`, `seqs`, `active`, `ffn_rows`).

use super::forward::{ForwardError, Logits, Scratch};
use super::{KvCache, Llama};
use crate::skip::Controller;

pub(super) trait Blocks {
    /// Attention half of layer `l`: K/V of every row into the cache, `ffn_inp = inpL +
    /// attn_out` for the rows in `s.active`.
    fn attention(&mut self, l: usize, s: &mut Scratch) -> Result<(), ForwardError>;

    /// FFN half of layer `l` for the rows in `s.ffn_rows`; with `cos`, queues
    /// cos(ffn_inp, l_out) per row, read by [`Blocks::cosines`].
    fn ffn(&mut self, l: usize, s: &mut Scratch, cos: bool) -> Result<(), ForwardError>;

    /// Waits for the cosines the last `ffn` queued and leaves them in `s.cos`.
    fn cosines(&mut self, s: &mut Scratch) -> Result<(), ForwardError>;

    /// Makes the host residual stream `s.x` current (a device copies it back).
    fn pull(&mut self, s: &mut Scratch) -> Result<(), ForwardError>;

    /// Makes the block's residual stream equal the host's `s.x` (a device uploads it).
    fn push(&mut self, s: &mut Scratch) -> Result<(), ForwardError>;

    /// result_norm and result_output for the rows `logits` asks for, into `s.logits`
    /// (one row) or `s.logits_all` (more).
    fn head(&mut self, s: &mut Scratch, logits: Logits) -> Result<(), ForwardError>;
}

/// Gives the controller the cosines of layer `pending`'s FFN rows, if any wait.
pub(super) fn flush<C: Controller>(
    pending: &mut Option<usize>,
    blocks: &mut dyn Blocks,
    s: &mut Scratch,
    controller: &mut C,
) -> Result<(), ForwardError> {
    let Some(l) = pending.take() else {
        return Ok(());
    };
    let t0 = std::time::Instant::now();
    blocks.cosines(s)?;
    s.times.decision_wait += t0.elapsed();
    for (&i, &cos) in s.cos_rows.iter().zip(&s.cos) {
        controller.after_ffn(l, i, cos);
    }
    Ok(())
}

/// The CPU blocks: the residual stream, the cache and the cosines are on the host already.
pub(super) struct CpuBlocks<'m, 'c> {
    model: &'m Llama<'m>,
    caches: &'c mut [KvCache],
}

impl<'m, 'c> CpuBlocks<'m, 'c> {
    pub(super) fn new(model: &'m Llama<'m>, caches: &'c mut [KvCache]) -> Self {
        CpuBlocks { model, caches }
    }
}

impl Blocks for CpuBlocks<'_, '_> {
    fn attention(&mut self, l: usize, s: &mut Scratch) -> Result<(), ForwardError> {
        self.model.attention_block(l, self.caches, s);
        Ok(())
    }

    fn ffn(&mut self, l: usize, s: &mut Scratch, cos: bool) -> Result<(), ForwardError> {
        self.model.ffn_block(l, s, cos);
        Ok(())
    }

    fn cosines(&mut self, _: &mut Scratch) -> Result<(), ForwardError> {
        Ok(())
    }

    fn pull(&mut self, _: &mut Scratch) -> Result<(), ForwardError> {
        Ok(())
    }

    fn push(&mut self, _: &mut Scratch) -> Result<(), ForwardError> {
        Ok(())
    }

    fn head(&mut self, s: &mut Scratch, logits: Logits) -> Result<(), ForwardError> {
        self.model.head(s, logits);
        Ok(())
    }
}
