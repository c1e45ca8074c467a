//! `ParleyError`: every failure the SDK reports, from the server (REST error bodies, WebSocket
//! `error` frames) or from the SDK itself (network, timeout, disconnected).
import type { ErrorCode } from "./types.js";

/** Codes the SDK itself uses, for failures that never reached the server's answer. */
export type SdkErrorCode =
  /** The request could not be sent or its answer not read (DNS, refused, reset). */
  | "network"
  /** No answer within the request's timeout. */
  | "timeout"
  /** The connection dropped while the request was pending and the request is not retried. */
  | "disconnected"
  /** The client was closed by the application. */
  | "closed"
  /** The answer could not be understood (not JSON, wrong shape). */
  | "bad_response";

/** A server error code, an SDK error code, or a code a newer server added. */
export type ParleyErrorCode = ErrorCode | SdkErrorCode | (string & {});

export interface ParleyErrorInit {
  code: ParleyErrorCode;
  message: string;
  /** HTTP status of a REST error; absent for WebSocket and SDK errors. */
  status?: number | undefined;
  /** The server's `request_id` (REST), to quote when reporting a server fault. */
  requestId?: string | undefined;
  /** For `rate_limited` (and 503 with `Retry-After`): how long to wait before retrying. */
  retryAfterMs?: number | undefined;
  /** For a refused `call.signal`: the negotiation rule that refused it (e.g. `ice_restart_required`). */
  reason?: string | undefined;
  cause?: unknown;
}

/** A failed REST call, WebSocket request or SDK operation. Match on `code`, not on `message`. */
export class ParleyError extends Error {
  override readonly name = "ParleyError";
  readonly code: ParleyErrorCode;
  readonly status: number | undefined;
  readonly requestId: string | undefined;
  readonly retryAfterMs: number | undefined;
  /** For a refused `call.signal`: the negotiation rule that refused it (e.g. `ice_restart_required`). */
  readonly reason: string | undefined;

  constructor(init: ParleyErrorInit) {
    super(init.message, init.cause === undefined ? undefined : { cause: init.cause });
    this.code = init.code;
    this.status = init.status;
    this.requestId = init.requestId;
    this.retryAfterMs = init.retryAfterMs;
    this.reason = init.reason;
  }

  /** Whether retrying the same request later may succeed. */
  get retryable(): boolean {
    return RETRYABLE.has(this.code);
  }
}

const RETRYABLE: ReadonlySet<string> = new Set([
  "rate_limited",
  "unavailable",
  "network",
  "timeout",
  "disconnected",
]);

/** Whether `e` is a `ParleyError` with one of `codes` (any code when none is given). */
export function isParleyError(e: unknown, ...codes: ParleyErrorCode[]): e is ParleyError {
  return e instanceof ParleyError && (codes.length === 0 || codes.includes(e.code));
}
