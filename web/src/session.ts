//! The signed-in development user: a token from `POST /v1/dev/token`, kept in sessionStorage (one sign-in per tab) so a
//! reload stays signed in. The route exists only while the server runs with its development key.

export interface DevSession {
  token: string;
  userId: string;
  tenantId: string;
  /** RFC 3339. */
  expiresAt: string;
}

const STORAGE_KEY = "parley.devSession";

/** Signs in as `userId` (in `tenantId`, or the server's default tenant). */
export async function signInAsDevUser(userId: string, tenantId?: string): Promise<DevSession> {
  const body: Record<string, string> = { user_id: userId };
  if (tenantId) body.tenant_id = tenantId;
  const res = await fetch("/v1/dev/token", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  if (res.status === 404) {
    throw new Error(
      "This server does not hand out development tokens (it runs with configured JWT keys). Sign-in as a development user only works on a development server.",
    );
  }
  if (!res.ok) {
    let message = `HTTP ${res.status}`;
    try {
      const err = (await res.json()) as { error?: { message?: string } };
      if (err.error?.message) message = err.error.message;
    } catch {
      // Keep the status line.
    }
    throw new Error(message);
  }
  const data = (await res.json()) as { token: string; user_id: string; tenant_id: string; expires_at: string };
  const session: DevSession = {
    token: data.token,
    userId: data.user_id,
    tenantId: data.tenant_id,
    expiresAt: data.expires_at,
  };
  sessionStorage.setItem(STORAGE_KEY, JSON.stringify(session));
  return session;
}

/** The stored session, unless it is missing, unreadable or expires within a minute. */
export function storedSession(): DevSession | null {
  const raw = sessionStorage.getItem(STORAGE_KEY);
  if (!raw) return null;
  try {
    const s = JSON.parse(raw) as DevSession;
    if (typeof s.token !== "string" || Date.parse(s.expiresAt) - Date.now() < 60_000) return null;
    return s;
  } catch {
    return null;
  }
}

export function forgetSession(): void {
  sessionStorage.removeItem(STORAGE_KEY);
}
