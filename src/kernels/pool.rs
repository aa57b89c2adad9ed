//! The kernels' thread pool: the calling thread and `threads - 1` workers
//! split each kernel's tasks, and workers spin (yielding the core) for a
//! short while after a kernel before they sleep.
//!
//! A decode step runs a few hundred kernels about 50-100 us apart on MLX's
//! stream thread. A pool whose workers sleep between them (rayon's) pays a
//! wake-up per kernel — on a VM, where waking an idle vCPU costs ~90 us,
//! that was a third of the step. Here a worker that saw a kernel in the
//! last [`spin`] waits for the next by polling a generation counter with
//! `sched_yield`, so it answers within microseconds without taking the core
//! from a thread that has work (the Python thread building the next step).
//! One kernel runs at a time; a second caller meanwhile (only tests have
//! several engines in one process) runs its tasks alone on its own thread.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering::*};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker keeps polling before it sleeps (default 3 ms;
/// `PENSIEVE_KERNEL_SPIN_US`).
fn spin() -> Duration {
    static S: OnceLock<Duration> = OnceLock::new();
    *S.get_or_init(|| {
        Duration::from_micros(std::env::var("PENSIEVE_KERNEL_SPIN_US").ok().and_then(|v| v.parse().ok()).unwrap_or(3000))
    })
}

struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    next: AtomicUsize,
    total: usize,
    done: AtomicUsize,
    panicked: AtomicBool,
}

impl Job<'_> {
    /// Takes and runs tasks until none are left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Relaxed);
            if i >= self.total {
                return;
            }
            if catch_unwind(AssertUnwindSafe(|| (self.f)(i))).is_err() {
                self.panicked.store(true, Relaxed);
            }
            self.done.fetch_add(1, Release);
        }
    }
}

struct Pool {
    threads: usize,
    /// One kernel at a time.
    busy: Mutex<()>,
    /// The current job (a `Job` on the caller's stack), or null.
    job: AtomicPtr<Job<'static>>,
    /// Workers between reading `job` and being done with it.
    in_job: AtomicUsize,
    generation: AtomicUsize,
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::env::var("PENSIEVE_KERNEL_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n: &usize| n >= 1)
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        let p: &'static Pool = Box::leak(Box::new(Pool {
            threads,
            busy: Mutex::new(()),
            job: AtomicPtr::new(std::ptr::null_mut()),
            in_job: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        }));
        for i in 1..threads {
            std::thread::Builder::new()
                .name(format!("pensieve-kernel-{i}"))
                .spawn(move || p.worker())
                .expect("spawn a kernel thread");
        }
        p
    })
}

impl Pool {
    fn worker(&self) {
        let mut seen = self.generation.load(Acquire);
        loop {
            // Wait for a new kernel: poll for a while, then sleep.
            let started = Instant::now();
            let mut polls = 0u32;
            loop {
                let g = self.generation.load(SeqCst);
                if g != seen {
                    seen = g;
                    break;
                }
                polls += 1;
                if polls.is_multiple_of(64) && started.elapsed() > spin() {
                    let guard = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
                    self.sleepers.fetch_add(1, SeqCst);
                    let mut guard = guard;
                    while self.generation.load(SeqCst) == seen {
                        guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                    }
                    self.sleepers.fetch_sub(1, SeqCst);
                    drop(guard);
                    seen = self.generation.load(SeqCst);
                    break;
                }
                std::thread::yield_now();
            }
            self.in_job.fetch_add(1, SeqCst);
            let job = self.job.load(SeqCst);
            if !job.is_null() {
                // SAFETY: a non-null `job` is the caller's live Job: the caller
                // clears it and then waits for `in_job` to drop to zero before
                // the Job leaves its stack (see `run`), and we counted
                // ourselves in before reading it.
                unsafe { (*job).work() };
            }
            self.in_job.fetch_sub(1, SeqCst);
        }
    }

    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let Ok(_busy) = self.busy.try_lock() else {
            (0..n).for_each(f);
            return;
        };
        let job = Job { f, next: AtomicUsize::new(0), total: n, done: AtomicUsize::new(0), panicked: AtomicBool::new(false) };
        // SAFETY (lifetime erasure): the pointer is cleared, and every worker
        // is done with it, before `job` goes out of scope below.
        let ptr = &job as *const Job<'_> as *mut Job<'static>;
        self.job.store(ptr, SeqCst);
        self.generation.fetch_add(1, SeqCst);
        if self.sleepers.load(SeqCst) > 0 {
            let _g = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
        job.work();
        // A worker still on a task may have lost its core (to the Python
        // thread building the next step): after a short spin, yield ours so
        // it can finish rather than burn the rest of a time slice waiting.
        let mut spins = 0u32;
        while job.done.load(Acquire) < n {
            spins += 1;
            if spins < 256 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        self.job.store(std::ptr::null_mut(), SeqCst);
        while self.in_job.load(SeqCst) != 0 {
            std::hint::spin_loop();
        }
        if job.panicked.load(Relaxed) {
            panic!("a kernel task panicked");
        }
    }
}

/// Runs `f(i)` for every `i` in `0..n`, split over the pool.
pub(crate) fn parallel_for(n: usize, f: impl Fn(usize) + Sync) {
    if n <= 1 {
        (0..n).for_each(f);
        return;
    }
    let p = pool();
    if p.threads == 1 {
        (0..n).for_each(f);
    } else {
        p.run(n, &f);
    }
}

/// Threads a kernel runs on (the caller's included).
pub fn threads() -> usize {
    pool().threads
}
