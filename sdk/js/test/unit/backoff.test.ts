/** Reconnect delays grow exponentially, stay within their jitter bounds, and honour the server. */
import { describe, expect, it } from "vitest";
import { Backoff, parseRetryAfter } from "../../src/backoff.js";

describe("Backoff", () => {
  it("doubles from the initial delay up to the ceiling, without jitter", () => {
    const b = new Backoff({ initialMs: 100, maxMs: 1_000, jitter: 0 });
    expect([1, 2, 3, 4, 5, 6].map(() => b.next())).toEqual([100, 200, 400, 800, 1_000, 1_000]);
  });

  it("keeps every jittered delay within [base × (1 − jitter), base]", () => {
    const b = new Backoff({ initialMs: 100, maxMs: 10_000, jitter: 0.5 });
    for (let round = 0; round < 50; round++) {
      b.reset();
      for (let attempt = 0; attempt < 10; attempt++) {
        const base = Math.min(10_000, 100 * 2 ** attempt);
        const delay = b.next();
        expect(delay, `attempt ${attempt}`).toBeGreaterThanOrEqual(Math.floor(base * 0.5));
        expect(delay, `attempt ${attempt}`).toBeLessThanOrEqual(base);
      }
    }
  });

  it("spreads clients that retry together (jitter is actually random)", () => {
    const delays = new Set(Array.from({ length: 50 }, () => new Backoff({ initialMs: 1_000 }).next()));
    expect(delays.size).toBeGreaterThan(10);
  });

  it("uses the extremes of the injected randomness exactly", () => {
    expect(new Backoff({ initialMs: 1_000, jitter: 0.3, random: () => 0 }).next()).toBe(1_000);
    expect(new Backoff({ initialMs: 1_000, jitter: 0.3, random: () => 0.999999 }).next()).toBe(700);
  });

  it("waits at least as long as the server asked", () => {
    const b = new Backoff({ initialMs: 100, jitter: 0 });
    expect(b.next(5_000)).toBe(5_000);
    expect(b.next(10)).toBe(200);
  });

  it("starts over after a reset", () => {
    const b = new Backoff({ initialMs: 100, jitter: 0 });
    b.next();
    b.next();
    expect(b.attempt).toBe(2);
    b.reset();
    expect(b.next()).toBe(100);
  });

  it("refuses nonsense bounds", () => {
    expect(() => new Backoff({ initialMs: 500, maxMs: 100 })).toThrow(RangeError);
    expect(() => new Backoff({ factor: 0.5 })).toThrow(RangeError);
  });
});

describe("parseRetryAfter", () => {
  it("reads seconds and HTTP dates", () => {
    expect(parseRetryAfter("3")).toBe(3_000);
    expect(parseRetryAfter("0.5")).toBe(500);
    const now = Date.parse("2026-11-28T10:00:00Z");
    expect(parseRetryAfter("Sat, 28 Nov 2026 10:00:07 GMT", now)).toBe(7_000);
    expect(parseRetryAfter(null)).toBeUndefined();
    expect(parseRetryAfter("soon")).toBeUndefined();
  });
});
