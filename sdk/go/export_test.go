package parley

import "time"

// Test hooks, compiled only into this package's tests.

// DropLiveMessages makes rt discard the live message.new events of channelID whose seq is in
// [from, to], as if the server had skipped them.
func DropLiveMessages(rt *Realtime, channelID string, from, to uint64) {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	rt.dropFrame = func(f *frame) bool {
		return f.Type == "message.new" && f.ChannelID == channelID && f.Seq != nil && *f.Seq >= from && *f.Seq <= to
	}
}

// Backoff exposes the reconnect delay computation.
func Backoff(rt *Realtime, attempt int, cause error) time.Duration { return rt.backoff(attempt, cause) }
