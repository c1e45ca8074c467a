//! The signed-in development user: a token from `POST /v1/dev/token`, kept in sessionStorage (one sign-in per tab) so a
//! reload stays signed in. The route exists only while the server runs with its development key.

import { isParleyError, RestClient, type OutboxRecord, type OutboxStore } from "@parley/sdk";

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
  let data;
  try {
    data = await RestClient.devToken(location.origin, tenantId ? { user_id: userId, tenant_id: tenantId } : { user_id: userId });
  } catch (e) {
    if (isParleyError(e, "route_not_found", "not_found")) {
      throw new Error(
        "This server does not hand out development tokens (it runs with configured JWT keys). Signing in as a development user only works on a development server.",
      );
    }
    throw e;
  }
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

/**
 * Keeps the SDK's outbox (messages not acknowledged yet) in sessionStorage, per user, so a
 * message written while the server is unreachable is still sent after a reload of the tab.
 */
export function sessionOutboxStore(session: DevSession): OutboxStore {
  const key = `parley.outbox.${session.tenantId}.${session.userId}`;
  return {
    load(): OutboxRecord[] {
      try {
        const records = JSON.parse(sessionStorage.getItem(key) ?? "[]") as unknown;
        return Array.isArray(records) ? (records as OutboxRecord[]) : [];
      } catch {
        return [];
      }
    },
    save(records: OutboxRecord[]): void {
      if (records.length === 0) sessionStorage.removeItem(key);
      else sessionStorage.setItem(key, JSON.stringify(records));
    },
  };
}
