// Command quickstart is the Go SDK's quick start: alice creates a channel with bob, bob
// subscribes over a Realtime connection, alice sends three messages, bob prints them as they
// arrive, then marks them read.
//
//	ALICE=$(parley token --user alice) BOB=$(parley token --user bob) \
//	  go run ./examples/quickstart --url http://127.0.0.1:8080
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"time"

	parley "github.com/parley-chat/parley/sdk/go"
)

func main() {
	url := flag.String("url", "http://127.0.0.1:8080", "Parley base URL")
	flag.Parse()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	alice, err := parley.New(*url, parley.WithToken(os.Getenv("ALICE")))
	if err != nil {
		log.Fatal(err)
	}
	bob, err := parley.New(*url, parley.WithToken(os.Getenv("BOB")))
	if err != nil {
		log.Fatal(err)
	}

	ch, err := alice.CreateChannel(ctx, parley.CreateChannelParams{
		Kind: parley.KindChannel, Name: "quickstart", Members: []string{"bob"},
	})
	if err != nil {
		log.Fatalf("create channel: %v", err)
	}

	// Bob's realtime connection: reconnects by itself, resumes, never delivers twice.
	rt, err := bob.Connect(ctx, parley.WithStateHandler(func(c parley.StateChange) {
		log.Printf("bob: %s -> %s", c.From, c.To)
	}))
	if err != nil {
		log.Fatalf("connect: %v", err)
	}
	defer rt.Close()
	if _, err := rt.Subscribe(ctx, ch.ID); err != nil {
		log.Fatalf("subscribe: %v", err)
	}

	// Alice sends through her own realtime connection's outbox (idempotent, ordered).
	art, err := alice.Connect(ctx)
	if err != nil {
		log.Fatalf("connect: %v", err)
	}
	defer art.Close()
	for i := 1; i <= 3; i++ {
		if _, err := art.Send(ctx, ch.ID, fmt.Sprintf("hello bob, #%d", i)); err != nil {
			log.Fatalf("send: %v", err)
		}
	}

	var last uint64
	for got := 0; got < 3; {
		select {
		case ev := <-rt.Events():
			if m, ok := ev.(*parley.MessageNew); ok {
				fmt.Printf("seq %d  %s: %s\n", m.Seq, m.Message.SenderID, m.Message.Text)
				last = m.Seq
				got++
			}
		case <-ctx.Done():
			log.Fatal("timed out waiting for messages")
		}
	}
	if _, err := rt.MarkRead(ctx, ch.ID, last); err != nil {
		log.Fatalf("mark read: %v", err)
	}
	fmt.Println("read up to", last)
}
