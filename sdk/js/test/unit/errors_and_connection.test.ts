/** ParleyError's shape and helpers; the Connection state object and its events. */
import { describe, expect, it } from "vitest";
import { Connection } from "../../src/connection.js";
import { isParleyError, ParleyError } from "../../src/errors.js";

describe("ParleyError", () => {
  it("carries code, message, status, request id and retry delay", () => {
    const e = new ParleyError({ code: "rate_limited", message: "slow down", status: 429, requestId: "r1", retryAfterMs: 1500 });
    expect(e).toBeInstanceOf(Error);
    expect(e.name).toBe("ParleyError");
    expect([e.code, e.message, e.status, e.requestId, e.retryAfterMs]).toEqual(["rate_limited", "slow down", 429, "r1", 1500]);
    expect(e.retryable).toBe(true);
  });

  it("says which codes are worth retrying", () => {
    for (const code of ["rate_limited", "unavailable", "network", "timeout", "disconnected"]) {
      expect(new ParleyError({ code, message: "" }).retryable, code).toBe(true);
    }
    for (const code of ["idempotency_conflict", "not_a_member", "invalid_argument", "closed", "token_expired"]) {
      expect(new ParleyError({ code, message: "" }).retryable, code).toBe(false);
    }
  });

  it("is matched by code with isParleyError", () => {
    const e = new ParleyError({ code: "forbidden", message: "no" });
    expect(isParleyError(e)).toBe(true);
    expect(isParleyError(e, "forbidden", "not_found")).toBe(true);
    expect(isParleyError(e, "not_found")).toBe(false);
    expect(isParleyError(new Error("x"))).toBe(false);
  });
});

describe("Connection", () => {
  it("starts disconnected and reports each change with the previous state", () => {
    const c = new Connection();
    const seen: string[] = [];
    c.on("statechange", (ch) => seen.push(`${ch.previous}->${ch.current}`));
    c._transition("connecting");
    c._transition("reconnecting", { retryInMs: 100 });
    c._transition("reconnecting", { retryInMs: 200 }); // every retry is announced
    c._transition("connected");
    c._transition("connected"); // not a change
    expect(seen).toEqual(["disconnected->connecting", "connecting->reconnecting", "reconnecting->reconnecting", "reconnecting->connected"]);
  });

  it("waits for a state, at once if it holds, with a bounded timeout otherwise", async () => {
    const c = new Connection();
    await c.waitFor("disconnected");
    const waiting = c.waitFor("connected", 1_000);
    c._transition("connecting");
    c._transition("connected");
    await waiting;
    await expect(c.waitFor("reconnecting", 20)).rejects.toThrow(/not reconnecting within 20 ms \(state connected\)/);
  });
});
