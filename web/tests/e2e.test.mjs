// The web client in a real browser (Debian's chromium driven by playwright-core) against a real
// stack: two gateways, a multiplexer, Kafka and Postgres, set up by tests/run-e2e.sh which passes
// the gateways' URLs in E2E_GW1 / E2E_GW2 and the retention mode in E2E_RETENTION.
//
// Three scenarios:
//   1. alice (gateway 1) and bob (gateway 2): one tick, two ticks once bob's client acks; bob
//      loses the network, alice sends 3, bob comes back and gets each once, in order; unread
//      counter shows and clears; after reloads both still show every body (the server erased
//      them in delete-on-ack mode).
//   2. a send whose answer is lost (error injected by a websocket proxy) is retried with the same
//      client message id and exists once; keyboard only on a phone-sized, dark screen; the server
//      dropping the socket (4008) and a second tab taking over (4001).
//   3. a receipt produced while the sender was offline reaches it with the next sync.
//   4. a new device: hank reads his messages in one browser context (gina's, answered; juno's,
//      never answered), then signs in from a fresh context by pasting his token (one for ".." is
//      refused on the page first): the server's conversation list brings both (unread 0, with
//      their previews in keep mode), and ivy's messages sent meanwhile show an unread badge of 2.
//   5. over https: the page from a gateway serving TLS itself (E2E_GW3) opens its websocket
//      with wss:// and talks to a user on a plain gateway.
//
// Every wait is on a DOM condition (selector / predicate), a browser event, or the server's
// conversation list showing what a step needs (polled), never a fixed sleep.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const GW1 = process.env.E2E_GW1;
const GW2 = process.env.E2E_GW2;
const GW3 = process.env.E2E_GW3;
const RETENTION = process.env.E2E_RETENTION || 'keep';
const ART = process.env.E2E_ARTIFACTS || new URL('../test-artifacts/', import.meta.url).pathname;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const WAIT = Number(process.env.E2E_WAIT_MS || 20_000);
const skip = !GW1 || !GW2 ? 'needs the stack: run web/tests/run-e2e.sh' : false;

let browser;

before(async () => {
  if (skip) return;
  mkdirSync(ART, { recursive: true });
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
});

after(async () => {
  await browser?.close();
});

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

async function newUser(base, user, { viewport = { width: 1100, height: 720 }, colorScheme = 'light', setup, shotSignIn, contextOptions = {} } = {}) {
  const context = await browser.newContext({ viewport, colorScheme, baseURL: base, ...contextOptions });
  const page = await context.newPage();
  page.on('pageerror', (e) => console.error(`[${user}] page error:`, e));
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') console.error(`[${user}] console.${m.type()}: ${m.text()}`);
  });
  if (setup) await setup(page);
  await page.goto('/');
  if (shotSignIn) {
    await page.getByLabel('User id').fill(user);
    await shot(page, shotSignIn);
  }
  await signIn(page, user);
  return { context, page, user };
}

async function signIn(page, user) {
  await page.getByLabel('User id').fill(user);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await connected(page);
  await page.locator('#me-name', { hasText: user }).waitFor({ timeout: WAIT });
}

function connected(page) {
  return page.locator('#conn-status[data-state="open"]').waitFor({ timeout: WAIT });
}

async function openConversation(page, peer) {
  const existing = page.locator(`#contact-list button[data-peer="${peer}"]`);
  if (await existing.count()) await existing.click();
  else {
    await page.getByLabel('Open a conversation with').fill(peer);
    await page.getByRole('button', { name: 'Open', exact: true }).click();
  }
  await page.locator('#conv-title', { hasText: peer }).waitFor({ timeout: WAIT });
}

async function send(page, text) {
  const box = page.locator('#composer-input');
  await box.fill(text);
  await box.press('Enter');
  await ownMessage(page, text).waitFor({ timeout: WAIT });
}

const exactly = (text) => new RegExp(`^${text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`);

function ownMessage(page, text, status) {
  const sel = status ? `li.msg.own[data-status="${status}"]` : 'li.msg.own';
  return page.locator(sel).filter({ has: page.locator('.body', { hasText: exactly(text) }) });
}

function theirMessage(page, text) {
  return page.locator('li.msg.theirs').filter({ has: page.locator('.body', { hasText: exactly(text) }) });
}

/** Bodies of the open conversation, in display order. */
function bodies(page) {
  return page.locator('#messages li .body').allTextContents();
}

function badge(page, peer) {
  return page.locator(`#contact-list button[data-peer="${peer}"] .badge`);
}

async function shot(page, name) {
  await page.screenshot({ path: join(ART, `${name}.png`), animations: 'disabled' });
}

async function serverHistory(page, peer) {
  return page.evaluate(async (p) => {
    const { token } = JSON.parse(localStorage.getItem('chat.v1.session'));
    const res = await fetch(`/messages/${p}?limit=100`, { headers: { Authorization: `Bearer ${token}` } });
    return (await res.json()).messages;
  }, peer);
}

/** A dev token, from node (no browser): for users who only send over REST. */
async function devToken(base, user) {
  const res = await fetch(`${base}/dev/token/${user}`);
  assert.equal(res.status, 200, `dev token for ${user}`);
  return (await res.json()).token;
}

/** `PUT /messages/{to}` from node; returns the `accepted` answer. */
async function restSend(base, token, to, body) {
  const res = await fetch(`${base}/messages/${to}`, {
    method: 'PUT',
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ body }),
  });
  assert.equal(res.status, 202, `send to ${to}: ${await res.clone().text()}`);
  return res.json();
}

/**
 * Polls `GET /conversations` (from node) until `ok(list)` holds, the list as a map peer ->
 * summary; fails after WAIT. The per-user list is written after the messages and acks it sums
 * up, so a test waits on it before it relies on it.
 */
async function listedUntil(base, token, what, ok) {
  const deadline = Date.now() + WAIT;
  let last = null;
  for (;;) {
    const res = await fetch(`${base}/conversations?limit=200`, { headers: { Authorization: `Bearer ${token}` } });
    if (res.ok) {
      last = new Map((await res.json()).conversations.map((c) => [c.peer, c]));
      if (ok(last)) return last;
    } else {
      last = `HTTP ${res.status}`;
    }
    if (Date.now() > deadline) assert.fail(`GET /conversations never showed ${what}: ${JSON.stringify(last instanceof Map ? [...last.values()] : last)}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** The contact list's peers, top to bottom. */
function contactPeers(page) {
  return page.locator('#contact-list button.contact').evaluateAll((bs) => bs.map((b) => b.dataset.peer));
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

test(`two users on two gateways: ticks, offline catch-up, unread (retention ${RETENTION})`, { skip }, async (t) => {
  const t0 = Date.now();
  const step = (what) => console.log(`  [${((Date.now() - t0) / 1000).toFixed(2)} s] ${what}`);

  // Alice signs in on gateway 1 and writes to bob, who has never connected: one tick, no more.
  const alice = await newUser(GW1, 'alice', { shotSignIn: `${RETENTION}-00-sign-in` });
  await shot(alice.page, `${RETENTION}-01-alice-signed-in`);
  await openConversation(alice.page, 'bob');
  await send(alice.page, 'Hi Bob');
  await ownMessage(alice.page, 'Hi Bob', 'accepted').waitFor({ timeout: WAIT });
  assert.equal(await ownMessage(alice.page, 'Hi Bob').locator('.status [aria-hidden="true"]').innerText(), '✓');
  step('alice: "Hi Bob" accepted (one tick)');
  await shot(alice.page, `${RETENTION}-02-alice-one-tick`);

  // Bob signs in on gateway 2: the sync delivers it, his client acks, alice sees two ticks.
  const bob = await newUser(GW2, 'bob');
  await badge(bob.page, 'alice').filter({ hasText: '1' }).waitFor({ timeout: WAIT });
  await ownMessage(alice.page, 'Hi Bob', 'delivered').waitFor({ timeout: WAIT });
  step('bob synced it; alice: two ticks');
  await shot(alice.page, `${RETENTION}-03-alice-two-ticks`);

  await openConversation(bob.page, 'alice');
  await theirMessage(bob.page, 'Hi Bob').waitFor({ timeout: WAIT });
  await badge(bob.page, 'alice').waitFor({ state: 'hidden', timeout: WAIT });

  // Bob answers live; alice (looking at the conversation) acks; bob sees two ticks.
  await send(bob.page, 'Hi Alice');
  await theirMessage(alice.page, 'Hi Alice').waitFor({ timeout: WAIT });
  await ownMessage(bob.page, 'Hi Alice', 'delivered').waitFor({ timeout: WAIT });
  step('live exchange both ways, both delivered');

  // Bob looks at another conversation and loses the network.
  await openConversation(bob.page, 'carol');
  await bob.context.setOffline(true);
  await bob.page.locator('#conn-status:not([data-state="open"]):not([data-state="connecting"])').waitFor({ timeout: WAIT });
  step(`bob offline (${await bob.page.locator('#conn-status').getAttribute('data-state')})`);

  const three = ['one', 'two', 'three'];
  for (const text of three) await send(alice.page, text);
  for (const text of three) await ownMessage(alice.page, text, 'accepted').waitFor({ timeout: WAIT });
  assert.equal(await alice.page.locator('li.msg.own[data-status="delivered"]').count(), 1, 'only "Hi Bob" is delivered');
  step('alice sent 3 while bob is offline: one tick each');
  await shot(bob.page, `${RETENTION}-04-bob-offline`);

  // Bob comes back: reconnect, resume, each message once, in order; unread counter shows.
  await bob.context.setOffline(false);
  await connected(bob.page);
  await badge(bob.page, 'alice').filter({ hasText: /^3$/ }).waitFor({ timeout: WAIT });
  step('bob reconnected; unread 3 for alice');
  await shot(bob.page, `${RETENTION}-05-bob-unread`);
  for (const text of three) await ownMessage(alice.page, text, 'delivered').waitFor({ timeout: WAIT });
  step('alice: two ticks on all 3');
  await shot(alice.page, `${RETENTION}-06-alice-all-delivered`);

  await openConversation(bob.page, 'alice');
  await theirMessage(bob.page, 'three').waitFor({ timeout: WAIT });
  assert.deepEqual(await bodies(bob.page), ['Hi Bob', 'Hi Alice', 'one', 'two', 'three']);
  await badge(bob.page, 'alice').waitFor({ state: 'hidden', timeout: WAIT });
  assert.equal(await bob.page.locator('#contact-list button[data-peer="alice"]').getAttribute('data-unread'), '0');
  const seqs = await bob.page.locator('#messages li').evaluateAll((lis) => lis.map((li) => Number(li.dataset.seq)));
  assert.deepEqual(seqs, [1, 2, 3, 4, 5]);
  step('bob: all 5 once each, in order (seq 1..5); unread cleared');
  await shot(bob.page, `${RETENTION}-07-bob-conversation`);

  // The server honours the retention mode, and the browsers keep the bodies either way.
  const onServer = await serverHistory(bob.page, 'alice');
  assert.equal(onServer.length, 5);
  const fromAlice = onServer.filter((m) => m.sender === 'alice');
  if (RETENTION === 'delete-on-ack') {
    assert.ok(fromAlice.every((m) => !m.body), 'acked bodies are erased on the server');
  } else {
    assert.deepEqual(fromAlice.map((m) => m.body), ['Hi Bob', 'one', 'two', 'three']);
  }
  await bob.page.reload();
  await connected(bob.page);
  await openConversation(bob.page, 'alice');
  await theirMessage(bob.page, 'three').waitFor({ timeout: WAIT });
  assert.deepEqual(await bodies(bob.page), ['Hi Bob', 'Hi Alice', 'one', 'two', 'three']);
  await alice.page.reload();
  await connected(alice.page);
  await openConversation(alice.page, 'bob');
  await ownMessage(alice.page, 'three', 'delivered').waitFor({ timeout: WAIT });
  assert.deepEqual(await bodies(alice.page), ['Hi Bob', 'Hi Alice', 'one', 'two', 'three']);
  assert.equal(await alice.page.locator('li.msg.own[data-status="delivered"]').count(), 4);
  step(`after reloads both still show every body (server bodies ${RETENTION === 'keep' ? 'kept' : 'erased'})`);

  await alice.context.close();
  await bob.context.close();
});

test('a refused send goes again by itself with the same client message id; keyboard only, narrow screen', { skip }, async () => {
  // carol's socket goes through a proxy that turns the first send's `accepted` into an error
  // (and drops its `stored`, which may come before or after the `accepted`), after the server
  // really accepted it: the retry must not create a second message.
  let injected = 0;
  let lost = '';
  const clientIds = [];
  const sockets = []; // page-side ends of carol's sockets, newest last
  let syncDone;
  const synced = new Promise((resolve) => { syncDone = resolve; });
  const carol = await newUser(GW1, 'carol', {
    setup: (page) =>
      page.routeWebSocket(/\/ws/, (ws) => {
        const server = ws.connectToServer();
        sockets.push({ ws, server });
        ws.onMessage((m) => {
          const f = JSON.parse(m);
          if (f.send) {
            clientIds.push(f.send.clientMessageId);
            if (!lost) lost = f.send.clientMessageId;
          }
          server.send(m);
        });
        server.onMessage((m) => {
          const f = JSON.parse(m);
          if (f.syncDone) syncDone();
          if (f.stored && f.stored.clientMessageId === lost) return;
          if (f.accepted && f.accepted.clientMessageId === lost && injected === 0) {
            injected += 1;
            const error = { code: 'produce_failed', message: 'injected failure', clientMessageId: f.accepted.clientMessageId };
            ws.send(JSON.stringify({ error }));
            return;
          }
          ws.send(m);
        });
      }),
  });
  // The send goes once the first sync and the conversation's history are in: a history answered
  // after the server stored the message would show it accepted before the retry goes (which is
  // right, but then there is no retry to check).
  await synced;
  const history = carol.page.waitForResponse((r) => new URL(r.url()).pathname === '/messages/dave');
  await openConversation(carol.page, 'dave');
  await history;
  await send(carol.page, 'flaky');
  // produce_failed is a passing refusal: the outbox sends the message again by itself, under the
  // same id, and the server answers the repeat with the original message.
  await ownMessage(carol.page, 'flaky', 'accepted').or(ownMessage(carol.page, 'flaky', 'delivered')).waitFor({ timeout: WAIT });
  await shot(carol.page, `${RETENTION}-08-carol-resent`);
  assert.equal(injected, 1, 'the first answer was the injected refusal');
  assert.equal(clientIds.length, 2);
  assert.equal(clientIds[0], clientIds[1], 'the retry reuses the client message id');

  // dave (offline until now) uses a phone-sized screen in dark mode, and only the keyboard.
  const dave = await newUser(GW2, 'dave', { viewport: { width: 390, height: 760 }, colorScheme: 'dark' });

  // dave: the list view first (narrow), a badge, then the conversation with the keyboard.
  await dave.page.locator('#contact-list button[data-peer="carol"] .badge', { hasText: '1' }).waitFor({ timeout: WAIT });
  await shot(dave.page, `${RETENTION}-09-dave-narrow-list`);
  assert.equal(await dave.page.locator('#conversation').isVisible(), false, 'one pane at a time on a narrow screen');
  await dave.page.locator('#contact-list button[data-peer="carol"]').focus();
  await dave.page.keyboard.press('Enter');
  await dave.page.locator('#composer-input:focus').waitFor({ timeout: WAIT });
  await theirMessage(dave.page, 'flaky').waitFor({ timeout: WAIT });
  await dave.page.keyboard.type('got it once');
  await dave.page.keyboard.press('Enter');
  await ownMessage(dave.page, 'got it once', 'delivered').waitFor({ timeout: WAIT });
  await ownMessage(carol.page, 'flaky', 'delivered').waitFor({ timeout: WAIT });
  await theirMessage(carol.page, 'got it once').waitFor({ timeout: WAIT });
  assert.deepEqual(await bodies(dave.page), ['flaky', 'got it once']);
  const onServer = await serverHistory(dave.page, 'carol');
  assert.equal(onServer.filter((m) => m.sender === 'carol').length, 1, 'one message on the server');
  await shot(dave.page, `${RETENTION}-10-dave-narrow-conversation`);
  await shot(carol.page, `${RETENTION}-11-carol-retried`);

  // Back to the list with the keyboard (Escape in the message box).
  await dave.page.keyboard.press('Escape');
  await dave.page.locator('#contact-list').waitFor({ timeout: WAIT });
  assert.equal(await dave.page.locator('#conversation').isVisible(), false);
  await dave.page.locator('#contact-list button[data-peer="carol"]:focus').waitFor({ timeout: WAIT });

  // The server drops carol's socket as "not draining" (4008): she reconnects by herself (backoff)
  // and resumes; what dave sent meanwhile arrives once.
  const before = sockets.length;
  const last = sockets.at(-1);
  await last.ws.close({ code: 4008, reason: 'socket not draining' });
  await last.server.close();
  await carol.page.locator('#conn-status[data-state="waiting"]').waitFor({ timeout: WAIT });
  await dave.page.keyboard.press('Enter'); // dave's focus is on the carol button: open it
  await dave.page.locator('#composer-input:focus').waitFor({ timeout: WAIT });
  await dave.page.keyboard.type('while you were away');
  await dave.page.keyboard.press('Enter');
  await connected(carol.page);
  assert.ok(sockets.length > before, 'carol opened a new socket');
  await theirMessage(carol.page, 'while you were away').waitFor({ timeout: WAIT });
  await ownMessage(dave.page, 'while you were away', 'delivered').waitFor({ timeout: WAIT });
  assert.deepEqual(await bodies(carol.page), ['flaky', 'got it once', 'while you were away']);

  // A second tab of carol takes over (the server closes the first with 4001); the first one does
  // not fight back until asked to.
  const tab2 = await carol.context.newPage();
  await tab2.goto('/');
  await connected(tab2);
  await carol.page.locator('#conn-status[data-state="replaced"]').waitFor({ timeout: WAIT });
  await shot(carol.page, `${RETENTION}-12-carol-replaced`);
  await carol.page.getByRole('button', { name: 'Use this tab' }).click();
  await connected(carol.page);
  await tab2.locator('#conn-status[data-state="replaced"]').waitFor({ timeout: WAIT });

  await carol.context.close();
  await dave.context.close();
});

test('a receipt missed while offline arrives with the next sync', { skip }, async () => {
  const erin = await newUser(GW1, 'erin');
  await openConversation(erin.page, 'frank');
  await send(erin.page, 'are you there?');
  await ownMessage(erin.page, 'are you there?', 'accepted').waitFor({ timeout: WAIT });
  // The seq came with `stored`, without asking history.
  await erin.page.locator('li.msg.own[data-seq="1"]').waitFor({ timeout: WAIT });

  await erin.context.setOffline(true);
  await erin.page.locator('#conn-status[data-state="offline"]').waitFor({ timeout: WAIT });
  let ackSent;
  const acked = new Promise((resolve) => (ackSent = resolve));
  const frank = await newUser(GW2, 'frank', {
    setup: (page) =>
      page.on('websocket', (ws) =>
        ws.on('framesent', (f) => {
          if (JSON.parse(f.payload).ack?.peer === 'erin') ackSent();
        }),
      ),
  });
  await openConversation(frank.page, 'erin');
  await theirMessage(frank.page, 'are you there?').waitFor({ timeout: WAIT });
  await acked;
  // His answer comes after his ack in the conversation's partition: once it is stored (seq 2),
  // the ack was applied and its receipt found erin offline.
  await send(frank.page, 'yes');
  await frank.page.locator('li.msg.own[data-seq="2"]').waitFor({ timeout: WAIT });
  await erin.context.setOffline(false);
  await connected(erin.page);
  await theirMessage(erin.page, 'yes').waitFor({ timeout: WAIT });
  await ownMessage(erin.page, 'are you there?', 'delivered').waitFor({ timeout: WAIT });
  await shot(erin.page, `${RETENTION}-13-erin-receipt-after-offline`);

  await erin.context.close();
  await frank.context.close();
});

test('a new device lists every conversation, read ones too, with unread badges', { skip }, async () => {
  // One browser context: gina on gateway 1 and hank on gateway 2 (two origins, two storages).
  const first = await browser.newContext({ viewport: { width: 1100, height: 720 } });
  const gina = await first.newPage();
  const hank = await first.newPage();
  for (const [page, user, base] of [[gina, 'gina', GW1], [hank, 'hank', GW2]]) {
    page.on('pageerror', (e) => console.error(`[${user}] page error:`, e));
    await page.goto(`${base}/`);
    await signIn(page, user);
  }
  const hankToken = await hank.evaluate(() => JSON.parse(localStorage.getItem('chat.v1.session')).token);

  // gina and hank talk; hank's browser stores and acknowledges, gina sees two ticks both ways.
  await openConversation(gina, 'hank');
  await send(gina, 'hello hank');
  await badge(hank, 'gina').filter({ hasText: '1' }).waitFor({ timeout: WAIT });
  await openConversation(hank, 'gina');
  await theirMessage(hank, 'hello hank').waitFor({ timeout: WAIT });
  await send(hank, 'hi gina');
  await ownMessage(gina, 'hello hank', 'delivered').waitFor({ timeout: WAIT });
  await ownMessage(hank, 'hi gina', 'delivered').waitFor({ timeout: WAIT });

  // juno writes (over REST); hank's browser receives and acknowledges it; he never answers.
  const junoToken = await devToken(GW1, 'juno');
  await restSend(GW1, junoToken, 'hank', 'are you coming on friday?');
  await badge(hank, 'juno').filter({ hasText: '1' }).waitFor({ timeout: WAIT });
  await openConversation(hank, 'juno');
  await theirMessage(hank, 'are you coming on friday?').waitFor({ timeout: WAIT });
  await listedUntil(GW1, hankToken, 'gina and juno read', (l) => l.get('gina')?.unread === 0 && l.get('gina')?.lastSeq === 2 && l.get('juno')?.unread === 0);
  await first.close();

  // ivy writes twice while hank is away: unread.
  const ivyToken = await devToken(GW1, 'ivy');
  await restSend(GW1, ivyToken, 'hank', 'ping');
  await restSend(GW1, ivyToken, 'hank', 'ping again');
  await listedUntil(GW1, hankToken, 'ivy with 2 unread', (l) => l.get('ivy')?.unread === 2);

  // hank on a new device: nothing in this browser, and the sync brings only ivy's messages.
  const fresh = await browser.newContext({ viewport: { width: 1100, height: 720 }, baseURL: GW1 });
  const device = await fresh.newPage();
  device.on('pageerror', (e) => console.error('[hank, new device] page error:', e));
  await device.goto('/');
  // Signed in with a token brought from elsewhere (pasted). First one for "..", which no one can
  // be reached as: refused on the page, before anything is stored or sent.
  await device.getByText('Use an access token instead').click();
  const unsigned = (claims) => ['{"alg":"RS256"}', JSON.stringify(claims)].map((j) => Buffer.from(j).toString('base64url')).join('.') + '.c2ln';
  await device.getByLabel('Access token (JWT)').fill(unsigned({ sub: '..' }));
  await device.getByRole('button', { name: 'Sign in' }).click();
  await device.locator('#signin-error', { hasText: 'may not be "." or ".."' }).waitFor({ timeout: WAIT });
  assert.equal(await device.evaluate(() => localStorage.getItem('chat.v1.session')), null);
  const listed = device.waitForResponse((r) => new URL(r.url()).pathname === '/conversations');
  await device.getByLabel('Access token (JWT)').fill(hankToken);
  await device.getByRole('button', { name: 'Sign in' }).click();
  await connected(device);
  await device.locator('#me-name', { hasText: 'hank' }).waitFor({ timeout: WAIT });
  assert.equal((await listed).status(), 200);

  const row = (peer) => device.locator(`#contact-list button[data-peer="${peer}"]`);
  for (const peer of ['gina', 'juno']) {
    await row(peer).waitFor({ timeout: WAIT });
    assert.equal(await row(peer).getAttribute('data-unread'), '0', `${peer}: read on the other device`);
    assert.equal(await badge(device, peer).isHidden(), true);
  }
  await badge(device, 'ivy').filter({ hasText: /^2$/ }).waitFor({ timeout: WAIT });
  assert.equal(await row('ivy').getAttribute('data-unread'), '2');
  assert.deepEqual(await contactPeers(device), ['ivy', 'juno', 'gina'], 'newest activity first');
  const preview = (peer) => row(peer).locator('.contact-preview').innerText();
  // In keep mode the list brings the preview; in delete-on-ack mode it has none, and the preview
  // shows once the websocket's sync has brought ivy's messages, which may be after the badge.
  await row('ivy').locator('.contact-preview').filter({ hasText: /^ping again$/ }).waitFor({ timeout: WAIT });
  if (RETENTION === 'keep') {
    // The previews come from the list: this browser holds none of these messages.
    assert.equal(await preview('juno'), 'are you coming on friday?');
    assert.equal(await preview('gina'), 'You: hi gina');
  }
  await shot(device, `${RETENTION}-14-hank-new-device`);

  // Opening a listed conversation loads its history; reading ivy's clears the badge.
  await openConversation(device, 'gina');
  await device.locator('li.msg.own[data-status="delivered"][data-seq="2"]').waitFor({ timeout: WAIT });
  assert.equal(await device.locator('#messages li').count(), 2);
  // In delete-on-ack mode the server erased both bodies once they were acknowledged.
  if (RETENTION === 'keep') assert.deepEqual(await bodies(device), ['hello hank', 'hi gina']);
  await openConversation(device, 'ivy');
  await theirMessage(device, 'ping again').waitFor({ timeout: WAIT });
  await badge(device, 'ivy').waitFor({ state: 'hidden', timeout: WAIT });
  await fresh.close();
});

test('over https: the page and its websocket (wss://) from a gateway serving TLS', { skip: skip || (!GW3 && 'needs E2E_GW3') }, async () => {
  assert.ok(GW3.startsWith('https://'), GW3);
  // From node, the certificate is checked against the run's CA (NODE_EXTRA_CA_CERTS): the
  // gateway really serves TLS with it, and answers REST over https.
  const token = await devToken(GW3, 'tlsnode');
  assert.ok(token);
  // The browser is shown a certificate from a CA it does not know: that context accepts it.
  const sockets = [];
  const tina = await newUser(GW3, 'tina', {
    contextOptions: { ignoreHTTPSErrors: true },
    setup: (page) => page.on('websocket', (ws) => sockets.push(ws.url())),
  });
  assert.ok(tina.page.url().startsWith('https://'), tina.page.url());
  assert.ok(sockets.length > 0 && sockets.every((u) => u.startsWith('wss://')), JSON.stringify(sockets));
  const uma = await newUser(GW1, 'uma');
  await openConversation(tina.page, 'uma');
  await send(tina.page, 'sent over TLS');
  await openConversation(uma.page, 'tina');
  await theirMessage(uma.page, 'sent over TLS').waitFor({ timeout: WAIT });
  await send(uma.page, 'read over TLS');
  await theirMessage(tina.page, 'read over TLS').waitFor({ timeout: WAIT });
  await ownMessage(tina.page, 'sent over TLS', 'delivered').waitFor({ timeout: WAIT });
  await shot(tina.page, `${RETENTION}-40-https`);
  await tina.context.close();
  await uma.context.close();
});
