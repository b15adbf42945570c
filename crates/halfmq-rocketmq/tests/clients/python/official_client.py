"""The official Apache RocketMQ Python client (rocketmq-python-client) against halfmq's
RocketMQ 5 endpoint, run by tests/other_clients.rs.

Usage: official_client.py <host:port>

The broker behind the endpoint has the topics orders, txn, reminders, work, tags and ledger,
and the consumer group `books` is FIFO. Each case prints one JSON line
{"case": ..., "ok": true|false, ...}; what the broker must hold afterwards is checked by the
Rust test from what the lines report. Exits 1 if any case failed.
"""

import contextlib
import copy
import json
import sys
import threading
import time
import traceback

from rocketmq import (ClientConfiguration, ConsumeResult, Credentials,
                      FilterExpression, Message, MessageListener, Producer,
                      PushConsumer, SimpleConsumer, TransactionChecker,
                      TransactionResolution)

ENDPOINT = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8081"
LEASE_S = 30


class CaseFailed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise CaseFailed(what)


def config():
    return ClientConfiguration(ENDPOINT, Credentials(), request_timeout=10)


def message(topic, body, tag=None, keys=(), group=None, deliver_at_s=None):
    m = Message()
    m.topic = topic
    m.body = body.encode()
    if tag:
        m.tag = tag
    for k in keys:
        m.keys = k
    if group:
        m.message_group = group
    if deliver_at_s:
        # The client puts this number in the protobuf timestamp's seconds as it is (its
        # docstring says ms, but ms are refused as too far ahead, by RocketMQ as by halfmq).
        m.delivery_timestamp = deliver_at_s
    return m


@contextlib.contextmanager
def started(client):
    """`client` started, and shut down when the block ends, however it ends."""
    client.startup()
    try:
        yield client
    finally:
        client.shutdown()


def producer(topics, checker=None):
    return started(Producer(config(), topics, checker=checker))


def consumer(group, topic, expression="*", await_s=2):
    return started(SimpleConsumer(config(), group, {topic: FilterExpression(expression)},
                                  await_duration=await_s))


def push_consumer(group, topic, listener):
    return started(PushConsumer(config(), group, listener, {topic: FilterExpression()}))


class Recorder:
    """What a client's callbacks saw, in `seen`: they run on the client's threads, so `seen`
    is read and changed under `lock`."""

    def __init__(self, empty):
        self.lock = threading.Lock()
        self.seen = empty

    def wait_for(self, done):
        """Wait up to 20 s for `done(seen)` to hold."""
        until = time.time() + 20
        while time.time() < until:
            with self.lock:
                if done(self.seen):
                    return
            time.sleep(0.1)

    def snapshot(self):
        """A copy of `seen` as it is now."""
        with self.lock:
            return copy.deepcopy(self.seen)


def receive_n(c, n, lease_s=LEASE_S, tries=10):
    """Receive until n messages came or `tries` receives passed."""
    got = []
    for _ in range(tries):
        if len(got) >= n:
            break
        got.extend(c.receive(16, lease_s))
    return got


def nothing_more(c):
    got = c.receive(16, LEASE_S)
    check(not got, f"{len(got)} more message(s) came: {[m.body for m in got]}")


def body(m):
    return m.body.decode()


def case_plain():
    with producer(["orders"]) as p:
        m = message("orders", "paid 12.50", tag="paid", keys=["order-42", "user-7"])
        m.add_property("region", "eu")
        r = p.send(m)
        check(r.message_id, "no message id in the receipt")
        return {"message_id": r.message_id}


class BodyChecker(Recorder, TransactionChecker):
    """Commits what it is asked about when the body says so, rolls back `roll me back`,
    answers unknown otherwise (the transactions the producer ends itself); `seen` counts
    the check-backs per body."""

    def check(self, message):
        b = body(message)
        with self.lock:
            self.seen[b] = self.seen.get(b, 0) + 1
        if b == "commit me":
            return TransactionResolution.COMMIT
        if b == "roll me back":
            return TransactionResolution.ROLLBACK
        return TransactionResolution.TRANSACTION_RESOLUTION_UNSPECIFIED


def case_transactions():
    checker = BodyChecker({})
    with producer(["txn"], checker) as p:
        txns = {}
        for b in ["kept", "dropped", "commit me", "roll me back"]:
            t = p.begin_transaction()
            r = p.send(message("txn", b, keys=[b.replace(" ", "-")]), transaction=t)
            check(r.transaction_id, f"no transaction id for {b!r}")
            txns[b] = (t, r.transaction_id)
        txns["kept"][0].commit()
        txns["dropped"][0].rollback()
        # The other two are left to check-back: the broker asks this producer.
        checker.wait_for(lambda asked: "commit me" in asked and "roll me back" in asked)
        asked = checker.snapshot()
        check("commit me" in asked and "roll me back" in asked,
              f"check-back did not ask about both: {asked}")
        # The checker's answer is sent by EndTransaction after check() returns.
        time.sleep(1)
        return {"transactions": {b: tid for b, (_, tid) in txns.items()}, "asked": asked}


def case_delayed():
    with producer(["reminders"]) as p, consumer("reminder-readers", "reminders") as c:
        at_s = int(time.time()) + 3
        at_ms = at_s * 1000
        r = p.send(message("reminders", "later", deliver_at_s=at_s))
        got = receive_n(c, 1)
        now_ms = int(time.time() * 1000)
        check(len(got) == 1, f"{len(got)} delayed message(s) came")
        check(now_ms >= at_ms, f"delivered {at_ms - now_ms} ms before its time")
        check(got[0].message_id == r.message_id, "another message id came")
        check(got[0].delivery_timestamp == at_ms,
              f"delivery_timestamp {got[0].delivery_timestamp} != {at_ms}")
        c.ack(got[0])
        return {"message_id": r.message_id, "deliver_at_ms": at_ms}


def case_consume():
    with producer(["work"]) as p, consumer("workers", "work") as c:
        sent = sorted(
            p.send(message("work", f"job {i}", tag="job", keys=[f"job-{i}"])).message_id
            for i in range(3))
        got = receive_n(c, 3)
        check(sorted(m.message_id for m in got) == sent, f"received {len(got)} of 3")
        for m in got:
            check((m.tag, m.delivery_attempt) == ("job", 1),
                  f"tag {m.tag} attempt {m.delivery_attempt}")
        for m in got[:2]:
            c.ack(m)
        slow = got[2]
        # Renew the lease, then shorten it to 1 s: not acked in time, it comes again as
        # the second attempt. Every handle before the redelivery is stale then.
        first_handle = slow.receipt_handle
        c.change_invisible_duration(slow, 60)
        renewed_handle = slow.receipt_handle
        check(renewed_handle and renewed_handle != first_handle,
              "ChangeInvisibleDuration gave no new handle")
        c.change_invisible_duration(slow, 1)
        again = receive_n(c, 1)
        check(len(again) == 1, f"{len(again)} message(s) came again")
        check((again[0].message_id, again[0].delivery_attempt) == (slow.message_id, 2),
              f"came again: {again[0].message_id} attempt {again[0].delivery_attempt}")
        stale = []
        for h in [first_handle, renewed_handle]:
            slow.receipt_handle = h
            try:
                c.ack(slow)
            except Exception as e:  # the refusal, as the client raises it
                stale.append(str(e))
        check(len(stale) == 2, "a stale handle's ack was accepted")
        check(all("stale" in s for s in stale), f"refusals do not say stale: {stale}")
        c.ack(again[0])
        nothing_more(c)
        return {"message_ids": sent, "stale_refusal": stale[0]}


def case_tags():
    with producer(["tags"]) as p, consumer("billing", "tags", "paid || refund") as c:
        for tag, b in [("paid", "p1"), ("refund", "r1"), ("shipped", "s1"), ("paid", "p2")]:
            p.send(message("tags", b, tag=tag))
        got = receive_n(c, 3)
        check(sorted(body(m) for m in got) == ["p1", "p2", "r1"],
              f"received {sorted(body(m) for m in got)}")
        for m in got:
            c.ack(m)
        nothing_more(c)
        return {"received": sorted(body(m) for m in got)}


def case_fifo():
    with producer(["ledger"]) as p, consumer("books", "ledger") as c:
        for group, b in [("acct-1", "a0"), ("acct-2", "b0"), ("acct-1", "a1"), ("acct-1", "a2")]:
            p.send(message("ledger", b, group=group))
        heads = receive_n(c, 2)
        check(sorted(body(m) for m in heads) == ["a0", "b0"],
              f"heads {sorted(body(m) for m in heads)}")
        # a1 does not come before a0 is acked.
        nothing_more(c)
        for m in heads:
            check(m.message_group in ("acct-1", "acct-2"), f"group {m.message_group}")
            c.ack(m)
        order = []
        for want in ["a1", "a2"]:
            got = receive_n(c, 1)
            check(len(got) == 1, f"waiting for {want}: {len(got)} came")
            check((body(got[0]), got[0].message_group) == (want, "acct-1"),
                  f"{body(got[0])} of {got[0].message_group} came, not {want}")
            order.append(body(got[0]))
            c.ack(got[0])
        return {"order": order}


class FlakyListener(Recorder, MessageListener):
    """Fails `retry me` once and `poison` always; `seen` has each body's delivery attempts."""

    def consume(self, message):
        b = body(message)
        with self.lock:
            self.seen.setdefault(b, []).append(message.delivery_attempt)
            n = len(self.seen[b])
        if b == "poison" or (b == "retry me" and n == 1):
            return ConsumeResult.FAILURE
        return ConsumeResult.SUCCESS


def case_push():
    """A push consumer (group `pushers`: one retry): successes acked, a failure retried as
    attempt 2, and a message failing both attempts dead-lettered. The client gives a failed
    message back with ChangeInvisibleDuration (the group's backoff in whole seconds: 200 ms
    is 0 s to it); past the group's retries the broker dead-letters it."""
    listener = FlakyListener({})
    want = {"ok 1": [1], "ok 2": [1], "retry me": [1, 2], "poison": [1, 2]}
    with producer(["push"]) as p, push_consumer("pushers", "push", listener):
        for b in want:
            p.send(message("push", b, keys=[b.replace(" ", "-")]))
        listener.wait_for(lambda seen: seen == want)
        # Time for the last acks and the forward to land.
        time.sleep(1)
        seen = listener.snapshot()
        check(seen == want, f"deliveries {seen}, wanted {want}")
        return {"seen": seen}


class OrderListener(Recorder, MessageListener):
    """Fails `first` always; `seen` has the bodies in the order they came."""

    def consume(self, message):
        with self.lock:
            self.seen.append(body(message))
        return ConsumeResult.FAILURE if body(message) == "first" else ConsumeResult.SUCCESS


def case_fifo_push():
    """A FIFO push consumer (group `fifo-pushers`): a message failing every attempt holds
    back the next of its message group until the client gives up and forwards it to the dead
    letters (ForwardMessageToDeadLetterQueue); then the next one comes."""
    listener = OrderListener([])
    with producer(["fifo-push"]) as p, push_consumer("fifo-pushers", "fifo-push", listener):
        for b in ["first", "second"]:
            p.send(message("fifo-push", b, keys=[b], group="acct-9"))
        listener.wait_for(lambda order: "second" in order)
        time.sleep(1)
        order = listener.snapshot()
        check(order and order[-1] == "second" and order.count("second") == 1
              and set(order[:-1]) == {"first"}, f"came in order {order}")
        return {"order": order}


def case_refused():
    """A message priority (which halfmq does not have) is refused, saying so, not stored: the
    route says which message types the queues accept, and the client checks it."""
    with producer(["orders"]) as p:
        m = message("orders", "urgent")
        m.priority = 1
        try:
            p.send(m)
        except Exception as e:  # the refusal, as the client raises it
            said = str(e)
            check("PRIORITY" in said and "NORMAL,FIFO,DELAY,TRANSACTION" in said,
                  f"refused unclearly: {said}")
            return {"refusal": str(e)}
        raise CaseFailed("a priority message was accepted")


class SlowListener(Recorder, MessageListener):
    """Takes 3 s for each message; `seen` has the attempts of each body."""

    def consume(self, message):
        with self.lock:
            self.seen.setdefault(body(message), []).append(message.delivery_attempt)
        time.sleep(3)
        return ConsumeResult.SUCCESS


def case_slow_push():
    """A push consumer (group `slow-pushers`: 1 s leases) whose listener takes 3 s: the
    endpoint renews the lease (the consumer receives with auto_renew), so the message is
    handed out once and acked."""
    listener = SlowListener({})
    with producer(["slow-push"]) as p, push_consumer("slow-pushers", "slow-push", listener):
        p.send(message("slow-push", "slow"))
        listener.wait_for(lambda seen: bool(seen))
        # The listener's 3 s, and time for a redelivery to show, were the lease not renewed.
        time.sleep(5)
        seen = listener.snapshot()
        check(seen == {"slow": [1]}, f"deliveries {seen}")
        return {"seen": seen}


CASES = [
    ("plain", case_plain),
    ("transactions", case_transactions),
    ("delayed", case_delayed),
    ("consume", case_consume),
    ("tags", case_tags),
    ("fifo", case_fifo),
    ("refused", case_refused),
    ("push", case_push),
    ("fifo_push", case_fifo_push),
    ("slow_push", case_slow_push),
]


def main():
    only = sys.argv[2:]
    failed = 0
    for name, run in CASES:
        if only and name not in only:
            continue
        started = time.time()
        try:
            out = {"case": name, "ok": True, **run()}
        except Exception as e:
            failed += 1
            out = {"case": name, "ok": False, "error": f"{type(e).__name__}: {e}",
                   "trace": traceback.format_exc()}
        out["seconds"] = round(time.time() - started, 2)
        print(json.dumps(out), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
