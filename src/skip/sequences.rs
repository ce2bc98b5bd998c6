//! Several sequences in one forward call (continuous batching), each with its own controller:
//! the calls for a batch row go to the controller of the row's sequence, with the row's index
//! among that sequence's rows. Each controller sees exactly the calls it would see if its
//! sequence ran alone, so decisions do not depend on what else is in the batch.

use super::Controller;

pub struct PerSequence<C> {
    /// One controller per sequence slot; `None` for a free slot.
    slots: Vec<Option<C>>,
    /// Per row of the current call: (sequence, row index within the sequence).
    rows: Vec<(usize, usize)>,
    /// Sequences in the current call, in row order.
    involved: Vec<usize>,
    positions: Vec<usize>,
}

impl<C: Controller> PerSequence<C> {
    pub fn new(n_slots: usize) -> Self {
        PerSequence {
            slots: (0..n_slots).map(|_| None).collect(),
            rows: Vec::new(),
            involved: Vec::new(),
            positions: Vec::new(),
        }
    }

    pub fn set(&mut self, slot: usize, controller: Option<C>) {
        self.slots[slot] = controller;
    }

    pub fn get(&self, slot: usize) -> Option<&C> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    pub fn get_mut(&mut self, slot: usize) -> Option<&mut C> {
        self.slots.get_mut(slot).and_then(Option::as_mut)
    }

    /// The rows' sequences for the next forward call (as passed to `forward_seqs`): the rows of
    /// a sequence consecutive, every sequence holding a controller.
    pub fn route(&mut self, seqs: &[usize]) {
        self.rows.clear();
        self.involved.clear();
        for &q in seqs {
            if self.involved.last() != Some(&q) {
                self.involved.push(q);
            }
            let local = self.rows.iter().filter(|(s, _)| *s == q).count();
            self.rows.push((q, local));
        }
    }

    fn at(&mut self, row: usize) -> (&mut C, usize) {
        let (q, local) = self.rows[row];
        let c = self.slots[q]
            .as_mut()
            .expect("a routed row's sequence has a controller");
        (c, local)
    }
}

impl<C: Controller> Controller for PerSequence<C> {
    fn begin(&mut self, positions: &[usize], prompt: bool) {
        for k in 0..self.involved.len() {
            let q = self.involved[k];
            self.positions.clear();
            for (&(s, _), &p) in self.rows.iter().zip(positions) {
                if s == q {
                    self.positions.push(p);
                }
            }
            if let Some(c) = self.slots[q].as_mut() {
                c.begin(&self.positions, prompt);
            }
        }
    }

    /// Whole-layer removal applies to every row of a call, so a batch must only hold
    /// sequences that agree on it (the engine batches ShortGPT sequences apart).
    fn layer_runs(&mut self, layer: usize) -> bool {
        let mut runs = true;
        for &q in &self.involved {
            if let Some(c) = self.slots[q].as_mut() {
                runs &= c.layer_runs(layer);
            }
        }
        runs
    }

    fn exited(&mut self, layer: usize, row: usize) -> bool {
        let (c, i) = self.at(row);
        c.exited(layer, i)
    }

    fn run_ffn(&mut self, layer: usize, row: usize) -> bool {
        let (c, i) = self.at(row);
        c.run_ffn(layer, i)
    }

    fn compensate(&mut self, layer: usize, row: usize, h: &mut [f32]) {
        let (c, i) = self.at(row);
        c.compensate(layer, i, h)
    }

    fn observes_ffn(&self) -> bool {
        self.involved
            .iter()
            .any(|&q| self.slots[q].as_ref().is_some_and(|c| c.observes_ffn()))
    }

    fn compensates(&self) -> bool {
        self.involved
            .iter()
            .any(|&q| self.slots[q].as_ref().is_some_and(|c| c.compensates()))
    }

    fn observes_ffn_vectors(&self) -> bool {
        self.involved.iter().any(|&q| {
            self.slots[q]
                .as_ref()
                .is_some_and(|c| c.observes_ffn_vectors())
        })
    }

    fn observes_layers(&self) -> bool {
        self.involved
            .iter()
            .any(|&q| self.slots[q].as_ref().is_some_and(|c| c.observes_layers()))
    }

    fn layer_input(&mut self, layer: usize, row: usize, x: &[f32]) {
        let (c, i) = self.at(row);
        if c.observes_layers() {
            c.layer_input(layer, i, x);
        }
    }

    fn after_ffn(&mut self, layer: usize, row: usize, cos: f32) {
        let (c, i) = self.at(row);
        if c.observes_ffn() {
            c.after_ffn(layer, i, cos);
        }
    }

    fn ffn_vectors(&mut self, layer: usize, row: usize, before: &[f32], after: &[f32]) {
        let (c, i) = self.at(row);
        if c.observes_ffn_vectors() {
            c.ffn_vectors(layer, i, before, after);
        }
    }

    fn end(&mut self) {
        for &q in &self.involved {
            if let Some(c) = self.slots[q].as_mut() {
                c.end();
            }
        }
    }

    fn prompt_is_full(&self) -> bool {
        self.involved
            .iter()
            .all(|&q| self.slots[q].as_ref().is_some_and(|c| c.prompt_is_full()))
    }
}
