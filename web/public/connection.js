// The websocket to the gateway: JSON frames, reconnection with exponential backoff and jitter.
//
// Why the jitter: when a gateway goes away, every browser it held sees the drop at the same
// moment. Each wait is drawn at random between a floor and a ceiling that doubles per failed
// attempt (`backoffDelay`), so they come back spread out rather than in waves; the schedule only
// starts over once a connection has held for STABLE_MS, so a server that accepts and drops at
// once sees the waits grow; and the browser's `online` event reconnects after a short random
// wait, not at once, since a whole office's network comes back at the same moment too.
//
// States (the `state` event's detail):
//   connecting  a socket is opening
//   open        the server's `welcome` arrived
//   waiting     closed; the next attempt is scheduled (`retryAt` = time of the next attempt)
//   offline     the browser says it has no network; retried as soon as it says it is back
//   replaced    the server closed with 4001 (same user connected elsewhere); not retried
//   unauthorized the token was refused; not retried
//   stopped     stop() was called

export const CLOSE = {
  NORMAL: 1000,
  GOING_AWAY: 1001,
  BAD_DATA: 1007,
  TOO_BIG: 1009,
  INTERNAL: 1011,
  REPLACED: 4001,
  SLOW_CONSUMER: 4008,
};

/** The reconnection schedule, in ms: the shortest wait, the first window's end, the longest. */
export const BACKOFF = { floor: 250, first: 1_000, cap: 30_000 };
/** A connection open this long was a success: after it drops, the schedule starts over. */
export const STABLE_MS = 10_000;
/** Back online, the reconnect waits a random time below this. */
export const ONLINE_JITTER_MS = 1_000;

/** The end of attempt `n`'s window (0-based): 1 s doubling up to 30 s. */
export function backoffCeiling(n) {
  return Math.min(BACKOFF.cap, BACKOFF.first * 2 ** Math.min(Math.max(n, 0), 16));
}

/** Delay before reconnect attempt `n` (0-based): uniformly random in [0.25 s, backoffCeiling(n)]. */
export function backoffDelay(n, random = Math.random) {
  const ceiling = backoffCeiling(n);
  return Math.round(BACKOFF.floor + random() * (ceiling - BACKOFF.floor));
}

export class Connection extends EventTarget {
  /**
   * @param {object} o
   * @param {string} o.baseUrl http(s) origin of the gateway, e.g. location.origin
   * @param {() => string} o.token current access token
   * @param {(token: string) => Promise<boolean>} o.checkToken true if the token is still accepted
   */
  constructor({ baseUrl, token, checkToken }) {
    super();
    this.baseUrl = baseUrl;
    this.token = token;
    this.checkToken = checkToken;
    this.ws = null;
    this.state = 'stopped';
    this.attempt = 0;
    this.timer = null;
    this.retryAt = 0;
    this.welcomed = false;
    this.openedAt = 0; // when the current socket was welcomed
    this.onOnline = () => {
      if (this.state === 'offline' || this.state === 'waiting') this.retryIn(Math.round(Math.random() * ONLINE_JITTER_MS), 'back online');
    };
    this.onOffline = () => {
      // The socket may linger half-open for minutes after the network is gone; drop it now.
      clearTimeout(this.timer);
      this.timer = null;
      if (this.ws) this.drop(this.ws, 'offline');
      this.setState('offline');
    };
  }

  setState(state, extra = {}) {
    this.state = state;
    this.dispatchEvent(new CustomEvent('state', { detail: { state, ...extra } }));
  }

  start() {
    globalThis.addEventListener?.('online', this.onOnline);
    globalThis.addEventListener?.('offline', this.onOffline);
    this.attempt = 0;
    this.connectNow();
  }

  stop() {
    globalThis.removeEventListener?.('online', this.onOnline);
    globalThis.removeEventListener?.('offline', this.onOffline);
    clearTimeout(this.timer);
    if (this.ws) this.drop(this.ws, 'stopped');
    this.setState('stopped');
  }

  /** Reconnects immediately (user action, or the network came back). */
  connectNow() {
    clearTimeout(this.timer);
    this.timer = null;
    if (this.ws) this.drop(this.ws, 'reconnect');
    if (globalThis.navigator && navigator.onLine === false) {
      this.setState('offline');
      return;
    }
    this.open();
  }

  wsUrl() {
    const u = new URL('/ws', this.baseUrl);
    u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:';
    u.searchParams.set('format', 'json');
    // The client resumes with its own `sync` (last seq per peer, receipts since): no automatic one.
    u.searchParams.set('sync', 'manual');
    u.searchParams.set('access_token', this.token());
    return u.toString();
  }

  open() {
    this.welcomed = false;
    this.setState('connecting', { attempt: this.attempt });
    let ws;
    try {
      ws = new WebSocket(this.wsUrl());
    } catch (e) {
      this.scheduleRetry(String(e));
      return;
    }
    this.ws = ws;
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      if (typeof ev.data !== 'string') return; // this client asks for JSON only
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (frame.welcome) {
        this.welcomed = true;
        this.openedAt = Date.now();
        this.setState('open', { welcome: frame.welcome });
      }
      this.dispatchEvent(new CustomEvent('frame', { detail: frame }));
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.closed(ev.code, ev.reason, this.welcomed);
    };
    ws.onerror = () => {
      // A close event always follows; nothing to do here.
    };
  }

  /** Detaches and closes a socket without reporting its close. */
  drop(ws, why) {
    ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      ws.close(CLOSE.NORMAL, why);
    } catch {
      /* already closed */
    }
    if (this.ws === ws) {
      this.ws = null;
      this.dispatchEvent(new CustomEvent('closed', { detail: { code: 0, reason: why, wasOpen: this.welcomed } }));
    }
  }

  async closed(code, reason, wasOpen) {
    this.dispatchEvent(new CustomEvent('closed', { detail: { code, reason, wasOpen } }));
    if (this.state === 'stopped') return;
    if (wasOpen && Date.now() - this.openedAt >= STABLE_MS) this.attempt = 0;
    if (code === CLOSE.REPLACED) {
      this.setState('replaced', { reason });
      return;
    }
    if (!wasOpen && this.checkToken) {
      // A refused upgrade (401) looks like any failed connection (1006) to a browser: ask the
      // REST side whether the token is the problem.
      let ok = true;
      try {
        ok = await this.checkToken(this.token());
      } catch {
        ok = true; // the server is unreachable: that is a network problem, retry
      }
      if (this.state === 'stopped') return;
      if (!ok) {
        this.setState('unauthorized');
        return;
      }
    }
    if (globalThis.navigator && navigator.onLine === false) {
      this.setState('offline');
      return;
    }
    this.scheduleRetry(reason || `closed (${code})`);
  }

  scheduleRetry(reason) {
    const delay = backoffDelay(this.attempt);
    this.attempt += 1;
    this.retryIn(delay, reason);
  }

  /** Opens a socket after `delay` ms (state `waiting` until then). */
  retryIn(delay, reason) {
    this.retryAt = Date.now() + delay;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = null;
      if (globalThis.navigator && navigator.onLine === false) {
        this.setState('offline');
        return;
      }
      this.open();
    }, delay);
    this.setState('waiting', { retryAt: this.retryAt, delay, reason });
  }

  /** Sends one ClientFrame; false when there is no open connection. */
  send(frame) {
    if (!this.ws || !this.welcomed || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  /** Forces a reconnect, e.g. when the server stopped answering on this socket. */
  recycle(why) {
    if (!this.ws) return;
    const stable = this.welcomed && Date.now() - this.openedAt >= STABLE_MS;
    this.drop(this.ws, why);
    if (stable) this.attempt = 0;
    this.scheduleRetry(why);
  }

  get isOpen() {
    return this.state === 'open';
  }
}
