//! FIFO message groups: a FIFO consumer group gets the messages of one message group one at
//! a time, in order; the next is handed out only after the one before it is acked or
//! dead-lettered, and other message groups are not held up. A model test runs random polls,
//! acks, nacks, lease changes and time-outs against it; the rest are examples, embedded, after
//! a restart and over the network. Time moves by a manual clock.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::{fresh_with_clock, model_config};
use halfmq::{Broker, BrokerConfig, Delivery, GroupSettings, ManualClock, Message, NackOutcome};
use proptest::prelude::*;

fn config(dir: &std::path::Path) -> BrokerConfig {
    let mut c = BrokerConfig::new(dir);
    c.default_queues = 2;
    c
}

fn fifo(vt_ms: u64, max_retries: u32) -> GroupSettings {
    GroupSettings {
        visibility_timeout_ms: Some(vt_ms),
        max_retries: Some(max_retries),
        retry_backoff_ms: Some(vec![10]),
        fifo: Some(true),
    }
}

/// A broker (its directory and manual clock too) whose group `g` is FIFO with
/// [`fifo`]`(vt_ms, max_retries)`.
fn open_fifo(vt_ms: u64, max_retries: u32) -> (tempfile::TempDir, Arc<Broker>, ManualClock) {
    let (tmp, b, clock) = fresh_with_clock(config);
    b.set_group_settings("g", &fifo(vt_ms, max_retries))
        .unwrap();
    (tmp, b, clock)
}

fn msg(group: &str, n: u32) -> Message {
    Message::new(format!("{group}-{n}")).with_message_group(group)
}

fn bodies(ds: &[Delivery]) -> Vec<String> {
    let mut v: Vec<String> = ds
        .iter()
        .map(|d| String::from_utf8_lossy(&d.body).into_owned())
        .collect();
    v.sort();
    v
}

fn ack(b: &Broker, d: &Delivery) {
    b.ack_receipt("g", "t", &d.receipt.unwrap()).unwrap();
}

#[test]
fn one_message_of_a_group_at_a_time_and_other_groups_go_on() {
    let (_tmp, b, clock) = open_fifo(1_000, 16);
    for n in 0..3 {
        b.send("t", &msg("a", n)).unwrap();
        b.send("t", &msg("b", n)).unwrap();
    }
    b.send("t", &Message::new("plain")).unwrap();
    let first = b.poll("g", "t", 100).unwrap();
    assert_eq!(bodies(&first), ["a-0", "b-0", "plain"]);
    // Nothing more of a or b until their heads are settled.
    assert!(b.poll("g", "t", 100).unwrap().is_empty());
    let a0 = first.iter().find(|d| d.body == b"a-0").unwrap();
    ack(&b, a0);
    assert_eq!(bodies(&b.poll("g", "t", 100).unwrap()), ["a-1"]);
    // b-0 times out: b-0 again (attempt 2), not b-1.
    clock.advance_ms(1_000);
    let again = b.poll("g", "t", 100).unwrap();
    let b0 = again.iter().find(|d| d.body == b"b-0").unwrap();
    assert_eq!(b0.attempt, 2);
    assert!(!again.iter().any(|d| d.body == b"b-1"));
    // A nack keeps the group held too.
    let out = b
        .nack_receipt(
            "g",
            "t",
            &b0.receipt.unwrap(),
            Some(Duration::from_millis(5)),
        )
        .unwrap();
    assert!(matches!(out, NackOutcome::Redeliver { .. }));
    clock.advance_ms(5);
    let b0 = b.poll("g", "t", 100).unwrap();
    assert!(bodies(&b0).contains(&"b-0".to_owned()));
    assert!(!bodies(&b0).contains(&"b-1".to_owned()));
    // Another group that is not FIFO gets everything at once.
    assert_eq!(b.poll("other", "t", 100).unwrap().len(), 7);
    let _ = clock;
}

#[test]
fn a_dead_letter_lets_its_group_go_on() {
    let (_tmp, b, _clock) = open_fifo(1_000, 0);
    for n in 0..2 {
        b.send("t", &msg("a", n)).unwrap();
    }
    let d = b.poll("g", "t", 10).unwrap().remove(0);
    let out = b.nack_receipt("g", "t", &d.receipt.unwrap(), None).unwrap();
    assert!(matches!(out, NackOutcome::DeadLettered { .. }));
    assert_eq!(bodies(&b.poll("g", "t", 10).unwrap()), ["a-1"]);
}

#[test]
fn the_order_holds_across_a_restart_and_turning_fifo_off_releases_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::starting_now();
    let open = || Broker::open(config(tmp.path()).with_clock(clock.clone())).unwrap();
    let b = open();
    b.set_group_settings("g", &fifo(1_000, 16)).unwrap();
    for n in 0..3 {
        b.send("t", &msg("a", n)).unwrap();
    }
    // a-0 fails once (durably counted), then the broker stops.
    let d = b.poll("g", "t", 10).unwrap().remove(0);
    b.nack_receipt(
        "g",
        "t",
        &d.receipt.unwrap(),
        Some(Duration::from_millis(500)),
    )
    .unwrap();
    b.close().unwrap();
    drop(b);
    let b = open();
    // a-0 holds its group while it waits for its redelivery: nothing of a before it.
    assert!(b.poll("g", "t", 10).unwrap().is_empty());
    clock.advance_ms(500);
    let d = b.poll("g", "t", 10).unwrap();
    assert_eq!((bodies(&d), d[0].attempt), (vec!["a-0".to_owned()], 2));
    ack(&b, &d[0]);
    assert_eq!(bodies(&b.poll("g", "t", 10).unwrap()), ["a-1"]);
    // Turned off: a-2 is handed out at once, though a-1 is not acked.
    let off = GroupSettings {
        fifo: Some(false),
        ..fifo(1_000, 16)
    };
    b.set_group_settings("g", &off).unwrap();
    assert_eq!(bodies(&b.poll("g", "t", 10).unwrap()), ["a-2"]);
    assert!(!b.group_settings("g").unwrap().0.fifo);
}

#[test]
fn fifo_over_the_network() {
    let (_tmp, b, _clock) = fresh_with_clock(config);
    common::with_served(&b, |_, c| async move {
        let (in_force, overrides) = c
            .set_group_settings("g", &fifo(1_000, 16))
            .await
            .map(|d| (d.fifo, ()))
            .unwrap();
        assert!(in_force, "{overrides:?}");
        // The older request, which cannot carry FIFO, keeps it as it is.
        let old = halfmq_client::protocol::Request::SetGroup {
            group: "g".into(),
            settings: fifo(1_000, 16),
        };
        c.call(old).await.unwrap();
        let (d, o) = c.group_settings("g").await.unwrap();
        assert!(d.fifo && o.fifo == Some(true));
        for n in 0..2 {
            c.send("t", &msg("a", n)).await.unwrap();
        }
        let first = c.poll("g", "t", 10).await.unwrap();
        assert_eq!(bodies(&first), ["a-0"]);
        // A long poll waiting for a-1 gets it once a-0 is acked.
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { c.poll_wait("g", "t", 10, Duration::from_secs(30)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.ack_receipt("g", "t", &first[0].receipt.unwrap())
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("the waiting poll saw the release")
            .unwrap()
            .unwrap();
        assert_eq!(bodies(&got), ["a-1"]);
    });
}

/// One step of the model test.
#[derive(Debug, Clone)]
enum Op {
    Poll(usize),
    /// Ack the i-th (mod count) message held now.
    Ack(usize),
    /// Nack it, to be delivered again after 0 or 20 ms.
    Nack(usize, bool),
    /// Change its lease to 5 ms or 500 ms.
    Change(usize, bool),
    /// Move the clock.
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1..4usize).prop_map(Op::Poll),
        3 => any::<usize>().prop_map(Op::Ack),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(i, d)| Op::Nack(i, d)),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(i, l)| Op::Change(i, l)),
        2 => prop_oneof![Just(1u64), Just(30), Just(120)].prop_map(Op::Advance),
    ]
}

/// The model: which message (group, number) each (queue, offset) is, which are done (acked
/// or dead-lettered), which a consumer holds now (with their latest delivery).
struct Model {
    b: Arc<Broker>,
    clock: ManualClock,
    ids: BTreeMap<(u32, u64), (u8, u32)>,
    done: BTreeSet<(u8, u32)>,
    held: Vec<Delivery>,
}

impl Model {
    fn id(&self, d: &Delivery) -> (u8, u32) {
        self.ids[&(d.queue, d.offset)]
    }

    /// Dead letters the broker made on its own (a time-out past `max_retries`) count as done.
    fn note_dead_letters(&mut self) {
        for dl in self.b.dead_letters("g", 0, 10_000).unwrap() {
            let id = self.ids[&(dl.queue, dl.offset)];
            self.done.insert(id);
        }
    }

    /// Every message handed out must be the first of its group not done yet.
    fn check_handout(&mut self, got: &[Delivery]) -> Result<(), TestCaseError> {
        self.note_dead_letters();
        for d in got {
            let (g, n) = self.id(d);
            for earlier in 0..n {
                prop_assert!(
                    self.done.contains(&(g, earlier)),
                    "message {n} of group {g} handed out before {earlier} was acked or dead-lettered"
                );
            }
            prop_assert!(!self.done.contains(&(g, n)), "a done message came again");
            self.held
                .retain(|h| self.ids[&(h.queue, h.offset)] != (g, n));
            self.held.push(d.clone());
        }
        Ok(())
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let pick = |i: usize, held: &Vec<Delivery>| (!held.is_empty()).then(|| i % held.len());
        match *op {
            Op::Poll(max) => {
                let got = self.b.poll("g", "t", max).unwrap();
                self.check_handout(&got)?;
            }
            Op::Ack(i) => {
                if let Some(i) = pick(i, &self.held) {
                    let d = self.held.remove(i);
                    // A stale receipt (the lease ran out and it was handed out again) is
                    // refused; the model then holds the newer delivery.
                    if self.b.ack_receipt("g", "t", &d.receipt.unwrap()).is_ok() {
                        self.done.insert(self.id(&d));
                    }
                }
            }
            Op::Nack(i, later) => {
                if let Some(i) = pick(i, &self.held) {
                    let d = self.held.remove(i);
                    let delay = Duration::from_millis(if later { 20 } else { 0 });
                    let r = self
                        .b
                        .nack_receipt("g", "t", &d.receipt.unwrap(), Some(delay));
                    if let Ok(NackOutcome::DeadLettered { .. }) = r {
                        self.done.insert(self.id(&d));
                    }
                }
            }
            Op::Change(i, long) => {
                if let Some(i) = pick(i, &self.held) {
                    let lease = Duration::from_millis(if long { 500 } else { 5 });
                    let d = &mut self.held[i];
                    if let Ok(r) = self.b.change_lease("g", "t", &d.receipt.unwrap(), lease) {
                        d.receipt = Some(r);
                    }
                }
            }
            Op::Advance(ms) => self.clock.advance_ms(ms),
        }
        Ok(())
    }

    /// Settle everything: every message ends acked or dead-lettered, in order per group.
    fn drain(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..10_000 {
            if self.done.len() == self.ids.len() {
                return Ok(());
            }
            self.clock.advance_ms(200);
            let got = self.b.poll("g", "t", 100).unwrap();
            self.check_handout(&got)?;
            for d in std::mem::take(&mut self.held) {
                if self.b.ack_receipt("g", "t", &d.receipt.unwrap()).is_ok() {
                    self.done.insert(self.id(&d));
                }
            }
            self.note_dead_letters();
        }
        prop_assert!(
            false,
            "not everything was settled: {:?} done",
            self.done.len()
        );
        Ok(())
    }
}

proptest! {
    #![proptest_config(model_config(24, 200))]

    #[test]
    fn fifo_order_holds_under_random_acks_nacks_and_timeouts(
        groups in proptest::collection::vec(0u8..3, 1..16),
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        let (_tmp, b, clock) = open_fifo(100, 2);
        let mut ids = BTreeMap::new();
        let mut next = [0u32; 3];
        for g in groups {
            let n = next[g as usize];
            next[g as usize] += 1;
            let r = b.send("t", &msg(&g.to_string(), n)).unwrap();
            ids.insert((r.queue, r.offset), (g, n));
        }
        let mut m = Model { b, clock, ids, done: BTreeSet::new(), held: Vec::new() };
        for op in &ops {
            m.step(op)?;
        }
        m.drain()?;
    }
}
