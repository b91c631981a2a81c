// Unit tests of the client's bookkeeping (no browser, no server): node --test tests/store.test.mjs

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ChatStore, STORAGE_PREFIX, isAddressableUserId, isValidUserId, int, pastedTokenUser } from '../public/store.js';
import { BACKOFF, Connection, STABLE_MS, backoffCeiling, backoffDelay } from '../public/connection.js';

class MemoryStorage {
  constructor() { this.m = new Map(); }
  getItem(k) { return this.m.has(k) ? this.m.get(k) : null; }
  setItem(k, v) { this.m.set(k, String(v)); }
  removeItem(k) { this.m.delete(k); }
}

let clock = 1_700_000_000_000;
const now = () => (clock += 1);

function wire(seq, sender, recipient, body = `m${seq}`, extra = {}) {
  const [lo, hi] = [sender, recipient].sort();
  return {
    messageId: `id-${sender}-${seq}`,
    clientMessageId: `c-${sender}-${seq}`,
    sender,
    recipient,
    body,
    sentAtMs: String(1_700_000_000_000 + seq),
    seq: String(seq),
    conversation: `${lo}:${hi}`,
    ...extra,
  };
}

const bodies = (s, peer) => s.messages(peer).map((m) => m.body);

test('proto3 JSON helpers', () => {
  assert.equal(int(undefined), 0);
  assert.equal(int('42'), 42);
  assert.ok(isValidUserId('a.b-c_9'));
  assert.ok(!isValidUserId('a:b'));
  assert.ok(!isValidUserId(''));
  assert.ok(!isValidUserId('x'.repeat(65)));
});

test('a typed user id is neither "." nor "..", which stored ids may still be', () => {
  for (const dots of ['.', '..']) {
    assert.ok(!isAddressableUserId(dots), dots);
    assert.ok(isValidUserId(dots), dots);
  }
  for (const fine of ['...', '.a', 'a..b', 'alice']) assert.ok(isAddressableUserId(fine), fine);
  for (const bad of ['', 'a/b', 'x'.repeat(65), undefined]) assert.ok(!isAddressableUserId(bad), String(bad));
});

test('a pasted token signs in as its subject, unless that is no user id or "." / ".."', () => {
  // Unsigned tokens with the given claims, base64url as a JWT carries them (no padding).
  const b64url = (o) => Buffer.from(JSON.stringify(o)).toString('base64').replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
  const token = (claims) => `${b64url({ alg: 'RS256', typ: 'JWT' })}.${b64url(claims)}.c2ln`;
  for (const user of ['alice', 'a.b-c_9', '...', 'x'.repeat(64)]) {
    // A claim whose base64url holds '-' and '_', which atob reads only once they are turned back.
    const t = token({ sub: user, exp: 2000000000, note: '~?~?~?' });
    assert.match(t.split('.')[1], /-/);
    assert.match(t.split('.')[1], /_/);
    assert.deepEqual(pastedTokenUser(t), { user }, user);
  }
  for (const dots of ['.', '..']) {
    const r = pastedTokenUser(token({ sub: dots }));
    assert.equal(r.user, undefined, dots);
    assert.match(r.error, /may not be "\." or "\.\."/, dots);
  }
  for (const sub of ['a/b', '', 'x'.repeat(65), 42, null, undefined]) {
    const r = pastedTokenUser(token({ sub }));
    assert.equal(r.user, undefined, String(sub));
    assert.match(r.error, /subject is not a user id/, String(sub));
  }
  for (const junk of ['', 'abc', 'a.b', 'a.!!!.c', `${b64url({})}.${Buffer.from('not json').toString('base64')}.x`, undefined]) {
    const r = pastedTokenUser(junk);
    assert.equal(r.user, undefined, String(junk));
    assert.match(r.error, /does not look like an access token/, String(junk));
  }
});

test('a message delivered twice (sync + live + history) is kept once', () => {
  const s = new ChatStore('bob', new MemoryStorage(), now);
  assert.equal(s.ingest(wire(1, 'alice', 'bob'), { live: true }).isNew, true);
  assert.equal(s.ingest(wire(1, 'alice', 'bob'), { live: true }).isNew, false);
  s.ingestPage('alice', [wire(1, 'alice', 'bob')], undefined, { latest: true });
  assert.deepEqual(bodies(s, 'alice'), ['m1']);
  assert.equal(s.unread('alice'), 1);
});

test('messages are ordered by seq whatever the arrival order; unknown seqs go last', () => {
  const s = new ChatStore('bob', new MemoryStorage(), now);
  s.ingest(wire(3, 'alice', 'bob'), { live: true });
  s.ingest(wire(1, 'alice', 'bob'), { live: true });
  const mine = s.addOutgoing('alice', 'mine');
  s.ingest(wire(2, 'alice', 'bob'), { live: true });
  assert.deepEqual(bodies(s, 'alice'), ['m1', 'm2', 'm3', 'mine']);
  assert.equal(mine.status, 'sending');
});

test('own message learns its seq from history and slots in order', () => {
  const s = new ChatStore('bob', new MemoryStorage(), now);
  s.ingest(wire(1, 'alice', 'bob'), { live: true });
  const mine = s.addOutgoing('alice', 'reply');
  s.markAccepted({ clientMessageId: mine.clientMessageId, messageId: 'id-reply', sentAtMs: '9', conversation: 'alice:bob' });
  s.ingest(wire(3, 'alice', 'bob'), { live: true });
  assert.deepEqual(bodies(s, 'alice'), ['m1', 'm3', 'reply']);
  assert.ok(s.hasGap('alice'));
  assert.equal(s.ackTarget('alice'), 1, 'acks stop at the hole');
  s.ingestPage('alice', [
    wire(1, 'alice', 'bob'),
    { ...wire(2, 'bob', 'alice', 'reply'), messageId: 'id-reply', clientMessageId: mine.clientMessageId },
    wire(3, 'alice', 'bob'),
  ], undefined, { latest: true, synced: true });
  assert.deepEqual(bodies(s, 'alice'), ['m1', 'reply', 'm3']);
  assert.equal(s.messages('alice').length, 3);
  assert.equal(s.ackTarget('alice'), 3);
  assert.equal(s.ackTarget('alice', 3), 0, 'nothing new to ack');
});

test('the history floor applies only once the connection has synced', () => {
  const s = new ChatStore('bob', new MemoryStorage(), now);
  s.ingest(wire(101, 'alice', 'bob'), { live: true });
  const page = Array.from({ length: 100 }, (_, i) => wire(i + 2, 'alice', 'bob'));
  s.ingestPage('alice', page, '2', { latest: true, synced: false });
  assert.equal(s.ackTarget('alice'), 0, 'seq 1 is not held: no ack before the sync is done');
  s.ingestPage('alice', page, '2', { latest: true, synced: true });
  assert.equal(s.ackTarget('alice'), 101);
  assert.equal(s.conversation('alice').olderBefore, 2);
});

test('an ack covers only a contiguous run and only if it includes a message from the peer', () => {
  const s = new ChatStore('bob', new MemoryStorage(), now);
  s.ingest(wire(1, 'alice', 'bob'), { live: true });
  s.ingest(wire(2, 'alice', 'bob'), { live: true });
  s.ingest(wire(4, 'alice', 'bob'), { live: true });
  assert.equal(s.ackTarget('alice'), 2);
  assert.equal(s.ackTarget('alice', 2), 0);
  s.ingest(wire(3, 'alice', 'bob'), { live: true });
  assert.equal(s.ackTarget('alice', 2), 4);
  assert.deepEqual(s.lastSeqMap(), { alice: '4' });
});

test('send states: sending -> accepted -> delivered (receipt + seq), failed -> retry', () => {
  const s = new ChatStore('alice', new MemoryStorage(), now);
  const m = s.addOutgoing('bob', 'hi');
  assert.equal(m.status, 'sending');
  assert.deepEqual(s.pendingSends().map((x) => x.body), ['hi']);
  s.markFailed(m.clientMessageId, 'produce_failed');
  assert.equal(m.status, 'failed');
  assert.equal(s.pendingSends().length, 0);
  s.markSending(m.clientMessageId);
  assert.equal(m.status, 'sending');
  s.markAccepted({ clientMessageId: m.clientMessageId, messageId: 'mid', sentAtMs: '7', conversation: 'alice:bob' });
  assert.equal(m.status, 'accepted');
  // A receipt before the seq is known changes nothing yet...
  s.applyReceipt('bob', '1');
  assert.equal(m.status, 'accepted');
  assert.equal(s.unknownSeqs('bob'), 1);
  // ...history tells the seq, and the receipt already recorded covers it.
  s.ingestPage('bob', [{ ...wire(1, 'alice', 'bob', 'hi'), messageId: 'mid', clientMessageId: m.clientMessageId }], undefined, { latest: true });
  assert.equal(m.status, 'delivered');
  assert.equal(s.messages('bob').length, 1);
});

test('a failed send the server did store is shown as accepted once history says so', () => {
  const s = new ChatStore('alice', new MemoryStorage(), now);
  const m = s.addOutgoing('bob', 'hi');
  s.markFailed(m.clientMessageId, 'no answer');
  s.ingestPage('bob', [{ ...wire(1, 'alice', 'bob', 'hi'), clientMessageId: m.clientMessageId }], undefined, { latest: true });
  assert.equal(m.status, 'accepted');
  assert.equal(m.messageId, 'id-alice-1');
  // The late `accepted` of the retry maps onto the same message, and its time (the retry's)
  // does not replace the stored message's.
  s.markAccepted({ clientMessageId: m.clientMessageId, messageId: 'id-alice-1', sentAtMs: '1', conversation: 'alice:bob' });
  assert.equal(s.messages('bob').length, 1);
  assert.equal(m.sentAtMs, 1_700_000_000_001);
});

test("a retry's `accepted` gives the message a time until the stored message's comes", () => {
  const s = new ChatStore('alice', new MemoryStorage(), now);
  const m = s.addOutgoing('bob', 'hi');
  // The first attempt's answer was lost; the retry, half an hour on, is answered with its time.
  s.markAccepted({ clientMessageId: m.clientMessageId, messageId: 'id-alice-1', sentAtMs: '1700000001800', conversation: 'alice:bob' });
  assert.equal(m.sentAtMs, 1_700_000_001_800);
  // History brings the stored message: the first attempt's time, which bob was shown.
  s.ingestPage('bob', [{ ...wire(1, 'alice', 'bob', 'hi'), clientMessageId: m.clientMessageId }], undefined, { latest: true });
  assert.equal(m.sentAtMs, 1_700_000_000_001);
  // Yet another answer to a repeat does not move it back, and the time outlives a reload.
  s.markAccepted({ clientMessageId: m.clientMessageId, messageId: 'id-alice-1', sentAtMs: '1700000002400', conversation: 'alice:bob' });
  assert.equal(m.sentAtMs, 1_700_000_000_001);
  const storage = new MemoryStorage();
  const t = new ChatStore('alice', storage, now);
  const n = t.addOutgoing('bob', 'hi');
  t.ingestPage('bob', [{ ...wire(1, 'alice', 'bob', 'hi'), clientMessageId: n.clientMessageId }], undefined, { latest: true });
  t.save();
  const reloaded = new ChatStore('alice', storage, now);
  reloaded.markAccepted({ clientMessageId: n.clientMessageId, messageId: 'id-alice-1', sentAtMs: '1700000002400', conversation: 'alice:bob' });
  assert.equal(reloaded.messages('bob')[0].sentAtMs, 1_700_000_000_001);
});

test('delete-on-ack: an erased body from the server never replaces the local one', () => {
  const s = new ChatStore('bob', new MemoryStorage(), now);
  s.ingest(wire(1, 'alice', 'bob', 'secret'), { live: true });
  s.ingestPage('alice', [wire(1, 'alice', 'bob', '')], undefined, { latest: true });
  assert.deepEqual(bodies(s, 'alice'), ['secret']);
  // Own message erased on the server: acked, or expired unacked; only a receipt says which.
  const mine = s.addOutgoing('alice', 'yo');
  s.markAccepted({ clientMessageId: mine.clientMessageId, messageId: 'id-yo', sentAtMs: '3', conversation: 'alice:bob' });
  s.ingestPage('alice', [{ ...wire(2, 'bob', 'alice', ''), messageId: 'id-yo', clientMessageId: mine.clientMessageId }], undefined, { latest: true });
  assert.equal(mine.status, 'accepted');
  assert.equal(mine.body, 'yo');
  s.applyReceipt('alice', '2', '1700000000500');
  assert.equal(mine.status, 'delivered');
  // A message only the server knew, already erased: kept as a placeholder.
  const fresh = new ChatStore('carol', new MemoryStorage(), now);
  fresh.ingestPage('alice', [wire(1, 'alice', 'carol', '')], undefined, { latest: true });
  assert.equal(fresh.messages('alice')[0].erased, true);
});

test('unread: counts deliveries not seen, clears on read; history of an opened conversation is read', () => {
  const s = new ChatStore('bob', new MemoryStorage(), now);
  s.ingest(wire(5, 'alice', 'bob'), { live: true });
  s.ingest(wire(6, 'alice', 'bob'), { live: true });
  assert.equal(s.unread('alice'), 2);
  // History that races in for the same messages does not change the count.
  s.ingestPage('alice', [wire(4, 'bob', 'alice'), wire(5, 'alice', 'bob'), wire(6, 'alice', 'bob'), wire(7, 'alice', 'bob')], undefined, { latest: true });
  assert.equal(s.unread('alice'), 3);
  assert.equal(s.markRead('alice'), true);
  assert.equal(s.unread('alice'), 0);
  const t = new ChatStore('bob2', new MemoryStorage(), now);
  t.touch('alice');
  t.ingestPage('alice', [wire(1, 'alice', 'bob2'), wire(2, 'alice', 'bob2')], undefined, { latest: true });
  assert.equal(t.unread('alice'), 0);
});

test('history survives a reload and is kept per signed-in user', () => {
  const storage = new MemoryStorage();
  const a = new ChatStore('bob', storage, now);
  a.ingest(wire(1, 'alice', 'bob', 'kept'), { live: true });
  a.applyReceipt('alice', '0');
  a.save();
  const b = new ChatStore('bob', storage, now);
  assert.deepEqual(bodies(b, 'alice'), ['kept']);
  assert.equal(b.ingest(wire(1, 'alice', 'bob', 'kept'), { live: true }).isNew, false);
  const other = new ChatStore('carol', storage, now);
  assert.equal(other.contacts().length, 0);
  assert.ok(storage.getItem(`${STORAGE_PREFIX}bob`));
  b.clear();
  assert.equal(storage.getItem(`${STORAGE_PREFIX}bob`), null);
});

test('messages that are not for this user are ignored', () => {
  const s = new ChatStore('bob', new MemoryStorage(), now);
  assert.equal(s.ingest(wire(1, 'alice', 'carol')), null);
  assert.equal(s.ingest({ ...wire(1, 'alice', 'bob'), messageId: '' }), null);
  assert.equal(s.contacts().length, 0);
});

test('backoff: a random wait between 0.25 s and a ceiling doubling from 1 s up to 30 s', () => {
  for (const [n, d] of [[0, 1000], [1, 2000], [3, 8000], [4, 16_000], [5, 30_000], [40, 30_000], [5000, 30_000]]) {
    assert.equal(backoffCeiling(n), d);
    assert.equal(backoffDelay(n, () => 0), BACKOFF.floor);
    assert.equal(backoffDelay(n, () => 0.999999), d);
  }
  // Math.random: every draw in its window, and the draws of one window spread over all of it
  // (browsers a gateway dropped together must not come back together).
  for (let n = 0; n < 8; n += 1) {
    const draws = Array.from({ length: 2000 }, () => backoffDelay(n));
    assert.ok(draws.every((d) => d >= BACKOFF.floor && d <= backoffCeiling(n)), `attempt ${n}`);
    const span = backoffCeiling(n) - BACKOFF.floor;
    assert.ok(Math.min(...draws) < BACKOFF.floor + span * 0.05, `attempt ${n}: low end reached`);
    assert.ok(Math.max(...draws) > BACKOFF.floor + span * 0.95, `attempt ${n}: high end reached`);
  }
});

test('reconnection: a socket dropped soon after opening keeps the schedule growing; one that held starts it over', () => {
  const sockets = [];
  class FakeSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 1;
      sockets.push(this);
    }
    close() {}
    send() {}
  }
  const saved = globalThis.WebSocket;
  globalThis.WebSocket = FakeSocket;
  const conn = new Connection({ baseUrl: 'http://127.0.0.1:1', token: () => 't' });
  const waits = [];
  conn.addEventListener('state', (e) => {
    if (e.detail.state === 'waiting') waits.push(e.detail.delay);
  });
  try {
    const openAndDrop = (heldMs) => {
      conn.open();
      const ws = sockets.at(-1);
      ws.onmessage({ data: JSON.stringify({ welcome: { user: 'bob', gatewayId: 'gw1' } }) });
      conn.openedAt -= heldMs;
      ws.onclose({ code: 1006, reason: '' });
    };
    openAndDrop(0);
    openAndDrop(0);
    openAndDrop(0);
    assert.equal(conn.attempt, 3, 'three quick drops: three steps along');
    assert.ok(waits.every((d) => d >= BACKOFF.floor && d <= backoffCeiling(2)));
    openAndDrop(STABLE_MS);
    assert.equal(conn.attempt, 1, 'a connection that held: back to the first window');
    assert.ok(waits.at(-1) <= backoffCeiling(0));
    assert.ok(sockets[0].url.startsWith('ws://127.0.0.1:1/ws?'));
  } finally {
    conn.stop();
    globalThis.WebSocket = saved;
  }
});

test("the server's conversation list adds conversations the sync does not bring", () => {
  const s = new ChatStore('bob', new MemoryStorage(), now);
  // Live: carol wrote once, this browser holds it.
  s.ingest(wire(1, 'carol', 'bob', 'from carol'), { live: true });
  const changed = s.applyListing([
    // Read on another device, never answered: only the list knows of it.
    {
      peer: 'alice', conversation: 'alice:bob', lastSeq: 4, lastActivityMs: 1_800_000_000_000,
      unread: 0, readUpTo: 3, peerReadUpTo: 4, preview: { sender: 'alice', body: 'see you', seq: 3 },
    },
    // Unread messages this browser does not hold yet (the sync brings them).
    { peer: 'dave', conversation: 'bob:dave', lastSeq: 7, lastActivityMs: 1_700_000_000_500, unread: 2, readUpTo: 5, peerReadUpTo: 0 },
    { peer: 'carol', conversation: 'bob:carol', lastSeq: 1, lastActivityMs: 1, unread: 1, readUpTo: 0, peerReadUpTo: 0 },
    { peer: 'bob', conversation: 'bob:bob', lastSeq: 1 }, // never a conversation with oneself
    { peer: 'not valid!' },
  ]);
  assert.deepEqual(changed, ['alice', 'dave', 'carol']);
  assert.deepEqual(s.contacts().map((c) => c.peer), ['alice', 'dave', 'carol'], 'newest activity first');
  assert.equal(s.unread('alice'), 0);
  assert.deepEqual(s.preview('alice'), { sender: 'alice', body: 'see you', seq: 3 });
  assert.equal(s.unread('dave'), 2, "the server's count, before the messages are here");
  assert.equal(s.preview('dave'), null, 'no preview (delete-on-ack mode): nothing to show');
  assert.equal(s.unread('carol'), 1, 'the same message counted once');
  assert.deepEqual(s.preview('carol'), { sender: 'carol', body: 'from carol', seq: 1 });

  // The sync brings dave's two unread messages (seq 6, 7), then a live one (8).
  s.ingest(wire(6, 'dave', 'bob'), { live: true });
  s.ingest(wire(7, 'dave', 'bob'), { live: true });
  assert.equal(s.unread('dave'), 2);
  s.ingest(wire(8, 'dave', 'bob', 'newest'), { live: true });
  assert.equal(s.unread('dave'), 3);
  assert.equal(s.preview('dave').body, 'newest');
  s.markRead('dave');
  assert.equal(s.unread('dave'), 0);

  // A listed count of messages that never arrive here clears once the conversation is seen.
  s.applyListing([{ peer: 'erin', conversation: 'bob:erin', lastSeq: 2, lastActivityMs: 5, unread: 2, readUpTo: 0 }]);
  assert.equal(s.unread('erin'), 2);
  assert.equal(s.markRead('erin'), true);
  assert.equal(s.unread('erin'), 0);

  // Own messages: the peer's acknowledgement is a receipt; a newer local message wins the preview.
  const mine = s.addOutgoing('alice', 'on my way');
  assert.equal(s.preview('alice').body, 'on my way', 'not sent yet: newer than the listed one');
  s.markStored({ clientMessageId: mine.clientMessageId, messageId: 'id-mine', seq: '4', conversation: 'alice:bob', peer: 'alice' });
  assert.equal(mine.status, 'delivered', 'alice acknowledged up to 4');

  // The list is kept with the history: a reload still shows it.
  const again = new ChatStore('bob', s.storage, now);
  assert.deepEqual(again.contacts().map((c) => c.peer), s.contacts().map((c) => c.peer));
  assert.equal(again.unread('alice'), 0);
});

test('a listed conversation starts read up to the server acknowledgement; later messages are unread', () => {
  const s = new ChatStore('bob', new MemoryStorage(), now);
  s.applyListing([{ peer: 'alice', conversation: 'alice:bob', lastSeq: 3, lastActivityMs: 9, unread: 0, readUpTo: 3, peerReadUpTo: 0 }]);
  s.ingestPage('alice', [wire(1, 'alice', 'bob'), wire(2, 'bob', 'alice'), wire(3, 'alice', 'bob')], undefined, { latest: true, synced: true });
  assert.equal(s.unread('alice'), 0, 'history of read messages');
  s.ingest(wire(4, 'alice', 'bob'), { live: true });
  assert.equal(s.unread('alice'), 1);
  // A conversation this browser already tracks keeps its own read mark.
  s.applyListing([{ peer: 'alice', conversation: 'alice:bob', lastSeq: 4, lastActivityMs: 10, unread: 0, readUpTo: 4 }]);
  assert.equal(s.unread('alice'), 1, 'the server says acknowledged (stored here), not seen');
});

test('a second tab writing the same history is noticed', () => {
  const storage = new MemoryStorage();
  const tab1 = new ChatStore('bob', storage, now);
  const tab2 = new ChatStore('bob', storage, now);
  assert.equal(tab1.changedElsewhere(), false);
  tab2.ingest(wire(1, 'alice', 'bob'), { live: true });
  tab2.save();
  assert.equal(tab1.changedElsewhere(), true);
  tab1.load();
  assert.deepEqual(bodies(tab1, 'alice'), ['m1']);
  assert.equal(tab1.changedElsewhere(), false);
  tab1.save();
  assert.equal(tab1.changedElsewhere(), false);
});

test('stored gives an own message its seq: order, holes and receipts follow', () => {
  const s = new ChatStore('bob', new MemoryStorage(), now);
  s.ingest(wire(1, 'alice', 'bob'), { live: true });
  const mine = s.addOutgoing('alice', 'reply');
  s.markAccepted({ clientMessageId: mine.clientMessageId, messageId: 'id-reply', sentAtMs: '9', conversation: 'alice:bob' });
  s.ingest(wire(3, 'alice', 'bob'), { live: true });
  assert.equal(s.ackTarget('alice'), 1);
  s.applyReceipt('alice', '2', '1700000000100');
  assert.equal(mine.status, 'accepted', 'seq unknown yet');
  const m = s.markStored({ clientMessageId: mine.clientMessageId, messageId: 'id-reply', conversation: 'alice:bob', seq: '2', peer: 'alice' });
  assert.equal(m, mine);
  assert.equal(mine.seq, 2);
  assert.equal(mine.status, 'delivered');
  assert.deepEqual(bodies(s, 'alice'), ['m1', 'reply', 'm3']);
  assert.equal(s.ackTarget('alice'), 3);
  assert.equal(s.markStored({ clientMessageId: 'from-another-device', messageId: 'x', seq: '4', peer: 'alice' }), null);
});

test('a stored that overtakes its accepted (or an error) still lands', () => {
  const s = new ChatStore('alice', new MemoryStorage(), now);
  const m = s.addOutgoing('bob', 'hi');
  s.markFailed(m.clientMessageId, 'timeout');
  s.markStored({ clientMessageId: m.clientMessageId, messageId: 'mid', conversation: 'alice:bob', seq: '1', peer: 'bob' });
  assert.equal(m.status, 'accepted');
  s.markAccepted({ clientMessageId: m.clientMessageId, messageId: 'mid', sentAtMs: '5', conversation: 'alice:bob' });
  assert.equal(m.status, 'accepted');
  assert.equal(s.messages('bob').length, 1);
});

test('the sync frame resumes from the last contiguous seq and the last receipt', () => {
  const storage = new MemoryStorage();
  const s = new ChatStore('bob', storage, now);
  assert.deepEqual(s.syncFrame(), { sync: { lastSeq: {} } });
  s.ingest(wire(1, 'alice', 'bob'), { live: true });
  s.ingest(wire(2, 'alice', 'bob'), { live: true });
  s.ingest(wire(1, 'carol', 'bob'), { live: true });
  s.applyReceipt('alice', '0', '1700000000500');
  s.applyReceipt('dave', '3', '1700000000400');
  s.save();
  const again = new ChatStore('bob', storage, now);
  assert.deepEqual(again.syncFrame(), {
    sync: { lastSeq: { alice: '2', carol: '1' }, receiptsAfterMs: '1700000000499' },
  });
  assert.equal(again.conversation('dave').deliveredUpTo, 3);
});

test('the outbox sends in write order, up to a bound, and again in that order after a reconnect', () => {
  // One clock tick for all: the order must not depend on timestamps (or on random ids).
  const storage = new MemoryStorage();
  const s = new ChatStore('bob', storage, () => 1_000);
  const written = ['a1', 'c1', 'a2', 'a3', 'c2', 'a4'].map((b) => s.addOutgoing(b[0] === 'a' ? 'alice' : 'carol', b));
  const inFlight = new Set();
  const send = (limit) => {
    const out = s.sendable(inFlight, limit);
    for (const m of out) inFlight.add(m.clientMessageId);
    return out.map((m) => m.body);
  };
  assert.deepEqual(send(3), ['a1', 'c1', 'a2'], 'pipelined up to the bound, in write order');
  assert.deepEqual(send(3), [], 'no room');
  s.markAccepted({ clientMessageId: written[1].clientMessageId, messageId: 'id-c1', sentAtMs: '5', conversation: 'bob:carol' });
  inFlight.delete(written[1].clientMessageId);
  assert.deepEqual(send(3), ['a3']);
  // The connection drops with a1, a2, a3 unanswered: they go first, in order, then the rest.
  inFlight.clear();
  assert.deepEqual(send(10), ['a1', 'a2', 'a3', 'c2', 'a4']);
  // Same after a reload (the order is kept with the history), and a new message goes last.
  const again = new ChatStore('bob', storage, () => 1_000);
  again.addOutgoing('alice', 'a5');
  assert.deepEqual(again.sendable(new Set(), 10).map((m) => m.body), ['a1', 'a2', 'a3', 'c2', 'a4', 'a5']);
  assert.deepEqual(bodies(again, 'alice'), ['a1', 'a2', 'a3', 'a4', 'a5'], 'shown in write order too');
});

test('a message the server set aside (failed) shows as failed; retrying sends a new message last', () => {
  const s = new ChatStore('bob', new MemoryStorage(), now);
  const dead = s.addOutgoing('alice', 'cannot be stored');
  const next = s.addOutgoing('alice', 'fine');
  const oldCid = dead.clientMessageId;
  s.markAccepted({ clientMessageId: oldCid, messageId: 'id-dead', sentAtMs: '5', conversation: 'alice:bob' });
  s.markAccepted({ clientMessageId: next.clientMessageId, messageId: 'id-next', sentAtMs: '6', conversation: 'alice:bob' });
  assert.equal(dead.status, 'accepted');
  const m = s.markDeadLettered({ clientMessageId: oldCid, messageId: 'id-dead', peer: 'alice', code: 'store_refused', reason: 'refused by the store' });
  assert.equal(m, dead);
  assert.equal(dead.status, 'failed');
  assert.match(dead.error, /refused by the store/);
  assert.deepEqual(s.pendingSends(), [], 'a failed message is not sent again by itself');
  // A repeated answer to the old send does not make it look sent.
  s.markAccepted({ clientMessageId: oldCid, messageId: 'id-dead', sentAtMs: '5', conversation: 'alice:bob' });
  assert.equal(dead.status, 'failed');
  // Not for another peer's message, nor for one this browser does not know.
  assert.equal(s.markDeadLettered({ clientMessageId: next.clientMessageId, peer: 'carol' }), null);
  assert.equal(s.markDeadLettered({ clientMessageId: 'unknown', peer: 'alice' }), null);
  assert.equal(next.status, 'accepted');
  // Retrying: a new client message id (the old one names the dead message), at the end.
  const later = s.addOutgoing('alice', 'written after');
  const retried = s.markSending(oldCid);
  assert.equal(retried, dead);
  assert.notEqual(dead.clientMessageId, oldCid);
  assert.equal(dead.messageId, '');
  assert.equal(s.byClientMessageId(oldCid), null);
  assert.equal(s.byClientMessageId(dead.clientMessageId), dead);
  assert.deepEqual(s.pendingSends().map((x) => x.body), ['written after', 'cannot be stored']);
  assert.equal(later.status, 'sending');
  // A refused send (an error answer) retried keeps its id: the server never had it.
  const refused = s.addOutgoing('alice', 'refused');
  const refusedCid = refused.clientMessageId;
  s.markFailed(refusedCid, 'invalid_body');
  assert.equal(s.markSending(refusedCid).clientMessageId, refusedCid);
});
