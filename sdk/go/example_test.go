package parley_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"time"

	parley "github.com/parley-chat/parley/sdk/go"
)

// Errors from the server are *parley.Error values: match the code with errors.Is, read the
// details with errors.As.
func ExampleError() {
	ctx := context.Background()
	client, _ := parley.New("http://127.0.0.1:8080", parley.WithToken("…"))
	_, err := client.History(ctx, "ch_01…", parley.HistoryQuery{Limit: 50})
	var perr *parley.Error
	switch {
	case errors.Is(err, parley.ErrNotAMember):
		fmt.Println("join the channel first")
	case errors.As(err, &perr) && perr.Code == "rate_limited":
		time.Sleep(perr.RetryAfter)
	case err != nil:
		log.Printf("request %s failed: %v", perr.RequestID, err)
	}
}

// A realtime client: subscribe, send through the outbox, read events in order.
func ExampleRealtime() {
	ctx := context.Background()
	client, _ := parley.New("http://127.0.0.1:8080", parley.WithToken("…"))
	rt, err := client.Connect(ctx, parley.WithStateHandler(func(c parley.StateChange) {
		log.Printf("connection: %s -> %s (%v)", c.From, c.To, c.Err)
	}))
	if err != nil {
		log.Fatal(err)
	}
	defer rt.Close()
	if _, err := rt.Subscribe(ctx, "ch_01…"); err != nil {
		log.Fatal(err)
	}
	out := rt.Post("ch_01…", "hello") // queued; sent (once) whenever connected
	for ev := range rt.Events() {
		switch e := ev.(type) {
		case *parley.MessageNew:
			fmt.Println(e.Seq, e.Message.Text)
		case *parley.Gap:
			log.Printf("the events of (%d, %d] follow, read from storage", e.From, e.To)
		}
		if _, err := out.Result(); err == nil {
			break
		}
	}
}

// Pages of history, newest first, fetched as the loop goes.
func ExampleClient_HistoryBackward() {
	ctx := context.Background()
	client, _ := parley.New("http://127.0.0.1:8080", parley.WithToken("…"))
	for m, err := range client.HistoryBackward(ctx, "ch_01…", 0, 100) {
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(m.Seq, m.SenderID, m.Text)
	}
}
