//! A team of threads that stays hot between short parallel jobs.
//!
//! Decoding one token runs a few hundred products of 0.4 to 5 MB each, tens
//! of microseconds apiece. Handing each to a rayon pool costs a sleeping
//! worker's wake-up (10 to 15 us on this kind of VM) and leaves the calling
//! thread idle while it waits. A [`Team`] instead has `threads - 1` workers
//! that spin for a short while after each job before they sleep, and the
//! calling thread works on the job alongside them, so a burst of products
//! pays for one wake-up at most (the same design as llama.cpp's and
//! bitnet.cpp's thread pools).
//!
//! A job is `parts` calls of one closure, claimed one at a time from a
//! shared counter, so the split balances itself and results do not depend on
//! which thread ran which part. One job runs at a time: a caller that finds
//! the team busy (another thread's job, or a job started from inside a
//! part) runs its parts itself, which gives the same results.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps: long enough to span the
/// float work between two products of a decode step, short enough that an
/// idle team gives its cores back at once.
const SPIN: Duration = Duration::from_micros(200);

/// One job: a closure whose lifetime was erased by [`Team::run`], which does
/// not return before every claimed part has finished.
struct Job {
    f: *const (dyn Fn(usize) + Sync + 'static),
    parts: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `f` points at a `Sync` closure, called only for claimed parts while
// `Team::run` (which owns the closure) waits for them.
unsafe impl Send for Job {}
// SAFETY: as above; every other field is itself `Sync`.
unsafe impl Sync for Job {}

impl Job {
    /// Claims and runs parts until none is left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.parts {
                return;
            }
            // SAFETY: part i was claimed, so `Team::run` is still waiting for
            // it and the closure is alive.
            let f = unsafe { &*self.f };
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(i))) {
                self.panic
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_or_insert(p);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

struct Shared {
    /// Bumped once per job; workers watch it.
    epoch: AtomicU64,
    job: Mutex<Option<Arc<Job>>>,
    sleepers: AtomicUsize,
    wake: Condvar,
    quit: AtomicBool,
}

/// A fixed team of threads for short parallel jobs (see the module docs).
pub(crate) struct Team {
    shared: Arc<Shared>,
    busy: Mutex<()>,
    workers: Vec<JoinHandle<()>>,
}

impl Team {
    /// A team of `threads` in all: the caller of [`Team::run`] and
    /// `threads - 1` workers.
    pub(crate) fn new(threads: usize) -> std::io::Result<Team> {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            sleepers: AtomicUsize::new(0),
            wake: Condvar::new(),
            quit: AtomicBool::new(false),
        });
        let mut team = Team {
            shared: shared.clone(),
            busy: Mutex::new(()),
            workers: Vec::new(),
        };
        for i in 1..threads.max(1) {
            let shared = shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("tern-team-{i}"))
                .spawn(move || worker(&shared))?;
            team.workers.push(handle);
        }
        Ok(team)
    }

    /// Calls `f(0)`, ..., `f(parts - 1)`, spread over the team, and returns
    /// when all have returned. A panic in a part is resumed here once every
    /// part has finished.
    pub(crate) fn run(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        let guard = match self.busy.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        if guard.is_none() || self.workers.is_empty() || parts <= 1 {
            (0..parts).for_each(f);
            return;
        }
        // SAFETY: only the lifetime changes. The closure is called for claimed
        // parts only, and this function waits below until every part (all of
        // them are claimed by then) has finished; a worker that still holds
        // the job afterwards finds nothing to claim and never calls it.
        let f: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(f) };
        let job = Arc::new(Job {
            f,
            parts,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panic: Mutex::new(None),
        });
        *self.shared.job.lock().unwrap_or_else(PoisonError::into_inner) = Some(job.clone());
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        if self.shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _lock = self.shared.job.lock().unwrap_or_else(PoisonError::into_inner);
            self.shared.wake.notify_all();
        }
        job.work();
        let start = Instant::now();
        while job.done.load(Ordering::Acquire) < parts {
            if start.elapsed() > SPIN {
                // A worker was descheduled mid-part: let it run.
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        drop(guard);
        if let Some(p) = job.panic.lock().unwrap_or_else(PoisonError::into_inner).take() {
            resume_unwind(p);
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.quit.store(true, Ordering::SeqCst);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        {
            let _lock = self.shared.job.lock().unwrap_or_else(PoisonError::into_inner);
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(s: &Shared) {
    let mut seen = 0;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        while s.epoch.load(Ordering::Acquire) == seen {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && start.elapsed() > SPIN {
                let mut lock = s.job.lock().unwrap_or_else(PoisonError::into_inner);
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                while s.epoch.load(Ordering::SeqCst) == seen {
                    lock = s.wake.wait(lock).unwrap_or_else(PoisonError::into_inner);
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                break;
            }
            std::hint::spin_loop();
        }
        if s.quit.load(Ordering::SeqCst) {
            return;
        }
        seen = s.epoch.load(Ordering::Acquire);
        let job = s.job.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if let Some(job) = job {
            job.work();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_exactly_once_on_any_team() {
        for threads in [1, 2, 3, 5] {
            let team = Team::new(threads).unwrap();
            for parts in [0, 1, 2, 7, 64, 1000] {
                let hits: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
                team.run(parts, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                    "{threads} threads, {parts} parts"
                );
            }
        }
    }

    #[test]
    fn jobs_after_the_workers_slept_still_run_on_them() {
        let team = Team::new(2).unwrap();
        for _ in 0..3 {
            std::thread::sleep(SPIN * 5);
            let threads = Mutex::new(std::collections::HashSet::new());
            team.run(64, &|_| {
                threads.lock().unwrap().insert(std::thread::current().id());
                std::thread::sleep(Duration::from_millis(1));
            });
            // 64 parts of 1 ms each: the woken worker takes some of them.
            assert_eq!(threads.lock().unwrap().len(), 2);
        }
    }

    #[test]
    fn concurrent_and_nested_jobs_complete() {
        let team = Team::new(2).unwrap();
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..50 {
                        team.run(8, &|_| {
                            team.run(3, &|_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            });
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 50 * 8 * 3);
    }

    #[test]
    fn a_panicking_part_reaches_the_caller_after_the_others_finish() {
        let team = Team::new(2).unwrap();
        let finished = AtomicUsize::new(0);
        let caught = catch_unwind(AssertUnwindSafe(|| {
            team.run(16, &|i| {
                if i == 5 {
                    panic!("part five");
                }
                finished.fetch_add(1, Ordering::Relaxed);
            })
        }));
        assert!(caught.is_err());
        assert_eq!(finished.load(Ordering::Relaxed), 15);
        // The team still works.
        let n = AtomicUsize::new(0);
        team.run(10, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 10);
    }
}
