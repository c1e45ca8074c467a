//! The conversation list: channels and direct messages, each with its unread count; DMs show
//! the other person's presence, and a conversation with an active call says so. Channels that
//! share a name show what tells them apart (their other members, or the end of their id).
import { h, replaceChildren } from "../dom.js";
import type { AppState, ConversationState } from "../state.js";

export interface SidebarActions {
  select(channelId: string): void;
  newChannel(): void;
  newDm(): void;
}

export class Sidebar {
  readonly element: HTMLElement;
  readonly #channels = h("ul", { class: "conversations", id: "channel-list" });
  readonly #dms = h("ul", { class: "conversations", id: "dm-list" });

  constructor(actions: SidebarActions, private readonly state: AppState) {
    this.#actions = actions;
    this.element = h(
      "nav",
      { class: "sidebar", id: "sidebar", "aria-label": "Conversations" },
      h(
        "section",
        { "aria-labelledby": "channels-heading" },
        h(
          "div",
          { class: "sidebar-head" },
          h("h2", { id: "channels-heading" }, "Channels"),
          h("button", { class: "button small", type: "button", onclick: () => actions.newChannel(), "aria-label": "New channel" }, "+ New"),
        ),
        this.#channels,
      ),
      h(
        "section",
        { "aria-labelledby": "dms-heading" },
        h(
          "div",
          { class: "sidebar-head" },
          h("h2", { id: "dms-heading" }, "Direct messages"),
          h("button", { class: "button small", type: "button", onclick: () => actions.newDm(), "aria-label": "New direct message" }, "+ New"),
        ),
        this.#dms,
      ),
    );
  }

  readonly #actions: SidebarActions;

  render(): void {
    this.#fill(this.#channels, this.state.sortedConversations("channel"), "No channels yet.");
    this.#fill(this.#dms, this.state.sortedConversations("dm"), "No direct messages yet.");
  }

  #fill(list: HTMLElement, conversations: ConversationState[], empty: string): void {
    if (conversations.length === 0) {
      replaceChildren(list, h("li", { class: "empty" }, empty));
      return;
    }
    replaceChildren(list, ...conversations.map((c) => h("li", {}, this.#item(c))));
  }

  #item(c: ConversationState): HTMLElement {
    const title = this.state.title(c);
    const selected = this.state.selected === c.channel.id;
    const partner = this.state.dmPartner(c);
    const status = partner ? (this.state.presence.get(partner) ?? "offline") : null;
    const twin = this.state.disambiguation(c);
    const labelParts = [c.channel.kind === "dm" ? `Direct message with ${title}` : `Channel ${title}${twin ? ` (${twin})` : ""}`];
    if (status) labelParts.push(status);
    if (c.unread > 0) labelParts.push(`${c.unread} unread`);
    if (c.call) labelParts.push("call in progress");
    return h(
      "button",
      {
        type: "button",
        class: `conversation${c.unread > 0 ? " has-unread" : ""}`,
        "aria-current": selected ? "true" : null,
        "aria-label": labelParts.join(", "),
        "data-channel-id": c.channel.id,
        onclick: () => this.#actions.select(c.channel.id),
      },
      status
        ? h("span", { class: "presence", "data-status": status, "data-user-id": partner, title: status })
        : h("span", { class: "hash", "aria-hidden": "true" }, "#"),
      h("span", { class: "name" }, title, twin ? h("span", { class: "twin" }, twin) : null),
      c.call ? h("span", { class: "call-badge", "aria-hidden": "true" }, "call") : null,
      c.unread > 0 ? h("span", { class: "unread", "aria-hidden": "true", "data-unread": c.unread }, c.unread > 99 ? "99+" : c.unread) : null,
    );
  }
}
