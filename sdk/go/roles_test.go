package parley_test

import (
	"errors"
	"testing"

	parley "github.com/parley-chat/parley/sdk/go"
)

// TestUpdateMemberRole: an owner promotes a member, who sees *MemberUpdated live; raising your
// own role is 403 forbidden, demoting the only owner 409 conflict — against a real server.
func TestUpdateMemberRole(t *testing.T) {
	srv := startServer(t)
	ctx := ctxT(t)
	alice := srv.client(t, "alice")
	bob := srv.client(t, "bob")

	ch, err := alice.CreateChannel(ctx, parley.CreateChannelParams{Kind: parley.KindChannel, Name: "roles"})
	if err != nil {
		t.Fatalf("create channel: %v", err)
	}
	if _, err := alice.AddMember(ctx, ch.ID, "bob", ""); err != nil {
		t.Fatalf("add bob: %v", err)
	}
	bobRT := connect(t, bob)
	if _, err := bobRT.Subscribe(ctx, ch.ID); err != nil {
		t.Fatalf("bob subscribes: %v", err)
	}

	m, err := alice.UpdateMemberRole(ctx, ch.ID, "bob", parley.RoleModerator)
	if err != nil || m.UserID != "bob" || m.Role != parley.RoleModerator {
		t.Fatalf("promote bob: %+v, %v", m, err)
	}
	ev := nextEvent(t, bobRT, "member.updated of bob", func(e *parley.MemberUpdated) bool { return true })
	if ev.Member.UserID != "bob" || ev.Member.Role != parley.RoleModerator || ev.By != "alice" || ev.ChannelID != ch.ID {
		t.Fatalf("unexpected member.updated: %+v", ev)
	}

	var perr *parley.Error
	_, err = bob.UpdateMemberRole(ctx, ch.ID, "bob", parley.RoleOwner)
	if !errors.As(err, &perr) || perr.Status != 403 || perr.Code != "forbidden" {
		t.Fatalf("bob raising himself: expected 403 forbidden, got %v", err)
	}
	_, err = alice.UpdateMemberRole(ctx, ch.ID, "alice", parley.RoleMember)
	if !errors.As(err, &perr) || perr.Status != 409 || perr.Code != "conflict" {
		t.Fatalf("demoting the only owner: expected 409 conflict, got %v", err)
	}
}
