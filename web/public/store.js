// The signed-in user's conversations, kept in the browser (localStorage, one key per user).
//
// Pure logic, no DOM: the UI (app.js) and the unit tests (tests/store.test.mjs) both drive it.
//
// Why the browser keeps history at all: in delete-on-ack retention the server erases a body once
// the recipient acknowledged it, so the only copy left is the one stored here. Server history is
// merged in by message id and never overwrites a body with an empty one.
//
// Ordering: sequences are per conversation, shared by both directions, dense from 1. Messages with
// a sequence are sorted by it; own messages whose sequence is not known yet (the server's
// `accepted` does not carry one) come after them, in the order they were written.
//
// The outbox: own messages still `sending` are sent in the order they were written (`order`, a
// counter kept with the history), pipelined up to a bound (`sendable`), and again in that order
// after a reconnect, with the same client message ids, so the server gives them seqs in that
// order and turns a repeat into the original message. A message the server accepted and then set
// aside (a `failed` frame: it can never be stored) is shown as failed; retrying it sends it as a
// new message (a new client message id), as the protocol asks.

export const STORAGE_PREFIX = 'chat.v1.history.';
/** Most messages kept per conversation in the browser; older ones are dropped first. */
export const MAX_KEPT = 2000;

/** User ids: 1 to 64 bytes of [A-Za-z0-9_.-] (same rule as the server). */
export function isValidUserId(s) {
  return typeof s === 'string' && /^[A-Za-z0-9_.-]{1,64}$/.test(s);
}

/**
 * A user id someone types to sign in or to write to: also neither "." nor "..", which a URL
 * cannot hold as a path segment (`/messages/..` is `/`); the server refuses them the same way.
 */
export function isAddressableUserId(s) {
  return isValidUserId(s) && s !== '.' && s !== '..';
}

/**
 * The user a pasted access token signs in as: `{ user }`, or `{ error }` saying why it cannot.
 * Only the subject is read (the gateway checks the signature and the expiry); a subject that is
 * no user id, or one nobody can be reached at ("." or ".."), is refused here rather than by the
 * gateway's 401 after the page has stored the session.
 */
export function pastedTokenUser(token) {
  let sub;
  try {
    const part = String(token).split('.')[1];
    const json = atob(part.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(part.length / 4) * 4, '='));
    sub = JSON.parse(json).sub;
  } catch {
    return { error: 'That does not look like an access token (a JWT with a user id as subject).' };
  }
  if (!isValidUserId(sub)) {
    return { error: 'That token\'s subject is not a user id (1 to 64 letters, digits, dots, dashes or underscores).' };
  }
  if (!isAddressableUserId(sub)) {
    return { error: `That token is for the user "${sub}", which no one can sign in as: a user id may not be "." or "..".` };
  }
  return { user: sub };
}

/** proto3 JSON carries 64-bit integers as strings and omits zero values. */
export function int(v) {
  if (v === undefined || v === null || v === '') return 0;
  const n = Number(v);
  return Number.isFinite(n) ? n : 0;
}

/** Normalises a ChatMessage from the wire (proto3 JSON) into the local shape. */
export function fromWire(m) {
  return {
    messageId: m.messageId || '',
    clientMessageId: m.clientMessageId || '',
    sender: m.sender || '',
    recipient: m.recipient || '',
    body: m.body || '',
    sentAtMs: int(m.sentAtMs),
    seq: int(m.seq),
    conversation: m.conversation || '',
  };
}

export function newClientMessageId() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  // Fallback for non-secure contexts (plain http on a non-loopback host): RFC 4122 v4 by hand.
  const b = new Uint8Array(16);
  globalThis.crypto.getRandomValues(b);
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function emptyConversation(peer) {
  return {
    peer,
    messages: [],
    // Highest n such that every seq 1..n of the conversation is known here (or older than
    // anything that matters, see `noteHistoryPage`). Only this far is acknowledged.
    contig: 0,
    // The peer received every message up to this seq (from receipts).
    deliveredUpTo: 0,
    // Messages from the peer above this seq are unread. null until the first one arrives: a
    // conversation first seen through a deliver starts unread at that message; one first seen
    // through history (the user opened it) starts read.
    readUpTo: null,
    lastActivity: 0,
    // `before` for the next older history page; 0 = unknown yet, -1 = at the beginning.
    olderBefore: 0,
    // What the server's conversation list (GET /conversations) last said, see `applyListing`:
    // { lastSeq, unread, preview: {sender, body, seq} | null }, or null before it said anything.
    listed: null,
  };
}

export class ChatStore {
  /**
   * @param {string} me the signed-in user id
   * @param {Storage | null} storage localStorage, or null to keep everything in memory
   * @param {() => number} now clock, in ms
   */
  constructor(me, storage = globalThis.localStorage ?? null, now = () => Date.now()) {
    this.me = me;
    this.storage = storage;
    this.now = now;
    this.key = STORAGE_PREFIX + me;
    this.convs = new Map();
    // Time of the newest receipt seen: a sync asks for receipts after it (`receiptsAfterMs`).
    this.lastReceiptMs = 0;
    this.byId = new Map(); // messageId -> message
    this.byClientId = new Map(); // clientMessageId -> own message
    // Write order of own messages (the outbox's order); continues from what is stored.
    this.nextOrder = 1;
    this.saveError = null;
    this.written = null; // what this instance last read or wrote
    this.load();
  }

  /** True when another tab wrote this user's history since this instance last read or wrote it. */
  changedElsewhere() {
    try {
      return (this.storage?.getItem(this.key) ?? null) !== this.written;
    } catch {
      return false;
    }
  }

  load() {
    this.convs.clear();
    this.byId.clear();
    this.byClientId.clear();
    this.lastReceiptMs = 0;
    let data = null;
    try {
      const raw = this.storage?.getItem(this.key) ?? null;
      this.written = raw;
      data = raw ? JSON.parse(raw) : null;
    } catch {
      data = null;
    }
    this.lastReceiptMs = int(data?.lastReceiptMs);
    for (const c of Object.values(data?.conversations ?? {})) {
      if (!isValidUserId(c?.peer)) continue;
      const conv = Object.assign(emptyConversation(c.peer), c);
      delete conv.unread;
      conv.messages = Array.isArray(c.messages) ? c.messages : [];
      this.convs.set(conv.peer, conv);
      for (const m of conv.messages) this.index(m);
    }
  }

  /** Writes everything synchronously, so what is acknowledged afterwards is already on disk. */
  save() {
    if (!this.storage) return true;
    const conversations = {};
    for (const [peer, c] of this.convs) conversations[peer] = c;
    const json = JSON.stringify({ v: 1, lastReceiptMs: this.lastReceiptMs, conversations });
    try {
      this.storage.setItem(this.key, json);
      this.written = json;
      this.saveError = null;
      return true;
    } catch (e) {
      // Quota exceeded: drop the oldest half of the biggest conversation and try once more.
      this.saveError = e;
      const biggest = [...this.convs.values()].sort((a, b) => b.messages.length - a.messages.length)[0];
      if (biggest && biggest.messages.length > 50) {
        this.trim(biggest, Math.floor(biggest.messages.length / 2));
        try {
          const smaller = JSON.stringify({ v: 1, lastReceiptMs: this.lastReceiptMs, conversations: Object.fromEntries(this.convs) });
          this.storage.setItem(this.key, smaller);
          this.written = smaller;
          this.saveError = null;
          return true;
        } catch (e2) {
          this.saveError = e2;
        }
      }
      return false;
    }
  }

  /** Forgets everything stored for this user in this browser. */
  clear() {
    this.storage?.removeItem(this.key);
    this.load();
  }

  index(m) {
    if (m.order >= this.nextOrder) this.nextOrder = m.order + 1;
    if (m.messageId) this.byId.set(m.messageId, m);
    if (m.sender === this.me && m.clientMessageId) this.byClientId.set(m.clientMessageId, m);
  }

  trim(conv, keep) {
    if (conv.messages.length <= keep) return;
    this.sort(conv);
    const dropped = conv.messages.splice(0, conv.messages.length - keep);
    for (const m of dropped) {
      if (m.messageId) this.byId.delete(m.messageId);
      if (m.clientMessageId && m.sender === this.me) this.byClientId.delete(m.clientMessageId);
    }
  }

  conversation(peer, create = true) {
    let c = this.convs.get(peer);
    if (!c && create) {
      c = emptyConversation(peer);
      this.convs.set(peer, c);
    }
    return c ?? null;
  }

  /** Contacts, most recently active first. */
  contacts() {
    return [...this.convs.values()].sort(
      (a, b) => b.lastActivity - a.lastActivity || a.peer.localeCompare(b.peer),
    );
  }

  peerOf(m) {
    return m.sender === this.me ? m.recipient : m.sender;
  }

  static compare(a, b) {
    const sa = a.seq || Number.POSITIVE_INFINITY;
    const sb = b.seq || Number.POSITIVE_INFINITY;
    if (sa !== sb) return sa - sb;
    return (
      (a.createdAt || a.sentAtMs) - (b.createdAt || b.sentAtMs) ||
      (a.order || 0) - (b.order || 0) ||
      (a.messageId || a.clientMessageId).localeCompare(b.messageId || b.clientMessageId)
    );
  }

  sort(conv) {
    conv.messages.sort(ChatStore.compare);
    return conv.messages;
  }

  /** The messages of a conversation in display order. */
  messages(peer) {
    const c = this.convs.get(peer);
    return c ? this.sort(c) : [];
  }

  /** A new own message, status `sending`. */
  addOutgoing(peer, body) {
    const conv = this.conversation(peer);
    const t = this.now();
    const m = {
      messageId: '',
      clientMessageId: newClientMessageId(),
      sender: this.me,
      recipient: peer,
      body,
      sentAtMs: 0,
      seq: 0,
      conversation: '',
      createdAt: t,
      order: this.nextOrder++,
      status: 'sending',
      error: '',
    };
    conv.messages.push(m);
    conv.lastActivity = t;
    this.index(m);
    this.save();
    return m;
  }

  byClientMessageId(id) {
    return this.byClientId.get(id) ?? null;
  }

  /** The server's `accepted`: the message is durable. Returns the message, or null if unknown. */
  markAccepted(a) {
    const m = this.byClientId.get(a.clientMessageId);
    if (!m) return null;
    const dup = a.messageId && this.byId.get(a.messageId);
    if (dup && dup !== m) {
      // Already merged from history or another device's copy: keep one.
      this.removeMessage(m);
      return dup;
    }
    if (m.deadLettered) return m; // a repeat answer: it was set aside since
    m.messageId = a.messageId || m.messageId;
    // This attempt's time, until the stored message's is known (`ingest`).
    if (!m.sentAtStored) m.sentAtMs = int(a.sentAtMs) || m.sentAtMs;
    m.conversation = a.conversation || m.conversation;
    if (m.status === 'sending' || m.status === 'failed') m.status = 'accepted';
    m.error = '';
    this.applyDelivered(this.conversation(m.recipient));
    this.index(m);
    this.save();
    return m;
  }

  /**
   * The server's `stored`: an own message got its seq. Returns the message, or null when this
   * browser does not know it (sent from another device: history will bring it).
   */
  markStored(st) {
    const m = this.byClientId.get(st.clientMessageId) ?? (st.messageId ? this.byId.get(st.messageId) : null);
    if (!m || m.sender !== this.me) return null;
    const dup = st.messageId && this.byId.get(st.messageId);
    if (dup && dup !== m) {
      this.removeMessage(m);
      return this.markStored(st);
    }
    m.messageId = st.messageId || m.messageId;
    m.conversation = st.conversation || m.conversation;
    m.seq = int(st.seq) || m.seq;
    if (m.status === 'sending' || m.status === 'failed') m.status = 'accepted';
    m.deadLettered = false;
    m.error = '';
    const conv = this.conversation(m.recipient);
    this.index(m);
    this.advance(conv);
    this.applyDelivered(conv);
    this.save();
    return m;
  }

  markFailed(clientMessageId, reason) {
    const m = this.byClientId.get(clientMessageId);
    if (!m || m.status !== 'sending') return m ?? null;
    m.status = 'failed';
    m.error = reason || 'not sent';
    this.save();
    return m;
  }

  /**
   * The server's `failed`: an own message it accepted can never be stored (a dead letter). It is
   * shown as failed and never as sent. Returns the message, or null when this browser does not
   * know it.
   */
  markDeadLettered(f) {
    const m = this.byClientId.get(f.clientMessageId) ?? (f.messageId ? this.byId.get(f.messageId) : null);
    if (!m || m.sender !== this.me || (f.peer && m.recipient !== f.peer)) return null;
    if (m.seq) return m; // stored after all (history said so): not this message's fate
    m.status = 'failed';
    m.deadLettered = true;
    m.error = f.reason || f.code || 'the server could not store it';
    if (f.messageId && !m.messageId) m.messageId = f.messageId;
    this.index(m);
    this.save();
    return m;
  }

  /**
   * The user retries a failed message. One the server refused goes again as it was; one it set
   * aside after accepting goes as a new message (a new client message id: the old id names the
   * dead one). Either way it joins the end of the outbox.
   */
  markSending(clientMessageId) {
    const m = this.byClientId.get(clientMessageId);
    if (!m || m.status !== 'failed') return m ?? null;
    if (m.deadLettered) {
      this.byClientId.delete(m.clientMessageId);
      if (m.messageId && this.byId.get(m.messageId) === m) this.byId.delete(m.messageId);
      m.clientMessageId = newClientMessageId();
      m.messageId = '';
      m.sentAtMs = 0;
      m.conversation = '';
      m.deadLettered = false;
      m.createdAt = this.now();
    }
    m.order = this.nextOrder++;
    m.status = 'sending';
    m.error = '';
    this.index(m);
    this.save();
    return m;
  }

  removeMessage(m) {
    const conv = this.convs.get(this.peerOf(m));
    if (conv) conv.messages = conv.messages.filter((x) => x !== m);
    if (m.messageId && this.byId.get(m.messageId) === m) this.byId.delete(m.messageId);
    if (m.clientMessageId && this.byClientId.get(m.clientMessageId) === m) this.byClientId.delete(m.clientMessageId);
  }

  /** Own messages waiting for an `accepted` (to send again after a reconnect), in write order. */
  pendingSends() {
    const out = [];
    for (const c of this.convs.values()) for (const m of c.messages) if (m.sender === this.me && m.status === 'sending') out.push(m);
    return out.sort((a, b) => (a.order || 0) - (b.order || 0) || a.createdAt - b.createdAt);
  }

  /**
   * The outbox's next sends: pending messages not in flight (`inFlight`: client message ids
   * written on this connection and not answered), in write order, as many as `limit` leaves room
   * for. Sending them all without waiting keeps the order: the server hands a connection's sends
   * to Kafka in frame order.
   */
  sendable(inFlight, limit) {
    const room = limit - inFlight.size;
    if (room <= 0) return [];
    return this.pendingSends()
      .filter((m) => !inFlight.has(m.clientMessageId))
      .slice(0, room);
  }

  /**
   * Merges one message from the server (a `deliver`, or a history row).
   * @param {object} wire ChatMessage in proto3 JSON
   * @param {{live?: boolean}} opts live = came as a deliver (not from a history page)
   * @returns {{peer: string, message: object, isNew: boolean, changed: boolean} | null}
   */
  ingest(wire, { live = false } = {}) {
    const w = fromWire(wire);
    if (!w.messageId || !isValidUserId(w.sender) || !isValidUserId(w.recipient)) return null;
    if (w.sender !== this.me && w.recipient !== this.me) return null;
    const peer = w.sender === this.me ? w.recipient : w.sender;
    if (peer === this.me) return null;
    const conv = this.conversation(peer);
    let m = this.byId.get(w.messageId) ?? (w.sender === this.me ? this.byClientId.get(w.clientMessageId) : null);
    let isNew = false;
    let changed = false;
    if (m) {
      if (!m.messageId) { m.messageId = w.messageId; changed = true; }
      if (w.seq && m.seq !== w.seq) { m.seq = w.seq; changed = true; }
      // The stored message's time wins over an `accepted`'s: a retry's answer carries the
      // retry's time, the message keeps the first stored attempt's.
      if (w.sentAtMs && (m.sentAtMs !== w.sentAtMs || !m.sentAtStored)) {
        m.sentAtMs = w.sentAtMs;
        m.sentAtStored = true;
        changed = true;
      }
      if (w.conversation && !m.conversation) m.conversation = w.conversation;
      // Never replace a body with an empty one: the server erased it (delete-on-ack), we did not.
      if (w.body && !m.body) { m.body = w.body; m.erased = false; changed = true; }
      if (m.sender === this.me && (m.status === 'sending' || m.status === 'failed')) {
        m.status = 'accepted'; // the server has it, so it was accepted
        m.deadLettered = false;
        m.error = '';
        changed = true;
      }
    } else {
      m = { ...w, createdAt: this.now() };
      if (w.sentAtMs) m.sentAtStored = true;
      if (!w.body) m.erased = true;
      if (w.sender === this.me) m.status = 'accepted';
      conv.messages.push(m);
      isNew = true;
      changed = true;
      if (w.sender === peer && conv.readUpTo === null) conv.readUpTo = live ? w.seq - 1 : w.seq;
      conv.lastActivity = Math.max(conv.lastActivity, w.sentAtMs || this.now());
    }
    // An empty body from the server says nothing about delivery: in delete-on-ack mode it may
    // have been erased by the ack or by the expiry of an unacked message. Only receipts count.
    this.index(m);
    this.advance(conv);
    if (this.applyDelivered(conv)) changed = true;
    if (conv.messages.length > MAX_KEPT) this.trim(conv, MAX_KEPT);
    return { peer, message: m, isNew, changed };
  }

  /** Merges a page of server history (oldest first). Returns true if anything changed. */
  ingestPage(peer, messages, nextBefore, { latest = false, synced = false } = {}) {
    const conv = this.conversation(peer);
    const list = (messages ?? []).filter((m) => m && (m.sender === peer || m.recipient === peer));
    if (conv.readUpTo === null) {
      const seqs = list.filter((m) => m.sender === peer).map((m) => int(m.seq));
      if (seqs.length) conv.readUpTo = Math.max(...seqs);
    }
    let changed = false;
    for (const m of list) {
      const r = this.ingest(m, { live: false });
      if (r?.changed) changed = true;
    }
    this.noteHistoryPage(peer, list, nextBefore, { latest, synced });
    return changed;
  }

  /**
   * Notes a page of server history (after ingesting its messages). A page fetched without
   * `before` is the latest: everything below its first seq is older than any message this client
   * could still owe an ack (unacked messages reach it by the server's sync), so `contig` may start
   * there.
   */
  noteHistoryPage(peer, messages, nextBefore, { latest = false, synced = false } = {}) {
    const conv = this.conversation(peer);
    const seqs = messages.map((m) => int(m.seq)).filter((s) => s > 0);
    if (latest && synced && seqs.length) conv.contig = Math.max(conv.contig, Math.min(...seqs) - 1);
    const nb = int(nextBefore);
    if (!latest) conv.olderBefore = nb || -1;
    else if (conv.olderBefore === 0) conv.olderBefore = nb || -1;
    this.advance(conv);
    this.save();
  }

  /** Moves `contig` over every seq held. */
  advance(conv) {
    const seqs = new Set();
    for (const m of conv.messages) if (m.seq) seqs.add(m.seq);
    let c = conv.contig;
    while (seqs.has(c + 1)) c += 1;
    conv.contig = c;
    return c;
  }

  /** True when a seq above `contig` is held: something in between is missing here. */
  hasGap(peer) {
    const conv = this.convs.get(peer);
    if (!conv) return false;
    return conv.messages.some((m) => m.seq > conv.contig);
  }

  /** Own messages whose seq is still unknown (accepted, or perhaps stored despite an error). */
  unknownSeqs(peer) {
    const conv = this.convs.get(peer);
    return conv ? conv.messages.filter((m) => m.sender === this.me && !m.seq).length : 0;
  }

  /**
   * What to acknowledge for `peer`: the highest contiguous seq, if it covers a message from the
   * peer above `already` (the last ack sent on this connection). 0 = nothing to ack.
   */
  ackTarget(peer, already = 0) {
    const conv = this.convs.get(peer);
    if (!conv) return 0;
    const upTo = conv.contig;
    if (upTo <= already) return 0;
    const covers = conv.messages.some((m) => m.sender === peer && m.seq > already && m.seq <= upTo);
    return covers ? upTo : 0;
  }

  /** A receipt: the peer has every message up to `upToSeq`. Returns true if a status changed. */
  applyReceipt(peer, upToSeq, ackedAtMs = 0) {
    const conv = this.conversation(peer);
    const up = int(upToSeq);
    const at = int(ackedAtMs);
    if (up > conv.deliveredUpTo) conv.deliveredUpTo = up;
    if (at > this.lastReceiptMs) this.lastReceiptMs = at;
    if (!conv.lastActivity && at) conv.lastActivity = at;
    const changed = this.applyDelivered(conv);
    this.save();
    return changed;
  }

  applyDelivered(conv) {
    let changed = false;
    for (const m of conv.messages) {
      if (m.sender === this.me && m.seq && m.seq <= conv.deliveredUpTo && m.status !== 'delivered') {
        m.status = 'delivered';
        m.error = '';
        changed = true;
      }
    }
    return changed;
  }

  /** The `sync` frame to resume with: last seq held per peer, and receipts since the last one. */
  syncFrame() {
    const sync = { lastSeq: this.lastSeqMap() };
    // Receipts are asked "after" a time: step back 1 ms so one at the same ms is not missed.
    if (this.lastReceiptMs > 0) sync.receiptsAfterMs = String(this.lastReceiptMs - 1);
    return { sync };
  }

  /** `lastSeq` for a `sync` frame: per peer, the last seq held without a gap. */
  lastSeqMap() {
    const out = {};
    for (const c of this.convs.values()) if (c.contig > 0) out[c.peer] = String(c.contig);
    return out;
  }

  /**
   * Merges a page of the server's conversation list (`GET /conversations`, newest first). The
   * list is how a browser learns of conversations the websocket's sync does not bring: those
   * acknowledged on another device (read there, perhaps never answered). Per conversation:
   * it is listed (created if new, ordered by its last activity); a new one starts read up to the
   * server's acknowledgement (`readUpTo`); the peer's acknowledgement counts as a receipt; and
   * its unread count and preview are kept (`listed`) for what this browser does not hold yet.
   * Returns the peers it changed.
   */
  applyListing(summaries) {
    const changed = [];
    for (const s of Array.isArray(summaries) ? summaries : []) {
      const peer = s?.peer;
      if (!isValidUserId(peer) || peer === this.me) continue;
      const conv = this.conversation(peer);
      const activity = int(s.lastActivityMs);
      if (activity > conv.lastActivity) conv.lastActivity = activity;
      if (conv.readUpTo === null) conv.readUpTo = int(s.readUpTo);
      const p = s.preview;
      const preview =
        p && isValidUserId(p.sender) && typeof p.body === 'string' ? { sender: p.sender, body: p.body, seq: int(p.seq) } : null;
      conv.listed = { lastSeq: int(s.lastSeq), unread: int(s.unread), preview };
      const peerRead = int(s.peerReadUpTo);
      if (peerRead > conv.deliveredUpTo) conv.deliveredUpTo = peerRead;
      this.applyDelivered(conv);
      changed.push(peer);
    }
    if (changed.length) this.save();
    return changed;
  }

  /**
   * Messages from the peer not seen yet: those held here above `readUpTo`, or, when the server's
   * list counted more unread up to its `lastSeq` (messages this browser does not hold yet), its
   * count, plus what arrived after that.
   */
  unread(peer) {
    const c = this.convs.get(peer);
    if (!c) return 0;
    const from = c.readUpTo ?? 0;
    const listedUnread = c.listed?.unread ?? 0;
    const cut = listedUnread > 0 ? c.listed.lastSeq : Number.POSITIVE_INFINITY;
    let upToCut = 0;
    let after = 0;
    for (const m of c.messages) {
      if (m.sender !== peer || m.seq <= from) continue;
      if (m.seq <= cut) upToCut += 1;
      else after += 1;
    }
    return Math.max(upToCut, listedUnread) + after;
  }

  /**
   * What the contact list shows of a conversation: its newest message held here, or the server's
   * preview when that is newer. null when there is neither.
   * @returns {{sender: string, body: string, seq: number} | null}
   */
  preview(peer) {
    const c = this.convs.get(peer);
    if (!c) return null;
    const last = this.messages(peer).at(-1);
    const p = c.listed?.preview;
    // An own message without a seq yet is newer than anything the server listed.
    if (p && (!last || (last.seq && last.seq < p.seq))) return { ...p };
    return last ? { sender: last.sender, body: last.body, seq: last.seq } : null;
  }

  /** The user saw the conversation: everything in it is read. */
  markRead(peer) {
    const c = this.convs.get(peer);
    if (!c) return false;
    let top = c.readUpTo ?? 0;
    for (const m of c.messages) if (m.sender === peer && m.seq > top) top = m.seq;
    const listedUnread = c.listed?.unread ?? 0;
    if (top === c.readUpTo && !listedUnread) return false;
    c.readUpTo = top;
    if (c.listed) c.listed.unread = 0;
    this.save();
    return true;
  }

  touch(peer) {
    const c = this.conversation(peer);
    if (!c.lastActivity) c.lastActivity = this.now();
    this.save();
    return c;
  }
}
