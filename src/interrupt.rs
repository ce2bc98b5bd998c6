//! Ctrl-C. By default it ends the process at once with status 130, after removing the
//! temporary files of outputs being written ([`crate::outfile`]). While an [`Answer`] is
//! running (chat), the first Ctrl-C only asks that answer to stop; a second one, or one while
//! no answer runs, exits.

use std::sync::atomic::{AtomicU8, Ordering};

const IDLE: u8 = 0;
const ANSWERING: u8 = 1;
const CANCELLED: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(IDLE);

/// Installs the handler (once per process; later calls do nothing).
pub fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Without a handler Ctrl-C still ends the process, only without the cleanup.
        let _ = ctrlc::set_handler(on_interrupt);
    });
}

fn on_interrupt() {
    let was_answering = STATE
        .compare_exchange(ANSWERING, CANCELLED, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok();
    if !was_answering {
        crate::outfile::remove_pending();
        eprintln!();
        std::process::exit(130);
    }
}

/// While alive, the first Ctrl-C cancels the answer instead of ending the process.
pub struct Answer(());

impl Answer {
    pub fn start() -> Self {
        STATE.store(ANSWERING, Ordering::SeqCst);
        Answer(())
    }

    /// Ctrl-C was pressed since [`Answer::start`].
    pub fn cancelled(&self) -> bool {
        STATE.load(Ordering::SeqCst) == CANCELLED
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        STATE.store(IDLE, Ordering::SeqCst);
    }
}
