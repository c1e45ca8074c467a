//! What the app knows, as plain data. The app (app.ts) changes it from REST answers and live
//! events, then asks the views to render. Nothing here talks to the network or the DOM.
import type { Call, Channel, Member, Message, PresenceStatus } from "@parley/sdk";

/** A message as the list shows it: a sent one, or one of ours still on its way. */
export interface ListedMessage {
  /** The server's message, once known. */
  message: Message;
  /** `pending` while our send is not acknowledged; `failed` when it was refused. */
  delivery: "sent" | "pending" | "failed";
}

export interface ConversationState {
  channel: Channel;
  unread: number;
  /** Bumped by every `unread.updated`: a count fetched over REST meanwhile is older than it. */
  unreadPushes: number;
  lastReadSeq: number;
  /** Members, once fetched. */
  members: Member[] | null;
  /** Each member's read position (from the member list and `read.updated`). */
  readBy: Map<string, number>;
  /** The channel's active call, if any. */
  call: Call | null;
  /** Ended calls (newest 50 from the server, and those ended since), shown as notices in the conversation. */
  pastCalls: Call[];
  /** Loaded history, ascending by seq. */
  messages: ListedMessage[];
  /** Older messages exist that are not loaded yet. */
  hasBefore: boolean;
  historyLoaded: boolean;
  /** Users typing now, with when their indicator expires (ms since epoch). */
  typing: Map<string, number>;
}

export function newConversation(channel: Channel): ConversationState {
  return {
    channel,
    unread: channel.unread_count ?? 0,
    unreadPushes: 0,
    lastReadSeq: channel.last_read_seq ?? 0,
    members: null,
    readBy: new Map(),
    call: null,
    pastCalls: [],
    messages: [],
    hasBefore: false,
    historyLoaded: false,
    typing: new Map(),
  };
}

export class AppState {
  readonly me: string;
  readonly conversations = new Map<string, ConversationState>();
  readonly presence = new Map<string, PresenceStatus>();
  selected: string | null = null;
  connection: "connecting" | "connected" | "reconnecting" | "disconnected" = "connecting";

  constructor(me: string) {
    this.me = me;
  }

  /** The other party of a DM (from its members), or null while unknown. */
  dmPartner(c: ConversationState): string | null {
    if (c.channel.kind !== "dm" || !c.members) return null;
    return c.members.find((m) => m.user_id !== this.me)?.user_id ?? null;
  }

  /** The name a person sees: `# general`, or the DM partner's id. */
  title(c: ConversationState): string {
    if (c.channel.kind === "dm") return this.dmPartner(c) ?? "Direct message";
    return c.channel.name ?? c.channel.id;
  }

  /**
   * What tells this channel apart from others of the same name ("" when its name is unique in
   * the list): the other members ("with bob, carol"), and the end of its id when that is not
   * enough. Channel names are not unique per tenant, so two "general" channels are common.
   */
  disambiguation(c: ConversationState): string {
    if (c.channel.kind !== "channel") return "";
    const name = this.title(c).toLocaleLowerCase();
    const twins = [...this.conversations.values()].filter((o) => o !== c && o.channel.kind === "channel" && this.title(o).toLocaleLowerCase() === name);
    if (twins.length === 0) return "";
    const mine = this.#membersLabel(c);
    const clash = twins.some((o) => this.#membersLabel(o) === mine);
    const tail = `…${c.channel.id.slice(-4)}`;
    if (!mine) return tail;
    return clash ? `${mine} · ${tail}` : mine;
  }

  #membersLabel(c: ConversationState): string {
    if (!c.members) return "";
    const others = c.members.map((m) => m.user_id).filter((u) => u !== this.me).sort();
    if (others.length === 0) return "only you";
    const shown = others.slice(0, 2).join(", ");
    return others.length > 2 ? `with ${shown} +${others.length - 2}` : `with ${shown}`;
  }

  sortedConversations(kind: "channel" | "dm"): ConversationState[] {
    return [...this.conversations.values()]
      .filter((c) => c.channel.kind === kind)
      .sort((a, b) => this.title(a).localeCompare(this.title(b)) || a.channel.id.localeCompare(b.channel.id));
  }
}

/**
 * Inserts or replaces `message` in an ascending list (by seq; a pending message of ours, matched
 * by `client_msg_id`, is replaced by the server's). Returns true when the list changed.
 */
export function upsertMessage(list: ListedMessage[], message: Message, delivery: ListedMessage["delivery"] = "sent"): boolean {
  const byClientId = list.findIndex(
    (m) => m.delivery !== "sent" && m.message.client_msg_id === message.client_msg_id && m.message.sender_id === message.sender_id,
  );
  if (byClientId >= 0 && delivery === "sent") list.splice(byClientId, 1);
  const existing = list.findIndex((m) => m.delivery === "sent" && m.message.id === message.id);
  if (existing >= 0) {
    list[existing] = { message, delivery };
    return true;
  }
  if (delivery !== "sent") {
    list.push({ message, delivery });
    return true;
  }
  // Sent messages go in seq order, before any still-pending ones.
  let at = list.length;
  while (at > 0) {
    const prev = list[at - 1]!;
    if (prev.delivery === "sent" && prev.message.seq < message.seq) break;
    if (prev.delivery === "sent" && prev.message.seq === message.seq) {
      list[at - 1] = { message, delivery };
      return true;
    }
    at -= 1;
  }
  list.splice(at, 0, { message, delivery });
  return true;
}
