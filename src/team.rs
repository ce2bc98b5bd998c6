//! A team of worker threads for the forward pass's parallel regions, fork-join as in ggml's CPU
//! threadpool and llama.cpp's OpenMP build: between regions the workers spin, so each of a decode
//! step's ~150 regions (5 per layer, 10–600 µs each) starts without a futex wake-up. After
//! [`SPIN`] without work they sleep on a condition variable.
//!
//! [`Team::install`] makes a team current on the calling thread; [`run`] then splits a region
//! over the caller and the team's workers. Without a current team, [`run`] uses rayon.
//!
//! The one `unsafe` block hands a region's borrowed closure to the workers, as rayon does inside
//! its `join` (a safe scoped API costs a thread spawn or a wake-up per region).
#![allow(unsafe_code)]

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps: longer than the serial work between two
/// regions (norms, RoPE, sampling a token), short enough not to hold a core while a user reads.
const SPIN: Duration = Duration::from_millis(2);

/// Most tasks one region may have (the task index is 16 bits of [`Shared::state`]).
pub const MAX_TASKS: usize = u16::MAX as usize;

pub struct Team {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

struct Shared {
    /// `epoch << 32 | n_tasks << 16 | next task`: a region is claimed task by task with one
    /// compare-and-swap, which fails once the region's epoch has passed.
    state: AtomicU64,
    /// The current region's [`Job`], valid while any of its tasks is unfinished.
    job: AtomicPtr<()>,
    /// Tasks of the current region finished (or panicked).
    done: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    sleepers: AtomicUsize,
    /// Set while a thread runs a region: a second thread's region then runs serially.
    busy: AtomicBool,
    stop: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
    threads: usize,
}

struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<Shared>>> = const { RefCell::new(None) };
    /// Set while this thread runs a task: a region started from inside one runs serially.
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

fn epoch(s: u64) -> u64 {
    s >> 32
}

fn n_tasks(s: u64) -> usize {
    (s >> 16 & 0xffff) as usize
}

fn next(s: u64) -> usize {
    (s & 0xffff) as usize
}

impl Team {
    /// A team of `threads` threads: the caller of [`run`] and `threads − 1` workers.
    pub fn new(threads: usize) -> std::io::Result<Team> {
        let threads = threads.clamp(1, MAX_TASKS);
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            done: AtomicUsize::new(0),
            panic: Mutex::new(None),
            sleepers: AtomicUsize::new(0),
            busy: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            threads,
        });
        let mut team = Team {
            shared: shared.clone(),
            workers: Vec::with_capacity(threads - 1),
        };
        for i in 1..threads {
            let s = shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("ffnskip-{i}"))
                .spawn(move || s.work())?;
            team.workers.push(h);
        }
        Ok(team)
    }

    pub fn threads(&self) -> usize {
        self.shared.threads
    }

    /// Runs `f` with this team current on the calling thread.
    pub fn install<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<Arc<Shared>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| *c.borrow_mut() = self.0.take());
            }
        }
        let _restore = Restore(CURRENT.with(|c| c.borrow_mut().replace(self.shared.clone())));
        f()
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

/// Threads a region started here runs on: the current team's, else rayon's.
pub fn current_threads() -> usize {
    CURRENT
        .with(|c| c.borrow().as_ref().map(|s| s.threads))
        .unwrap_or_else(rayon::current_num_threads)
}

/// Runs `f(0) … f(n − 1)` in parallel and returns when all have returned; tasks are claimed in
/// order by whichever thread is free. A panic in a task is raised here once all have finished.
pub fn run(n: usize, f: &(dyn Fn(usize) + Sync)) {
    let team = CURRENT.with(|c| c.borrow().clone());
    match team {
        _ if n <= 1 || IN_TASK.with(Cell::get) => (0..n).for_each(f),
        Some(s) if s.threads > 1 && n <= MAX_TASKS && s.enter() => s.run(n, f),
        Some(_) => (0..n).for_each(f),
        None => {
            use rayon::prelude::*;
            (0..n).into_par_iter().for_each(f)
        }
    }
}

impl Shared {
    fn enter(&self) -> bool {
        self.busy
            .compare_exchange(false, true, Acquire, Relaxed)
            .is_ok()
    }

    /// Runs a region; the caller has [`Shared::enter`]ed.
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let job = Job { f };
        self.job.store(&job as *const Job as *mut (), Release);
        self.done.store(0, Relaxed);
        let e = epoch(self.state.load(Relaxed)) + 1;
        self.state.store(e << 32 | (n as u64) << 16, SeqCst);
        if self.sleepers.load(SeqCst) > 0 {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
        self.claim(e);
        let mut spins = 0u32;
        while self.done.load(Acquire) < n {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(4096) {
                std::thread::yield_now();
            }
        }
        self.job.store(std::ptr::null_mut(), Relaxed);
        self.busy.store(false, Release);
        let panic = self.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(p) = panic {
            resume_unwind(p);
        }
    }

    /// Runs tasks of region `e` until none is left to claim.
    fn claim(&self, e: u64) {
        let mut s = self.state.load(Acquire);
        loop {
            if epoch(s) != e || next(s) >= n_tasks(s) {
                return;
            }
            match self.state.compare_exchange_weak(s, s + 1, AcqRel, Acquire) {
                Ok(_) => {
                    // SAFETY: task `next(s)` of region `e` is claimed and not yet counted in
                    // `done`, so `Shared::run` for region `e` is still waiting and the `Job` it
                    // stored (on its stack, before publishing `e` with a release store) is live.
                    let job = unsafe { &*(self.job.load(Acquire) as *const Job) };
                    IN_TASK.with(|t| t.set(true));
                    let r = catch_unwind(AssertUnwindSafe(|| (job.f)(next(s))));
                    IN_TASK.with(|t| t.set(false));
                    if let Err(p) = r {
                        *self.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
                    }
                    self.done.fetch_add(1, Release);
                    s = self.state.load(Acquire);
                }
                Err(now) => s = now,
            }
        }
    }

    /// A worker: waits for each new region and helps run it.
    fn work(&self) {
        let mut seen = 0u64;
        while let Some(e) = self.wait_after(seen) {
            seen = e;
            self.claim(e);
        }
    }

    /// Waits for a region newer than `seen`, spinning up to [`SPIN`] and then sleeping; `None`
    /// once the team is dropped.
    fn wait_after(&self, seen: u64) -> Option<u64> {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if self.stop.load(Relaxed) {
                return None;
            }
            let e = epoch(self.state.load(Acquire));
            if e != seen {
                return Some(e);
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
                break;
            }
        }
        let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.sleepers.fetch_add(1, SeqCst);
        while epoch(self.state.load(SeqCst)) == seen && !self.stop.load(SeqCst) {
            g = self.wake.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        self.sleepers.fetch_sub(1, SeqCst);
        drop(g);
        (!self.stop.load(SeqCst)).then(|| epoch(self.state.load(Acquire)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_per_region_across_many_regions() {
        let team = Team::new(3).unwrap();
        let hits: Vec<AtomicUsize> = (0..64).map(|_| AtomicUsize::new(0)).collect();
        team.install(|| {
            for round in 0..2000 {
                let n = 1 + round % 64;
                run(n, &|i| {
                    hits[i].fetch_add(1, Relaxed);
                });
            }
        });
        for (i, h) in hits.iter().enumerate() {
            let expect = (0..2000).filter(|r| 1 + r % 64 > i).count();
            assert_eq!(h.load(Relaxed), expect, "task {i}");
        }
    }

    #[test]
    fn regions_after_workers_slept_still_run_every_task() {
        let team = Team::new(2).unwrap();
        let sum = AtomicUsize::new(0);
        team.install(|| {
            for _ in 0..3 {
                std::thread::sleep(SPIN * 3);
                run(8, &|i| {
                    sum.fetch_add(i, Relaxed);
                });
            }
        });
        assert_eq!(sum.load(Relaxed), 3 * 28);
    }

    #[test]
    fn a_panicking_task_is_raised_after_the_region_and_the_team_stays_usable() {
        let team = Team::new(2).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            team.install(|| run(16, &|i| assert_ne!(i, 5, "task five")))
        }));
        assert!(r.is_err());
        let sum = AtomicUsize::new(0);
        team.install(|| {
            run(4, &|i| {
                sum.fetch_add(i, Relaxed);
            })
        });
        assert_eq!(sum.load(Relaxed), 6);
    }

    #[test]
    fn nested_regions_run_serially_inside_a_task() {
        let team = Team::new(2).unwrap();
        let sum = AtomicUsize::new(0);
        team.install(|| {
            run(4, &|_| {
                run(4, &|j| {
                    sum.fetch_add(j, Relaxed);
                })
            })
        });
        assert_eq!(sum.load(Relaxed), 4 * 6);
    }
}
