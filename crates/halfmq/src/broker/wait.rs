//! One code path per operation, two ways to wait for it.
//!
//! An operation that waits (for an idempotency key another sender holds, for its record to
//! be acknowledged by the store, for sled's flush, for messages to poll) is written once, as
//! an `async fn` generic over a [`Wait`]. The blocking methods (`send`, `commit`, `ack`, ...) run it with
//! [`Blocking`], whose waits block the calling thread, so the future is finished at its first
//! poll ([`block_on`]). The `_async` methods await it with [`Async`], whose waits never block
//! an executor thread. The two differ only in how each wait is done, which is all in this
//! file: an operation made of steps (a batch send: submit a run, then wait for each ticket)
//! is written once over the steps each way implements.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use crate::broker::Topic;
use crate::idem::{Claim, DedupIndex};
use crate::meta::Meta;
use halfmq_store::{Append, Appended, DurableHook, Store, Ticket};
use halfmq_types::error::Result;

/// What runs when an appended record is acknowledged.
pub(crate) enum Hook {
    /// Nothing: the record is acknowledged under the flush policy.
    None,
    /// Run once the record is durable; the record is synced whatever the flush policy
    /// (halves, transaction outcomes, delayed messages: the broker's indexes follow them).
    Durable(DurableHook),
    /// Run once the record is acknowledged under the flush policy, without forcing a sync
    /// (an idempotency key's reservation).
    Acknowledged(DurableHook),
    /// No hook; the record is synced and acknowledged only once durable, whatever the flush
    /// policy (a dead letter's copy, a replay: the ack of the original in sled follows it).
    Sync,
}

impl Hook {
    /// The store's hook doing the same (what each `append` of a [`Wait`] asks the store for).
    pub(super) fn into_store(self) -> halfmq_store::Hook {
        match self {
            Hook::None => halfmq_store::Hook::None,
            Hook::Durable(h) => halfmq_store::Hook::Durable(h),
            Hook::Acknowledged(h) => halfmq_store::Hook::Observed(h),
            Hook::Sync => halfmq_store::Hook::Sync,
        }
    }
}

/// How an operation waits. See the module docs.
pub(crate) trait Wait: Sync {
    /// Append `a` and wait until it is acknowledged (see [`Hook`]).
    fn append(
        &self,
        store: &Store,
        a: Append<'_>,
        hook: Hook,
    ) -> impl Future<Output = Result<Appended>> + Send;

    /// Submit a run of records under one hold of the store's writer lock: each record's
    /// ticket (or why it was refused), in order; a batch send waits on each with
    /// [`Wait::wait`].
    fn submit_many<'s>(
        &self,
        store: &'s Store,
        run: Vec<(Append<'_>, halfmq_store::Hook)>,
    ) -> impl Future<Output = Vec<Result<Ticket<'s>>>> + Send;

    /// Wait until the record of `ticket` is acknowledged.
    fn wait(&self, ticket: Ticket<'_>) -> impl Future<Output = Result<Appended>> + Send;

    /// Find an idempotency key or reserve it, waiting while another sender holds it.
    fn claim(&self, index: &Arc<DedupIndex>, key: &Arc<str>) -> impl Future<Output = Claim> + Send;

    /// Wait until everything written to sled so far is on disk.
    fn flush(&self, meta: &Meta) -> impl Future<Output = Result<()>> + Send;

    /// The time now, on the clock this way of waiting times out by (tokio's for
    /// [`Async`], which a test may pause).
    fn now(&self) -> Instant;

    /// Wait until the queues of `t` may have messages past `from` (one position per queue),
    /// or `left` passes (what an empty long poll waits for).
    fn wait_for_messages(
        &self,
        store: &Store,
        t: &Topic,
        from: &[u64],
        left: Duration,
    ) -> impl Future<Output = ()> + Send;
}

/// Waits by blocking the calling thread: each of its futures finishes at its first poll.
pub(crate) struct Blocking;

impl Wait for Blocking {
    async fn append(&self, store: &Store, a: Append<'_>, hook: Hook) -> Result<Appended> {
        match hook {
            Hook::None => store.append(a),
            Hook::Durable(h) => store.append_hooked(a, Some(h)),
            Hook::Acknowledged(h) => store.append_observed(a, h),
            Hook::Sync => store.submit(a, halfmq_store::Hook::Sync)?.wait(),
        }
    }

    async fn submit_many<'s>(
        &self,
        store: &'s Store,
        run: Vec<(Append<'_>, halfmq_store::Hook)>,
    ) -> Vec<Result<Ticket<'s>>> {
        store.submit_many(run)
    }

    async fn wait(&self, ticket: Ticket<'_>) -> Result<Appended> {
        ticket.wait()
    }

    async fn claim(&self, index: &Arc<DedupIndex>, key: &Arc<str>) -> Claim {
        index.claim(key)
    }

    async fn flush(&self, meta: &Meta) -> Result<()> {
        meta.flush()
    }

    fn now(&self) -> Instant {
        Instant::now()
    }

    async fn wait_for_messages(&self, store: &Store, t: &Topic, from: &[u64], left: Duration) {
        store.wait_for_messages(&t.queues, from, left);
    }
}

/// Waits without blocking the executor's thread.
pub(crate) struct Async;

impl Wait for Async {
    async fn append(&self, store: &Store, a: Append<'_>, hook: Hook) -> Result<Appended> {
        match hook {
            Hook::None => store.append_async(a).await,
            Hook::Durable(h) => store.append_async_hooked(a, Some(h)).await,
            Hook::Acknowledged(h) => store.append_async_observed(a, h).await,
            Hook::Sync => {
                store
                    .submit_async(a, halfmq_store::Hook::Sync)
                    .await?
                    .wait_async()
                    .await
            }
        }
    }

    async fn submit_many<'s>(
        &self,
        store: &'s Store,
        run: Vec<(Append<'_>, halfmq_store::Hook)>,
    ) -> Vec<Result<Ticket<'s>>> {
        store.submit_many_async(run).await
    }

    async fn wait(&self, ticket: Ticket<'_>) -> Result<Appended> {
        ticket.wait_async().await
    }

    async fn claim(&self, index: &Arc<DedupIndex>, key: &Arc<str>) -> Claim {
        index.claim_async(key).await
    }

    async fn flush(&self, meta: &Meta) -> Result<()> {
        meta.flush_async().await
    }

    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    async fn wait_for_messages(&self, store: &Store, t: &Topic, from: &[u64], left: Duration) {
        let deadline = tokio::time::Instant::now() + left;
        store
            .wait_for_messages_async(&t.queues, from, deadline)
            .await;
    }
}

/// Wakes the thread that runs [`block_on`].
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

thread_local! {
    /// One waker per thread, made on first use, so that a blocking call allocates nothing.
    static THREAD_WAKER: Waker = Waker::from(Arc::new(Unpark(std::thread::current())));
}

/// A blocking method and its `_async` twin over the one path of an operation
/// (`$with`, an `async fn` generic over [`Wait`]), declared once: the parameters, the result
/// and what is passed on are the same for both; the blocking one runs the path with
/// [`Blocking`] to its end at once ([`block_on`]), the async one awaits it with [`Async`].
/// An optional `.map(f)` turns the path's result into the method's.
macro_rules! blocking_and_async {
    (
        $(#[$doc:meta])*
        fn $name:ident;
        $(#[$doc_async:meta])*
        async fn $name_async:ident;
        (&self, $($arg:ident: $ty:ty),* $(,)?) -> $ret:ty;
        $with:ident($($pass:expr),* $(,)?) $(.$adapt:ident($f:expr))?
    ) => {
        $(#[$doc])*
        pub fn $name(&self, $($arg: $ty),*) -> $ret {
            $crate::broker::wait::block_on(
                self.$with(&$crate::broker::wait::Blocking, $($pass),*)
            )$(.$adapt($f))?
        }

        $(#[$doc_async])*
        pub async fn $name_async(&self, $($arg: $ty),*) -> $ret {
            self.$with(&$crate::broker::wait::Async, $($pass),*)
                .await$(.$adapt($f))?
        }
    };
}
pub(crate) use blocking_and_async;

/// Run an operation to its end on this thread. With [`Blocking`] every wait inside it blocks
/// within a poll and never returns `Pending`, so the first poll finishes it; parking until
/// woken only keeps this correct for any future.
pub(crate) fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    THREAD_WAKER.with(|waker| {
        let mut cx = Context::from_waker(waker);
        loop {
            if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
                return out;
            }
            std::thread::park();
        }
    })
}

#[cfg(test)]
mod tests {
    use crate::{Broker, HalfOptions, Message, TxnId};

    /// Type-checked, never run: every async method's future can move between an executor's
    /// threads (the network server spawns them).
    #[allow(dead_code)]
    fn async_methods_are_send(b: &Broker, m: &Message) {
        fn send<T: Send>(_: T) {}
        send(b.send_async("t", m));
        send(b.send_batch_async("t", std::slice::from_ref(m)));
        send(b.send_delayed_async("t", m, 0));
        send(b.send_half_receipt_async("t", m, "g", HalfOptions::default()));
        send(b.commit_async(TxnId(0)));
        send(b.rollback_async(TxnId(0)));
        send(b.ack_async("g", "t", 0, 0));
        send(b.ack_many_async("g", "t", &[]));
        send(b.nack_async("g", "t", 0, 0, None));
        send(b.poll_wait_async("g", "t", 1, 1, std::time::Duration::ZERO));
    }

    #[test]
    fn block_on_runs_a_future_that_waits_on_another_thread() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let _ = tx.send(7);
        });
        assert_eq!(super::block_on(rx), Ok(7));
        t.join().unwrap();
    }
}
