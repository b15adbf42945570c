//! Transactions on the embedded broker: half messages stay invisible until committed, the
//! first outcome stands, check-back asks the producer group when the producer goes quiet,
//! and a transaction nobody can answer for becomes *unresolved* — kept, listed, counted,
//! surviving restarts and resolvable by hand — instead of being dropped.

mod common;

use common::{advance, check_back, fresh_with_clock, visible, wait_until};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use halfmq::{
    Broker, BrokerConfig, CheckAnswer, Error, HalfMessage, HalfOptions, Message, TxnId, TxnState,
};

fn config(dir: &std::path::Path) -> BrokerConfig {
    let mut c = BrokerConfig::new(dir);
    c.txn = check_back((150, 50, 100), 3, 300);
    c
}

#[test]
fn half_is_invisible_until_commit_and_visible_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let b = Broker::open(config(tmp.path())).unwrap();
    let msg = Message::new("paid")
        .with_key("order-7")
        .with_property("amount", "12.50");
    let txn = b
        .send_half("payments", &msg, "pay-svc", HalfOptions::default())
        .unwrap();
    assert!(
        visible(&b, "payments").is_empty(),
        "a half message is invisible"
    );
    assert_eq!(b.transaction_state(txn).unwrap(), TxnState::Pending);
    assert_eq!(b.stats().unwrap().txn_pending, 1);

    b.commit(txn).unwrap();
    let got = visible(&b, "payments");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].key, "order-7");
    assert_eq!(got[0].body, b"paid");
    assert_eq!(
        got[0].properties.get("amount").map(String::as_str),
        Some("12.50")
    );
    assert_eq!(
        got[0].properties.get("halfmq.txn"),
        Some(&txn.0.to_string())
    );
    assert!(!got[0].properties.contains_key("halfmq.producer_group"));

    // The same outcome again is a no-op; the opposite is refused and says what stands.
    b.commit(txn).unwrap();
    assert_eq!(
        visible(&b, "payments").len(),
        1,
        "a second commit stores nothing"
    );
    match b.rollback(txn) {
        Err(Error::TxnConflict {
            stands: "committed",
            ..
        }) => {}
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(b.transaction_state(txn).unwrap(), TxnState::Committed);
    assert_eq!(b.stats().unwrap().txn_pending, 0);
    assert!(matches!(
        b.commit(TxnId(12345)),
        Err(Error::UnknownTxn(12345))
    ));

    // All of it holds after a restart.
    b.close().unwrap();
    drop(b);
    let b = Broker::open(config(tmp.path())).unwrap();
    assert_eq!(visible(&b, "payments").len(), 1);
    b.commit(txn).unwrap();
    assert!(matches!(b.rollback(txn), Err(Error::TxnConflict { .. })));
    assert_eq!(b.transaction_state(txn).unwrap(), TxnState::Committed);
}

#[test]
fn rollback_is_never_visible() {
    let (tmp, b, clock) = fresh_with_clock(config);
    let txn = b
        .send_half("t", &Message::new("x"), "g", HalfOptions::default())
        .unwrap();
    b.rollback(txn).unwrap();
    b.rollback(txn).unwrap();
    assert!(matches!(
        b.commit(txn),
        Err(Error::TxnConflict {
            stands: "rolled back",
            ..
        })
    ));
    // Long past the time-out: a rolled-back half is never checked nor made visible.
    advance(&b, &clock, 60_000);
    assert!(visible(&b, "t").is_empty());
    b.close().unwrap();
    drop(b);
    let b = Broker::open(config(tmp.path())).unwrap();
    assert!(visible(&b, "t").is_empty());
    assert_eq!(b.transaction_state(txn).unwrap(), TxnState::RolledBack);
}

#[test]
fn reserved_property_names_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let b = Broker::open(config(tmp.path())).unwrap();
    let msg = Message::new("x").with_property("halfmq.txn", "1");
    assert!(matches!(
        b.send_half("t", &msg, "g", HalfOptions::default()),
        Err(Error::Invalid {
            what: "property name",
            ..
        })
    ));
}

#[test]
fn check_back_commit_and_rollback_answers_resolve() {
    let tmp = tempfile::tempdir().unwrap();
    let b = Broker::open(config(tmp.path())).unwrap();
    let asked = Arc::new(AtomicU32::new(0));
    let a = asked.clone();
    b.register_checker(
        "pay-svc",
        Arc::new(move |h: &HalfMessage| {
            a.fetch_add(1, Ordering::SeqCst);
            if h.key.starts_with("ok") {
                CheckAnswer::Commit
            } else {
                CheckAnswer::Rollback
            }
        }),
    )
    .unwrap();
    let ok = b.send_half(
        "t",
        &Message::new("1").with_key("ok-1"),
        "pay-svc",
        HalfOptions::default(),
    );
    let bad = b.send_half(
        "t",
        &Message::new("2").with_key("bad-1"),
        "pay-svc",
        HalfOptions::default(),
    );
    let (ok, bad) = (ok.unwrap(), bad.unwrap());
    wait_until(
        "both resolved by check-back",
        Duration::from_secs(10),
        || {
            b.transaction_state(ok).unwrap() == TxnState::Committed
                && b.transaction_state(bad).unwrap() == TxnState::RolledBack
        },
    );
    let got = visible(&b, "t");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].key, "ok-1");
    assert_eq!(
        asked.load(Ordering::SeqCst),
        2,
        "each half was checked once"
    );
}

/// A checker that counts the checks of its group and answers "unknown".
fn counting_checker(b: &Broker, group: &str) -> Arc<AtomicU32> {
    counting_checker_answering(b, group, CheckAnswer::Unknown)
}

/// A checker that counts the checks of its group and gives them all `answer`.
fn counting_checker_answering(b: &Broker, group: &str, answer: CheckAnswer) -> Arc<AtomicU32> {
    let asked = Arc::new(AtomicU32::new(0));
    let a = asked.clone();
    b.register_checker(
        group,
        Arc::new(move |_: &HalfMessage| {
            a.fetch_add(1, Ordering::SeqCst);
            answer
        }),
    )
    .unwrap();
    asked
}

#[test]
fn not_checked_before_the_timeout_or_the_immunity() {
    // The broker's clock moves only when the test moves it, so "not yet" is exact.
    let (_tmp, b, clock) = fresh_with_clock(config);
    let plain = counting_checker(&b, "plain");
    let immune = counting_checker(&b, "immune");
    let opts = HalfOptions {
        check_immunity: Some(Duration::from_millis(700)),
    };
    b.send_half("t", &Message::new("x"), "plain", HalfOptions::default())
        .unwrap();
    let txn = b
        .send_half("t", &Message::new("y"), "immune", opts)
        .unwrap();

    // One millisecond before the time-out (150 ms): nobody is asked.
    advance(&b, &clock, 149);
    assert_eq!(
        plain.load(Ordering::SeqCst),
        0,
        "checked before the time-out"
    );
    // At the time-out the plain half is checked; the immune one is not.
    advance(&b, &clock, 1);
    wait_until(
        "first check at the time-out",
        Duration::from_secs(10),
        || plain.load(Ordering::SeqCst) >= 1,
    );
    // One millisecond before the immunity ends (700 ms): still not asked.
    advance(&b, &clock, 549);
    assert_eq!(
        immune.load(Ordering::SeqCst),
        0,
        "checked inside the immunity window"
    );
    let info = b
        .transactions(None)
        .into_iter()
        .find(|i| i.txn_id == txn.0)
        .unwrap();
    assert_eq!(info.checks, 0, "the immunity window uses up no checks");
    advance(&b, &clock, 1);
    wait_until(
        "first check after immunity",
        Duration::from_secs(10),
        || immune.load(Ordering::SeqCst) >= 1,
    );
}

/// An immunity too long for u64 milliseconds counts as u64::MAX ms: it never ends, neither
/// overflows the first check's time nor is lost by a restart.
#[test]
fn an_endless_immunity_is_never_over_even_after_a_restart() {
    let (tmp, b, clock) = fresh_with_clock(config);
    let asked = counting_checker(&b, "g");
    let opts = HalfOptions {
        check_immunity: Some(Duration::MAX),
    };
    let txn = b.send_half("t", &Message::new("x"), "g", opts).unwrap();
    let next_check = |b: &Broker| {
        let infos = b.transactions(None).into_iter();
        infos
            .filter(|i| i.txn_id == txn.0)
            .map(|i| i.next_check_ms)
            .next()
    };
    assert_eq!(next_check(&b), Some(u64::MAX));
    advance(&b, &clock, 3_600_000);
    assert_eq!(
        asked.load(Ordering::SeqCst),
        0,
        "checked inside the immunity"
    );
    b.close().unwrap();
    drop(b);
    let b = Broker::open(config(tmp.path())).unwrap();
    assert_eq!(next_check(&b), Some(u64::MAX));
}

#[test]
fn unknown_answers_end_unresolved_which_survives_restart_and_can_be_resolved_by_hand() {
    let (tmp, b, clock) = fresh_with_clock(config);
    let asked = counting_checker(&b, "g");
    let txn = b.send_half(
        "t",
        &Message::new("x").with_key("k"),
        "g",
        HalfOptions::default(),
    );
    let txn = txn.unwrap();
    // Each step moves the clock past the longest wait between checks (100 ms) and runs the
    // check-back round; the answers come in on the check threads.
    wait_until(
        "unresolved after check_max",
        Duration::from_secs(10),
        || {
            advance(&b, &clock, 150);
            b.transaction_state(txn).unwrap() == TxnState::Unresolved
        },
    );
    let u = b.unresolved_transactions();
    assert_eq!(u.len(), 1);
    assert_eq!(u[0].checks, 3, "exactly check_max checks");
    assert_eq!(u[0].last_answer.as_deref(), Some("unknown"));
    assert_eq!(b.stats().unwrap().txn_unresolved, 1);
    // Unresolved is not checked any more, however late it gets.
    advance(&b, &clock, 3_600_000);
    assert_eq!(b.unresolved_transactions()[0].checks, 3);
    assert_eq!(asked.load(Ordering::SeqCst), 3);
    assert!(visible(&b, "t").is_empty());

    b.close().unwrap();
    drop(b);
    let b = Broker::open(config(tmp.path())).unwrap();
    let u = b.unresolved_transactions();
    assert_eq!(u.len(), 1, "unresolved survives a restart");
    assert_eq!((u[0].txn_id, u[0].checks), (txn.0, 3));
    b.commit(txn).unwrap();
    assert_eq!(visible(&b, "t").len(), 1);
    assert!(b.unresolved_transactions().is_empty());
}

#[test]
fn no_live_producer_counts_and_rearm_checks_again() {
    let tmp = tempfile::tempdir().unwrap();
    let b = Broker::open(config(tmp.path())).unwrap();
    let txn = b
        .send_half("t", &Message::new("x"), "gone", HalfOptions::default())
        .unwrap();
    wait_until(
        "unresolved without producers",
        Duration::from_secs(10),
        || b.transaction_state(txn).unwrap() == TxnState::Unresolved,
    );
    assert_eq!(
        b.unresolved_transactions()[0].last_answer.as_deref(),
        Some("no live producer of the group")
    );
    // The producer comes back; an operator re-arms the transaction.
    b.register_checker("gone", Arc::new(|_: &HalfMessage| CheckAnswer::Commit))
        .unwrap();
    b.rearm(txn).unwrap();
    wait_until("committed after re-arm", Duration::from_secs(10), || {
        b.transaction_state(txn).unwrap() == TxnState::Committed
    });
    assert_eq!(visible(&b, "t").len(), 1);
}

#[test]
fn panicking_and_hanging_checkers_cost_one_check_each_and_the_broker_keeps_going() {
    let tmp = tempfile::tempdir().unwrap();
    let b = Broker::open(config(tmp.path())).unwrap();
    b.register_checker(
        "panics",
        Arc::new(|_: &HalfMessage| -> CheckAnswer { panic!("boom") }),
    )
    .unwrap();
    b.register_checker(
        "hangs",
        Arc::new(|_: &HalfMessage| {
            std::thread::sleep(Duration::from_secs(3));
            CheckAnswer::Commit
        }),
    )
    .unwrap();
    let p = b
        .send_half("t", &Message::new("p"), "panics", HalfOptions::default())
        .unwrap();
    let h = b
        .send_half("t", &Message::new("h"), "hangs", HalfOptions::default())
        .unwrap();
    // Meanwhile ordinary traffic and other transactions flow.
    for i in 0..20 {
        b.send("t", &Message::new(format!("plain-{i}"))).unwrap();
    }
    let other = b
        .send_half("t", &Message::new("o"), "nobody", HalfOptions::default())
        .unwrap();
    b.commit(other).unwrap();
    wait_until("both unresolved", Duration::from_secs(15), || {
        b.transaction_state(p).unwrap() == TxnState::Unresolved
            && b.transaction_state(h).unwrap() == TxnState::Unresolved
    });
    let u = b.unresolved_transactions();
    let why = |t: TxnId| {
        u.iter()
            .find(|i| i.txn_id == t.0)
            .unwrap()
            .last_answer
            .clone()
            .unwrap()
    };
    assert_eq!(why(p), "the checker panicked");
    assert_eq!(why(h), "no answer within check_answer_timeout");
    assert_eq!(visible(&b, "t").len(), 21);
}

#[test]
fn pending_halves_are_checked_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let txns: Vec<TxnId> = {
        let b = Broker::open(config(tmp.path())).unwrap();
        let t = (0..10)
            .map(|i| {
                let msg = Message::new(format!("m{i}")).with_key(format!("k{i}"));
                b.send_half("t", &msg, "g", HalfOptions::default()).unwrap()
            })
            .collect();
        b.close().unwrap();
        t
    };
    let b = Broker::open(config(tmp.path())).unwrap();
    assert_eq!(
        b.stats().unwrap().txn_pending,
        10,
        "pending halves rebuilt on open"
    );
    b.register_checker(
        "g",
        Arc::new(|h: &HalfMessage| {
            let n: u32 = h.key[1..].parse().unwrap();
            if n.is_multiple_of(2) {
                CheckAnswer::Commit
            } else {
                CheckAnswer::Rollback
            }
        }),
    )
    .unwrap();
    wait_until("all resolved", Duration::from_secs(10), || {
        b.transactions(None).is_empty()
    });
    let mut keys: Vec<String> = visible(&b, "t").into_iter().map(|d| d.key).collect();
    keys.sort();
    assert_eq!(keys, vec!["k0", "k2", "k4", "k6", "k8"]);
    for (i, t) in txns.iter().enumerate() {
        let want = if i % 2 == 0 {
            TxnState::Committed
        } else {
            TxnState::RolledBack
        };
        assert_eq!(b.transaction_state(*t).unwrap(), want);
    }
}

#[test]
fn many_producer_groups_are_asked_separately() {
    let tmp = tempfile::tempdir().unwrap();
    let b = Broker::open(config(tmp.path())).unwrap();
    let mut txns = Vec::new();
    for g in 0..8 {
        let group = format!("group-{g}");
        let want = g;
        b.register_checker(
            &group,
            Arc::new(move |h: &HalfMessage| {
                assert_eq!(h.producer_group, format!("group-{want}"));
                CheckAnswer::Commit
            }),
        )
        .unwrap();
        for i in 0..5 {
            let msg = Message::new(format!("{g}-{i}"));
            txns.push(
                b.send_half("t", &msg, &group, HalfOptions::default())
                    .unwrap(),
            );
        }
    }
    wait_until("all committed", Duration::from_secs(10), || {
        b.transactions(None).is_empty()
    });
    assert_eq!(visible(&b, "t").len(), 40);
}

/// A producer group that was gone comes back: the halves whose checks found nobody are asked
/// at once when its checker registers, not when the backoff next schedules them (an hour
/// away here). Halves whose producer answered "unknown" keep their schedule.
#[test]
fn a_returning_producer_is_asked_at_once_about_halves_that_found_nobody() {
    let hour = 3_600_000;
    let (_tmp, b, clock) = fresh_with_clock(|dir| {
        let mut c = BrokerConfig::new(dir);
        c.txn = check_back((150, hour, hour), 5, 300);
        c
    });
    let unsure = counting_checker(&b, "unsure");
    let half = |body: &str, group: &str| {
        b.send_half("t", &Message::new(body), group, HalfOptions::default())
            .unwrap()
    };
    let (gone, doubted) = (half("x", "gone"), half("y", "unsure"));
    advance(&b, &clock, 150);
    let info = |txn: TxnId| {
        b.transactions(None)
            .into_iter()
            .find(|i| i.txn_id == txn.0)
            .unwrap()
    };
    wait_until("both checked once", Duration::from_secs(10), || {
        info(gone).checks == 1 && info(doubted).checks == 1
    });
    assert_eq!(
        info(gone).last_answer.as_deref(),
        Some(halfmq::NO_LIVE_PRODUCER)
    );
    assert_eq!(info(gone).next_check_ms, info(gone).last_check_ms + hour);
    assert_eq!(unsure.load(Ordering::SeqCst), 1);

    // Both groups' producers register (again), the clock standing still.
    let asked = counting_checker_answering(&b, "gone", CheckAnswer::Commit);
    let unsure_again = counting_checker(&b, "unsure");
    wait_until(
        "the returning producer's half committed",
        Duration::from_secs(10),
        || b.transaction_state(gone).unwrap() == TxnState::Committed,
    );
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    assert_eq!(visible(&b, "t").len(), 1);
    // A round later, the half whose producer said "unknown" is still waiting for its hour.
    b.run_due_now();
    assert_eq!(b.transaction_state(doubted).unwrap(), TxnState::Pending);
    assert_eq!(info(doubted).checks, 1);
    assert_eq!(
        unsure.load(Ordering::SeqCst) + unsure_again.load(Ordering::SeqCst),
        1
    );
}
