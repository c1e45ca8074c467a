/** Own typing is debounced (one start per throttle, a stop after idling); others' expire. */
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { Typing } from "../../src/typing.js";

describe("Typing", () => {
  beforeEach(() => vi.useFakeTimers());
  afterEach(() => vi.useRealTimers());

  function setup(throttleMs = 3_000, idleMs = 4_000) {
    const sent: string[] = [];
    const changes: string[] = [];
    const typing = new Typing(
      { send: (ch, state) => sent.push(`${ch}:${state}`), throttleMs: () => throttleMs, now: () => Date.now() },
      { idleMs },
      (ch) => changes.push(ch),
    );
    return { typing, sent, changes };
  }

  it("sends one start per throttle interval while keys are pressed, then a stop after idling", () => {
    const { typing, sent } = setup();
    typing.keystroke("c");
    vi.advanceTimersByTime(1_000);
    typing.keystroke("c");
    vi.advanceTimersByTime(1_000);
    typing.keystroke("c");
    expect(sent).toEqual(["c:start"]);
    vi.advanceTimersByTime(1_500);
    typing.keystroke("c"); // 3.5 s after the first start
    expect(sent).toEqual(["c:start", "c:start"]);
    vi.advanceTimersByTime(3_999);
    expect(sent).toHaveLength(2);
    vi.advanceTimersByTime(1);
    expect(sent).toEqual(["c:start", "c:start", "c:stop"]);
  });

  it("stops at once on request, and not again after a reset", () => {
    const { typing, sent } = setup();
    typing.keystroke("c");
    typing.stop("c");
    typing.stop("c");
    expect(sent).toEqual(["c:start", "c:stop"]);
    typing.keystroke("c");
    typing.reset("c"); // a sent message stopped it on the server
    vi.advanceTimersByTime(10_000);
    expect(sent).toEqual(["c:start", "c:stop", "c:start"]);
  });

  it("tracks others until the server's expiry, a stop, or their message", () => {
    const { typing, changes } = setup();
    typing._onEvent({ type: "typing", channel_id: "c", user_id: "bob", state: "start", expires_in_ms: 6_000 });
    typing._onEvent({ type: "typing", channel_id: "c", user_id: "eve", state: "start", expires_in_ms: 1_000 });
    expect(typing.users("c").sort()).toEqual(["bob", "eve"]);
    vi.advanceTimersByTime(1_000);
    expect(typing.users("c")).toEqual(["bob"]);
    typing._onMessage("c", "bob");
    expect(typing.users("c")).toEqual([]);
    expect(changes).toEqual(["c", "c", "c", "c"]);
  });
});
