// The websocket to the gateway: JSON frames, reconnection with exponential backoff and jitter.
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

/** Delay before reconnect attempt `n` (0-based): 0.5 s doubling up to 30 s, with jitter. */
export function backoffDelay(n, random = Math.random) {
  const base = Math.min(30_000, 500 * 2 ** Math.min(n, 16));
  return Math.round(base / 2 + (random() * base) / 2);
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
    this.onOnline = () => {
      if (this.state === 'offline' || this.state === 'waiting') this.connectNow();
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
        this.attempt = 0;
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
    this.retryAt = Date.now() + delay;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.open(), delay);
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
    this.drop(this.ws, why);
    this.scheduleRetry(why);
  }

  get isOpen() {
    return this.state === 'open';
  }
}
