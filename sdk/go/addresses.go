package parley

import (
	"fmt"
	"math/rand/v2"
	"net/url"
	"strings"
	"sync"
)

// URLOrder is the order in which a Client uses several addresses of one deployment.
type URLOrder int

const (
	// URLOrderRandom shuffles the addresses once per Client (the default), so the clients of a
	// deployment spread over its addresses and, when one fails, over the others.
	URLOrderRandom URLOrder = iota
	// URLOrderListed keeps the order given: the base URL of New first, then those of WithURLs.
	URLOrderListed
)

// addresses holds the base URLs of one deployment (several edges, say) and which one is in use.
// The realtime connection and REST share it: a failure at the current address (a connection
// lost or refused, a network error) hands over to the next one, round robin.
type addresses struct {
	mu    sync.Mutex
	urls  []*url.URL
	index int
}

func parseBaseURL(raw string) (*url.URL, error) {
	u, err := url.Parse(strings.TrimRight(raw, "/"))
	if err != nil {
		return nil, fmt.Errorf("parley: base URL: %w", err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("parley: base URL %q: scheme must be http or https", raw)
	}
	return u, nil
}

func newAddresses(raw []string, order URLOrder) (*addresses, error) {
	a := &addresses{}
	for _, r := range raw {
		u, err := parseBaseURL(r)
		if err != nil {
			return nil, err
		}
		a.urls = append(a.urls, u)
	}
	if len(a.urls) == 0 {
		return nil, fmt.Errorf("parley: no server address")
	}
	if order == URLOrderRandom {
		rand.Shuffle(len(a.urls), func(i, j int) { a.urls[i], a.urls[j] = a.urls[j], a.urls[i] })
	}
	return a, nil
}

// current is the address the next connection and request go to.
func (a *addresses) current() *url.URL {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.urls[a.index]
}

// failed hands over to the next address if u is still the current one (a failure already
// handed over by another caller moves nothing).
func (a *addresses) failed(u *url.URL) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.urls) > 1 && a.urls[a.index] == u {
		a.index = (a.index + 1) % len(a.urls)
	}
}

func (a *addresses) len() int { return len(a.urls) }

func (a *addresses) all() []string {
	out := make([]string, len(a.urls))
	for i, u := range a.urls {
		out[i] = u.String()
	}
	return out
}
