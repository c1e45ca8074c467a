//! The signed-in app: owns the SDK client, keeps `AppState` up to date from REST answers and live
//! events, and renders the views. Views call back through the `*Actions` interfaces.
import { isParleyError, ParleyClient, type Call, type Channel, type ConnectionStateChange, type DeliveredEvent, type MemberRole, type Message } from "@parley/sdk";
import { h } from "./dom.js";
import { sessionOutboxStore, type DevSession } from "./session.js";
import { AppState, newConversation, upsertMessage, type ConversationState } from "./state.js";
import { CallController } from "./call.js";
import { ConversationView, type ConversationActions } from "./views/conversation.js";
import { Ringer, ringTimeoutMs } from "./ring.js";
import { openConfirmDialog, openFormDialog } from "./views/dialog.js";
import { MembersDialog, type MembersActions } from "./views/members.js";
import { Sidebar, type SidebarActions } from "./views/sidebar.js";

/** Messages per history page. */
const PAGE_SIZE = 50;

export interface AppOptions {
  session: DevSession;
  root: HTMLElement;
  /** Called after signing out; `notice` says why when it was not the person's choice. */
  onSignOut: (notice?: string) => void;
}

export class App implements SidebarActions, ConversationActions, MembersActions {
  readonly state: AppState;
  readonly client: ParleyClient;
  readonly #root: HTMLElement;
  readonly #sidebar: Sidebar;
  readonly #conversation: ConversationView;
  readonly #calls: CallController;
  readonly #ringer = new Ringer();
  #members: MembersDialog | null = null;
  #shell: HTMLElement | null = null;
  /** On narrow screens the conversation list is behind this button. */
  readonly #sidebarToggle = h(
    "button",
    { class: "button small sidebar-toggle", type: "button", id: "sidebar-toggle", "aria-controls": "sidebar", "aria-expanded": "false" },
    h("span", { "aria-hidden": "true" }, "☰"),
    "Conversations",
  );
  readonly #connection = h("span", { class: "connection", role: "status", id: "connection-status" });
  readonly #onSignOut: (notice?: string) => void;
  /** Sends whose promise failed, kept to offer "Retry": client_msg_id → text. */
  readonly #failed = new Map<string, string>();
  /** Aborted on sign-out: removes the window and document listeners of this app. */
  readonly #stop = new AbortController();
  #typingRender: ReturnType<typeof setInterval> | undefined;

  constructor(options: AppOptions) {
    this.state = new AppState(options.session.userId);
    this.#root = options.root;
    this.#onSignOut = options.onSignOut;
    this.client = new ParleyClient({
      url: location.origin,
      token: options.session.token,
      outboxStore: sessionOutboxStore(options.session),
    });
    this.#sidebar = new Sidebar(this, this.state);
    this.#conversation = new ConversationView(this.state, this, (id) => this.#calls.channelId === id);
    this.#calls = new CallController(this.client, this.state, this.#conversation.body, () => this.renderAll());
    this.#listen();
  }

  /** Connects, loads the conversations, and shows the app. */
  async start(): Promise<void> {
    const signOut = h("button", { class: "button small", type: "button", onclick: () => this.signOut() }, "Sign out");
    this.#sidebarToggle.addEventListener("click", () => this.#showSidebar(this.#sidebarToggle.getAttribute("aria-expanded") !== "true"));
    this.#shell = h(
      "div",
      { class: "shell" },
      h(
        "header",
        { class: "topbar" },
        this.#sidebarToggle,
        h("h1", { class: "brand" }, "Parley"),
        this.#connection,
        h("span", { class: "spacer" }),
        h("span", { id: "signed-in-as" }, h("span", { class: "signed-in-label" }, "Signed in as "), h("strong", {}, this.state.me)),
        signOut,
      ),
      this.#sidebar.element,
      this.#conversation.element,
    );
    this.#root.replaceChildren(this.#shell);
    this.#root.removeAttribute("aria-busy");
    this.#renderConnection();
    this.renderAll();
    this.client.connect().catch((e: unknown) => this.#fatal(e));
    try {
      await this.refreshChannels();
    } catch (e) {
      this.#fatal(e);
      if (isParleyError(e) && e.code.startsWith("token_")) return;
    }
    if (this.#stop.signal.aborted) return; // signed out meanwhile
    this.#showRestoredOutbox();
    const wanted = decodeURIComponent(location.hash.replace(/^#\/?/, ""));
    if (wanted && this.state.conversations.has(wanted)) this.select(wanted);
    this.#typingRender = setInterval(() => this.#conversation.renderTyping(), 1_000);
    const signal = this.#stop.signal;
    window.addEventListener(
      "hashchange",
      () => {
        const id = decodeURIComponent(location.hash.replace(/^#\/?/, ""));
        if (id && id !== this.state.selected && this.state.conversations.has(id)) this.select(id);
      },
      { signal },
    );
    document.addEventListener("visibilitychange", () => this.#markSelectedRead(), { signal });
    // Escape closes the conversation list when it covers the conversation (narrow screens).
    document.addEventListener(
      "keydown",
      (e) => {
        if (e.key === "Escape" && this.#shell?.classList.contains("sidebar-open") && this.state.selected) this.#showSidebar(false);
      },
      { signal },
    );
  }

  /** Shows or hides the conversation list over the conversation (narrow screens only, by CSS). */
  #showSidebar(open: boolean): void {
    this.#shell?.classList.toggle("sidebar-open", open);
    this.#sidebarToggle.setAttribute("aria-expanded", String(open));
    if (open) this.#sidebar.element.querySelector<HTMLElement>("button.conversation[aria-current=true], button.conversation")?.focus();
  }

  signOut(notice?: string): void {
    if (this.#stop.signal.aborted) return;
    this.#stop.abort();
    clearInterval(this.#typingRender);
    this.#ringer.stop();
    this.#members?.close();
    void this.#calls.leave();
    this.client.close();
    document.title = "Parley";
    this.#onSignOut(notice);
  }

  renderAll(): void {
    this.#sidebar.render();
    this.#conversation.render();
    this.#members?.render();
    if (this.#shell) this.#shell.dataset.selected = String(this.state.selected !== null);
    this.#renderTitle();
  }

  /** "(3) Parley" while 3 messages are unread anywhere. */
  #renderTitle(): void {
    let unread = 0;
    for (const c of this.state.conversations.values()) unread += c.unread;
    const title = unread > 0 ? `(${unread}) Parley` : "Parley";
    if (document.title !== title) document.title = title;
  }

  // ---- loading ----

  /** Fetches the channel list; new conversations get subscribed, their members and calls loaded. */
  async refreshChannels(): Promise<void> {
    const channels = await this.client.rest.allChannels();
    const fresh: ConversationState[] = [];
    for (const channel of channels) {
      const known = this.state.conversations.get(channel.id);
      if (known) {
        known.channel = { ...known.channel, ...channel };
        known.unread = channel.unread_count ?? known.unread;
        known.lastReadSeq = channel.last_read_seq ?? known.lastReadSeq;
      } else {
        const c = newConversation(channel);
        this.state.conversations.set(channel.id, c);
        fresh.push(c);
      }
    }
    const listed = new Set(channels.map((c) => c.id));
    for (const id of [...this.state.conversations.keys()]) if (!listed.has(id)) this.#forget(id);
    this.renderAll();
    await Promise.all(fresh.map((c) => this.#load(c)));
    if (fresh.length > 0) await this.#refreshPresence();
    this.renderAll();
  }

  async #load(c: ConversationState): Promise<void> {
    const id = c.channel.id;
    const listedSeq = c.channel.last_seq;
    this.client
      .subscribe(id)
      .then(async (sub) => {
        // Events committed between the channel list and the subscription are history to it: no
        // message.new or unread.updated tells of them, so read the count again, unless a push
        // (newer than any list) arrives meanwhile.
        if (sub.seq <= listedSeq) return;
        const pushes = c.unreadPushes;
        const listed = (await this.client.rest.allChannels()).find((x) => x.id === id);
        if (!listed || c.unreadPushes !== pushes) return;
        c.unread = listed.unread_count ?? c.unread;
        c.lastReadSeq = Math.max(c.lastReadSeq, listed.last_read_seq ?? 0);
        this.renderAll();
      })
      .catch((e: unknown) => console.warn(`parley: cannot subscribe to ${id}`, e));
    const [members, calls] = await Promise.all([
      this.client.rest.listMembers(id).catch(() => null),
      this.client.rest.channelCalls(id).catch(() => null),
    ]);
    if (members) {
      c.members = members.members;
      for (const m of members.members) c.readBy.set(m.user_id, Math.max(c.readBy.get(m.user_id) ?? 0, m.last_read_seq ?? 0));
    }
    if (calls) {
      c.call = calls.calls.find((call) => !call.ended_at) ?? null;
      c.pastCalls = calls.calls.filter((call) => call.ended_at);
      if (c.call) this.#maybeRing(c.call);
    }
  }

  /** Rings for a call someone else started, unless we are in it or it started too long ago. */
  #maybeRing(call: Call): void {
    if (call.ended_at || call.started_by === this.state.me || this.#calls.channelId === call.channel_id) return;
    if (call.participants.some((p) => p.user_id === this.state.me && !p.left_at)) return;
    const c = this.state.conversations.get(call.channel_id);
    if (!c || Date.parse(call.started_at) + ringTimeoutMs() < Date.now()) return;
    const dm = c.channel.kind === "dm";
    const text = dm ? `${call.started_by} is calling you.` : `${call.started_by} started a call in # ${this.state.title(c)}.`;
    this.#ringer.ring({
      call,
      text,
      mode: dm ? "ring" : "notify",
      accept: () => {
        this.select(call.channel_id);
        void this.#calls.startOrJoin(call.channel_id);
      },
    });
  }

  /** A call ended: keep it (with its participants, from the server) for the conversation's notice. */
  async #callEnded(channelId: string, callId: string): Promise<void> {
    const call = await this.client.rest.getCall(callId);
    const c = this.state.conversations.get(channelId);
    if (!c) return;
    c.pastCalls = [...c.pastCalls.filter((p) => p.id !== call.id), call];
    if (channelId === this.state.selected) this.#conversation.render();
  }

  /** Messages restored from the outbox of an earlier page: shown as pending until the SDK sends them. */
  #showRestoredOutbox(): void {
    for (const entry of this.client.pendingMessages()) {
      const c = this.state.conversations.get(entry.channelId);
      if (!c) continue;
      upsertMessage(c.messages, pendingMessage(entry.channelId, this.state.me, entry.clientMsgId, entry.text), "pending");
    }
    this.#conversation.render();
  }

  async #refreshPresence(): Promise<void> {
    const users = new Set<string>();
    for (const c of this.state.conversations.values()) for (const m of c.members ?? []) if (m.user_id !== this.state.me) users.add(m.user_id);
    const ids = [...users];
    for (let i = 0; i < ids.length; i += 200) {
      const { presence } = await this.client.rest.queryPresence(ids.slice(i, i + 200));
      for (const p of presence) this.state.presence.set(p.user_id, p.status);
    }
  }

  async #loadHistory(c: ConversationState): Promise<void> {
    const page = await this.client.history(c.channel.id, { limit: PAGE_SIZE });
    for (const m of page.messages) upsertMessage(c.messages, m);
    c.hasBefore = page.has_before;
    c.historyLoaded = true;
  }

  #forget(channelId: string): void {
    this.state.conversations.delete(channelId);
    void this.client.unsubscribe(channelId);
    if (this.state.selected === channelId) {
      this.state.selected = null;
      void this.#calls.leaveIfIn(channelId);
    }
  }

  // ---- live events ----

  #listen(): void {
    this.client.connection.on("statechange", (change: ConnectionStateChange) => {
      this.state.connection = change.current;
      this.#renderConnection();
      this.#conversation.render(); // your own presence dot follows the connection
      if (change.current === "connected" && change.reconnected) void this.refreshChannels().catch(() => {});
    });
    this.client.on("event", (event: DeliveredEvent) => this.#onChannelEvent(event));
    this.client.on("typing.users", ({ channelId, users }) => {
      const c = this.state.conversations.get(channelId);
      if (!c) return;
      c.typing = new Map(users.map((u) => [u, Number.POSITIVE_INFINITY]));
      if (channelId === this.state.selected) this.#conversation.renderTyping();
    });
    this.client.on("presence.changed", (p) => {
      this.state.presence.set(p.user_id, p.status);
      this.renderAll();
    });
    this.client.on("read.updated", (r) => {
      const c = this.state.conversations.get(r.channel_id);
      if (!c) return;
      c.readBy.set(r.user_id, Math.max(c.readBy.get(r.user_id) ?? 0, r.last_read_seq));
      if (r.channel_id === this.state.selected) this.#conversation.render();
    });
    this.client.on("unread.updated", (u) => {
      const c = this.state.conversations.get(u.channel_id);
      if (!c) return;
      // Counted against an older read position than ours (the server looked it up before our
      // read reached it, and the frames can cross): stale, it would bring back a read badge.
      if (u.last_read_seq < c.lastReadSeq) return;
      c.unreadPushes += 1;
      c.unread = u.unread_count;
      c.lastReadSeq = u.last_read_seq;
      this.#sidebar.render();
      this.#renderTitle();
    });
    // Every outbox message ends in one of these, also those restored from an earlier page.
    this.client.on("outbox.sent", ({ clientMsgId, result }) => {
      this.#failed.delete(clientMsgId);
      const c = this.state.conversations.get(result.message.channel_id);
      if (!c) return;
      upsertMessage(c.messages, result.message);
      this.#conversation.render();
    });
    this.client.on("outbox.failed", ({ clientMsgId, error }) => {
      for (const c of this.state.conversations.values()) {
        const i = c.messages.findIndex((m) => m.delivery !== "sent" && m.message.client_msg_id === clientMsgId);
        if (i < 0) continue;
        const listed = c.messages[i]!;
        this.#failed.set(clientMsgId, listed.message.text);
        c.messages[i] = { message: listed.message, delivery: "failed" };
        console.warn("parley: send failed", error);
        this.#conversation.render();
      }
    });
    // A channel or DM someone added us to appears at once (the server pushes `channel.added`); a
    // removal or deletion ends its subscription (below). The list is also refetched on reconnect.
    this.client.on("channel.added", () => void this.refreshChannels().catch(() => {}));
    this.client.on("subscription.lost", ({ channelId }) => {
      this.#forget(channelId);
      this.renderAll();
    });
    this.client.on("resync", ({ channelId, unrecoverable }) => {
      // Edits, deletes or membership changes may have been missed: reload what is shown.
      const c = this.state.conversations.get(channelId);
      if (c && unrecoverable > 0) void this.#load(c).then(() => this.renderAll());
    });
  }

  #onChannelEvent(event: DeliveredEvent): void {
    const c = this.state.conversations.get(event.channel_id);
    if (!c) return;
    switch (event.type) {
      case "message.new":
      case "message.updated":
      case "message.deleted":
        upsertMessage(c.messages, event.message);
        c.channel.last_seq = Math.max(c.channel.last_seq, event.seq);
        if (event.type === "message.new" && event.message.sender_id === this.state.me) {
          // Our own message: we have read up to it.
          c.readBy.set(this.state.me, Math.max(c.readBy.get(this.state.me) ?? 0, event.message.seq));
        }
        break;
      case "member.added":
        c.members = [...(c.members ?? []).filter((m) => m.user_id !== event.member.user_id), event.member];
        void this.#refreshPresence().then(() => this.renderAll());
        break;
      case "member.updated":
        c.members = (c.members ?? []).map((m) => (m.user_id === event.member.user_id ? event.member : m));
        if (event.member.user_id === this.state.me) c.channel = { ...c.channel, role: event.member.role };
        break;
      case "member.removed":
        c.members = (c.members ?? []).filter((m) => m.user_id !== event.user_id);
        c.readBy.delete(event.user_id);
        break;
      case "channel.updated":
        c.channel = { ...c.channel, ...event.channel };
        break;
      case "call.started":
        c.call = event.call;
        this.#maybeRing(event.call);
        break;
      case "call.participant_joined":
        // Answered in another tab of ours.
        if (event.participant.user_id === this.state.me) this.#ringer.stop(event.call_id);
        if (c.call && c.call.id === event.call_id) {
          c.call = { ...c.call, participants: [...c.call.participants.filter((p) => p.participant_id !== event.participant.participant_id), event.participant] };
        }
        break;
      case "call.participant_left":
        if (c.call && c.call.id === event.call_id) {
          c.call = {
            ...c.call,
            participants: c.call.participants.map((p) => (p.participant_id === event.participant_id ? { ...p, left_at: new Date().toISOString() } : p)),
          };
        }
        break;
      case "call.ended":
        if (c.call && c.call.id === event.call_id) c.call = null;
        this.#ringer.stop(event.call_id);
        void this.#callEnded(c.channel.id, event.call_id).catch((e: unknown) => console.warn("parley: cannot load the ended call", e));
        break;
      case "channel.deleted":
        this.#forget(c.channel.id);
        break;
      default:
        break;
    }
    this.renderAll();
    if (event.channel_id === this.state.selected) this.#markSelectedRead();
  }

  /** Marks the open conversation read up to its newest message, while the page is visible. */
  #markSelectedRead(): void {
    const c = this.state.selected ? this.state.conversations.get(this.state.selected) : undefined;
    if (!c || document.visibilityState !== "visible" || !c.historyLoaded) return;
    let newest = 0;
    for (const m of c.messages) if (m.delivery === "sent") newest = Math.max(newest, m.message.seq);
    if (newest <= c.lastReadSeq && c.unread === 0) return;
    c.lastReadSeq = Math.max(c.lastReadSeq, newest);
    this.client.markRead(c.channel.id, newest).catch(() => {});
  }

  #renderConnection(): void {
    const labels = { connecting: "Connecting…", connected: "Connected", reconnecting: "Reconnecting…", disconnected: "Disconnected" } as const;
    this.#connection.dataset.state = this.state.connection;
    this.#connection.textContent = labels[this.state.connection];
  }

  #fatal(e: unknown): void {
    if (isParleyError(e) && e.code.startsWith("token_")) {
      // The stored token is no longer accepted (expired, or the server's development key changed).
      this.signOut(`Your sign-in is no longer valid (${e.code}). Please sign in again.`);
      return;
    }
    const message = isParleyError(e) ? `${e.message} (${e.code})` : String(e);
    this.#connection.textContent = `Disconnected: ${message}`;
  }


  // ---- SidebarActions ----

  select(channelId: string): void {
    const c = this.state.conversations.get(channelId);
    if (!c) return;
    this.state.selected = channelId;
    this.#showSidebar(false);
    if (location.hash !== `#${channelId}`) history.replaceState(null, "", `#${encodeURIComponent(channelId)}`);
    this.renderAll();
    if (!c.historyLoaded) {
      this.#loadHistory(c)
        .then(() => {
          this.renderAll();
          this.#markSelectedRead();
        })
        .catch((e: unknown) => console.warn("parley: cannot load history", e));
    } else {
      this.#markSelectedRead();
    }
  }

  newChannel(): void {
    openFormDialog({
      title: "New channel",
      submitLabel: "Create channel",
      fields: [
        { name: "name", label: "Channel name", required: true, placeholder: "general" },
        { name: "members", label: "Members (optional)", hint: "User ids separated by commas or spaces", placeholder: "bob, carol" },
      ],
      submit: async ({ name, members }) => {
        const ids = (members ?? "").split(/[\s,]+/).filter((m) => m && m !== this.state.me);
        const channel = await this.client.rest.createChannel({ kind: "channel", name: name ?? "", members: ids });
        await this.#opened(channel);
      },
    });
  }

  newDm(): void {
    openFormDialog({
      title: "New direct message",
      submitLabel: "Open conversation",
      fields: [{ name: "user", label: "User id", required: true, placeholder: "bob" }],
      submit: async ({ user }) => {
        if (!user || user === this.state.me) throw new Error("Enter the user id of someone else.");
        const channel = await this.client.rest.createChannel({ kind: "dm", members: [user] });
        await this.#opened(channel);
      },
    });
  }

  async #opened(channel: Channel): Promise<void> {
    if (!this.state.conversations.has(channel.id)) {
      const c = newConversation(channel);
      this.state.conversations.set(channel.id, c);
      await this.#load(c);
      await this.#refreshPresence().catch(() => {});
    }
    this.select(channel.id);
  }

  // ---- ConversationActions ----

  send(channelId: string, text: string, clientMsgId: string = crypto.randomUUID()): void {
    const c = this.state.conversations.get(channelId);
    if (!c) return;
    upsertMessage(c.messages, pendingMessage(channelId, this.state.me, clientMsgId, text), "pending");
    this.#conversation.render();
    // The outcome arrives as `outbox.sent` / `outbox.failed` (see #listen).
    this.client.send(channelId, text, { clientMsgId }).catch(() => {});
  }


  retry(channelId: string, clientMsgId: string): void {
    const text = this.#failed.get(clientMsgId);
    const c = this.state.conversations.get(channelId);
    if (text === undefined || !c) return;
    c.messages = c.messages.filter((m) => !(m.delivery === "failed" && m.message.client_msg_id === clientMsgId));
    this.send(channelId, text, clientMsgId);
  }

  typing(channelId: string, active: boolean): void {
    if (active) this.client.typing.keystroke(channelId);
    else this.client.typing.stop(channelId);
  }

  async loadEarlier(channelId: string): Promise<void> {
    const c = this.state.conversations.get(channelId);
    if (!c || !c.hasBefore) return;
    const oldest = c.messages.find((m) => m.delivery === "sent")?.message.seq;
    const page = await this.client.history(channelId, oldest === undefined ? { limit: PAGE_SIZE } : { before: oldest, limit: PAGE_SIZE });
    for (const m of page.messages) upsertMessage(c.messages, m);
    c.hasBefore = page.has_before;
    this.#conversation.render();
  }

  addMember(channelId: string): void {
    openFormDialog({
      title: "Add a member",
      submitLabel: "Add member",
      fields: [{ name: "user", label: "User id", required: true, placeholder: "carol" }],
      submit: async ({ user }) => {
        if (!user) throw new Error("Enter a user id.");
        const member = await this.client.rest.addMember(channelId, { user_id: user });
        const c = this.state.conversations.get(channelId);
        if (c) c.members = [...(c.members ?? []).filter((m) => m.user_id !== member.user_id), member];
        await this.#refreshPresence().catch(() => {});
        this.renderAll();
      },
    });
  }

  startOrJoinCall(channelId: string): void {
    void this.#calls.startOrJoin(channelId);
  }

  async editMessage(channelId: string, messageId: string, text: string): Promise<void> {
    try {
      const message = await this.client.rest.editMessage(channelId, messageId, { text });
      const c = this.state.conversations.get(channelId);
      if (c) upsertMessage(c.messages, message);
    } catch (e) {
      throw new Error(isParleyError(e) ? `Not saved: ${e.message}` : "Not saved: the server could not be reached.");
    }
  }

  deleteMessage(channelId: string, messageId: string): void {
    openConfirmDialog({
      title: "Delete message",
      body: "Delete this message for everyone? It is replaced by “Message deleted”.",
      confirmLabel: "Delete",
      danger: true,
      confirm: async () => {
        const tombstone = await this.client.rest.deleteMessage(channelId, messageId);
        const c = this.state.conversations.get(channelId);
        if (c) upsertMessage(c.messages, tombstone);
        this.#conversation.render();
      },
    });
  }

  openMembers(channelId: string): void {
    this.#members?.close();
    this.#members = new MembersDialog(this.state, this, channelId, () => {
      this.#members = null;
    });
  }

  // ---- MembersActions ----

  async addMemberAs(channelId: string, userId: string, role: MemberRole): Promise<void> {
    const member = await this.client.rest.addMember(channelId, role === "member" ? { user_id: userId } : { user_id: userId, role });
    if (member.role !== role) {
      // Adding someone who is already a member changes nothing; their role is changed in the list.
      throw new Error(`${userId} is already a ${member.role} of this channel; change their role in the list.`);
    }
    const c = this.state.conversations.get(channelId);
    if (c) c.members = [...(c.members ?? []).filter((m) => m.user_id !== member.user_id), member];
    await this.#refreshPresence().catch(() => {});
    this.renderAll();
  }

  async changeRole(channelId: string, userId: string, role: MemberRole): Promise<void> {
    const member = await this.client.rest.updateMemberRole(channelId, userId, role);
    const c = this.state.conversations.get(channelId);
    if (c) {
      c.members = (c.members ?? []).map((m) => (m.user_id === member.user_id ? member : m));
      if (member.user_id === this.state.me) c.channel = { ...c.channel, role: member.role };
    }
    this.renderAll();
  }

  async removeMember(channelId: string, userId: string): Promise<void> {
    await this.client.rest.removeMember(channelId, userId);
    const c = this.state.conversations.get(channelId);
    if (userId === this.state.me) {
      this.#members?.close();
      this.#forget(channelId);
    } else if (c) {
      c.members = (c.members ?? []).filter((m) => m.user_id !== userId);
      c.readBy.delete(userId);
    }
    this.renderAll();
  }
}

/** Our message as shown while it is on its way (the server's replaces it, by `client_msg_id`). */
function pendingMessage(channelId: string, me: string, clientMsgId: string, text: string): Message {
  return {
    id: `pending:${clientMsgId}`,
    channel_id: channelId,
    seq: 0,
    sender_id: me,
    client_msg_id: clientMsgId,
    text,
    created_at: new Date().toISOString(),
  };
}
