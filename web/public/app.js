// The web chat client: sign in, conversations, live messages over the gateway's websocket.
//
// Modules: store.js (local history, ordering, dedup, ack/unread bookkeeping), connection.js
// (websocket with reconnect/backoff), this file (protocol handling and the DOM).

import { ChatStore, isAddressableUserId, isValidUserId, int, pastedTokenUser } from './store.js';
import { Connection, CLOSE } from './connection.js';

const SESSION_KEY = 'chat.v1.session';
/** What a typed user id must be (isAddressableUserId). */
const USER_ID_RULE = 'Enter a user id: 1 to 64 letters, digits, dots, dashes or underscores, other than "." and "..".';
/** A send without an answer for this long is shown as failed (with a retry button). */
const SEND_TIMEOUT_MS = 15_000;
/** The gateway's default MAX_BODY_BYTES; the server does not advertise its own value. */
const MAX_BODY_BYTES = 4096;
const HISTORY_PAGE = 100;
/** The most messages one sync answers with (gateway SYNC_LIMIT); a full answer means "sync again". */
const SYNC_LIMIT = 10_000;
/** Deliveries arriving within this many ms are stored, acknowledged and rendered together. */
const FLUSH_MS = 25;
/**
 * Most sends written on a connection and not answered yet; the rest of the outbox waits its turn.
 * Below the gateway's default MAX_IN_FLIGHT (256), which refuses sends beyond it.
 */
const MAX_IN_FLIGHT = 100;
/** Errors that mean "not now": the send stays in the outbox and goes again (same id, in order). */
const RETRYABLE = new Set(['produce_failed', 'too_many_in_flight', 'rate_limited']);
const FIRST_RETRY_MS = 200;
const MAX_RETRY_MS = 5_000;
/**
 * The conversation list (GET /conversations) is read a page of this many at a time, at most
 * LISTING_PAGES pages: the most recent 1,000 conversations are listed, older ones show up when
 * they get a message or are opened by name.
 */
const LISTING_PAGE = 200;
const LISTING_PAGES = 5;

const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === 'class') e.className = v;
    else if (k === 'dataset') Object.assign(e.dataset, v);
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('aria-') || k === 'role') e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
};

const app = {
  me: null,
  token: null,
  store: null,
  conn: null,
  current: null, // peer of the open conversation
  acked: new Map(), // peer -> highest ack sent on this connection
  syncsPending: 0,
  synced: false, // the first sync of this connection is done
  sendTimers: new Map(), // clientMessageId -> timeout
  inFlight: new Set(), // client message ids written on this connection, not answered yet
  holdTimer: null, // after a retryable refusal, the outbox waits for this timer
  retryDelay: FIRST_RETRY_MS,
  history: new Map(), // peer -> { running: Promise, again: boolean }
  countdown: null,
  dirty: new Set(), // peers with deliveries not yet stored/acked/rendered
  flushTimer: null,
  lastFrameAt: 0,
  dev: false, // the token came from /dev/token: renew it by itself when it expires
  // The server's conversation list is read on the next welcome: after signing in (or loading the
  // page), and after another device of this user held the connection meanwhile.
  listingDue: false,
  listing: null, // the listing in progress (a Promise)
};

// ---------------------------------------------------------------------------------------------
// Session
// ---------------------------------------------------------------------------------------------

function loadSession() {
  try {
    const s = JSON.parse(localStorage.getItem(SESSION_KEY) || 'null');
    if (s && isValidUserId(s.user) && typeof s.token === 'string' && s.token) return s;
  } catch {
    /* ignore */
  }
  return null;
}

async function onSignIn(ev) {
  ev.preventDefault();
  const err = $('signin-error');
  err.textContent = '';
  const pasted = $('signin-token').value.trim();
  const user = $('signin-user').value.trim();
  const submit = $('signin-submit');
  submit.disabled = true;
  try {
    let session;
    if (pasted) {
      const read = pastedTokenUser(pasted);
      if (read.error) throw new Error(read.error);
      session = { user: read.user, token: pasted };
    } else {
      if (!isAddressableUserId(user)) {
        $('signin-user').setAttribute('aria-invalid', 'true');
        $('signin-user').focus();
        throw new Error(USER_ID_RULE);
      }
      $('signin-user').removeAttribute('aria-invalid');
      let res;
      try {
        res = await fetch(`/dev/token/${encodeURIComponent(user)}`);
      } catch {
        throw new Error('Cannot reach the server.');
      }
      if (res.status === 404) throw new Error('This server does not hand out development tokens: paste an access token.');
      if (!res.ok) throw new Error(`The server refused: ${await errorText(res)}`);
      const body = await res.json();
      session = { user: body.user, token: body.token, dev: true };
    }
    localStorage.setItem(SESSION_KEY, JSON.stringify(session));
    startSession(session);
  } catch (e) {
    err.textContent = e.message;
  } finally {
    submit.disabled = false;
  }
}

async function errorText(res) {
  try {
    const b = await res.json();
    return b.message || b.code || res.statusText;
  } catch {
    return res.statusText || String(res.status);
  }
}

function startSession({ user, token, dev = false }) {
  app.me = user;
  app.token = token;
  app.dev = dev;
  app.store = new ChatStore(user);
  app.current = null;
  app.listingDue = true;
  $('me-name').textContent = user;
  $('whoami').hidden = false;
  $('signin').hidden = true;
  $('chat').hidden = false;
  document.body.dataset.screen = 'chat';
  document.body.dataset.view = 'list';
  document.title = `Chat — ${user}`;
  renderContacts();
  renderConversation();

  const conn = new Connection({
    baseUrl: location.origin,
    token: () => app.token,
    checkToken,
  });
  app.conn = conn;
  conn.addEventListener('state', (e) => onConnState(e.detail));
  conn.addEventListener('frame', (e) => onFrame(e.detail));
  conn.addEventListener('closed', (e) => onClosed(e.detail));
  conn.start();
  $('contact-input').focus();
}

function signOut(message = '') {
  app.conn?.stop();
  app.conn = null;
  for (const t of app.sendTimers.values()) clearTimeout(t);
  app.sendTimers.clear();
  app.inFlight.clear();
  clearTimeout(app.holdTimer);
  app.holdTimer = null;
  flushDeliveries();
  clearTimeout(app.flushTimer);
  app.flushTimer = null;
  app.history.clear();
  app.listingDue = false;
  localStorage.removeItem(SESSION_KEY);
  app.store = null;
  app.me = app.token = app.current = null;
  $('whoami').hidden = true;
  $('chat').hidden = true;
  $('signin').hidden = false;
  document.body.dataset.screen = 'signin';
  document.title = 'Chat';
  $('signin-error').textContent = message;
  $('messages').replaceChildren();
  $('contact-list').replaceChildren();
  setConnStatus('stopped', 'Not connected');
  $('signin-user').focus();
}

/** A refused development token is simply fetched again; any other token means signing in again. */
async function renewOrSignOut() {
  const conn = app.conn;
  if (app.dev && app.me) {
    try {
      const res = await fetch(`/dev/token/${encodeURIComponent(app.me)}`);
      if (res.ok) {
        const body = await res.json();
        if (app.conn !== conn || body.user !== app.me) return;
        app.token = body.token;
        localStorage.setItem(SESSION_KEY, JSON.stringify({ user: app.me, token: app.token, dev: true }));
        conn.start();
        return;
      }
    } catch {
      /* fall through */
    }
  }
  if (app.conn === conn) signOut('Your session has expired or the token was refused. Sign in again.');
}

/** Whether the token is still accepted: `GET /me` answers 401 when it is not. */
async function checkToken(token) {
  const res = await fetch('/me', { headers: { Authorization: `Bearer ${token}` } });
  return res.status !== 401;
}

// ---------------------------------------------------------------------------------------------
// Connection and frames
// ---------------------------------------------------------------------------------------------

function setConnStatus(state, text, countdown = '') {
  const s = $('conn-status');
  s.dataset.state = state;
  // The status is a live region: only real changes are announced, not the ticking countdown.
  if (s.firstChild?.nodeType !== Node.TEXT_NODE || s.firstChild.data !== text) {
    s.replaceChildren(document.createTextNode(text), el('span', { class: 'countdown', 'aria-hidden': 'true' }));
  }
  s.lastChild.textContent = countdown;
  $('reconnect').hidden = !(state === 'waiting' || state === 'replaced');
  $('reconnect').textContent = state === 'replaced' ? 'Use this tab' : 'Reconnect now';
}

function onConnState({ state, retryAt, welcome }) {
  clearInterval(app.countdown);
  app.countdown = null;
  switch (state) {
    case 'connecting':
      setConnStatus(state, 'Connecting…');
      break;
    case 'open':
      onWelcome(welcome);
      setConnStatus(state, 'Connected');
      break;
    case 'waiting': {
      const tick = () => {
        const s = Math.max(0, Math.ceil((retryAt - Date.now()) / 1000));
        setConnStatus(state, 'Disconnected. Retrying', ` in ${s} s`);
      };
      tick();
      app.countdown = setInterval(tick, 1000);
      break;
    }
    case 'offline':
      setConnStatus(state, 'Offline. Messages will be sent when you are back online');
      break;
    case 'replaced':
      // What the other device read meanwhile comes with the list when this tab takes over.
      app.listingDue = true;
      setConnStatus(state, 'Signed in from another tab or device');
      announce('This chat was opened somewhere else; this tab is disconnected.');
      break;
    case 'unauthorized':
      renewOrSignOut();
      break;
    default:
      setConnStatus(state, 'Not connected');
  }
}

function onWelcome(welcome) {
  if (welcome?.user && welcome.user !== app.me) {
    // A pasted token whose subject we could not read right: trust the server.
    app.me = welcome.user;
    app.store = new ChatStore(welcome.user);
    $('me-name').textContent = welcome.user;
    localStorage.setItem(SESSION_KEY, JSON.stringify({ user: app.me, token: app.token, dev: app.dev }));
    renderContacts();
    renderConversation();
  }
  // Another tab of this user may have been the connected one meanwhile: take its writes.
  if (app.store.changedElsewhere()) {
    app.store.load();
    renderContacts();
    if (app.current) renderMessages();
  }
  app.acked = new Map();
  app.synced = false;
  // The socket was opened with sync=manual: the server holds live messages until this first
  // sync is answered, so the resume point is ours (what this browser holds, receipts since).
  app.syncsPending = 1;
  app.conn.send(app.store.syncFrame());
  // Sends that never got an answer go again, in the order they were written, with the same
  // client message ids (idempotent), pipelined up to the in-flight bound.
  app.inFlight.clear();
  pumpOutbox();
  if (app.listingDue) loadListing();
}

function onClosed({ code }) {
  // Sends in flight on that socket stay "sending" and go again after the reconnect; a socket
  // closed for a too-big frame would just close again, so those fail instead.
  for (const [cid, t] of app.sendTimers) {
    clearTimeout(t);
    if (code === CLOSE.TOO_BIG) app.store?.markFailed(cid, 'Too large for the server');
  }
  app.sendTimers.clear();
  app.inFlight.clear();
  flushDeliveries();
  app.synced = false;
  app.syncsPending = 0;
  if (code === CLOSE.TOO_BIG) renderMessages();
}

function onFrame(f) {
  app.lastFrameAt = Date.now();
  const store = app.store;
  if (!store) return;
  if (f.deliver) onDeliver(f.deliver.message);
  else if (f.accepted) {
    clearSendTimer(f.accepted.clientMessageId);
    app.inFlight.delete(f.accepted.clientMessageId);
    app.retryDelay = FIRST_RETRY_MS;
    const m = store.markAccepted(f.accepted);
    if (m) refreshConversation(store.peerOf(m));
    pumpOutbox();
  } else if (f.failed) {
    // Accepted, then set aside by the server: it can never be stored or delivered.
    const m = store.markDeadLettered(f.failed);
    if (m) refreshConversation(m.recipient);
  } else if (f.stored) {
    const st = f.stored;
    const m = store.markStored(st);
    const peer = m ? m.recipient : st.peer;
    if (!isValidUserId(peer)) return;
    if (!m) loadHistory(peer); // sent from another device: history has it
    // Its seq may close a hole that held acks back.
    ackIfDue(peer);
    refreshConversation(peer);
  } else if (f.error) onError(f.error);
  else if (f.receipt) {
    const { peer, upToSeq, ackedAtMs } = f.receipt;
    if (!isValidUserId(peer)) return;
    store.applyReceipt(peer, upToSeq, ackedAtMs);
    // A receipt names a seq; own messages learn theirs only from history.
    if (store.unknownSeqs(peer) > 0) loadHistory(peer);
    refreshConversation(peer);
  } else if (f.syncDone) {
    flushDeliveries();
    app.syncsPending = Math.max(0, app.syncsPending - 1);
    if (int(f.syncDone.delivered) >= SYNC_LIMIT) {
      app.syncsPending += 1;
      app.conn.send(store.syncFrame());
    }
    if (app.syncsPending === 0 && !app.synced) {
      app.synced = true;
      // Fill holes (own messages of unknown seq, messages read elsewhere) so acks can advance,
      // and refresh the open conversation (copies sent from other devices, receipts missed).
      for (const c of store.contacts()) {
        if (store.hasGap(c.peer) || store.unknownSeqs(c.peer) > 0 || c.peer === app.current) loadHistory(c.peer);
      }
    }
  }
}

function onDeliver(wire) {
  const store = app.store;
  if (!wire) return;
  const r = store.ingest(wire, { live: true });
  if (!r) return;
  if (r.isNew && r.message.sender === r.peer) {
    announce(`New message from ${r.peer}: ${r.message.body || '(no text)'}`);
  }
  // A sync may bring thousands of frames: store, ack and render them in batches.
  app.dirty.add(r.peer);
  if (!app.flushTimer) app.flushTimer = setTimeout(flushDeliveries, FLUSH_MS);
}

/** Writes what arrived to localStorage, then (only then) acknowledges it and renders it. */
function flushDeliveries() {
  app.flushTimer = null;
  const store = app.store;
  const peers = [...app.dirty];
  app.dirty.clear();
  if (!store || !peers.length) return;
  const saved = store.save();
  if (!saved) showStorageWarning();
  for (const peer of peers) {
    if (saved) ackIfDue(peer);
    if (store.hasGap(peer) && app.synced) loadHistory(peer);
    if (isViewing(peer)) store.markRead(peer);
  }
  if (peers.includes(app.current)) renderMessages();
  renderContacts();
}

function onError(e) {
  if (e.clientMessageId) {
    clearSendTimer(e.clientMessageId);
    app.inFlight.delete(e.clientMessageId);
    if (RETRYABLE.has(e.code)) {
      // Stays "sending": it goes again after a pause, before the messages written after it.
      holdOutbox(e.retryAfterMs);
      return;
    }
    const m = app.store.markFailed(e.clientMessageId, e.message || e.code);
    if (m) refreshConversation(app.store.peerOf(m));
    pumpOutbox();
    return;
  }
  if (RETRYABLE.has(e.code)) {
    // A frame was dropped and the server cannot say which: everything unanswered goes again,
    // in order, after a pause (a repeat is answered with the original message).
    app.inFlight.clear();
    holdOutbox(e.retryAfterMs);
    return;
  }
  if (e.code === 'sync_failed') {
    // The server ends the failed sync with an empty syncDone; ask again shortly.
    setTimeout(() => {
      if (app.conn?.isOpen && app.store) {
        app.syncsPending += 1;
        app.conn.send(app.store.syncFrame());
      }
    }, 2000);
    return;
  }
  console.warn('server error', e);
}

/** Acknowledges up to the highest contiguous seq, once it is stored in this browser. */
function ackIfDue(peer) {
  const already = app.acked.get(peer) || 0;
  const upTo = app.store.ackTarget(peer, already);
  if (!upTo) return;
  if (app.conn?.send({ ack: { peer, upToSeq: String(upTo) } })) app.acked.set(peer, upTo);
}

/** Writes the outbox's next sends: in write order, up to the in-flight bound, no waiting between. */
function pumpOutbox() {
  if (!app.store || !app.conn?.isOpen || app.holdTimer) return;
  for (const m of app.store.sendable(app.inFlight, MAX_IN_FLIGHT)) {
    if (!transmit(m)) break;
  }
}

/**
 * Pauses the outbox after a retryable refusal (doubling up to MAX_RETRY_MS), or for as long as
 * the server asked (`retryAfterMs` of a `rate_limited` error) if that is longer, then goes on.
 */
function holdOutbox(askedMs = 0) {
  if (app.holdTimer) return;
  const delay = Math.max(app.retryDelay, Number(askedMs) || 0);
  app.retryDelay = Math.min(app.retryDelay * 2, MAX_RETRY_MS);
  app.holdTimer = setTimeout(() => {
    app.holdTimer = null;
    pumpOutbox();
  }, delay);
}

function transmit(m) {
  if (!app.conn?.send({ send: { clientMessageId: m.clientMessageId, recipient: m.recipient, body: m.body } })) {
    return false; // stays "sending": goes out after the reconnect
  }
  app.inFlight.add(m.clientMessageId);
  clearSendTimer(m.clientMessageId);
  const sentAt = Date.now();
  app.sendTimers.set(
    m.clientMessageId,
    setTimeout(() => {
      app.sendTimers.delete(m.clientMessageId);
      if (app.lastFrameAt < sentAt) {
        // Not a single frame since: the socket is probably dead (browsers cannot ping). Start
        // over; the message stays "sending" and goes again after the reconnect.
        app.conn?.recycle('no answer from the server');
        return;
      }
      app.inFlight.delete(m.clientMessageId);
      const f = app.store?.markFailed(m.clientMessageId, 'No answer from the server');
      if (f) refreshConversation(f.recipient);
      pumpOutbox();
    }, SEND_TIMEOUT_MS),
  );
  return true;
}

function clearSendTimer(cid) {
  const t = app.sendTimers.get(cid);
  if (t) clearTimeout(t);
  app.sendTimers.delete(cid);
}

/**
 * Reads the server's conversation list (newest activity first, up to LISTING_PAGES pages) and
 * merges it: the sync brings only what this user has not acknowledged, so a conversation read
 * on another device, and never answered, is known here only from the list. A failure leaves it
 * due for the next connection; a gateway without the route (404) lists nothing.
 */
function loadListing() {
  if (app.listing) return app.listing;
  const store = app.store;
  const run = async () => {
    let before = '';
    for (let page = 0; page < LISTING_PAGES; page += 1) {
      const q = new URLSearchParams({ limit: String(LISTING_PAGE) });
      if (before) q.set('before', before);
      let res;
      try {
        res = await fetch(`/conversations?${q}`, { headers: { Authorization: `Bearer ${app.token}` } });
      } catch {
        return; // offline: still due
      }
      if (app.store !== store) return;
      if (res.status === 404) break;
      if (!res.ok) return; // 401 is the connection's to handle (renew or sign out); others: next time
      const body = await res.json();
      if (app.store !== store) return;
      if (store.applyListing(body.conversations).length) renderContacts();
      const next = typeof body.nextBefore === 'string' ? body.nextBefore : '';
      if (!next || next === before) break;
      before = next;
    }
    app.listingDue = false;
  };
  app.listing = run()
    .catch((e) => console.warn('conversation list', e))
    .finally(() => {
      app.listing = null;
    });
  return app.listing;
}

/** Fetches the latest page (or the page before `before`) and merges it. */
async function loadHistory(peer, { before = 0 } = {}) {
  const key = before ? `${peer}<${before}` : peer;
  const job = app.history.get(key);
  if (job) {
    job.again = true;
    return job.running;
  }
  const entry = { again: false, running: null };
  app.history.set(key, entry);
  const store = app.store;
  const run = async () => {
    do {
      entry.again = false;
      const synced = app.synced;
      const status = peer === app.current ? $('history-status') : null;
      if (status && before) status.textContent = 'Loading earlier messages…';
      let res;
      try {
        const q = new URLSearchParams({ limit: String(HISTORY_PAGE) });
        if (before) q.set('before', String(before));
        res = await fetch(`/messages/${encodeURIComponent(peer)}?${q}`, {
          headers: { Authorization: `Bearer ${app.token}` },
        });
      } catch {
        if (status) status.textContent = 'History is unavailable (network). It will load when the connection is back.';
        return;
      }
      if (app.store !== store) return;
      if (res.status === 401) {
        renewOrSignOut();
        return;
      }
      if (!res.ok) {
        if (status) status.textContent = `History is unavailable: ${await errorText(res)}`;
        return;
      }
      const page = await res.json();
      if (app.store !== store) return;
      if (status) status.textContent = '';
      store.ingestPage(peer, page.messages, page.nextBefore, { latest: !before, synced });
      store.save();
      refreshConversation(peer);
      ackIfDue(peer);
    } while (entry.again);
  };
  entry.running = run().finally(() => app.history.delete(key));
  return entry.running;
}

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

const STATUS = {
  sending: { icon: '🕓', label: 'Sending' },
  accepted: { icon: '✓', label: 'Sent' },
  delivered: { icon: '✓✓', label: 'Delivered' },
  failed: { icon: '!', label: 'Not sent' },
};

function isViewing(peer) {
  return app.current === peer && document.visibilityState === 'visible';
}

/** Re-renders what a change in `peer`'s conversation affects. */
function refreshConversation(peer) {
  if (!app.store) return;
  if (isViewing(peer)) app.store.markRead(peer);
  if (peer === app.current) renderMessages();
  renderContacts();
}

function renderContacts() {
  const store = app.store;
  const list = $('contact-list');
  if (!store) return;
  const contacts = store.contacts();
  $('no-contacts').hidden = contacts.length > 0;
  const existing = new Map([...list.children].map((li) => [li.dataset.peer, li]));
  let prev = null;
  for (const c of contacts) {
    let li = existing.get(c.peer);
    existing.delete(c.peer);
    if (!li) {
      const name = el('span', { class: 'contact-name', text: c.peer });
      const preview = el('span', { class: 'contact-preview' });
      const text = el('span', { class: 'contact-text' }, name, preview);
      const badge = el('span', { class: 'badge', 'aria-hidden': 'true' });
      const sr = el('span', { class: 'visually-hidden unread-label' });
      const btn = el('button', { type: 'button', class: 'contact', dataset: { peer: c.peer } }, text, sr, badge);
      btn.addEventListener('click', () => openConversation(c.peer, { focus: true }));
      li = el('li', { dataset: { peer: c.peer } }, btn);
    }
    const n = store.unread(c.peer);
    const btn = li.firstChild;
    const badge = btn.querySelector('.badge');
    badge.textContent = n > 0 ? String(n) : '';
    badge.hidden = n === 0;
    btn.querySelector('.unread-label').textContent = n > 0 ? `, ${n} unread` : '';
    btn.dataset.unread = String(n);
    const last = store.preview(c.peer);
    btn.querySelector('.contact-preview').textContent = last
      ? `${last.sender === app.me ? 'You: ' : ''}${last.body || '…'}`
      : '';
    if (c.peer === app.current) btn.setAttribute('aria-current', 'true');
    else btn.removeAttribute('aria-current');
    const want = prev ? prev.nextSibling : list.firstChild;
    if (want !== li) list.insertBefore(li, want);
    prev = li;
  }
  for (const li of existing.values()) li.remove();
  const total = contacts.reduce((s, c) => s + store.unread(c.peer), 0);
  document.title = `${total ? `(${total}) ` : ''}Chat — ${app.me}`;
}

function messageKey(m) {
  return m.sender === app.me ? `c:${m.clientMessageId}` : `m:${m.messageId}`;
}

function formatTime(ms) {
  if (!ms) return '';
  const d = new Date(ms);
  const sameDay = d.toDateString() === new Date().toDateString();
  return sameDay
    ? d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })
    : d.toLocaleString([], { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
}

function buildMessage(m) {
  const own = m.sender === app.me;
  const li = el('li', { class: `msg ${own ? 'own' : 'theirs'}`, dataset: { key: messageKey(m) } });
  const who = el('span', { class: 'visually-hidden who' });
  const body = el('p', { class: 'body' });
  const time = el('time', { class: 'time' });
  const status = el('span', { class: 'status' });
  const meta = el('p', { class: 'meta' }, time, status);
  const fail = el('p', { class: 'fail', hidden: true });
  const bubble = el('div', { class: 'bubble' }, who, body, meta, fail);
  li.append(bubble);
  return li;
}

function updateMessage(li, m) {
  const own = m.sender === app.me;
  const status = own ? m.status || 'accepted' : 'received';
  const sig = JSON.stringify([m.body, m.seq, m.sentAtMs || m.createdAt, status, m.error, m.messageId]);
  if (li.dataset.sig === sig) return;
  li.dataset.sig = sig;
  li.dataset.seq = String(m.seq || '');
  li.dataset.status = status;
  if (m.messageId) li.dataset.messageId = m.messageId;
  li.querySelector('.who').textContent = own ? 'You: ' : `${m.sender}: `;
  const body = li.querySelector('.body');
  if (m.body) {
    body.textContent = m.body;
    body.classList.remove('erased');
  } else {
    body.textContent = 'This message is no longer stored on the server.';
    body.classList.add('erased');
  }
  const t = m.sentAtMs || m.createdAt;
  const time = li.querySelector('.time');
  time.textContent = formatTime(t);
  time.dateTime = t ? new Date(t).toISOString() : '';
  const st = li.querySelector('.status');
  const fail = li.querySelector('.fail');
  if (own) {
    const s = STATUS[status] ?? STATUS.accepted;
    st.replaceChildren(el('span', { 'aria-hidden': 'true', text: s.icon }), el('span', { class: 'visually-hidden', text: s.label }));
    st.title = s.label;
    st.dataset.status = status;
  } else {
    st.replaceChildren();
  }
  if (own && status === 'failed') {
    const retry = el('button', { type: 'button', class: 'retry', text: 'Retry' });
    retry.setAttribute('aria-label', `Retry sending: ${m.body.slice(0, 40)}`);
    retry.addEventListener('click', () => retrySend(m.clientMessageId));
    fail.replaceChildren(el('span', { text: `Not sent: ${m.error || 'unknown error'}. ` }), retry);
    fail.hidden = false;
  } else if (!fail.hidden) {
    // Keep keyboard focus in the conversation when the retry button goes away.
    const hadFocus = fail.contains(document.activeElement);
    fail.hidden = true;
    fail.replaceChildren();
    if (hadFocus) $('composer-input').focus();
  }
}

function renderMessages(toBottom = false) {
  const list = $('messages');
  const wrap = $('messages-wrap');
  const store = app.store;
  const peer = app.current;
  if (!store || !peer) {
    list.replaceChildren();
    return;
  }
  const nearBottom = wrap.scrollHeight - wrap.scrollTop - wrap.clientHeight < 80;
  const msgs = store.messages(peer);
  const existing = new Map([...list.children].map((li) => [li.dataset.key, li]));
  let prev = null;
  for (const m of msgs) {
    const key = messageKey(m);
    let li = existing.get(key);
    existing.delete(key);
    if (!li) li = buildMessage(m);
    updateMessage(li, m);
    const want = prev ? prev.nextSibling : list.firstChild;
    if (want !== li) list.insertBefore(li, want);
    prev = li;
  }
  for (const li of existing.values()) li.remove();
  $('empty-conv').hidden = msgs.length > 0;
  const conv = store.conversation(peer, false);
  // Older pages exist on the server and this browser does not already hold the beginning.
  const lowest = msgs.find((m) => m.seq)?.seq ?? 0;
  $('load-older').hidden = !(conv && conv.olderBefore > 1 && lowest !== 1);
  if (nearBottom || toBottom) wrap.scrollTop = wrap.scrollHeight;
}

function renderConversation() {
  const peer = app.current;
  const input = $('composer-input');
  $('conv-title').textContent = peer ? peer : 'Pick a conversation';
  input.disabled = !peer;
  $('send').disabled = !peer;
  $('composer-label').textContent = peer ? `Message to ${peer}` : 'Message';
  $('messages').setAttribute('aria-label', peer ? `Messages with ${peer}` : 'Messages');
  $('history-status').textContent = '';
  $('empty-conv').hidden = true;
  $('no-conv').hidden = !!peer;
  $('load-older').hidden = true;
  renderMessages(true);
}

function announce(text) {
  const a = $('announcer');
  a.append(el('p', { text }));
  while (a.childElementCount > 5) a.firstChild.remove();
}

let storageWarned = false;
function showStorageWarning() {
  if (storageWarned) return;
  storageWarned = true;
  $('composer-error').textContent =
    'This browser refused to store more messages; new messages are shown but not acknowledged.';
}

// ---------------------------------------------------------------------------------------------
// User actions
// ---------------------------------------------------------------------------------------------

function openConversation(peer, { focus = false } = {}) {
  if (!app.store) return;
  app.current = peer;
  app.store.touch(peer);
  document.body.dataset.view = 'conversation';
  $('composer-error').textContent = '';
  renderConversation();
  app.store.markRead(peer);
  renderContacts();
  loadHistory(peer);
  if (focus) $('composer-input').focus();
}

function onOpenContact(ev) {
  ev.preventDefault();
  const input = $('contact-input');
  const peer = input.value.trim();
  const err = $('contact-error');
  if (!isAddressableUserId(peer)) {
    err.textContent = USER_ID_RULE;
    input.setAttribute('aria-invalid', 'true');
    input.focus();
    return;
  }
  if (peer === app.me) {
    err.textContent = 'That is you. Pick someone else.';
    input.setAttribute('aria-invalid', 'true');
    input.focus();
    return;
  }
  err.textContent = '';
  input.removeAttribute('aria-invalid');
  input.value = '';
  openConversation(peer, { focus: true });
}

function onSend(ev) {
  ev?.preventDefault();
  const peer = app.current;
  const input = $('composer-input');
  const err = $('composer-error');
  if (!peer || !app.store) return;
  const body = input.value;
  if (!body.trim()) {
    input.focus();
    return;
  }
  const size = new TextEncoder().encode(body).length;
  if (size > MAX_BODY_BYTES) {
    err.textContent = `The message is ${size} bytes; the limit is ${MAX_BODY_BYTES}.`;
    return;
  }
  err.textContent = '';
  input.value = '';
  autoGrow(input);
  app.store.addOutgoing(peer, body);
  refreshConversation(peer);
  renderMessages(true);
  // Behind whatever the outbox still holds (sent while offline, or waiting for room).
  pumpOutbox();
  input.focus();
}

function retrySend(clientMessageId) {
  const m = app.store?.markSending(clientMessageId);
  if (!m) return;
  refreshConversation(m.recipient);
  pumpOutbox();
}

function autoGrow(t) {
  t.style.height = 'auto';
  t.style.height = `${Math.min(t.scrollHeight, 160)}px`;
}

function init() {
  $('signin-form').addEventListener('submit', onSignIn);
  $('new-contact').addEventListener('submit', onOpenContact);
  $('composer').addEventListener('submit', onSend);
  $('signout').addEventListener('click', () => signOut());
  $('reconnect').addEventListener('click', () => app.conn?.connectNow());
  $('load-older').addEventListener('click', () => {
    const conv = app.current && app.store?.conversation(app.current, false);
    if (conv && conv.olderBefore > 1) {
      const wrap = $('messages-wrap');
      const fromBottom = wrap.scrollHeight - wrap.scrollTop;
      loadHistory(app.current, { before: conv.olderBefore }).then(() => {
        wrap.scrollTop = wrap.scrollHeight - fromBottom;
      });
    }
  });
  $('back').addEventListener('click', () => {
    document.body.dataset.view = 'list';
    const btn = document.querySelector(`#contact-list button[data-peer="${CSS.escape(app.current || '')}"]`);
    (btn || $('contact-input')).focus();
  });
  const input = $('composer-input');
  input.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      onSend();
    } else if (e.key === 'Escape' && document.body.dataset.view === 'conversation') {
      $('back').click();
    }
  });
  input.addEventListener('input', () => autoGrow(input));
  window.addEventListener('storage', (e) => {
    // Another tab of the same user wrote its history (only one tab is connected at a time).
    if (app.store && e.key === app.store.key && app.conn?.state !== 'open' && app.store.changedElsewhere()) {
      app.store.load();
      renderContacts();
      if (app.current) renderMessages();
    }
  });
  document.addEventListener('visibilitychange', () => {
    if (app.current && isViewing(app.current) && app.store?.markRead(app.current)) renderContacts();
  });
  const session = loadSession();
  if (session) startSession(session);
  else $('signin-user').focus();
}

init();
