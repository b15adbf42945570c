//! A broadcast wake-up: threads sleep until an epoch counter changes, and one `advance`
//! wakes them all with a single futex call.
//!
//! Group commit releases many writers at once. A mutex + condvar hands the mutex from one
//! woken writer to the next, a chain of context switches per round that cost more than the
//! fsync itself with 64 writers on 2 cores. Here every waiter checks an atomic watermark and
//! needs no lock at all.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rustix::thread::futex;

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Epoch {
    word: AtomicU32,
    sleepers: AtomicU32,
}

impl Epoch {
    /// The current epoch; read it before checking the condition you wait for.
    pub(crate) fn current(&self) -> u32 {
        self.word.load(Ordering::Acquire)
    }

    /// Sleep until the epoch is no longer `seen`, the deadline passes, or a spurious wake-up.
    /// Callers re-check their condition in a loop.
    pub(crate) fn wait(&self, seen: u32, deadline: Option<Instant>) {
        let timeout = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return;
                }
                Some(left)
            }
            None => None,
        };
        let ts = timeout.map(|d: Duration| futex::Timespec {
            tv_sec: d.as_secs() as _,
            tv_nsec: d.subsec_nanos() as _,
        });
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        // EAGAIN (the epoch moved already), EINTR and ETIMEDOUT all mean "look again".
        let _ = futex::wait(&self.word, futex::Flags::PRIVATE, seen, ts.as_ref());
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }

    /// Sleep until `check` has an answer: it is asked first, and again after every advance
    /// or spurious wake-up. Each sleep ends at `deadline` at the latest, so a check that
    /// watches a deadline must answer once it has passed.
    pub(crate) fn wait_for<T>(
        &self,
        deadline: Option<Instant>,
        mut check: impl FnMut() -> Option<T>,
    ) -> T {
        loop {
            let seen = self.current();
            if let Some(answer) = check() {
                return answer;
            }
            self.wait(seen, deadline);
        }
    }

    /// Advance the epoch and wake every sleeper.
    pub(crate) fn advance(&self) {
        self.word.fetch_add(1, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _ = futex::wake(&self.word, futex::Flags::PRIVATE, i32::MAX as u32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn advance_wakes_every_sleeper() {
        let e = Arc::new(Epoch::default());
        let flag = Arc::new(AtomicBool::new(false));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (e, flag) = (e.clone(), flag.clone());
                std::thread::spawn(move || loop {
                    let seen = e.current();
                    if flag.load(Ordering::Acquire) {
                        return;
                    }
                    e.wait(seen, None);
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        flag.store(true, Ordering::Release);
        e.advance();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn wait_times_out() {
        let e = Epoch::default();
        let t = Instant::now();
        e.wait(
            e.current(),
            Some(Instant::now() + Duration::from_millis(30)),
        );
        assert!(t.elapsed() >= Duration::from_millis(25));
    }
}
