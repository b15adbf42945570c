// The official Apache RocketMQ Node.js client (rocketmq-client-nodejs) against halfmq's
// RocketMQ 5 endpoint, run by tests/other_clients.rs.
//
// Usage: node official_client.js <host:port> [case...]
//
// The broker behind the endpoint has the topics orders, txn, reminders, work, tags and
// ledger, and the consumer group `books` is FIFO. Each case prints one JSON line
// {"case": ..., "ok": true|false, ...}; what the broker must hold afterwards is checked by
// the Rust test from what the lines report. Exits 1 if any case failed.
'use strict';

const {
  Producer, SimpleConsumer, PushConsumer, ConsumeResult,
} = require('rocketmq-client-nodejs');
const {
  TransactionResolution,
} = require('rocketmq-client-nodejs/proto/apache/rocketmq/v2/definition_pb');

const ENDPOINT = process.argv[2] || '127.0.0.1:8081';
const LEASE_MS = 30000;

// The client's warnings and errors go to stderr (the Rust test shows them on failure).
const logger = {
  info() {},
  debug() {},
  warn(...args) { console.error('warn:', ...args); },
  error(...args) { console.error('error:', ...args); },
};

class CaseFailed extends Error {}

function check(cond, what) {
  if (!cond) throw new CaseFailed(what);
}

const sleep = ms => new Promise(r => setTimeout(r, ms));

function options() {
  return { endpoints: ENDPOINT, namespace: '', requestTimeout: 10000, logger };
}

async function producer(topics, checker) {
  const p = new Producer({ ...options(), topics, checker });
  await p.startup();
  return p;
}

async function consumer(group, topic, expression = '*') {
  const c = new SimpleConsumer({
    ...options(),
    consumerGroup: group,
    subscriptions: new Map([[ topic, expression ]]),
    awaitDuration: 2000,
  });
  await c.startup();
  return c;
}

/** A push consumer of `group` on every message of `topic`, answering with `consume(view)`. */
async function pushConsumer(group, topic, consume) {
  const c = new PushConsumer({
    ...options(),
    consumerGroup: group,
    subscriptions: new Map([[ topic, '*' ]]),
    messageListener: { consume },
  });
  await c.startup();
  return c;
}

/**
 * Start the clients `starts` make, in order, run `work` with them and shut down those that
 * started, last first, however `work` ends.
 */
async function withClients(starts, work) {
  const clients = [];
  try {
    for (const start of starts) clients.push(await start());
    return await work(...clients);
  } finally {
    for (const c of clients.reverse()) await c.shutdown();
  }
}

/** Wait up to 20 s for `done()` to hold. */
async function waitFor(done) {
  const until = Date.now() + 20000;
  while (Date.now() < until && !done()) await sleep(100);
}

/** Receive until n messages came or `tries` receives passed. */
async function receiveN(c, n, leaseMs = LEASE_MS, tries = 10) {
  const got = [];
  for (let i = 0; i < tries && got.length < n; i++) {
    got.push(...await c.receive(16, leaseMs));
  }
  return got;
}

async function nothingMore(c) {
  const got = await c.receive(16, LEASE_MS);
  check(got.length === 0, `${got.length} more message(s) came: ${got.map(body)}`);
}

const body = m => m.body.toString();
const sorted = a => [ ...a ].sort();
const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

async function casePlain() {
  return withClients([ () => producer([ 'orders' ]) ], async p => {
    const r = await p.send({
      topic: 'orders',
      body: Buffer.from('paid 12.50'),
      tag: 'paid',
      keys: [ 'order-42', 'user-7' ],
      properties: new Map([[ 'region', 'eu' ]]),
    });
    check(r.messageId, 'no message id in the receipt');
    return { message_id: r.messageId };
  });
}

async function caseTransactions() {
  // Commits what it is asked about when the body says so, rolls back `roll me back`,
  // answers unknown otherwise (the transactions the producer ends itself).
  const asked = {};
  const checker = {
    async check(view) {
      const b = body(view);
      asked[b] = (asked[b] || 0) + 1;
      if (b === 'commit me') return TransactionResolution.COMMIT;
      if (b === 'roll me back') return TransactionResolution.ROLLBACK;
      return TransactionResolution.TRANSACTION_RESOLUTION_UNSPECIFIED;
    },
  };
  return withClients([ () => producer([ 'txn' ], checker) ], async p => {
    const txns = {};
    for (const b of [ 'kept', 'dropped', 'commit me', 'roll me back' ]) {
      const t = p.beginTransaction();
      const r = await p.send({ topic: 'txn', body: Buffer.from(b), keys: [ b.replace(/ /g, '-') ] }, t);
      check(r.transactionId, `no transaction id for ${b}`);
      txns[b] = [ t, r.transactionId ];
    }
    await txns.kept[0].commit();
    await txns.dropped[0].rollback();
    // The other two are left to check-back: the broker asks this producer.
    const bothAsked = () => asked['commit me'] && asked['roll me back'];
    await waitFor(bothAsked);
    check(bothAsked(), `check-back did not ask about both: ${JSON.stringify(asked)}`);
    // The checker's answer is sent by EndTransaction after check() returns.
    await sleep(1000);
    const transactions = {};
    for (const [ b, [ , id ] ] of Object.entries(txns)) transactions[b] = id;
    return { transactions, asked };
  });
}

async function caseDelayed() {
  const starts = [ () => producer([ 'reminders' ]), () => consumer('reminder-readers', 'reminders') ];
  return withClients(starts, async (p, c) => {
    const at = new Date(Date.now() + 2000);
    const r = await p.send({ topic: 'reminders', body: Buffer.from('later'), deliveryTimestamp: at });
    const got = await receiveN(c, 1);
    const now = Date.now();
    check(got.length === 1, `${got.length} delayed message(s) came`);
    check(now >= at.getTime(), `delivered ${at.getTime() - now} ms before its time`);
    check(got[0].messageId === r.messageId, 'another message id came');
    const shown = got[0].deliveryTimestamp && got[0].deliveryTimestamp.getTime();
    check(shown === at.getTime(), `deliveryTimestamp ${shown} != ${at.getTime()}`);
    await c.ack(got[0]);
    return { message_id: r.messageId, deliver_at_ms: at.getTime() };
  });
}

async function caseConsume() {
  return withClients([ () => producer([ 'work' ]), () => consumer('workers', 'work') ], async (p, c) => {
    const sent = [];
    for (let i = 0; i < 3; i++) {
      const r = await p.send({ topic: 'work', body: Buffer.from(`job ${i}`), tag: 'job', keys: [ `job-${i}` ] });
      sent.push(r.messageId);
    }
    const got = await receiveN(c, 3);
    check(same(sorted(got.map(m => m.messageId)), sorted(sent)), `received ${got.length} of 3`);
    for (const m of got) {
      check(m.tag === 'job' && m.deliveryAttempt === 1, `tag ${m.tag} attempt ${m.deliveryAttempt}`);
    }
    for (const m of got.slice(0, 2)) await c.ack(m);
    const slow = got[2];
    // Renew the lease, then shorten it to 1 s: not acked in time, it comes again as the
    // second attempt. Every handle before the redelivery is stale then.
    const firstHandle = slow.receiptHandle;
    await c.changeInvisibleDuration(slow, 60000);
    const renewedHandle = slow.receiptHandle;
    check(renewedHandle && renewedHandle !== firstHandle, 'ChangeInvisibleDuration gave no new handle');
    await c.changeInvisibleDuration(slow, 1000);
    const again = await receiveN(c, 1);
    check(again.length === 1, `${again.length} message(s) came again`);
    check(again[0].messageId === slow.messageId && again[0].deliveryAttempt === 2,
      `came again: ${again[0].messageId} attempt ${again[0].deliveryAttempt}`);
    const stale = [];
    for (const h of [ firstHandle, renewedHandle ]) {
      slow.receiptHandle = h;
      try {
        await c.ack(slow);
      } catch (e) {
        stale.push(String(e.message || e));
      }
    }
    check(stale.length === 2, 'a stale handle\'s ack was accepted');
    check(stale.every(s => s.includes('stale')), `refusals do not say stale: ${stale}`);
    await c.ack(again[0]);
    await nothingMore(c);
    return { message_ids: sorted(sent), stale_refusal: stale[0] };
  });
}

async function caseTags() {
  const starts = [ () => producer([ 'tags' ]), () => consumer('billing', 'tags', 'paid || refund') ];
  return withClients(starts, async (p, c) => {
    for (const [ tag, b ] of [[ 'paid', 'p1' ], [ 'refund', 'r1' ], [ 'shipped', 's1' ], [ 'paid', 'p2' ]]) {
      await p.send({ topic: 'tags', body: Buffer.from(b), tag });
    }
    const got = await receiveN(c, 3);
    const bodies = sorted(got.map(body));
    check(same(bodies, [ 'p1', 'p2', 'r1' ]), `received ${bodies}`);
    for (const m of got) await c.ack(m);
    await nothingMore(c);
    return { received: bodies };
  });
}

async function caseFifo() {
  return withClients([ () => producer([ 'ledger' ]), () => consumer('books', 'ledger') ], async (p, c) => {
    for (const [ group, b ] of [[ 'acct-1', 'a0' ], [ 'acct-2', 'b0' ], [ 'acct-1', 'a1' ], [ 'acct-1', 'a2' ]]) {
      await p.send({ topic: 'ledger', body: Buffer.from(b), messageGroup: group });
    }
    const heads = await receiveN(c, 2);
    check(same(sorted(heads.map(body)), [ 'a0', 'b0' ]), `heads ${sorted(heads.map(body))}`);
    // a1 does not come before a0 is acked.
    await nothingMore(c);
    for (const m of heads) {
      check([ 'acct-1', 'acct-2' ].includes(m.messageGroup), `group ${m.messageGroup}`);
      await c.ack(m);
    }
    const order = [];
    for (const want of [ 'a1', 'a2' ]) {
      const got = await receiveN(c, 1);
      check(got.length === 1, `waiting for ${want}: ${got.length} came`);
      check(body(got[0]) === want && got[0].messageGroup === 'acct-1',
        `${body(got[0])} of ${got[0].messageGroup} came, not ${want}`);
      order.push(body(got[0]));
      await c.ack(got[0]);
    }
    return { order };
  });
}

// A message priority (which halfmq does not have) is refused, saying so, not stored: the
// route says which message types the queues accept, and the client checks it.
async function caseRefused() {
  return withClients([ () => producer([ 'orders' ]) ], async p => {
    try {
      await p.send({ topic: 'orders', body: Buffer.from('urgent'), priority: 1 });
    } catch (e) {
      const said = String(e.message || e);
      check(said.includes('actualMessageType=6') && said.includes('acceptMessageTypes=[1,2,3,4]'),
        `refused unclearly: ${said}`);
      return { refusal: said };
    }
    throw new CaseFailed('a priority message was accepted');
  });
}

// A push consumer (group `pushers`: one retry): successes acked, a failure retried as
// attempt 2, and a message failing both attempts dead-lettered. The client gives a failed
// message back with ChangeInvisibleDuration (at once: it ignores the customized backoff the
// endpoint sends); past the group's retries the broker dead-letters it.
async function casePush() {
  const seen = {};
  const started = Date.now();
  const at = [];
  const consume = async view => {
    const b = body(view);
    (seen[b] = seen[b] || []).push(view.deliveryAttempt);
    at.push(`${b}#${view.deliveryAttempt}@${Date.now() - started}ms`);
    const failing = b === 'poison' || (b === 'retry me' && seen[b].length === 1);
    return failing ? ConsumeResult.FAILURE : ConsumeResult.SUCCESS;
  };
  const want = { 'ok 1': [ 1 ], 'ok 2': [ 1 ], 'retry me': [ 1, 2 ], poison: [ 1, 2 ] };
  const starts = [ () => producer([ 'push' ]), () => pushConsumer('pushers', 'push', consume) ];
  return withClients(starts, async p => {
    for (const b of Object.keys(want)) {
      await p.send({ topic: 'push', body: Buffer.from(b), keys: [ b.replace(/ /g, '-') ] });
    }
    const done = () => same(Object.keys(seen).sort().map(k => [ k, seen[k] ]),
      Object.keys(want).sort().map(k => [ k, want[k] ]));
    await waitFor(done);
    // Time for the last acks and the forward to land.
    await sleep(1000);
    check(done(), `deliveries ${JSON.stringify(seen)}, wanted ${JSON.stringify(want)}`);
    return { seen, at };
  });
}

// A FIFO push consumer (group `fifo-pushers`): a message failing every attempt holds back the
// next of its message group until the client gives up and forwards it to the dead letters
// (ForwardMessageToDeadLetterQueue); then the next one comes.
async function caseFifoPush() {
  const order = [];
  const consume = async view => {
    order.push(body(view));
    return body(view) === 'first' ? ConsumeResult.FAILURE : ConsumeResult.SUCCESS;
  };
  const starts = [ () => producer([ 'fifo-push' ]), () => pushConsumer('fifo-pushers', 'fifo-push', consume) ];
  return withClients(starts, async p => {
    for (const b of [ 'first', 'second' ]) {
      await p.send({ topic: 'fifo-push', body: Buffer.from(b), keys: [ b ], messageGroup: 'acct-9' });
    }
    await waitFor(() => order.includes('second'));
    await sleep(1000);
    const before = order.slice(0, -1);
    check(order.length > 1 && order[order.length - 1] === 'second' && before.every(b => b === 'first'),
      `came in order ${order}`);
    return { order };
  });
}

// A push consumer (group `slow-pushers`: 1 s leases) whose listener takes 3 s: the endpoint
// renews the lease (the consumer receives with auto_renew), so the message is handed out
// once and acked.
async function caseSlowPush() {
  const p = await producer([ 'slow-push' ]);
  const seen = {};
  const c = new PushConsumer({
    ...options(),
    consumerGroup: 'slow-pushers',
    subscriptions: new Map([[ 'slow-push', '*' ]]),
    messageListener: {
      async consume(view) {
        const b = body(view);
        (seen[b] = seen[b] || []).push(view.deliveryAttempt);
        await sleep(3000);
        return ConsumeResult.SUCCESS;
      },
    },
  });
  await c.startup();
  try {
    await p.send({ topic: 'slow-push', body: Buffer.from('slow') });
    const until = Date.now() + 20000;
    while (Date.now() < until && !seen.slow) await sleep(100);
    // The listener's 3 s, and time for a redelivery to show, were the lease not renewed.
    await sleep(5000);
    check(same(seen, { slow: [ 1 ] }), `deliveries ${JSON.stringify(seen)}`);
    return { seen };
  } finally {
    await c.shutdown();
    await p.shutdown();
  }
}

const CASES = [
  [ 'plain', casePlain ],
  [ 'transactions', caseTransactions ],
  [ 'delayed', caseDelayed ],
  [ 'consume', caseConsume ],
  [ 'tags', caseTags ],
  [ 'fifo', caseFifo ],
  [ 'refused', caseRefused ],
  // Run side by side: a PushConsumer's shutdown waits for its receive in flight (up to the
  // 20 s long poll), and these use their own topics and groups.
  [[ 'push', casePush ], [ 'fifo_push', caseFifoPush ], [ 'slow_push', caseSlowPush ]],
];

async function main() {
  const only = process.argv.slice(3);
  let failed = 0;
  const runCase = async ([ name, run ]) => {
    if (only.length && !only.includes(name)) return;
    const started = Date.now();
    let out;
    try {
      out = { case: name, ok: true, ...await run() };
    } catch (e) {
      failed++;
      out = { case: name, ok: false, error: `${e.name}: ${e.message}`, trace: String(e.stack) };
    }
    out.seconds = (Date.now() - started) / 1000;
    console.log(JSON.stringify(out));
  };
  for (const entry of CASES) {
    await (Array.isArray(entry[0]) ? Promise.all(entry.map(runCase)) : runCase(entry));
  }
  process.exit(failed ? 1 : 0);
}

main();
