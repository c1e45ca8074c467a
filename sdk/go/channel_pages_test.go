package parley_test

import (
	"errors"
	"fmt"
	"slices"
	"testing"

	parley "github.com/parley-chat/parley/sdk/go"
)

// TestChannelPages: ListChannelsPage returns one page with the cursor of the next (empty on the
// last page), ListChannels follows the cursors to every channel, and a foreign cursor or a limit
// out of range is invalid_argument.
func TestChannelPages(t *testing.T) {
	srv := startServer(t)
	ctx := ctxT(t)
	dave := srv.client(t, "dave")

	var created []string
	for i := range 5 {
		ch, err := dave.CreateChannel(ctx, parley.CreateChannelParams{Kind: parley.KindChannel, Name: fmt.Sprintf("c%d", i)})
		if err != nil {
			t.Fatalf("create channel %d: %v", i, err)
		}
		created = append(created, ch.ID)
	}
	// The server's order: newest first, by channel id descending.
	slices.Sort(created)
	slices.Reverse(created)

	var paged []string
	cursor := ""
	for pages := 0; ; pages++ {
		if pages > 3 {
			t.Fatalf("more pages than 5 channels in pages of 2 make: %v", paged)
		}
		page, err := dave.ListChannelsPage(ctx, parley.ChannelsQuery{Limit: 2, Cursor: cursor})
		if err != nil {
			t.Fatalf("page %d: %v", pages, err)
		}
		if len(page.Channels) > 2 {
			t.Fatalf("page %d holds %d channels, over its limit 2", pages, len(page.Channels))
		}
		for _, c := range page.Channels {
			paged = append(paged, c.ID)
		}
		if page.NextCursor == "" {
			break
		}
		cursor = page.NextCursor
	}
	if !slices.Equal(paged, created) {
		t.Fatalf("pages of 2 listed %v, expected %v", paged, created)
	}

	all, err := dave.ListChannels(ctx)
	if err != nil {
		t.Fatalf("ListChannels: %v", err)
	}
	var ids []string
	for _, c := range all {
		ids = append(ids, c.ID)
	}
	if !slices.Equal(ids, created) {
		t.Fatalf("ListChannels listed %v, expected %v", ids, created)
	}

	if _, err := dave.ListChannelsPage(ctx, parley.ChannelsQuery{Cursor: "not-a-cursor"}); !errors.Is(err, parley.ErrInvalidArgument) {
		t.Fatalf("expected invalid_argument for a foreign cursor, got %v", err)
	}
	if _, err := dave.ListChannelsPage(ctx, parley.ChannelsQuery{Limit: 201}); !errors.Is(err, parley.ErrInvalidArgument) {
		t.Fatalf("expected invalid_argument for limit 201, got %v", err)
	}
}
