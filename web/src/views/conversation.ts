//! The open conversation: its header (members with presence, the members dialog, add member, call
//! button), the message list that pages back through history with notices of past calls, read
//! receipts, editing and deleting your own messages, the typing line and the composer.
//!
//! Keys: Enter sends, Shift+Enter starts a new line, ArrowUp in an empty composer edits your last
//! message; while editing, Enter saves and Escape cancels.
import type { Call } from "@parley/sdk";
import { formatTime, h, listNames, replaceChildren } from "../dom.js";
import type { AppState, ConversationState, ListedMessage } from "../state.js";

export interface ConversationActions {
  send(channelId: string, text: string): void;
  retry(channelId: string, clientMsgId: string): void;
  typing(channelId: string, active: boolean): void;
  loadEarlier(channelId: string): Promise<void>;
  addMember(channelId: string): void;
  openMembers(channelId: string): void;
  startOrJoinCall(channelId: string): void;
  /** Saves a new text for one of your messages; rejects with a readable error. */
  editMessage(channelId: string, messageId: string, text: string): Promise<void>;
  /** Asks, then deletes one of your messages. */
  deleteMessage(channelId: string, messageId: string): void;
}

/** One row of the list: a message, or the notice of a past call. */
type Entry = { kind: "message"; m: ListedMessage } | { kind: "call"; call: Call };

/** The message of ours being edited: its id, the text typed so far, and how saving went. */
interface Editing {
  id: string;
  draft: string | null;
  error: string;
  saving: boolean;
}

/** Below this many pixels from the top, the list fetches older messages by itself. */
const LOAD_EARLIER_THRESHOLD_PX = 48;

export class ConversationView {
  readonly element = h("main", { class: "main", id: "main", "aria-labelledby": "conversation-title" });
  /** Holds the chat column and, during a call, the call panel beside it. */
  readonly body = h("div", { class: "body" });
  readonly #head = h("header", { class: "conversation-head" });
  readonly #scroller = h("div", { class: "messages", tabindex: 0, role: "region", "aria-label": "Message history" });
  readonly #list = h("ol", { class: "message-list", id: "message-list", "aria-label": "Messages" });
  /** The live region: new messages are announced once (rows are reused across renders). */
  readonly #log = h("div", { role: "log", "aria-live": "polite", "aria-relevant": "additions" }, this.#list);
  /** Rendered rows by message key, with what they show, so an unchanged message keeps its row. */
  #rows = new Map<string, { element: HTMLElement; shown: string }>();
  readonly #edge = h("div", { class: "history-edge" });
  readonly #edgeText = h("span");
  readonly #loadEarlierButton = h("button", { class: "button small", type: "button", id: "load-earlier" }, "Load earlier messages");
  readonly #typing = h("div", { class: "typing", id: "typing-indicator", "aria-live": "polite" });
  readonly #input = h("textarea", { id: "composer-input", rows: 1, maxlength: 4000, autocomplete: "off" });
  readonly #composerLabel = h("label", { for: "composer-input", class: "visually-hidden" });
  readonly #sendButton = h("button", { class: "button primary", type: "submit" }, "Send");
  readonly #chat: HTMLElement;
  #shownId: string | null = null;
  #loadingEarlier = false;
  /** The id of the message of ours being edited, and the edit's error, if any. */
  #editing: Editing | null = null;

  constructor(
    private readonly state: AppState,
    private readonly actions: ConversationActions,
    /** Whether we are in the call of a channel. */
    private readonly inCall: (channelId: string) => boolean,
  ) {
    const composer = h("form", { class: "composer", "aria-label": "Write a message" }, this.#composerLabel, this.#input, this.#sendButton);
    composer.addEventListener("submit", (e) => {
      e.preventDefault();
      this.#submit();
    });
    this.#input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        this.#submit();
      } else if (e.key === "ArrowUp" && this.#input.value === "" && !e.isComposing) {
        const last = this.#lastEditable();
        if (last) {
          e.preventDefault();
          this.#startEdit(last.id);
        }
      }
    });
    this.#input.addEventListener("input", () => {
      if (!this.#shownId) return;
      this.actions.typing(this.#shownId, this.#input.value.trim() !== "");
    });
    this.#scroller.addEventListener("scroll", () => {
      if (this.#scroller.scrollTop < LOAD_EARLIER_THRESHOLD_PX) void this.#loadEarlier();
    });
    this.#loadEarlierButton.addEventListener("click", () => void this.#loadEarlier());
    this.#edge.append(this.#edgeText, this.#loadEarlierButton);
    this.#scroller.append(this.#edge, this.#log);
    this.#chat = h("section", { class: "chat", "aria-label": "Chat" }, this.#scroller, this.#typing, composer);
  }

  /** Renders the selected conversation, or a placeholder when none is open. */
  render(): void {
    const c = this.state.selected ? this.state.conversations.get(this.state.selected) : undefined;
    if (!c) {
      this.#shownId = null;
      replaceChildren(
        this.element,
        h("div", { class: "placeholder" }, h("h2", { id: "conversation-title" }, "No conversation open"), h("p", {}, "Pick a channel or a direct message, or start a new one.")),
      );
      return;
    }
    const switched = this.#shownId !== c.channel.id;
    if (switched) {
      this.#shownId = c.channel.id;
      this.#editing = null;
      this.#input.value = "";
      replaceChildren(this.element, this.#head, this.body);
      if (!this.body.contains(this.#chat)) this.body.prepend(this.#chat);
    }
    this.#renderHead(c);
    this.#renderMessages(c, switched);
    this.renderTyping();
    const title = this.state.title(c);
    this.#composerLabel.textContent = c.channel.kind === "dm" ? `Message ${title}` : `Message #${title}`;
    this.#input.placeholder = this.#composerLabel.textContent;
    if (switched) this.#input.focus();
  }

  /** The typing line alone (it changes often). */
  renderTyping(): void {
    const c = this.#shownId ? this.state.conversations.get(this.#shownId) : undefined;
    const now = Date.now();
    const who = c ? [...c.typing].filter(([user, until]) => user !== this.state.me && until > now).map(([user]) => user).sort() : [];
    this.#typing.textContent = who.length === 0 ? "" : `${listNames(who)} ${who.length === 1 ? "is" : "are"} typing…`;
  }

  /** Whether the newest message is on screen (the person can be said to have read it). */
  atBottom(): boolean {
    return this.#scroller.scrollHeight - this.#scroller.scrollTop - this.#scroller.clientHeight < 24;
  }

  #renderHead(c: ConversationState): void {
    const title = this.state.title(c);
    const members = c.members ?? [];
    const present = c.call ? c.call.participants.filter((p) => !p.left_at).length : 0;
    const inThisCall = this.inCall(c.channel.id);
    const callLabel = inThisCall ? `In call (${present})` : c.call ? `Join call (${present} in call)` : "Start call";
    const canAdd = c.channel.kind === "channel" && (c.channel.role === "owner" || c.channel.role === "moderator");
    const twin = this.state.disambiguation(c);
    replaceChildren(
      this.#head,
      h(
        "div",
        { class: "title-block" },
        h("h2", { id: "conversation-title" }, c.channel.kind === "dm" ? title : `# ${title}`),
        twin ? h("span", { class: "twin", id: "conversation-twin" }, `${twin} · created by ${c.channel.created_by}`) : null,
      ),
      h(
        "ul",
        { class: "members", "aria-label": "Members" },
        ...members.map((m) => {
          const status = m.user_id === this.state.me ? (this.state.connection === "connected" ? "online" : "offline") : (this.state.presence.get(m.user_id) ?? "offline");
          return h(
            "li",
            { "data-user-id": m.user_id },
            h("span", { class: "presence", "data-status": status, "data-user-id": m.user_id, "aria-hidden": "true" }),
            h("span", {}, m.user_id === this.state.me ? `${m.user_id} (you)` : m.user_id),
            h("span", { class: "visually-hidden" }, `, ${status}`),
          );
        }),
      ),
      h(
        "button",
        { class: "button", type: "button", id: "members-button", "aria-haspopup": "dialog", onclick: () => this.actions.openMembers(c.channel.id) },
        `Members (${members.length})`,
      ),
      canAdd ? h("button", { class: "button add-member", type: "button", onclick: () => this.actions.addMember(c.channel.id) }, "Add member") : null,
      h("button", { class: "button primary", type: "button", id: "call-button", disabled: inThisCall, onclick: () => this.actions.startOrJoinCall(c.channel.id) }, callLabel),
    );
  }

  #renderMessages(c: ConversationState, switched: boolean): void {
    const fromBottom = this.#scroller.scrollHeight - this.#scroller.scrollTop;
    const wasAtBottom = this.atBottom();
    // The button stays the same element across renders, so focus and clicks are never lost.
    this.#loadEarlierButton.hidden = !(c.historyLoaded && c.hasBefore);
    this.#loadEarlierButton.disabled = this.#loadingEarlier;
    this.#edgeText.textContent = !c.historyLoaded
      ? "Loading messages…"
      : c.hasBefore
        ? ""
        : c.messages.length === 0
          ? "No messages yet. Say hello!"
          : "This is the beginning of the conversation.";
    const receipts = this.#receipts(c);
    this.#reconcile(c, receipts, switched);
    if (switched || wasAtBottom) {
      this.#scroller.scrollTop = this.#scroller.scrollHeight;
    } else {
      // Keep what the person looks at in place when older messages are added above it.
      this.#scroller.scrollTop = this.#scroller.scrollHeight - fromBottom;
    }
  }

  /**
   * Brings the list in line with `c.messages`, touching only rows that changed: a screen reader
   * then announces new messages once, not the whole list on every render.
   */
  #reconcile(c: ConversationState, receipts: Map<number, string[]>, switched: boolean): void {
    if (switched) {
      this.#rows = new Map();
      this.#list.replaceChildren();
    }
    const next = new Map<string, { element: HTMLElement; shown: string }>();
    let cursor: ChildNode | null = this.#list.firstChild;
    let previous: ListedMessage | undefined;
    for (const entry of timeline(c)) {
      let key: string;
      let shown: string;
      let make: () => HTMLElement;
      if (entry.kind === "call") {
        const call = entry.call;
        key = `call\u0000${call.id}`;
        shown = JSON.stringify([call.ended_at, call.participants.length]);
        make = () => this.#callNotice(c, call);
        previous = undefined;
      } else {
        const m = entry.m;
        const readers = m.delivery === "sent" ? receipts.get(m.message.seq) : undefined;
        const continued = continues(previous, m);
        previous = m;
        const editing = this.#editing && m.delivery === "sent" && !m.message.deleted && this.#editing.id === m.message.id ? this.#editing : null;
        key = `${m.message.sender_id}\u0000${m.message.client_msg_id}`;
        // The row being edited is kept while receipts and grouping change around it: rebuilding
        // it would take the focus (and the caret) away from the person typing.
        shown = editing
          ? JSON.stringify(["editing", m.message.text, m.message.edited_at ?? null, editing.error, editing.saving])
          : JSON.stringify([m.delivery, m.message.seq, m.message.text, m.message.deleted ?? false, m.message.edited_at ?? null, readers ?? [], continued]);
        make = () => this.#message(c, m, readers, continued, editing);
      }
      let row = this.#rows.get(key);
      if (!row || row.shown !== shown) {
        const element = make();
        if (row) row.element.replaceWith(element);
        if (row && cursor === row.element) cursor = element;
        row = { element, shown };
      }
      next.set(key, row);
      if (row.element !== cursor) this.#list.insertBefore(row.element, cursor);
      else cursor = cursor.nextSibling;
    }
    for (const [key, row] of this.#rows) if (!next.has(key)) row.element.remove();
    this.#rows = next;
  }

  /** "Missed call from alice", "bob did not answer", "Call with alice and bob · 3 min". */
  #callNotice(c: ConversationState, call: Call): HTMLElement {
    const joined = [...new Set(call.participants.map((p) => p.user_id))];
    const answered = joined.some((u) => u !== call.started_by);
    const me = this.state.me;
    let text: string;
    if (!answered) {
      if (call.started_by !== me) text = c.channel.kind === "dm" ? `Missed call from ${call.started_by}` : `${call.started_by} started a call no one joined`;
      else if (c.channel.kind === "dm") text = `${this.state.dmPartner(c) ?? "They"} did not answer your call`;
      else text = "No one joined your call";
    } else {
      const minutes = Math.round((Date.parse(call.ended_at ?? call.started_at) - Date.parse(call.started_at)) / 60_000);
      const names = joined.map((u) => (u === me ? "you" : u));
      text = `Call with ${listNames(names)} · ${minutes < 1 ? "under a minute" : `${minutes} min`}`;
    }
    return h(
      "li",
      { class: "call-notice", "data-call-id": call.id, "data-kind": answered ? "ended" : "missed" },
      h("span", { class: "call-icon", "aria-hidden": "true" }, answered ? "☎" : "✆"),
      h("span", { class: "text" }, text),
      h("time", { datetime: call.started_at }, formatTime(call.started_at)),
    );
  }

  /** For each other member, the newest loaded message they have read: seq → readers. */
  #receipts(c: ConversationState): Map<number, string[]> {
    const out = new Map<number, string[]>();
    const sent = c.messages.filter((m) => m.delivery === "sent");
    for (const [user, readSeq] of c.readBy) {
      if (user === this.state.me) continue;
      let seen: ListedMessage | undefined;
      for (const m of sent) if (m.message.seq <= readSeq) seen = m;
      // Under their own message, "Seen by" would only say that they saw what they wrote.
      if (seen === undefined || seen.message.sender_id === user) continue;
      out.set(seen.message.seq, [...(out.get(seen.message.seq) ?? []), user].sort());
    }
    return out;
  }

  #message(
    c: ConversationState,
    m: ListedMessage,
    readers: string[] | undefined,
    continued: boolean,
    editing: Editing | null,
  ): HTMLElement {
    const msg = m.message;
    const mine = msg.sender_id === this.state.me;
    const classes = ["message", m.delivery === "sent" ? "" : m.delivery, msg.deleted ? "deleted" : "", mine ? "mine" : "", continued ? "continued" : "", editing ? "editing" : ""]
      .filter(Boolean)
      .join(" ");
    const editable = mine && m.delivery === "sent" && !msg.deleted;
    return h(
      "li",
      { class: classes, "data-seq": m.delivery === "sent" ? msg.seq : null, "data-client-msg-id": msg.client_msg_id, "data-message-id": m.delivery === "sent" ? msg.id : null },
      h(
        "div",
        { class: "meta" },
        h("span", { class: "sender" }, mine ? "You" : msg.sender_id),
        h("time", { datetime: msg.created_at }, formatTime(msg.created_at)),
        msg.edited_at && !msg.deleted ? h("span", { class: "edited" }, "(edited)") : null,
      ),
      editing ? this.#editForm(c, msg.id, msg.text, editing) : h("div", { class: "text" }, msg.deleted ? "Message deleted" : msg.text),
      editable && !editing
        ? h(
            "div",
            { class: "actions" },
            h("button", { class: "button small", type: "button", "aria-label": "Edit message", onclick: () => this.#startEdit(msg.id) }, "Edit"),
            h(
              "button",
              { class: "button small danger", type: "button", "aria-label": "Delete message", onclick: () => this.actions.deleteMessage(c.channel.id, msg.id) },
              "Delete",
            ),
          )
        : null,
      m.delivery === "pending" ? h("div", { class: "receipt" }, "Sending…") : null,
      m.delivery === "failed"
        ? h(
            "div",
            { class: "receipt" },
            "Not sent. ",
            h("button", { class: "button small", type: "button", onclick: () => this.actions.retry(c.channel.id, msg.client_msg_id) }, "Retry"),
          )
        : null,
      readers ? h("div", { class: "receipt read-receipt", "data-readers": readers.join(",") }, `Seen by ${listNames(readers)}`) : null,
    );
  }

  /** The inline editor of one of our messages: Enter saves, Shift+Enter is a new line, Escape cancels. */
  #editForm(c: ConversationState, messageId: string, text: string, editing: Editing): HTMLElement {
    const input = h("textarea", { id: "edit-input", class: "edit-input", rows: 2, maxlength: 4000, "aria-label": "Edit message" });
    input.value = editing.draft ?? text;
    input.addEventListener("input", () => {
      if (this.#editing?.id === messageId) this.#editing.draft = input.value;
    });
    const save = () => {
      const next = input.value.trim();
      if (!next || this.#editing?.saving) return;
      if (next === text) {
        this.#cancelEdit();
        return;
      }
      this.#editing = { id: messageId, draft: next, error: "", saving: true };
      this.render();
      this.actions.editMessage(c.channel.id, messageId, next).then(
        () => {
          if (this.#editing?.id === messageId) this.#editing = null;
          this.render();
          this.#input.focus();
        },
        (e: unknown) => {
          if (this.#editing?.id === messageId) this.#editing = { id: messageId, draft: next, error: e instanceof Error ? e.message : String(e), saving: false };
          this.render();
        },
      );
    };
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        save();
      } else if (e.key === "Escape") {
        e.preventDefault();
        e.stopPropagation();
        this.#cancelEdit();
      }
    });
    const form = h(
      "form",
      { class: "edit", "aria-label": "Edit message" },
      input,
      h(
        "div",
        { class: "edit-actions" },
        h("span", { class: "hint" }, "Enter to save · Escape to cancel"),
        h("button", { class: "button small", type: "button", onclick: () => this.#cancelEdit() }, "Cancel"),
        h("button", { class: "button small primary", type: "submit", disabled: editing.saving }, editing.saving ? "Saving…" : "Save"),
      ),
      editing.error ? h("p", { class: "error-text", role: "alert" }, editing.error) : null,
    );
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      save();
    });
    queueMicrotask(() => {
      if (!input.isConnected || document.activeElement === input) return;
      input.focus();
      input.setSelectionRange(input.value.length, input.value.length);
    });
    return form;
  }

  /** Our newest message that can still be edited. */
  #lastEditable(): { id: string } | null {
    const c = this.#shownId ? this.state.conversations.get(this.#shownId) : undefined;
    if (!c) return null;
    for (let i = c.messages.length - 1; i >= 0; i--) {
      const m = c.messages[i]!;
      if (m.delivery === "sent" && m.message.sender_id === this.state.me && !m.message.deleted) return { id: m.message.id };
    }
    return null;
  }

  #startEdit(messageId: string): void {
    this.#editing = { id: messageId, draft: null, error: "", saving: false };
    this.render();
  }

  #cancelEdit(): void {
    this.#editing = null;
    this.render();
    this.#input.focus();
  }

  #submit(): void {
    const text = this.#input.value.trim();
    if (!text || !this.#shownId) return;
    this.actions.send(this.#shownId, text);
    this.#input.value = "";
    this.actions.typing(this.#shownId, false);
  }

  async #loadEarlier(): Promise<void> {
    const c = this.#shownId ? this.state.conversations.get(this.#shownId) : undefined;
    if (!c || !c.hasBefore || this.#loadingEarlier) return;
    this.#loadingEarlier = true;
    try {
      await this.actions.loadEarlier(c.channel.id);
    } finally {
      this.#loadingEarlier = false;
    }
  }
}

/** Messages of one sender within this long of each other are shown as one group. */
const GROUP_WITHIN_MS = 5 * 60_000;

/** Whether `m` continues the group of `previous` (same sender, shortly after): no header then. */
function continues(previous: ListedMessage | undefined, m: ListedMessage): boolean {
  if (!previous || previous.message.sender_id !== m.message.sender_id) return false;
  const gap = Date.parse(m.message.created_at) - Date.parse(previous.message.created_at);
  return gap >= 0 && gap < GROUP_WITHIN_MS;
}

/**
 * The rows of the list: messages in seq order (pending ones last) with the notices of past calls
 * placed by time. Calls older than the loaded history are left out while older pages exist.
 */
function timeline(c: ConversationState): Entry[] {
  const sent = c.messages.filter((m) => m.delivery === "sent");
  const oldest = sent[0] ? Date.parse(sent[0].message.created_at) : Number.NEGATIVE_INFINITY;
  const calls = c.pastCalls
    .filter((call) => call.ended_at && (!c.hasBefore || Date.parse(call.started_at) >= oldest))
    .sort((a, b) => Date.parse(a.started_at) - Date.parse(b.started_at));
  const out: Entry[] = [];
  let i = 0;
  for (const m of c.messages) {
    if (m.delivery === "sent") {
      const at = Date.parse(m.message.created_at);
      while (i < calls.length && Date.parse(calls[i]!.started_at) < at) out.push({ kind: "call", call: calls[i++]! });
    } else {
      while (i < calls.length) out.push({ kind: "call", call: calls[i++]! });
    }
    out.push({ kind: "message", m });
  }
  while (i < calls.length) out.push({ kind: "call", call: calls[i++]! });
  return out;
}
