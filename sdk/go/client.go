// Package parley is the official Go SDK of Parley, a self-hosted real-time chat and calls
// server.
//
// It has three parts:
//
//   - Client: the REST API v1 (channels, members, messages and history, read state, presence,
//     typing, calls), with typed errors (*Error, matched with errors.Is / errors.As).
//   - Realtime: one WebSocket connection kept alive across network faults, with a visible
//     connection state, automatic reconnect with backoff and jitter, resume with per-channel
//     seq, exact gap filling from stored events, and an outbox of idempotent sends; every channel event is
//     delivered once and in seq order.
//   - Call: a WebRTC call (pion/webrtc v4), one PeerConnection per remote participant,
//     negotiated through Parley with perfect negotiation, trickle ICE and ICE restarts.
//
// Every blocking method takes a context.Context first; options are functional.
package parley

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"syscall"
	"time"
)

// TokenSource returns the access token (a JWT) to present. It is called for every REST request
// and every WebSocket connection, so it may refresh an expiring token.
type TokenSource func(ctx context.Context) (string, error)

// StaticToken is a TokenSource that always returns token.
func StaticToken(token string) TokenSource {
	return func(context.Context) (string, error) { return token, nil }
}

// Client is a REST client of one Parley deployment (one address, or several: WithURLs) for one
// user. It is safe for concurrent use.
type Client struct {
	addrs     *addresses
	more      []string
	order     URLOrder
	token     TokenSource
	http      *http.Client
	userAgent string
}

// Option configures a Client.
type Option func(*Client)

// WithToken authenticates every request with a fixed access token.
func WithToken(token string) Option {
	return func(c *Client) { c.token = StaticToken(token) }
}

// WithTokenSource authenticates every request with the token src returns at that moment.
func WithTokenSource(src TokenSource) Option {
	return func(c *Client) { c.token = src }
}

// WithHTTPClient sets the HTTP client for REST requests (default: a client with a 30 s timeout).
func WithHTTPClient(h *http.Client) Option {
	return func(c *Client) { c.http = h }
}

// WithUserAgent sets the User-Agent header of REST requests and WebSocket upgrades.
func WithUserAgent(ua string) Option {
	return func(c *Client) { c.userAgent = ua }
}

// WithURLs adds more addresses of the same deployment (its edges, say) to the base URL of New.
// The client uses one address at a time for REST and the realtime connection; when the
// connection drops or cannot be made, the next attempt goes to the next address (after the
// usual backoff), and a REST request that fails with a network error moves REST to the next
// address too (a request whose connection was refused, so it reached no server, is sent to the
// next address at once). The order is random unless WithURLOrder(URLOrderListed). See
// docs/failover.md.
func WithURLs(urls ...string) Option {
	return func(c *Client) { c.more = append(c.more, urls...) }
}

// WithURLOrder sets the order in which several addresses are used (default URLOrderRandom).
func WithURLOrder(order URLOrder) Option {
	return func(c *Client) { c.order = order }
}

// New returns a client of the server at baseURL (for example "http://127.0.0.1:8080"); more
// addresses of the same deployment can be added with WithURLs.
func New(baseURL string, opts ...Option) (*Client, error) {
	if _, err := parseBaseURL(baseURL); err != nil {
		return nil, err
	}
	c := &Client{
		http:      &http.Client{Timeout: 30 * time.Second},
		userAgent: "parley-go",
	}
	for _, o := range opts {
		o(c)
	}
	addrs, err := newAddresses(append([]string{baseURL}, c.more...), c.order)
	if err != nil {
		return nil, err
	}
	c.addrs, c.more = addrs, nil
	if c.token == nil {
		return nil, fmt.Errorf("parley: no token: use WithToken or WithTokenSource")
	}
	return c, nil
}

// BaseURL returns the address in use (with several addresses, the one that last answered).
func (c *Client) BaseURL() string { return c.addrs.current().String() }

// BaseURLs returns every address of the deployment, in the order they are tried.
func (c *Client) BaseURLs() []string { return c.addrs.all() }

// do sends a request with a JSON body (nil for none) and decodes a JSON answer into out (nil to
// discard it). Non-2xx answers become *Error. A refused connection (the request reached no
// server) is tried at the next address at once, while there is one not tried yet.
func (c *Client) do(ctx context.Context, method, path string, query url.Values, body, out any) error {
	var payload []byte
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return fmt.Errorf("parley: encoding request: %w", err)
		}
		payload = b
	}
	for refusals := 0; ; refusals++ {
		err := c.doOnce(ctx, method, path, query, payload, body != nil, out)
		if errors.Is(err, syscall.ECONNREFUSED) && refusals < c.addrs.len()-1 && ctx.Err() == nil {
			continue
		}
		return err
	}
}

func (c *Client) doOnce(ctx context.Context, method, path string, query url.Values, payload []byte, hasBody bool, out any) error {
	base := c.addrs.current()
	u := *base
	u.Path = base.Path + path
	if query != nil {
		u.RawQuery = query.Encode()
	}
	var rd io.Reader
	if hasBody {
		rd = bytes.NewReader(payload)
	}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), rd)
	if err != nil {
		return fmt.Errorf("parley: %w", err)
	}
	if c.token != nil {
		tok, err := c.token(ctx)
		if err != nil {
			return fmt.Errorf("parley: token: %w", err)
		}
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", c.userAgent)
	if hasBody {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() == nil {
			// This address did not answer: the next request goes to the next one.
			c.addrs.failed(base)
		}
		return fmt.Errorf("parley: %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("parley: %s %s: reading answer: %w", method, path, err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return httpError(resp, data)
	}
	if out == nil || len(data) == 0 {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("parley: %s %s: decoding answer: %w", method, path, err)
	}
	return nil
}

// httpError turns a non-2xx answer into an *Error, also when the body is not Parley's.
func httpError(resp *http.Response, data []byte) *Error {
	e := &Error{Status: resp.StatusCode, RequestID: resp.Header.Get("X-Request-Id")}
	var body errorBody
	if json.Unmarshal(data, &body) == nil && body.Error.Code != "" {
		e.Code = body.Error.Code
		e.Message = body.Error.Message
		if body.Error.RequestID != "" {
			e.RequestID = body.Error.RequestID
		}
		if body.Error.RetryAfterMS != nil {
			e.RetryAfter = time.Duration(*body.Error.RetryAfterMS) * time.Millisecond
		}
	} else {
		e.Code = codeOfStatus(resp.StatusCode)
		e.Message = strings.TrimSpace(string(data))
	}
	if e.RetryAfter == 0 {
		e.RetryAfter = retryAfterHeader(resp.Header)
	}
	return e
}

// codeOfStatus names an answer without a Parley body (a proxy's, say) by its status.
func codeOfStatus(status int) string {
	switch {
	case status == http.StatusTooManyRequests:
		return "rate_limited"
	case status == http.StatusNotFound:
		return "not_found"
	case status == http.StatusForbidden:
		return "forbidden"
	case status == http.StatusUnauthorized:
		return "token_missing"
	case status == http.StatusServiceUnavailable || status == http.StatusBadGateway || status == http.StatusGatewayTimeout:
		return "unavailable"
	case status >= 500:
		return "internal"
	default:
		return "invalid_request"
	}
}

func pathEscape(s string) string { return url.PathEscape(s) }
