//! The members dialog of a conversation, opened from its header: everyone with their role and
//! presence, and what the signed-in person's role allows. Owners add members, moderators and
//! owners, remove anyone and change anyone's role; moderators add and remove members; everyone
//! can lower their own role and leave a channel. The members of a DM are fixed. The server checks
//! every one of these again (and refuses to demote a channel's only owner).
import type { Member, MemberRole } from "@parley/sdk";
import { h, replaceChildren } from "../dom.js";
import type { AppState, ConversationState } from "../state.js";

export interface MembersActions {
  addMemberAs(channelId: string, userId: string, role: MemberRole): Promise<void>;
  removeMember(channelId: string, userId: string): Promise<void>;
  changeRole(channelId: string, userId: string, role: MemberRole): Promise<void>;
}

const ROLE_RANK: Record<MemberRole, number> = { member: 0, moderator: 1, owner: 2 };

/** Which roles `mine` may give to someone it adds (empty: adding is not allowed). */
export function addableRoles(c: ConversationState): MemberRole[] {
  if (c.channel.kind !== "channel") return [];
  if (c.channel.role === "owner") return ["member", "moderator", "owner"];
  if (c.channel.role === "moderator") return ["member"];
  return [];
}

/** Whether the signed-in person may remove `target` (someone else) from the channel. */
export function canRemove(c: ConversationState, target: Member, me: string): boolean {
  if (c.channel.kind !== "channel" || target.user_id === me) return false;
  const mine = c.channel.role ?? "member";
  if (mine === "owner") return true;
  return mine === "moderator" && ROLE_RANK[target.role] < ROLE_RANK.moderator;
}

/**
 * The roles the signed-in person may set for `target`, its current one included; fewer than two
 * means its role cannot be changed from here. Owners set any role of anyone; anyone may lower
 * their own role, never raise it.
 */
export function settableRoles(c: ConversationState, target: Member, me: string): MemberRole[] {
  if (c.channel.kind !== "channel") return [];
  const mine = c.channel.role ?? "member";
  const all: MemberRole[] = ["member", "moderator", "owner"];
  if (target.user_id === me) return all.filter((r) => ROLE_RANK[r] <= ROLE_RANK[mine]);
  return mine === "owner" ? all : [];
}

export class MembersDialog {
  readonly element: HTMLDialogElement;
  readonly #list = h("ul", { class: "member-list", id: "member-list", "aria-label": "Members" });
  readonly #form: HTMLFormElement;
  readonly #user = h("input", { id: "members-add-user", type: "text", name: "user", spellcheck: "false", autocomplete: "off", placeholder: "carol" });
  readonly #role = h("select", { id: "members-add-role", name: "role" });
  readonly #add = h("button", { class: "button primary", type: "submit" }, "Add");
  readonly #error = h("p", { class: "error-text", role: "alert", id: "members-error" });
  readonly #note = h("p", { class: "hint" });
  readonly #leave = h("button", { class: "button danger", type: "button", id: "members-leave" }, "Leave channel");
  readonly #heading = h("h2", { id: "members-title" });
  #roles: MemberRole[] = [];

  constructor(
    private readonly state: AppState,
    private readonly actions: MembersActions,
    readonly channelId: string,
    onClose: () => void,
  ) {
    this.#form = h(
      "form",
      { class: "members-add", "aria-label": "Add a member" },
      h("div", { class: "field" }, h("label", { for: "members-add-user" }, "User id"), this.#user),
      h("div", { class: "field" }, h("label", { for: "members-add-role" }, "Role"), this.#role),
      this.#add,
    );
    this.#form.addEventListener("submit", (e) => {
      e.preventDefault();
      void this.#run(async () => {
        const user = this.#user.value.trim();
        if (!user) throw new Error("Enter a user id.");
        const role = (this.#role.value || "member") as MemberRole;
        await this.actions.addMemberAs(this.channelId, user, role);
        // Keep whatever was typed meanwhile (the list shows the new member before this returns).
        if (this.#user.value.trim() === user) this.#user.value = "";
        this.#user.focus();
      });
    });
    this.#leave.addEventListener("click", () => void this.#run(() => this.actions.removeMember(this.channelId, this.state.me)));
    const close = h("button", { class: "button", type: "button", onclick: () => this.element.close() }, "Close");
    this.element = h(
      "dialog",
      { class: "members-dialog", id: "members-dialog", "aria-labelledby": "members-title" },
      this.#heading,
      this.#list,
      this.#note,
      this.#form,
      this.#error,
      h("div", { class: "dialog-actions" }, this.#leave, close),
    );
    this.element.addEventListener("close", () => {
      this.element.remove();
      onClose();
    });
    document.body.append(this.element);
    this.render();
    this.element.showModal();
    (this.#roles.length > 0 ? this.#user : close).focus();
  }

  close(): void {
    if (this.element.open) this.element.close();
  }

  render(): void {
    const c = this.state.conversations.get(this.channelId);
    if (!c) {
      this.close();
      return;
    }
    const members = [...(c.members ?? [])].sort((a, b) => ROLE_RANK[b.role] - ROLE_RANK[a.role] || a.user_id.localeCompare(b.user_id));
    this.#heading.textContent = `Members of ${c.channel.kind === "dm" ? `your conversation with ${this.state.title(c)}` : `# ${this.state.title(c)}`}`;
    replaceChildren(
      this.#list,
      ...members.map((m) => {
        const me = m.user_id === this.state.me;
        const status = me ? (this.state.connection === "connected" ? "online" : "offline") : (this.state.presence.get(m.user_id) ?? "offline");
        return h(
          "li",
          { "data-user-id": m.user_id, "data-role": m.role },
          h("span", { class: "presence", "data-status": status, "aria-hidden": "true" }),
          h("span", { class: "member-name" }, me ? `${m.user_id} (you)` : m.user_id),
          h("span", { class: "visually-hidden" }, `, ${status}, `),
          this.#roleControl(c, m),
          canRemove(c, m, this.state.me)
            ? h(
                "button",
                { class: "button small danger", type: "button", "aria-label": `Remove ${m.user_id}`, onclick: () => void this.#run(() => this.actions.removeMember(this.channelId, m.user_id)) },
                "Remove",
              )
            : null,
        );
      }),
    );
    const roles = addableRoles(c);
    if (roles.join() !== this.#roles.join()) {
      this.#roles = roles;
      replaceChildren(this.#role, ...roles.map((r) => h("option", { value: r }, r)));
    }
    this.#form.hidden = roles.length === 0;
    this.#role.disabled = roles.length <= 1;
    this.#leave.hidden = c.channel.kind !== "channel";
    this.#note.textContent =
      c.channel.kind === "dm"
        ? "The members of a direct message are fixed."
        : roles.length === 0
          ? `You are a ${c.channel.role ?? "member"} here: owners and moderators add and remove members, owners change roles.`
          : c.channel.role === "moderator"
            ? "As a moderator you add and remove members; owners manage moderators, owners and roles."
            : "As an owner you add and remove anyone and change roles; a channel keeps at least one owner.";
  }

  /** A role selector when the signed-in person may change `m`'s role, its badge otherwise. */
  #roleControl(c: ConversationState, m: Member): HTMLElement {
    const roles = settableRoles(c, m, this.state.me);
    if (roles.length < 2) return h("span", { class: "role-badge" }, m.role);
    const select = h(
      "select",
      { class: "role-select", "aria-label": `Role of ${m.user_id}` },
      ...roles.map((r) => h("option", { value: r }, r)),
    );
    select.value = m.role;
    select.addEventListener("change", () => {
      const role = select.value as MemberRole;
      void this.#run(async () => {
        try {
          await this.actions.changeRole(this.channelId, m.user_id, role);
        } finally {
          // Refused or not, the list shows the role the member has.
          this.render();
        }
      });
    });
    return select;
  }

  async #run(action: () => Promise<void>): Promise<void> {
    this.#error.textContent = "";
    this.#add.disabled = true;
    try {
      await action();
    } catch (e) {
      this.#error.textContent = e instanceof Error ? e.message : String(e);
    } finally {
      this.#add.disabled = false;
    }
  }
}
