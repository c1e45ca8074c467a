//! Entry point: show the sign-in screen, or the app for a stored development session.
import { App } from "./app.js";
import { forgetSession, storedSession, type DevSession } from "./session.js";
import { renderSignIn } from "./signin.js";

const root = document.getElementById("app");
if (!root) throw new Error("index.html has no #app element");

function showApp(session: DevSession): void {
  const app = new App({
    session,
    root: root!,
    onSignOut: (notice) => {
      forgetSession();
      history.replaceState(null, "", "/");
      renderSignIn(root!, showApp, notice);
    },
  });
  app.start().catch((e: unknown) => console.error("parley: the app failed to start", e));
}

const session = storedSession();
if (session) showApp(session);
else renderSignIn(root, showApp);
