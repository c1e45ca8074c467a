//! A small form in a modal <dialog> (focus is trapped and Escape cancels, natively), used for
//! "new channel", "new direct message" and "add member". `submit` may fail: its message is shown
//! in the dialog and the dialog stays open.
import { h } from "../dom.js";

export interface DialogField {
  name: string;
  label: string;
  hint?: string;
  required?: boolean;
  placeholder?: string;
}

let dialogCount = 0;

export function openFormDialog(options: {
  title: string;
  fields: DialogField[];
  submitLabel: string;
  submit: (values: Record<string, string>) => Promise<void>;
}): void {
  const id = `dialog-${++dialogCount}`;
  const inputs = options.fields.map((f, i) =>
    h("input", {
      id: `${id}-${i}`,
      name: f.name,
      type: "text",
      required: f.required ?? false,
      placeholder: f.placeholder,
      spellcheck: "false",
      autocomplete: "off",
      "aria-describedby": f.hint ? `${id}-${i}-hint` : null,
    }),
  );
  const error = h("p", { class: "error-text", role: "alert" });
  const submit = h("button", { class: "button primary", type: "submit" }, options.submitLabel);
  const cancel = h("button", { class: "button", type: "button" }, "Cancel");
  const form = h(
    "form",
    { method: "dialog" },
    h("h2", { id: `${id}-title` }, options.title),
    ...options.fields.map((f, i) =>
      h(
        "div",
        { class: "field" },
        h("label", { for: `${id}-${i}` }, f.label),
        inputs[i],
        f.hint ? h("span", { class: "hint", id: `${id}-${i}-hint` }, f.hint) : null,
      ),
    ),
    error,
    h("div", { class: "dialog-actions" }, cancel, submit),
  );
  const dialog = h("dialog", { "aria-labelledby": `${id}-title` }, form);
  cancel.addEventListener("click", () => dialog.close());
  dialog.addEventListener("close", () => dialog.remove());
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const values: Record<string, string> = {};
    options.fields.forEach((f, i) => (values[f.name] = inputs[i]!.value.trim()));
    submit.disabled = true;
    error.textContent = "";
    options.submit(values).then(
      () => dialog.close(),
      (err: unknown) => {
        submit.disabled = false;
        error.textContent = err instanceof Error ? err.message : String(err);
      },
    );
  });
  document.body.append(dialog);
  dialog.showModal();
  inputs[0]?.focus();
}

/**
 * A yes/no question in a modal dialog ("Delete this message?"). `confirm` may fail: its message is
 * shown and the dialog stays open. Escape or Cancel closes it without doing anything.
 */
export function openConfirmDialog(options: {
  title: string;
  body: string;
  confirmLabel: string;
  danger?: boolean;
  confirm: () => Promise<void>;
}): void {
  const id = `dialog-${++dialogCount}`;
  const error = h("p", { class: "error-text", role: "alert" });
  const ok = h("button", { class: `button ${options.danger ? "danger" : "primary"}`, type: "submit" }, options.confirmLabel);
  const cancel = h("button", { class: "button", type: "button" }, "Cancel");
  const form = h(
    "form",
    { method: "dialog" },
    h("h2", { id: `${id}-title` }, options.title),
    h("p", { id: `${id}-body` }, options.body),
    error,
    h("div", { class: "dialog-actions" }, cancel, ok),
  );
  const dialog = h("dialog", { "aria-labelledby": `${id}-title`, "aria-describedby": `${id}-body` }, form);
  cancel.addEventListener("click", () => dialog.close());
  dialog.addEventListener("close", () => dialog.remove());
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    ok.disabled = true;
    error.textContent = "";
    options.confirm().then(
      () => dialog.close(),
      (err: unknown) => {
        ok.disabled = false;
        error.textContent = err instanceof Error ? err.message : String(err);
      },
    );
  });
  document.body.append(dialog);
  dialog.showModal();
  cancel.focus();
}
