package parley

import (
	"context"
	"iter"
)

// HistoryBackward iterates over a channel's messages from the newest (or from before seq, when
// before is not 0) to the oldest, fetching pages of pageSize (1–200; 0 for 50). It stops at the
// first error, which it yields.
//
//	for m, err := range client.HistoryBackward(ctx, ch, 0, 100) { ... }
func (c *Client) HistoryBackward(ctx context.Context, channelID string, before uint64, pageSize int) iter.Seq2[Message, error] {
	return func(yield func(Message, error) bool) {
		for {
			page, err := c.History(ctx, channelID, HistoryQuery{Before: before, Limit: pageSize})
			if err != nil {
				yield(Message{}, err)
				return
			}
			for i := len(page.Messages) - 1; i >= 0; i-- {
				if !yield(page.Messages[i], nil) {
					return
				}
			}
			if !page.HasBefore || len(page.Messages) == 0 {
				return
			}
			before = page.Messages[0].Seq
		}
	}
}

// HistoryAfter iterates over a channel's messages with a seq greater than after, oldest first,
// fetching pages of pageSize (1–200; 0 for 50) until the newest. It stops at the first error,
// which it yields.
func (c *Client) HistoryAfter(ctx context.Context, channelID string, after uint64, pageSize int) iter.Seq2[Message, error] {
	return func(yield func(Message, error) bool) {
		for {
			q := HistoryQuery{After: after, FromStart: after == 0, Limit: pageSize}
			page, err := c.History(ctx, channelID, q)
			if err != nil {
				yield(Message{}, err)
				return
			}
			for _, m := range page.Messages {
				if m.Seq <= after {
					continue
				}
				if !yield(m, nil) {
					return
				}
				after = m.Seq
			}
			if !page.HasAfter || len(page.Messages) == 0 {
				return
			}
		}
	}
}
