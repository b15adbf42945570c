//! [`Counted`]: one more in a shared count for as long as it lives, as the broker's
//! idempotency index counts the senders waiting for room and a replicated node's peer gate
//! the requests it is answering.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Adds one to a count when made and takes it off when dropped, also when the future that
/// holds it is dropped half-way.
#[derive(Debug)]
pub struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    /// One more in `count` until the result is dropped.
    pub fn new(count: &'a AtomicUsize) -> Counted<'a> {
        count.fetch_add(1, Ordering::SeqCst);
        Counted(count)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_counts_while_it_lives() {
        let n = AtomicUsize::new(0);
        let a = Counted::new(&n);
        let b = Counted::new(&n);
        assert_eq!(n.load(Ordering::SeqCst), 2);
        drop(a);
        assert_eq!(n.load(Ordering::SeqCst), 1);
        drop(b);
        assert_eq!(n.load(Ordering::SeqCst), 0);
    }
}
