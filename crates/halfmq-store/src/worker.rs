//! A background thread owned by the broker, driven by messages on a channel.
//!
//! The broker's timer loops (delayed delivery, check-back, persisting idempotency keys) all
//! need the same things: a named thread, a channel to wake or stop it, and a stop that waits
//! for the thread unless the thread itself is the one stopping it (the last `Arc<Broker>`
//! can be dropped on a worker). This type is that, once.

use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;

use halfmq_types::error::{Error, Result};

/// A running worker thread taking messages of type `M`.
pub struct Worker<M: Send + 'static> {
    tx: Sender<M>,
    handle: Option<JoinHandle<()>>,
    stop: fn() -> M,
}

impl<M: Send + 'static> Worker<M> {
    /// Start thread `name` running `body` with its receiver and a sender to itself.
    /// `stop` makes the message that tells `body` to return.
    pub fn spawn(
        name: &'static str,
        stop: fn() -> M,
        body: impl FnOnce(Receiver<M>, Sender<M>) + Send + 'static,
    ) -> Result<Worker<M>> {
        let (tx, rx) = mpsc::channel();
        let own = tx.clone();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || body(rx, own))
            .map_err(|e| Error::io(name, "start a background thread", e))?;
        Ok(Worker {
            tx,
            handle: Some(handle),
            stop,
        })
    }

    /// Send `msg`; ignored once the thread has stopped.
    pub fn send(&self, msg: M) {
        let _ = self.tx.send(msg);
    }

    /// A sender to the thread, for code that must wake it later (say, a durable hook).
    pub fn sender(&self) -> Sender<M> {
        self.tx.clone()
    }

    /// Stop the thread and wait for it, unless called from the thread itself.
    pub fn stop(&mut self) {
        let _ = self.tx.send((self.stop)());
        if let Some(h) = self.handle.take() {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

impl<M: Send + 'static> Drop for Worker<M> {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    enum Msg {
        Count,
        Stop,
    }

    #[test]
    fn messages_arrive_in_order_and_stop_waits_for_the_thread() {
        let n = Arc::new(AtomicU32::new(0));
        let seen = n.clone();
        let mut w = Worker::spawn(
            "halfmq-test-worker",
            || Msg::Stop,
            move |rx, _own| {
                while let Ok(Msg::Count) = rx.recv() {
                    // Slow enough that a stop which did not wait would see a lower count.
                    std::thread::sleep(Duration::from_millis(5));
                    seen.fetch_add(1, Ordering::SeqCst);
                }
            },
        )
        .unwrap();
        for _ in 0..5 {
            w.send(Msg::Count);
        }
        w.stop();
        assert_eq!(n.load(Ordering::SeqCst), 5);
        w.send(Msg::Count); // after stop: ignored, no panic
        w.stop(); // twice: harmless
    }
}
