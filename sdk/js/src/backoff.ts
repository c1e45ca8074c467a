//! Reconnect delays: exponential backoff with jitter, and the server's own delay when it asks.

export interface BackoffOptions {
  /** Delay before the first retry, before jitter. Default 500 ms. */
  initialMs?: number;
  /** Ceiling of the delay, before jitter. Default 30 s. */
  maxMs?: number;
  /** Growth per attempt. Default 2. */
  factor?: number;
  /**
   * Share of the delay that is random, 0–1. Default 0.5: a delay is uniform in
   * `[base × (1 − jitter), base]`, so clients that dropped together do not return together.
   */
  jitter?: number;
  /** Source of randomness in [0, 1); injectable for tests. */
  random?: () => number;
}

/** Exponential backoff: attempt n waits `min(maxMs, initialMs × factor^n)`, less random jitter. */
export class Backoff {
  readonly initialMs: number;
  readonly maxMs: number;
  readonly factor: number;
  readonly jitter: number;
  readonly #random: () => number;
  #attempt = 0;

  constructor(options: BackoffOptions = {}) {
    this.initialMs = options.initialMs ?? 500;
    this.maxMs = options.maxMs ?? 30_000;
    this.factor = options.factor ?? 2;
    this.jitter = Math.min(1, Math.max(0, options.jitter ?? 0.5));
    this.#random = options.random ?? Math.random;
    if (this.initialMs < 0 || this.maxMs < this.initialMs || this.factor < 1) {
      throw new RangeError("backoff: need 0 ≤ initialMs ≤ maxMs and factor ≥ 1");
    }
  }

  /** How many delays were handed out since the last reset. */
  get attempt(): number {
    return this.#attempt;
  }

  /** The delay before the next attempt, at least `serverDelayMs` when the server asked for one. */
  next(serverDelayMs?: number): number {
    const base = Math.min(this.maxMs, this.initialMs * this.factor ** this.#attempt);
    this.#attempt += 1;
    const delay = base * (1 - this.jitter * this.#random());
    return Math.round(Math.max(delay, serverDelayMs ?? 0));
  }

  /** Back to the first delay (after a connection that worked). */
  reset(): void {
    this.#attempt = 0;
  }
}

/** Parses an HTTP `Retry-After` header (seconds or an HTTP date) into milliseconds. */
export function parseRetryAfter(value: string | null, now: number = Date.now()): number | undefined {
  if (value === null || value.trim() === "") return undefined;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, Math.round(seconds * 1000));
  const date = Date.parse(value);
  return Number.isNaN(date) ? undefined : Math.max(0, date - now);
}
