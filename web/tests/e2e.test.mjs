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
//
// Every wait is on a DOM condition (selector / predicate) or a browser event, never a fixed sleep.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const GW1 = process.env.E2E_GW1;
const GW2 = process.env.E2E_GW2;
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

async function newUser(base, user, { viewport = { width: 1100, height: 720 }, colorScheme = 'light', setup, shotSignIn } = {}) {
  const context = await browser.newContext({ viewport, colorScheme, baseURL: base });
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
  // carol's socket goes through a proxy that turns the first `accepted` into an error (and drops
  // the `stored` that follows), after the server really accepted it: the retry must not create a
  // second message.
  let injected = 0;
  let lost = '';
  const clientIds = [];
  const sockets = []; // page-side ends of carol's sockets, newest last
  const carol = await newUser(GW1, 'carol', {
    setup: (page) =>
      page.routeWebSocket(/\/ws/, (ws) => {
        const server = ws.connectToServer();
        sockets.push({ ws, server });
        ws.onMessage((m) => {
          const f = JSON.parse(m);
          if (f.send) clientIds.push(f.send.clientMessageId);
          server.send(m);
        });
        server.onMessage((m) => {
          const f = JSON.parse(m);
          if (f.stored && f.stored.clientMessageId === lost) return;
          if (f.accepted && injected === 0) {
            injected += 1;
            lost = f.accepted.clientMessageId;
            const error = { code: 'produce_failed', message: 'injected failure', clientMessageId: f.accepted.clientMessageId };
            ws.send(JSON.stringify({ error }));
            return;
          }
          ws.send(m);
        });
      }),
  });
  await openConversation(carol.page, 'dave');
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
