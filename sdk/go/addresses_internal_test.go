package parley

import (
	"slices"
	"testing"
)

func TestAddressesHandOverRoundRobin(t *testing.T) {
	a, err := newAddresses([]string{"http://a:1/", "http://b:2", "https://c:3"}, URLOrderListed)
	if err != nil {
		t.Fatal(err)
	}
	if got := a.all(); !slices.Equal(got, []string{"http://a:1", "http://b:2", "https://c:3"}) {
		t.Fatalf("all = %v", got)
	}
	first := a.current()
	a.failed(a.urls[1]) // not the current one: nothing moves
	if a.current() != first {
		t.Fatal("a failure of another address moved the current one")
	}
	var seen []string
	for range 4 {
		u := a.current()
		seen = append(seen, u.String())
		a.failed(u)
	}
	if !slices.Equal(seen, []string{"http://a:1", "http://b:2", "https://c:3", "http://a:1"}) {
		t.Fatalf("hand-over order %v", seen)
	}
}

func TestAddressesShuffleSpreadsAndValidates(t *testing.T) {
	firsts := map[string]bool{}
	for range 200 {
		a, err := newAddresses([]string{"http://a:1", "http://b:2", "http://c:3"}, URLOrderRandom)
		if err != nil {
			t.Fatal(err)
		}
		firsts[a.current().String()] = true
	}
	if len(firsts) != 3 {
		t.Fatalf("200 shuffles started at %v only", firsts)
	}
	one, _ := newAddresses([]string{"http://a:1"}, URLOrderRandom)
	one.failed(one.current())
	if one.current().String() != "http://a:1" {
		t.Fatal("a single address must stay current")
	}
	for _, bad := range [][]string{nil, {"ws://a:1"}, {"://"}} {
		if _, err := newAddresses(bad, URLOrderListed); err == nil {
			t.Fatalf("%v accepted", bad)
		}
	}
}
