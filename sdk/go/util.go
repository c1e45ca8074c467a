package parley

import (
	"crypto/rand"
	"encoding/hex"
	"sync"
)

// NewClientMsgID returns a fresh idempotency key for a send: 26 random hex characters with a
// "g" prefix, well inside the server's 64-character limit.
func NewClientMsgID() string {
	var b [13]byte
	_, _ = rand.Read(b[:])
	return "g" + hex.EncodeToString(b[:])
}

// queue is an unbounded FIFO with a wake-up channel, so a producer never blocks (a socket
// reader must keep reading) while its consumer is busy.
type queue[T any] struct {
	mu    sync.Mutex
	items []T
	wake  chan struct{}
}

func newQueue[T any]() *queue[T] {
	return &queue[T]{wake: make(chan struct{}, 1)}
}

func (q *queue[T]) push(v T) {
	q.mu.Lock()
	q.items = append(q.items, v)
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// pop returns the oldest item, if any.
func (q *queue[T]) pop() (T, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	var zero T
	if len(q.items) == 0 {
		return zero, false
	}
	v := q.items[0]
	q.items[0] = zero
	q.items = q.items[1:]
	return v, true
}
