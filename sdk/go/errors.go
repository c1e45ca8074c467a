package parley

import (
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"
)

// Error is a failure reported by the server: a REST error body or a WebSocket error frame.
// Match it with errors.As to read its fields, or with errors.Is against the sentinels below,
// which compare codes only:
//
//	var perr *parley.Error
//	if errors.As(err, &perr) { log.Println(perr.Code, perr.RequestID) }
//	if errors.Is(err, parley.ErrNotAMember) { ... }
type Error struct {
	// Code is the stable, machine-readable error code (see docs/protocol.md).
	Code string
	// Message is for people; it may change between versions. Match on Code.
	Message string
	// Status is the HTTP status of a REST error (0 for WebSocket errors).
	Status int
	// RequestID identifies the request in the server's logs (REST only).
	RequestID string
	// RetryAfter is the delay the server asks for before a retry (rate_limited), or 0.
	RetryAfter time.Duration
	// Reason is, for a refused call signal (Code "conflict"), the negotiation rule that refused
	// it: "peer_gone", "no_pending_offer", "answer_from_offerer", "rollback_from_answerer",
	// "no_local_description" or "ice_restart_required". Empty otherwise.
	Reason string
}

func (e *Error) Error() string {
	s := "parley: " + e.Code
	if e.Message != "" {
		s += ": " + e.Message
	}
	if e.Status != 0 {
		s += " (HTTP " + strconv.Itoa(e.Status) + ")"
	}
	if e.RequestID != "" {
		s += " [request " + e.RequestID + "]"
	}
	return s
}

// Is reports whether target is an *Error with the same Code, so that the sentinels match any
// error of their code whatever its message or status.
func (e *Error) Is(target error) bool {
	var t *Error
	if !errors.As(target, &t) {
		return false
	}
	return t.Code == e.Code && (t.Message == "" || t.Message == e.Message)
}

// Sentinels for errors.Is, one per stable error code of API v1.
var (
	ErrMalformedJSON       = &Error{Code: "malformed_json"}
	ErrInvalidRequest      = &Error{Code: "invalid_request"}
	ErrInvalidArgument     = &Error{Code: "invalid_argument"}
	ErrUnknownFrameType    = &Error{Code: "unknown_frame_type"}
	ErrTokenMissing        = &Error{Code: "token_missing"}
	ErrTokenMalformed      = &Error{Code: "token_malformed"}
	ErrTokenBadSignature   = &Error{Code: "token_bad_signature"}
	ErrTokenUnknownKey     = &Error{Code: "token_unknown_key"}
	ErrTokenExpired        = &Error{Code: "token_expired"}
	ErrTokenNotYetValid    = &Error{Code: "token_not_yet_valid"}
	ErrTokenInvalidClaims  = &Error{Code: "token_invalid_claims"}
	ErrAuthRequired        = &Error{Code: "auth_required"}
	ErrNotAMember          = &Error{Code: "not_a_member"}
	ErrForbidden           = &Error{Code: "forbidden"}
	ErrNotFound            = &Error{Code: "not_found"}
	ErrRouteNotFound       = &Error{Code: "route_not_found"}
	ErrMethodNotAllowed    = &Error{Code: "method_not_allowed"}
	ErrIdempotencyConflict = &Error{Code: "idempotency_conflict"}
	ErrConflict            = &Error{Code: "conflict"}
	ErrCallFull            = &Error{Code: "call_full"}
	ErrPayloadTooLarge     = &Error{Code: "payload_too_large"}
	ErrRateLimited         = &Error{Code: "rate_limited"}
	ErrInternal            = &Error{Code: "internal"}
	ErrUnavailable         = &Error{Code: "unavailable"}
)

// IsAuthError reports whether err is a refused or missing token (a token_* or auth_required
// code): retrying with the same token will not help.
func IsAuthError(err error) bool {
	var e *Error
	if !errors.As(err, &e) {
		return false
	}
	switch e.Code {
	case "token_missing", "token_malformed", "token_bad_signature", "token_unknown_key",
		"token_expired", "token_not_yet_valid", "token_invalid_claims", "auth_required":
		return true
	}
	return false
}

// Errors of the SDK itself (not from the server).
var (
	// ErrClosed is returned by operations on a Realtime client or Call that was closed.
	ErrClosed = errors.New("parley: closed")
	// ErrNotConnected matches a request cut by a lost connection and not retried (most
	// requests wait for the next connection and are retried; sends wait in the outbox).
	ErrNotConnected = errors.New("parley: not connected")
)

// CloseError says why the server closed a WebSocket connection (see the close codes in
// docs/protocol.md). It is reported through Realtime.Err after a fatal close and is the cause
// of a reconnect otherwise.
type CloseError struct {
	Code   int
	Reason string
}

func (e *CloseError) Error() string {
	return fmt.Sprintf("parley: connection closed with %d %s", e.Code, e.Reason)
}

// Close codes of the parley.v1 WebSocket protocol.
const (
	CloseGoingAway        = 1001
	CloseInvalidUTF8      = 1007
	ClosePolicyViolation  = 1008
	CloseFrameTooLarge    = 1009
	CloseAuthFailed       = 4001
	CloseAuthTimeout      = 4002
	CloseHeartbeatTimeout = 4003
	CloseRateLimitFlood   = 4008
	CloseSlowConsumer     = 4009
	// CloseTokenExpired: the token expired and was not refreshed (auth.refresh).
	CloseTokenExpired = 4011
)

// errorBody is the REST error envelope.
type errorBody struct {
	Error struct {
		Code         string `json:"code"`
		Message      string `json:"message"`
		RequestID    string `json:"request_id"`
		RetryAfterMS *int64 `json:"retry_after_ms"`
	} `json:"error"`
}

// retryAfterHeader parses a Retry-After header in seconds (the only form Parley sends).
func retryAfterHeader(h http.Header) time.Duration {
	v := h.Get("Retry-After")
	if v == "" {
		return 0
	}
	if n, err := strconv.Atoi(v); err == nil && n >= 0 {
		return time.Duration(n) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		if d := time.Until(t); d > 0 {
			return d
		}
	}
	return 0
}
