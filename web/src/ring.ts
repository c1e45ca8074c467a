//! An incoming call. In a DM: a dialog that rings (Accept / Decline), with a ring tone where the
//! browser lets the page play sound (autoplay rules may keep it silent until the page was
//! interacted with; the dialog shows either way). In a channel, where a call is an invitation to
//! many rather than a call to you: a quiet notice in a corner (Join / Dismiss), no tone. Either
//! stops when answered, declined, answered in another tab, when the call ends, and after the ring
//! time.
import type { Call } from "@parley/sdk";
import { h } from "./dom.js";

/** How long a call rings, and how long a caller waits in a DM before giving up ("no answer"). */
export function ringTimeoutMs(): number {
  // A development and test knob: `localStorage["parley.ringTimeoutMs"] = "5000"`.
  const override = Number(globalThis.localStorage?.getItem("parley.ringTimeoutMs"));
  return Number.isFinite(override) && override > 0 ? override : 30_000;
}

export interface Ringing {
  call: Call;
  /** "alice is calling you", "alice started a call in # general". */
  text: string;
  /** `ring` (a DM: modal, with a tone) or `notify` (a channel: a quiet notice). */
  mode: "ring" | "notify";
  accept: () => void;
}

export class Ringer {
  #dialog: HTMLDialogElement | null = null;
  #callId: string | null = null;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #audio: AudioContext | null = null;
  #tone: ReturnType<typeof setInterval> | undefined;
  #cleanup: (() => void) | null = null;

  /** The call ringing now, if any. */
  get callId(): string | null {
    return this.#callId;
  }

  ring(r: Ringing): void {
    if (this.#callId === r.call.id) return;
    this.stop();
    const left = Date.parse(r.call.started_at) + ringTimeoutMs() - Date.now();
    if (left <= 0) return;
    this.#callId = r.call.id;
    const ring = r.mode === "ring";
    const accept = h("button", { class: "button primary", type: "button", id: "accept-call" }, ring ? "Accept" : "Join");
    const decline = h("button", { class: ring ? "button danger" : "button", type: "button", id: "decline-call" }, ring ? "Decline" : "Dismiss");
    const dialog = h(
      "dialog",
      { class: `incoming-call${ring ? "" : " call-invite"}`, id: "incoming-call", "aria-labelledby": "incoming-call-title", "data-call-id": r.call.id },
      h("h2", { id: "incoming-call-title" }, ring ? "Incoming call" : "Call started"),
      h("p", { id: "incoming-call-text" }, r.text),
      h("div", { class: "dialog-actions" }, decline, accept),
    );
    accept.addEventListener("click", () => {
      this.stop();
      r.accept();
    });
    decline.addEventListener("click", () => this.stop());
    // Escape (the dialog's cancel) declines.
    dialog.addEventListener("close", () => this.stop(r.call.id));
    this.#dialog = dialog;
    document.body.append(dialog);
    this.#timer = setTimeout(() => this.stop(r.call.id), left);
    if (ring) {
      dialog.showModal();
      accept.focus();
      this.#startTone(dialog);
    } else {
      // Not modal: whoever is typing keeps typing. Escape dismisses it, wherever the focus is,
      // unless something else (a dialog, a message being edited) takes that Escape.
      dialog.show();
      const onKey = (e: KeyboardEvent) => {
        if (e.key === "Escape" && !e.defaultPrevented && !document.querySelector("dialog[open]:modal")) this.stop(r.call.id);
      };
      document.addEventListener("keydown", onKey);
      this.#cleanup = () => document.removeEventListener("keydown", onKey);
    }
  }

  /** Stops ringing (only if `callId` is the ringing call, when given). */
  stop(callId?: string): void {
    if (callId !== undefined && callId !== this.#callId) return;
    this.#callId = null;
    this.#cleanup?.();
    this.#cleanup = null;
    clearTimeout(this.#timer);
    clearInterval(this.#tone);
    this.#tone = undefined;
    void this.#audio?.close().catch(() => {});
    this.#audio = null;
    const dialog = this.#dialog;
    this.#dialog = null;
    if (dialog) {
      if (dialog.open) dialog.close();
      dialog.remove();
    }
  }

  /** Two short beeps every 2.5 s, as long as the page may play sound. */
  #startTone(dialog: HTMLElement): void {
    const Ctx = (globalThis as { AudioContext?: typeof AudioContext }).AudioContext;
    if (!Ctx) {
      dialog.dataset.sound = "unavailable";
      return;
    }
    let ctx: AudioContext;
    try {
      ctx = new Ctx();
    } catch {
      dialog.dataset.sound = "unavailable";
      return;
    }
    this.#audio = ctx;
    const beep = (at: number) => {
      const osc = ctx.createOscillator();
      const gain = ctx.createGain();
      osc.frequency.value = 480;
      gain.gain.setValueAtTime(0.0001, at);
      gain.gain.exponentialRampToValueAtTime(0.2, at + 0.02);
      gain.gain.exponentialRampToValueAtTime(0.0001, at + 0.35);
      osc.connect(gain).connect(ctx.destination);
      osc.start(at);
      osc.stop(at + 0.4);
    };
    const play = () => {
      if (ctx.state !== "running") return;
      beep(ctx.currentTime + 0.02);
      beep(ctx.currentTime + 0.5);
    };
    const show = () => (dialog.dataset.sound = ctx.state === "running" ? "playing" : "blocked");
    show();
    ctx.onstatechange = show;
    // Without an earlier interaction with the page, autoplay rules keep the context suspended.
    ctx.resume().then(play, () => {});
    this.#tone = setInterval(play, 2_500);
  }
}
