//! The sign-in screen: pick a development user id (and optionally a tenant).
import { h } from "./dom.js";
import { signInAsDevUser, type DevSession } from "./session.js";

const USER_ID = /^[A-Za-z0-9._@-]{1,64}$/;

export function renderSignIn(root: HTMLElement, onSignedIn: (session: DevSession) => void, notice?: string): void {
  const userInput = h("input", {
    id: "signin-user",
    type: "text",
    name: "user_id",
    autocomplete: "username",
    required: true,
    maxlength: 64,
    spellcheck: "false",
    "aria-describedby": "signin-user-hint",
  });
  const tenantInput = h("input", {
    id: "signin-tenant",
    type: "text",
    name: "tenant_id",
    placeholder: "default",
    spellcheck: "false",
  });
  const error = h("p", { class: "error-text", role: "alert", id: "signin-error" }, notice ?? "");
  const submit = h("button", { class: "button primary", type: "submit" }, "Sign in");
  const form = h(
    "form",
    { class: "signin", "aria-labelledby": "signin-title" },
    h("h1", { id: "signin-title" }, "Parley"),
    h("p", {}, "Sign in as a development user to chat and call. Each tab has its own sign-in: open another tab as a second user to try it with yourself."),
    h(
      "div",
      { class: "field" },
      h("label", { for: "signin-user" }, "User id"),
      userInput,
      h("span", { class: "hint", id: "signin-user-hint" }, "Letters, digits and . _ @ -, e.g. alice"),
    ),
    h("div", { class: "field" }, h("label", { for: "signin-tenant" }, "Tenant (optional)"), tenantInput),
    error,
    submit,
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const userId = userInput.value.trim();
    if (!USER_ID.test(userId)) {
      error.textContent = "Enter a user id of letters, digits and . _ @ - (at most 64).";
      userInput.focus();
      return;
    }
    submit.disabled = true;
    error.textContent = "";
    signInAsDevUser(userId, tenantInput.value.trim() || undefined).then(onSignedIn, (err: unknown) => {
      submit.disabled = false;
      error.textContent = `Could not sign in: ${err instanceof Error ? err.message : String(err)}`;
    });
  });
  root.replaceChildren(h("main", {}, form));
  root.removeAttribute("aria-busy");
  userInput.focus();
}
