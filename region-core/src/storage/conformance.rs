//! The storage conformance suite: the observable behaviour every [`Storage`] engine must have.
//!
//! Each case is a `pub async fn` taking the engine as `Arc<dyn Storage>` and panicking on a
//! deviation. Every case works in a fresh random tenant, so cases may share one database and run
//! in parallel. [`storage_conformance_tests!`](crate::storage_conformance_tests) turns the whole
//! suite into one `#[tokio::test]` per case for an engine:
//!
//! ```ignore
//! parley_core::storage_conformance_tests!(open_engine().await);
//! ```
//!
//! where the expression (evaluated inside each async test) yields a [`Fixture`]: an
//! `Arc<Engine>`, an `Arc<dyn Storage>`, or a pair `(fixture, guard)` whose guard (a temporary
//! directory, say) must live as long as the test.
//!
//! Where the trait leaves a behaviour open (whether `members`, `history` or `events` of a channel
//! that does not exist in the tenant are empty or `NotFound`), the suite accepts either.

use std::collections::HashSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use parley_proto::calls::{CallMode, LeaveReason};
use parley_proto::{Channel, ChannelEvent, ChannelKind, EventBody, Message, MessagePage, Role};
use serde_json::json;

use super::{
    HistoryAnchor, NewCall, NewChannel, NewMessage, SendOutcome, Storage, StorageError,
    StorageResult, UNREAD_COUNT_CAP,
};

/// Generates one `#[tokio::test]` per conformance case. The argument is an expression evaluated
/// inside each test (it may `.await`) that yields a [`Fixture`].
#[macro_export]
macro_rules! storage_conformance_tests {
    ($fixture:expr) => {
        $crate::storage_conformance_tests!(@cases ($fixture)
            channel_create_get_list
            channels_page_through_every_channel
            dm_unique_per_pair
            rename_emits_channel_updated
            member_add_remove_events
            member_role_changes
            non_member_cannot_send
            member_history_is_for_members
            removed_member_cannot_send
            removal_races_sends
            concurrent_sends_are_gapless
            concurrent_sends_across_channels
            concurrent_retries_are_idempotent
            retries_among_new_sends
            idempotency_conflict
            idempotency_survives_edit
            edit_and_delete_events
            history_paging
            events_merged_stream
            tenant_isolation
            delete_channel_removes_everything
            metadata_round_trips
            read_state_and_unread_counts
            unread_counts_follow_from_the_event_stream
            unread_counts_stop_at_the_cap
            unread_counts_follow_every_change
            unread_reads_in_the_middle_of_a_long_channel
            unread_counts_exact_under_concurrency
            presence_channels_leave_out_large_ones
            call_lifecycle
            one_active_call_per_channel
            concurrent_joins_stop_at_the_cap
            end_call_makes_everyone_leave
            last_seqs_in_one_call
        );
    };
    (@cases ($fixture:expr) $($case:ident)*) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let fixture = $fixture;
                let storage = $crate::storage::conformance::Fixture::storage(&fixture);
                $crate::storage::conformance::$case(storage).await;
            }
        )*
    };
}

/// What a test's constructor expression yields: the engine, possibly with a guard that must
/// outlive it.
pub trait Fixture {
    fn storage(&self) -> Arc<dyn Storage>;
}

impl Fixture for Arc<dyn Storage> {
    fn storage(&self) -> Arc<dyn Storage> {
        self.clone()
    }
}

impl<S: Storage> Fixture for Arc<S> {
    fn storage(&self) -> Arc<dyn Storage> {
        self.clone()
    }
}

impl<F: Fixture, G> Fixture for (F, G) {
    fn storage(&self) -> Arc<dyn Storage> {
        self.0.storage()
    }
}

// ---- channels ----

/// Create, get and list channels; roles per member; newest first.
pub async fn channel_create_get_list(s: Arc<dyn Storage>) {
    let t = tenant();
    let (alice, bob, carol) = (id("alice"), id("bob"), id("carol"));
    let first_id = id("ch");
    let (first, created) = s
        .create_channel(NewChannel {
            tenant_id: t.clone(),
            id: first_id.clone(),
            kind: ChannelKind::Channel,
            name: Some("general".into()),
            created_by: alice.clone(),
            members: vec![(alice.clone(), Role::Owner), (bob.clone(), Role::Member)],
            dm_key: None,
        })
        .await
        .expect("create channel");
    assert!(created);
    assert_eq!(first.id, first_id);
    assert_eq!(first.kind, ChannelKind::Channel);
    assert_eq!(first.name.as_deref(), Some("general"));
    assert_eq!(first.created_by, alice);
    assert_eq!(first.last_seq, 0);
    assert_rfc3339(&first.created_at);
    // created_at has millisecond resolution: make "newest first" observable.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let second = channel(
        &s,
        &t,
        &alice,
        &[(&bob, Role::Moderator), (&carol, Role::Member)],
    )
    .await;

    let got = s
        .channel(&t, &first_id)
        .await
        .expect("get")
        .expect("channel exists");
    assert_eq!(got.role, None, "channel() carries no role");
    assert_eq!(
        (got.id.as_str(), got.name.as_deref(), got.kind),
        (first_id.as_str(), Some("general"), ChannelKind::Channel)
    );
    assert_eq!(
        (
            got.created_by.as_str(),
            got.created_at.as_str(),
            got.last_seq
        ),
        (alice.as_str(), first.created_at.as_str(), 0)
    );
    assert_eq!(s.channel(&t, &id("missing")).await.expect("get"), None);

    let listed = |user: String| {
        let s = s.clone();
        let t = t.clone();
        async move {
            s.channels_of(&t, &user)
                .await
                .expect("channels_of")
                .into_iter()
                .map(|c| (c.id, c.role))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        listed(alice.clone()).await,
        vec![
            (second.id.clone(), Some(Role::Owner)),
            (first_id.clone(), Some(Role::Owner))
        ]
    );
    assert_eq!(
        listed(bob.clone()).await,
        vec![
            (second.id.clone(), Some(Role::Moderator)),
            (first_id.clone(), Some(Role::Member))
        ]
    );
    assert_eq!(
        listed(carol.clone()).await,
        vec![(second.id.clone(), Some(Role::Member))]
    );
    assert_eq!(listed(id("nobody")).await, vec![]);
    let mut bobs = s.channel_ids_of(&t, &bob).await.expect("ids");
    bobs.sort();
    let mut expected = vec![second.id.clone(), first_id.clone()];
    expected.sort();
    assert_eq!(bobs, expected, "channel ids of a member of two channels");

    let members = s.members(&t, &second.id).await.expect("members");
    let roles: HashSet<(String, Role)> = members
        .iter()
        .map(|m| (m.user_id.clone(), m.role))
        .collect();
    let expected: HashSet<(String, Role)> = [
        (alice.clone(), Role::Owner),
        (bob.clone(), Role::Moderator),
        (carol.clone(), Role::Member),
    ]
    .into();
    assert_eq!(roles, expected);
    members.iter().for_each(|m| assert_rfc3339(&m.joined_at));
    let bob_in_first = s
        .member(&t, &first_id, &bob)
        .await
        .expect("member")
        .expect("bob is a member");
    assert_eq!(
        (bob_in_first.user_id.as_str(), bob_in_first.role),
        (bob.as_str(), Role::Member)
    );
    assert_eq!(s.member(&t, &first_id, &carol).await.expect("member"), None);
}

/// A user's channels come in pages by id descending: each page holds at most `limit`, the next
/// one starts below the last id of the previous, and together they list every channel exactly
/// once, with each page's own role and unread count.
pub async fn channels_page_through_every_channel(s: Arc<dyn Storage>) {
    let t = tenant();
    let (alice, bob) = (id("alice"), id("bob"));
    let mut ids = Vec::new();
    for _ in 0..7 {
        ids.push(channel(&s, &t, &alice, &[(&bob, Role::Member)]).await.id);
    }
    // Someone else's channel is never listed.
    channel(&s, &t, &bob, &[]).await;
    send(&s, msg(&t, &ids[2], &bob, "k1", "hello")).await;
    let ids_sent_to = ids[2].clone();
    ids.sort();
    ids.reverse();

    let mut pages = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let page = s
            .channels_page(&t, &alice, before.as_deref(), 3)
            .await
            .expect("channels_page");
        assert!(page.len() <= 3, "a page holds at most its limit");
        if page.is_empty() {
            break;
        }
        before = page.last().map(|c| c.id.clone());
        pages.push(page);
    }
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![3, 3, 1]);
    let listed: Vec<String> = pages.iter().flatten().map(|c| c.id.clone()).collect();
    assert_eq!(listed, ids, "every channel once, by id descending");
    for c in pages.iter().flatten() {
        assert_eq!(c.role, Some(Role::Owner));
        let expected = if c.id == ids_sent_to { 1 } else { 0 };
        assert_eq!(c.unread_count, Some(expected), "unread count of {}", c.id);
    }
    assert!(
        s.channels_page(&t, &alice, Some(&ids[6]), 3)
            .await
            .expect("past the end")
            .is_empty(),
        "nothing below the last id"
    );
    assert_eq!(
        s.channels_of(&t, &alice)
            .await
            .expect("channels_of")
            .into_iter()
            .map(|c| c.id)
            .collect::<Vec<_>>(),
        ids
    );
}

/// A DM exists once per pair and tenant: a second create returns it with `created = false`.
pub async fn dm_unique_per_pair(s: Arc<dyn Storage>) {
    let (t, other_tenant) = (tenant(), tenant());
    let (alice, bob, carol) = (id("alice"), id("bob"), id("carol"));
    let (dm, created) = s
        .create_channel(new_dm(&t, &alice, &bob))
        .await
        .expect("create DM");
    assert!(created);
    assert_eq!((dm.kind, dm.name.as_deref()), (ChannelKind::Dm, None));

    let (again, created) = s
        .create_channel(new_dm(&t, &bob, &alice))
        .await
        .expect("create DM again");
    assert!(
        !created,
        "the second create of a DM returns the existing one"
    );
    assert_eq!(again.id, dm.id);
    assert_eq!(
        again.created_by, alice,
        "the existing DM is returned as it is"
    );
    let of_alice: Vec<String> = s
        .channels_of(&t, &alice)
        .await
        .expect("list")
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(of_alice, vec![dm.id.clone()]);
    assert_eq!(s.members(&t, &dm.id).await.expect("members").len(), 2);

    let (with_carol, created) = s
        .create_channel(new_dm(&t, &alice, &carol))
        .await
        .expect("another pair");
    assert!(created);
    assert_ne!(with_carol.id, dm.id);

    let (elsewhere, created) = s
        .create_channel(new_dm(&other_tenant, &alice, &bob))
        .await
        .expect("other tenant");
    assert!(created, "tenants do not share DMs");
    assert_ne!(elsewhere.id, dm.id);
    assert_eq!(s.channel(&t, &elsewhere.id).await.expect("get"), None);
    assert_eq!(s.channel(&other_tenant, &dm.id).await.expect("get"), None);
}

/// A rename is the `channel.updated` event with the channel's next seq.
pub async fn rename_emits_channel_updated(s: Arc<dyn Storage>) {
    let t = tenant();
    let alice = id("alice");
    let ch = channel(&s, &t, &alice, &[]).await;
    let event = s
        .rename_channel(&t, &ch.id, "renamed", &alice)
        .await
        .expect("rename");
    assert_eq!((event.channel_id.as_str(), event.seq), (ch.id.as_str(), 1));
    let EventBody::ChannelUpdated {
        channel: updated,
        by,
    } = &event.body
    else {
        panic!("expected channel.updated, got {event:?}");
    };
    assert_eq!(by, &alice);
    assert_eq!(
        (
            updated.id.as_str(),
            updated.name.as_deref(),
            updated.last_seq
        ),
        (ch.id.as_str(), Some("renamed"), 1)
    );
    let got = s.channel(&t, &ch.id).await.expect("get").expect("exists");
    assert_eq!((got.name.as_deref(), got.last_seq), (Some("renamed"), 1));
    assert_eq!(events(&s, &t, &ch.id, 0).await, vec![event]);

    let second = s
        .rename_channel(&t, &ch.id, "again", &alice)
        .await
        .expect("rename again");
    assert_eq!(second.seq, 2);
    assert_err(
        s.rename_channel(&t, &id("missing"), "x", &alice).await,
        is_not_found,
        "rename of an unknown channel",
    );
}

/// Adding and removing members are events with consecutive seqs; repeating them changes nothing.
pub async fn member_add_remove_events(s: Arc<dyn Storage>) {
    let t = tenant();
    let (alice, carol, dave) = (id("alice"), id("carol"), id("dave"));
    let ch = channel(&s, &t, &alice, &[]).await;

    let added = s
        .add_member(&t, &ch.id, &carol, Role::Member, &alice)
        .await
        .expect("add")
        .expect("added");
    assert_eq!(added.seq, 1);
    match &added.body {
        EventBody::MemberAdded { member, by } => {
            assert_eq!(
                (member.user_id.as_str(), member.role, by.as_str()),
                (carol.as_str(), Role::Member, alice.as_str())
            );
            assert_rfc3339(&member.joined_at);
        }
        other => panic!("expected member.added, got {other:?}"),
    }
    assert_eq!(
        s.add_member(&t, &ch.id, &carol, Role::Moderator, &alice)
            .await
            .expect("re-add"),
        None
    );
    let carol_member = s
        .member(&t, &ch.id, &carol)
        .await
        .expect("member")
        .expect("carol is a member");
    assert_eq!(
        carol_member.role,
        Role::Member,
        "a repeated add changes nothing"
    );
    assert_eq!(s.channels_of(&t, &carol).await.expect("list").len(), 1);
    assert_eq!(
        s.channel_ids_of(&t, &carol).await.expect("ids"),
        vec![ch.id.clone()]
    );

    let removed = s
        .remove_member(&t, &ch.id, &carol, &alice)
        .await
        .expect("remove")
        .expect("removed");
    assert_eq!(removed.seq, 2);
    assert_eq!(
        removed.body,
        EventBody::MemberRemoved {
            user_id: carol.clone(),
            by: alice.clone()
        }
    );
    assert_eq!(
        s.remove_member(&t, &ch.id, &carol, &alice)
            .await
            .expect("re-remove"),
        None
    );
    assert_eq!(s.member(&t, &ch.id, &carol).await.expect("member"), None);
    assert!(s.channels_of(&t, &carol).await.expect("list").is_empty());
    assert!(
        s.channel_ids_of(&t, &carol).await.expect("ids").is_empty(),
        "a removed member's channel ids no longer include the channel"
    );

    let third = s
        .add_member(&t, &ch.id, &dave, Role::Moderator, &alice)
        .await
        .expect("add")
        .expect("added");
    assert_eq!(third.seq, 3);
    assert_eq!(
        s.channel(&t, &ch.id)
            .await
            .expect("get")
            .expect("exists")
            .last_seq,
        3
    );
    let members: Vec<(String, Role)> = s
        .members(&t, &ch.id)
        .await
        .expect("members")
        .into_iter()
        .map(|m| (m.user_id, m.role))
        .collect();
    assert_eq!(
        members,
        vec![
            (alice.clone(), Role::Owner),
            (dave.clone(), Role::Moderator)
        ],
        "by join time"
    );
    assert_eq!(events(&s, &t, &ch.id, 0).await, vec![added, removed, third]);
    assert_err(
        s.add_member(&t, &id("missing"), &carol, Role::Member, &alice)
            .await,
        is_not_found,
        "add to an unknown channel",
    );
}

// ---- sends ----

/// Only members send; a refused send allocates no seq.
/// A role change is a `member.updated` event with the next seq; setting the same role changes
/// nothing; the only owner cannot be demoted, even when two owners demote each other at once.
pub async fn member_role_changes(s: Arc<dyn Storage>) {
    let t = tenant();
    let (alice, bob, carol) = (id("alice"), id("bob"), id("carol"));
    let ch = channel(&s, &t, &alice, &[(bob.as_str(), Role::Member)]).await;
    let before = s
        .member(&t, &ch.id, &bob)
        .await
        .expect("member")
        .expect("bob");

    let promoted = s
        .update_member_role(&t, &ch.id, &bob, Role::Moderator, &alice)
        .await
        .expect("promote")
        .expect("changed");
    assert_eq!(promoted.seq, ch.last_seq + 1);
    assert_eq!(
        promoted.body,
        EventBody::MemberUpdated {
            member: parley_proto::Member {
                role: Role::Moderator,
                ..before
            },
            by: alice.clone()
        }
    );
    assert_eq!(
        s.member(&t, &ch.id, &bob)
            .await
            .expect("member")
            .expect("bob")
            .role,
        Role::Moderator
    );
    assert_eq!(
        s.update_member_role(&t, &ch.id, &bob, Role::Moderator, &alice)
            .await
            .expect("same role"),
        None,
        "setting the role a member has changes nothing"
    );
    assert_err(
        s.update_member_role(&t, &ch.id, &carol, Role::Member, &alice)
            .await,
        is_not_found,
        "a non-member's role",
    );
    assert_err(
        s.update_member_role(&t, &id("missing"), &bob, Role::Member, &alice)
            .await,
        is_not_found,
        "a role in an unknown channel",
    );
    assert_err(
        s.update_member_role(&t, &ch.id, &alice, Role::Member, &alice)
            .await,
        |e| matches!(e, StorageError::Conflict(_)),
        "demoting the only owner",
    );
    assert_eq!(
        s.member(&t, &ch.id, &alice)
            .await
            .expect("member")
            .expect("alice")
            .role,
        Role::Owner
    );

    // Two owners demote each other at once: one wins, the other is the last owner.
    let made_owner = s
        .update_member_role(&t, &ch.id, &bob, Role::Owner, &alice)
        .await
        .expect("make owner")
        .expect("changed");
    let (a, b) = tokio::join!(
        s.update_member_role(&t, &ch.id, &bob, Role::Member, &alice),
        s.update_member_role(&t, &ch.id, &alice, Role::Member, &bob),
    );
    let won: Vec<ChannelEvent> = [a, b]
        .into_iter()
        .filter_map(|r| match r {
            Ok(Some(e)) => Some(e),
            Err(StorageError::Conflict(_)) => None,
            other => panic!("a concurrent demotion: {other:?}"),
        })
        .collect();
    assert_eq!(
        won.len(),
        1,
        "exactly one of two crossing demotions commits"
    );
    let owners = s
        .members(&t, &ch.id)
        .await
        .expect("members")
        .into_iter()
        .filter(|m| m.role == Role::Owner)
        .count();
    assert_eq!(owners, 1, "the channel keeps one owner");
    assert_eq!(
        events(&s, &t, &ch.id, ch.last_seq).await,
        vec![promoted, made_owner, won[0].clone()],
        "each change is one event, in seq order"
    );
}

pub async fn non_member_cannot_send(s: Arc<dyn Storage>) {
    let t = tenant();
    let (alice, mallory) = (id("alice"), id("mallory"));
    let ch = channel(&s, &t, &alice, &[]).await;
    assert_err(
        s.send_message(msg(&t, &ch.id, &mallory, "k1", "hi")).await,
        is_not_a_member,
        "send by a non-member",
    );
    assert_err(
        s.send_message(msg(&t, &id("missing"), &alice, "k1", "hi"))
            .await,
        |e| is_not_a_member(e) || is_not_found(e),
        "send to an unknown channel",
    );
    assert_eq!(
        s.channel(&t, &ch.id)
            .await
            .expect("get")
            .expect("exists")
            .last_seq,
        0
    );
    assert!(
        history(&s, &t, &ch.id, HistoryAnchor::Latest, 50)
            .await
            .messages
            .is_empty()
    );
}

/// `member_history` gives a member the page `history` gives, refuses a non-member (and a
/// removed member) with `NotAMember`, and an unknown channel with `NotFound`.
pub async fn member_history_is_for_members(s: Arc<dyn Storage>) {
    let t = tenant();
    let (alice, bob, mallory) = (id("alice"), id("bob"), id("mallory"));
    let ch = channel(&s, &t, &alice, &[(bob.as_str(), Role::Member)]).await;
    for i in 0..7 {
        s.send_message(msg(&t, &ch.id, &alice, &format!("k{i}"), "hi"))
            .await
            .expect("send");
    }
    for anchor in [
        HistoryAnchor::Latest,
        HistoryAnchor::Before(5),
        HistoryAnchor::After(2),
        HistoryAnchor::Around(4),
    ] {
        let page = s
            .member_history(&t, &ch.id, &bob, anchor, 3)
            .await
            .expect("a member's page");
        let plain = history(&s, &t, &ch.id, anchor, 3).await;
        let seqs = |p: &MessagePage| p.messages.iter().map(|m| m.seq).collect::<Vec<_>>();
        assert_eq!(seqs(&page), seqs(&plain), "{anchor:?}");
        assert_eq!(
            (page.has_before, page.has_after),
            (plain.has_before, plain.has_after),
            "{anchor:?}"
        );
    }
    assert_err(
        s.member_history(&t, &ch.id, &mallory, HistoryAnchor::Latest, 50)
            .await,
        is_not_a_member,
        "a non-member's page",
    );
    assert_err(
        s.member_history(&t, &id("missing"), &alice, HistoryAnchor::Latest, 50)
            .await,
        is_not_found,
        "a page of an unknown channel",
    );
    s.remove_member(&t, &ch.id, &bob, &alice)
        .await
        .expect("remove bob");
    assert_err(
        s.member_history(&t, &ch.id, &bob, HistoryAnchor::Latest, 50)
            .await,
        is_not_a_member,
        "a removed member's page",
    );
}

/// Once the removal commits, the removed member cannot send, not even a retry of an old send.
pub async fn removed_member_cannot_send(s: Arc<dyn Storage>) {
    let t = tenant();
    let (alice, bob) = (id("alice"), id("bob"));
    let ch = channel(&s, &t, &alice, &[(bob.as_str(), Role::Member)]).await;
    let sent = send(&s, msg(&t, &ch.id, &bob, "k1", "hello")).await;
    assert_eq!((sent.message.seq, sent.created), (1, true));
    s.remove_member(&t, &ch.id, &bob, &alice)
        .await
        .expect("remove")
        .expect("removed");
    assert_err(
        s.send_message(msg(&t, &ch.id, &bob, "k2", "still here?"))
            .await,
        is_not_a_member,
        "send after removal",
    );
    assert_err(
        s.send_message(msg(&t, &ch.id, &bob, "k1", "hello")).await,
        is_not_a_member,
        "retry after removal",
    );
    assert_eq!(
        s.channel(&t, &ch.id)
            .await
            .expect("get")
            .expect("exists")
            .last_seq,
        2
    );
    s.add_member(&t, &ch.id, &bob, Role::Member, &alice)
        .await
        .expect("add")
        .expect("added");
    let back = send(&s, msg(&t, &ch.id, &bob, "k2", "back")).await;
    assert_eq!((back.message.seq, back.created), (4, true));
}

/// A removal racing with the member's sends: every send that succeeds is ordered before the
/// removal, every other send is `NotAMember`, and the seqs stay gapless.
pub async fn removal_races_sends(s: Arc<dyn Storage>) {
    let t = tenant();
    let (alice, bob) = (id("alice"), id("bob"));
    let ch = channel(&s, &t, &alice, &[(bob.as_str(), Role::Member)]).await;
    let sends: Vec<_> = (0..60)
        .map(|i| {
            let (s, new) = (s.clone(), msg(&t, &ch.id, &bob, &format!("k{i}"), "racing"));
            tokio::spawn(async move { s.send_message(new).await })
        })
        .collect();
    tokio::task::yield_now().await;
    let removal = s
        .remove_member(&t, &ch.id, &bob, &alice)
        .await
        .expect("remove")
        .expect("removed");
    let mut seqs = vec![removal.seq];
    for send in sends {
        match send.await.expect("send task") {
            Ok(o) => {
                assert!(
                    o.message.seq < removal.seq,
                    "send {} committed after the removal {}",
                    o.message.seq,
                    removal.seq
                );
                seqs.push(o.message.seq);
            }
            Err(e) => assert!(is_not_a_member(&e), "a refused send is NotAMember: {e:?}"),
        }
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "gapless");
    assert_eq!(
        s.channel(&t, &ch.id)
            .await
            .expect("get")
            .expect("exists")
            .last_seq,
        seqs.len() as u64
    );
}

/// 50 concurrent sends to one channel get exactly the seqs 1..=50.
pub async fn concurrent_sends_are_gapless(s: Arc<dyn Storage>) {
    let t = tenant();
    let senders: Vec<String> = (0..5).map(|_| id("user")).collect();
    let others: Vec<(&str, Role)> = senders[1..]
        .iter()
        .map(|u| (u.as_str(), Role::Member))
        .collect();
    let ch = channel(&s, &t, &senders[0], &others).await;
    let requests = (0..50).map(|i| {
        msg(
            &t,
            &ch.id,
            &senders[i % 5],
            &format!("k{i}"),
            &format!("text {i}"),
        )
    });
    let outcomes = send_all(&s, requests.collect()).await;

    let mut seqs: Vec<u64> = outcomes.iter().map(|o| o.message.seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=50).collect::<Vec<_>>(), "no gap, no duplicate");
    assert!(outcomes.iter().all(|o| o.created));
    let ids: HashSet<&str> = outcomes.iter().map(|o| o.message.id.as_str()).collect();
    assert_eq!(ids.len(), 50);
    assert_eq!(
        s.channel(&t, &ch.id)
            .await
            .expect("get")
            .expect("exists")
            .last_seq,
        50
    );
    let page = history(&s, &t, &ch.id, HistoryAnchor::Latest, 50).await;
    assert_eq!((page.has_before, page.has_after), (false, false));
    let mut by_seq = outcomes
        .iter()
        .map(|o| o.message.clone())
        .collect::<Vec<_>>();
    by_seq.sort_by_key(|m| m.seq);
    assert_eq!(
        page.messages, by_seq,
        "history holds what the sends returned"
    );
}

/// Concurrent sends to several channels: each channel's seqs are gapless on their own.
pub async fn concurrent_sends_across_channels(s: Arc<dyn Storage>) {
    let t = tenant();
    let alice = id("alice");
    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(channel(&s, &t, &alice, &[]).await.id);
    }
    let requests = (0..200).map(|i| msg(&t, &channels[i % 8], &alice, &format!("k{i}"), "hi"));
    let outcomes = send_all(&s, requests.collect()).await;
    for ch in &channels {
        let mut seqs: Vec<u64> = outcomes
            .iter()
            .filter(|o| &o.message.channel_id == ch)
            .map(|o| o.message.seq)
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=25).collect::<Vec<_>>(), "channel {ch}");
        assert_eq!(
            s.channel(&t, ch)
                .await
                .expect("get")
                .expect("exists")
                .last_seq,
            25
        );
    }
}

/// 50 concurrent sends of one request (same key, same body) make one message.
pub async fn concurrent_retries_are_idempotent(s: Arc<dyn Storage>) {
    let t = tenant();
    let alice = id("alice");
    let ch = channel(&s, &t, &alice, &[]).await;
    // Each attempt proposes its own message id, as the domain does.
    let outcomes = send_all(
        &s,
        (0..50)
            .map(|_| msg(&t, &ch.id, &alice, "same-key", "same body"))
            .collect(),
    )
    .await;
    let first = &outcomes[0].message;
    assert!(
        outcomes
            .iter()
            .all(|o| o.message.id == first.id && o.message.seq == 1),
        "one message"
    );
    assert_eq!(
        outcomes.iter().filter(|o| o.created).count(),
        1,
        "exactly one send created it"
    );
    assert_eq!(
        s.channel(&t, &ch.id)
            .await
            .expect("get")
            .expect("exists")
            .last_seq,
        1
    );
    assert_eq!(
        history(&s, &t, &ch.id, HistoryAnchor::Latest, 50)
            .await
            .messages
            .len(),
        1
    );
}

/// Retries of stored messages (and conflicting reuses of their keys) sent at once with new
/// messages: each retry gets its original back, each conflict fails alone, the new messages take
/// the next seqs without a gap; and fresh sends after that are as before. (On PostgreSQL the
/// batch's first attempt skips the idempotency read and has to fall back to it here.)
pub async fn retries_among_new_sends(s: Arc<dyn Storage>) {
    let t = tenant();
    let alice = id("alice");
    let ch = channel(&s, &t, &alice, &[]).await;
    let mut stored = Vec::new();
    for i in 0..20 {
        stored.push(
            send(
                &s,
                msg(&t, &ch.id, &alice, &format!("k{i}"), &format!("text {i}")),
            )
            .await,
        );
    }
    // k0..k19 again (k15..k19 with another text), and k20..k39 new, all at once.
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let text = if (15..20).contains(&i) {
                format!("changed {i}")
            } else {
                format!("text {i}")
            };
            let new = msg(&t, &ch.id, &alice, &format!("k{i}"), &text);
            let s = s.clone();
            tokio::spawn(async move { s.send_message(new).await })
        })
        .collect();
    let mut new_seqs = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let result = task.await.expect("send task");
        match i {
            0..15 => {
                let o = result.unwrap_or_else(|e| panic!("retry k{i}: {e:?}"));
                assert_eq!(
                    (o.created, &o.message),
                    (false, &stored[i].message),
                    "retry k{i}"
                );
            }
            15..20 => assert_err(result, is_conflict, &format!("k{i} with another text")),
            _ => {
                let o = result.unwrap_or_else(|e| panic!("new k{i}: {e:?}"));
                assert!(o.created, "k{i} is new");
                assert_eq!(o.message.text, format!("text {i}"));
                new_seqs.push(o.message.seq);
            }
        }
    }
    new_seqs.sort_unstable();
    assert_eq!(
        new_seqs,
        (21..=40).collect::<Vec<u64>>(),
        "new messages, no gap"
    );
    let later = send_all(
        &s,
        (40..80)
            .map(|i| msg(&t, &ch.id, &alice, &format!("k{i}"), "later"))
            .collect(),
    )
    .await;
    let mut later_seqs: Vec<u64> = later.iter().map(|o| o.message.seq).collect();
    later_seqs.sort_unstable();
    assert_eq!(later_seqs, (41..=80).collect::<Vec<u64>>());
    assert!(later.iter().all(|o| o.created));
    let page = history(&s, &t, &ch.id, HistoryAnchor::Latest, 100).await;
    assert_eq!(page.messages.len(), 80, "every message once");
    assert_eq!(
        s.channel(&t, &ch.id)
            .await
            .expect("get")
            .expect("exists")
            .last_seq,
        80
    );
}

/// The same key with another body (text or metadata) is a conflict; keys are per sender.
pub async fn idempotency_conflict(s: Arc<dyn Storage>) {
    let t = tenant();
    let (alice, bob) = (id("alice"), id("bob"));
    let ch = channel(&s, &t, &alice, &[(bob.as_str(), Role::Member)]).await;
    let first = send(&s, msg(&t, &ch.id, &alice, "k", "hello")).await;
    assert!(first.created);
    assert_err(
        s.send_message(msg(&t, &ch.id, &alice, "k", "hullo")).await,
        is_conflict,
        "same key, other text",
    );
    let mut with_metadata = msg(&t, &ch.id, &alice, "k", "hello");
    with_metadata.metadata = Some(json!({"x": 1}));
    assert_err(
        s.send_message(with_metadata).await,
        is_conflict,
        "same key, other metadata",
    );

    let bobs = send(&s, msg(&t, &ch.id, &bob, "k", "hullo")).await;
    assert_eq!(
        (bobs.created, bobs.message.seq),
        (true, 2),
        "another sender's key is another key"
    );
    let retry = send(&s, msg(&t, &ch.id, &alice, "k", "hello")).await;
    assert_eq!((retry.created, retry.message), (false, first.message));
    assert_eq!(
        s.channel(&t, &ch.id)
            .await
            .expect("get")
            .expect("exists")
            .last_seq,
        2
    );
}

/// A retry after the message was edited still returns the original message, not a new one.
pub async fn idempotency_survives_edit(s: Arc<dyn Storage>) {
    let t = tenant();
    let alice = id("alice");
    let ch = channel(&s, &t, &alice, &[]).await;
    let first = send(&s, msg(&t, &ch.id, &alice, "k", "draft")).await;
    s.edit_message(&t, &ch.id, &first.message.id, "final", None)
        .await
        .expect("edit");
    let retry = send(&s, msg(&t, &ch.id, &alice, "k", "draft")).await;
    assert!(!retry.created);
    assert_eq!(
        (retry.message.id.as_str(), retry.message.seq),
        (first.message.id.as_str(), 1)
    );
    assert_err(
        s.send_message(msg(&t, &ch.id, &alice, "k", "final")).await,
        is_conflict,
        "the edited text is another body",
    );
    assert_eq!(
        s.channel(&t, &ch.id)
            .await
            .expect("get")
            .expect("exists")
            .last_seq,
        2,
        "edit: 2; retries: none"
    );
}

/// Edits and deletes are events with their own seqs; a delete leaves a tombstone.
pub async fn edit_and_delete_events(s: Arc<dyn Storage>) {
    let t = tenant();
    let alice = id("alice");
    let ch = channel(&s, &t, &alice, &[]).await;
    let mut original = msg(&t, &ch.id, &alice, "k", "first");
    original.metadata = Some(json!({"draft": true}));
    let sent = send(&s, original).await.message;

    let edited = s
        .edit_message(
            &t,
            &ch.id,
            &sent.id,
            "second",
            Some(json!({"draft": false})),
        )
        .await
        .expect("edit");
    assert_eq!(edited.seq, 2);
    let EventBody::MessageUpdated {
        message: after_edit,
    } = &edited.body
    else {
        panic!("expected message.updated, got {edited:?}");
    };
    assert_eq!(
        (
            after_edit.id.as_str(),
            after_edit.seq,
            after_edit.text.as_str()
        ),
        (sent.id.as_str(), 1, "second")
    );
    assert_eq!(after_edit.metadata, Some(json!({"draft": false})));
    assert!(after_edit.edited_at.is_some() && !after_edit.deleted);
    assert_eq!(
        s.message(&t, &ch.id, &sent.id).await.expect("get").as_ref(),
        Some(after_edit)
    );

    let deleted = s
        .delete_message(&t, &ch.id, &sent.id, &alice)
        .await
        .expect("delete");
    assert_eq!(deleted.seq, 3);
    let EventBody::MessageDeleted { message: tomb } = &deleted.body else {
        panic!("expected message.deleted, got {deleted:?}");
    };
    assert_tombstone(tomb, &sent);
    let page = history(&s, &t, &ch.id, HistoryAnchor::Latest, 50).await;
    assert_eq!(page.messages.len(), 1);
    assert_tombstone(&page.messages[0], &sent);
    let stored = s
        .message(&t, &ch.id, &sent.id)
        .await
        .expect("get")
        .expect("the tombstone stays");
    assert_tombstone(&stored, &sent);

    assert_err(
        s.edit_message(&t, &ch.id, &sent.id, "third", None).await,
        is_not_found,
        "edit of a deleted message",
    );
    assert_err(
        s.delete_message(&t, &ch.id, &sent.id, &alice).await,
        is_not_found,
        "second delete",
    );
    assert_err(
        s.edit_message(&t, &ch.id, &id("missing"), "x", None).await,
        is_not_found,
        "edit of an unknown message",
    );
    assert_err(
        s.delete_message(&t, &ch.id, &id("missing"), &alice).await,
        is_not_found,
        "delete of an unknown message",
    );
    assert_eq!(
        s.channel(&t, &ch.id)
            .await
            .expect("get")
            .expect("exists")
            .last_seq,
        3
    );
}

// ---- reading ----

/// 1,000 messages paged at limit 50 backwards, forwards and around: each exactly once, in order,
/// with exact `has_before`/`has_after` at both ends.
pub async fn history_paging(s: Arc<dyn Storage>) {
    const N: u64 = 1000;
    let t = tenant();
    let alice = id("alice");
    let ch = channel(&s, &t, &alice, &[]).await;
    let mut texts = vec![String::new(); N as usize + 1];
    for wave in 0..10 {
        let requests = (0..100).map(|i| {
            msg(
                &t,
                &ch.id,
                &alice,
                &format!("k{wave}-{i}"),
                &format!("text {wave}-{i}"),
            )
        });
        for o in send_all(&s, requests.collect()).await {
            texts[o.message.seq as usize] = o.message.text;
        }
    }
    let all: Vec<u64> = (1..=N).collect();
    let check = |page: &MessagePage| {
        for m in &page.messages {
            assert_eq!(m.text, texts[m.seq as usize], "text of seq {}", m.seq);
        }
        page.messages.iter().map(|m| m.seq).collect::<Vec<u64>>()
    };

    // Backwards from the newest.
    let mut page = history(&s, &t, &ch.id, HistoryAnchor::Latest, 50).await;
    assert_eq!(check(&page), (951..=N).collect::<Vec<_>>());
    assert_eq!((page.has_before, page.has_after), (true, false));
    let mut seen = check(&page);
    while page.has_before {
        let first = page.messages[0].seq;
        page = history(&s, &t, &ch.id, HistoryAnchor::Before(first), 50).await;
        assert_eq!(page.messages.len(), 50);
        assert!(page.has_after, "newer messages exist after a Before page");
        let mut seqs = check(&page);
        seqs.extend(seen);
        seen = seqs;
    }
    assert_eq!(seen, all, "Before paging");
    assert_eq!(page.messages[0].seq, 1);

    // Forwards from the start.
    let mut page = history(&s, &t, &ch.id, HistoryAnchor::After(0), 50).await;
    assert_eq!((page.has_before, page.has_after), (false, true));
    let mut seen = check(&page);
    while page.has_after {
        let last = page.messages[page.messages.len() - 1].seq;
        page = history(&s, &t, &ch.id, HistoryAnchor::After(last), 50).await;
        assert!(page.has_before, "older messages exist before an After page");
        seen.extend(check(&page));
    }
    assert_eq!(seen, all, "After paging");

    // Around: limit/2 before the anchor, the rest at or after it.
    let mut seen = Vec::new();
    for k in 0..20 {
        let page = history(&s, &t, &ch.id, HistoryAnchor::Around(26 + 50 * k), 50).await;
        assert_eq!(check(&page), (1 + 50 * k..=50 + 50 * k).collect::<Vec<_>>());
        assert_eq!(
            (page.has_before, page.has_after),
            (k > 0, k < 19),
            "Around({})",
            26 + 50 * k
        );
        seen.extend(check(&page));
    }
    assert_eq!(seen, all, "Around paging");
    let page = history(&s, &t, &ch.id, HistoryAnchor::Around(500), 50).await;
    assert_eq!(check(&page), (475..=524).collect::<Vec<_>>());
    let page = history(&s, &t, &ch.id, HistoryAnchor::Around(1), 50).await;
    assert_eq!(
        (check(&page), page.has_before, page.has_after),
        ((1..=25).collect(), false, true)
    );
    let page = history(&s, &t, &ch.id, HistoryAnchor::Around(N), 50).await;
    assert_eq!(
        (check(&page), page.has_before, page.has_after),
        ((975..=N).collect(), true, false)
    );

    // Past both ends.
    let page = history(&s, &t, &ch.id, HistoryAnchor::Before(1), 50).await;
    assert_eq!(
        (page.messages.len(), page.has_before, page.has_after),
        (0, false, true)
    );
    let page = history(&s, &t, &ch.id, HistoryAnchor::After(N), 50).await;
    assert_eq!(
        (page.messages.len(), page.has_before, page.has_after),
        (0, true, false)
    );
    let page = history(&s, &t, &ch.id, HistoryAnchor::Latest, 1).await;
    assert_eq!(
        (check(&page), page.has_before, page.has_after),
        (vec![N], true, false)
    );
}

/// `events` merges messages (current state) and other events by seq, honouring range and limit.
pub async fn events_merged_stream(s: Arc<dyn Storage>) {
    let t = tenant();
    let (alice, bob) = (id("alice"), id("bob"));
    let ch = channel(&s, &t, &alice, &[]).await;
    let m1 = send(&s, msg(&t, &ch.id, &alice, "k1", "one")).await.message; // 1
    s.add_member(&t, &ch.id, &bob, Role::Member, &alice)
        .await
        .expect("add")
        .expect("added"); // 2
    let m2 = send(&s, msg(&t, &ch.id, &bob, "k2", "two")).await.message; // 3
    s.edit_message(&t, &ch.id, &m1.id, "one, edited", None)
        .await
        .expect("edit"); // 4
    s.rename_channel(&t, &ch.id, "renamed", &alice)
        .await
        .expect("rename"); // 5
    s.delete_message(&t, &ch.id, &m2.id, &bob)
        .await
        .expect("delete"); // 6
    s.remove_member(&t, &ch.id, &bob, &alice)
        .await
        .expect("remove")
        .expect("removed"); // 7
    let m3 = send(&s, msg(&t, &ch.id, &alice, "k3", "three"))
        .await
        .message; // 8

    let all = events(&s, &t, &ch.id, 0).await;
    let names: Vec<(u64, &str)> = all.iter().map(|e| (e.seq, e.body.name())).collect();
    assert_eq!(
        names,
        vec![
            (1, "message.new"),
            (2, "member.added"),
            (3, "message.new"),
            (4, "message.updated"),
            (5, "channel.updated"),
            (6, "message.deleted"),
            (7, "member.removed"),
            (8, "message.new"),
        ]
    );
    assert!(all.iter().all(|e| e.channel_id == ch.id));
    let EventBody::MessageNew { message: first } = &all[0].body else {
        unreachable!("checked above")
    };
    assert_eq!(
        (first.id.as_str(), first.text.as_str()),
        (m1.id.as_str(), "one, edited"),
        "current state"
    );
    assert!(first.edited_at.is_some());
    let EventBody::MessageNew { message: second } = &all[2].body else {
        unreachable!("checked above")
    };
    assert_tombstone(second, &m2);
    assert_eq!(all[7].body, EventBody::MessageNew { message: m3 });

    let in_range = s.events(&t, &ch.id, 2, Some(6), 100).await.expect("events");
    assert_eq!(
        in_range.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![3, 4, 5, 6]
    );
    assert_eq!(in_range, all[2..6].to_vec());
    let limited = s.events(&t, &ch.id, 0, None, 3).await.expect("events");
    assert_eq!(limited, all[..3].to_vec());
    let limited = s.events(&t, &ch.id, 3, Some(7), 2).await.expect("events");
    assert_eq!(limited, all[3..5].to_vec());
    assert!(
        s.events(&t, &ch.id, 8, None, 100)
            .await
            .expect("events")
            .is_empty()
    );
    assert!(
        s.events(&t, &ch.id, 0, Some(0), 100)
            .await
            .expect("events")
            .is_empty()
    );
    assert_eq!(
        s.events(&t, &ch.id, 7, Some(8), 100).await.expect("events"),
        all[7..].to_vec()
    );
}

// ---- tenants and deletion ----

/// Nothing of tenant A is visible or writable when named with tenant B.
pub async fn tenant_isolation(s: Arc<dyn Storage>) {
    let (a, b) = (tenant(), tenant());
    let (alice, bob) = (id("alice"), id("bob"));
    let ch = channel(&s, &a, &alice, &[(&bob, Role::Member)]).await;
    let sent = send(&s, msg(&a, &ch.id, &alice, "k", "secret"))
        .await
        .message;

    assert_eq!(s.channel(&b, &ch.id).await.expect("get"), None);
    assert!(s.channels_of(&b, &alice).await.expect("list").is_empty());
    assert!(s.channel_ids_of(&b, &alice).await.expect("ids").is_empty());
    assert_eq!(
        s.channel_ids_of(&a, &alice).await.expect("ids"),
        vec![ch.id.clone()]
    );
    assert_eq!(s.member(&b, &ch.id, &alice).await.expect("member"), None);
    assert_missing(s.members(&b, &ch.id).await, "members");
    assert_eq!(
        s.message(&b, &ch.id, &sent.id).await.expect("message"),
        None
    );
    assert_missing(
        s.history(&b, &ch.id, HistoryAnchor::Latest, 50)
            .await
            .map(|p| p.messages),
        "history",
    );
    assert_missing(s.events(&b, &ch.id, 0, None, 100).await, "events");

    assert_err(
        s.send_message(msg(&b, &ch.id, &alice, "k2", "hi")).await,
        |e| is_not_a_member(e) || is_not_found(e),
        "send",
    );
    assert_err(
        s.rename_channel(&b, &ch.id, "x", &alice).await,
        is_not_found,
        "rename",
    );
    assert_err(
        s.add_member(&b, &ch.id, &id("eve"), Role::Owner, &alice)
            .await,
        is_not_found,
        "add_member",
    );
    match s.remove_member(&b, &ch.id, &bob, &alice).await {
        Ok(None) | Err(StorageError::NotFound) => {}
        other => panic!("remove_member across tenants: {other:?}"),
    }
    assert_err(
        s.edit_message(&b, &ch.id, &sent.id, "x", None).await,
        is_not_found,
        "edit",
    );
    assert_err(
        s.delete_message(&b, &ch.id, &sent.id, &alice).await,
        is_not_found,
        "delete",
    );
    assert_err(
        s.delete_channel(&b, &ch.id, &alice).await,
        is_not_found,
        "delete_channel",
    );

    let got = s
        .channel(&a, &ch.id)
        .await
        .expect("get")
        .expect("still there");
    assert_eq!((got.name, got.last_seq), (ch.name, 1));
    assert_eq!(s.members(&a, &ch.id).await.expect("members").len(), 2);
    assert_eq!(
        s.message(&a, &ch.id, &sent.id).await.expect("message"),
        Some(sent)
    );
}

/// Deleting a channel removes it with its members, messages and events; the returned
/// `channel.deleted` carries seq last_seq + 1. A deleted DM can be created anew.
pub async fn delete_channel_removes_everything(s: Arc<dyn Storage>) {
    let t = tenant();
    let (alice, bob) = (id("alice"), id("bob"));
    let ch = channel(&s, &t, &alice, &[]).await;
    let sent = send(&s, msg(&t, &ch.id, &alice, "k1", "one")).await.message;
    s.add_member(&t, &ch.id, &bob, Role::Member, &alice)
        .await
        .expect("add")
        .expect("added");
    send(&s, msg(&t, &ch.id, &bob, "k2", "two")).await;
    s.rename_channel(&t, &ch.id, "renamed", &alice)
        .await
        .expect("rename");
    assert_eq!(
        s.channel(&t, &ch.id)
            .await
            .expect("get")
            .expect("exists")
            .last_seq,
        4
    );

    let deleted = s.delete_channel(&t, &ch.id, &alice).await.expect("delete");
    assert_eq!(
        deleted,
        ChannelEvent {
            channel_id: ch.id.clone(),
            seq: 5,
            body: EventBody::ChannelDeleted { by: alice.clone() }
        }
    );
    assert_eq!(s.channel(&t, &ch.id).await.expect("get"), None);
    assert!(s.channels_of(&t, &alice).await.expect("list").is_empty());
    assert!(s.channels_of(&t, &bob).await.expect("list").is_empty());
    assert_eq!(s.member(&t, &ch.id, &alice).await.expect("member"), None);
    assert_missing(s.members(&t, &ch.id).await, "members");
    assert_eq!(
        s.message(&t, &ch.id, &sent.id).await.expect("message"),
        None
    );
    assert_missing(
        s.history(&t, &ch.id, HistoryAnchor::Latest, 50)
            .await
            .map(|p| p.messages),
        "history",
    );
    assert_missing(s.events(&t, &ch.id, 0, None, 100).await, "events");
    assert_err(
        s.send_message(msg(&t, &ch.id, &alice, "k3", "three")).await,
        |e| is_not_a_member(e) || is_not_found(e),
        "send to a deleted channel",
    );
    assert_err(
        s.delete_channel(&t, &ch.id, &alice).await,
        is_not_found,
        "second delete",
    );

    let (dm_channel, _) = s
        .create_channel(new_dm(&t, &alice, &bob))
        .await
        .expect("create DM");
    let gone = s
        .delete_channel(&t, &dm_channel.id, &bob)
        .await
        .expect("delete DM");
    assert_eq!(gone.seq, 1);
    let (again, created) = s
        .create_channel(new_dm(&t, &alice, &bob))
        .await
        .expect("recreate DM");
    assert!(created, "the DM key is free again");
    assert_ne!(again.id, dm_channel.id);
}

/// Metadata is stored as JSON and read back equal everywhere a message appears.
pub async fn metadata_round_trips(s: Arc<dyn Storage>) {
    let t = tenant();
    let alice = id("alice");
    let ch = channel(&s, &t, &alice, &[]).await;
    let metadata = json!({
        "nested": {"list": [1, 2.5, -3, "four", null, true], "empty": {}},
        "unicode": "héllo ✓ \u{1F600} \"quoted\" \\ back\nslash",
        "big": 9_007_199_254_740_993_u64,
    });
    let mut request = msg(&t, &ch.id, &alice, "k", "with metadata");
    request.metadata = Some(metadata.clone());
    let sent = send(&s, request).await.message;
    assert_eq!(sent.metadata.as_ref(), Some(&metadata));
    assert_eq!(
        s.message(&t, &ch.id, &sent.id).await.expect("get"),
        Some(sent.clone()),
        "stored = returned"
    );
    assert_eq!(
        history(&s, &t, &ch.id, HistoryAnchor::Latest, 10)
            .await
            .messages,
        vec![sent.clone()]
    );
    assert_eq!(
        events(&s, &t, &ch.id, 0).await[0].body,
        EventBody::MessageNew {
            message: sent.clone()
        }
    );

    let plain = send(&s, msg(&t, &ch.id, &alice, "k2", "without"))
        .await
        .message;
    assert_eq!(plain.metadata, None);
    assert_eq!(
        s.message(&t, &ch.id, &plain.id)
            .await
            .expect("get")
            .and_then(|m| m.metadata),
        None
    );

    let replaced = json!(["a", {"b": [null]}]);
    s.edit_message(&t, &ch.id, &sent.id, "edited", Some(replaced.clone()))
        .await
        .expect("edit");
    let got = s
        .message(&t, &ch.id, &sent.id)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(got.metadata, Some(replaced));
    s.edit_message(&t, &ch.id, &sent.id, "cleared", None)
        .await
        .expect("edit");
    let got = s
        .message(&t, &ch.id, &sent.id)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!((got.text.as_str(), got.metadata), ("cleared", None));
}

/// A call's life: started (`call.started`), joined by two (a second join of a user keeps their
/// participant, no event), left one by one (a second leave changes nothing), ended when the last
/// one leaves (`call.ended`); joining an ended call is `NotFound`; every event takes the channel's
/// next seq and is in the channel's event stream.
pub async fn call_lifecycle(s: Arc<dyn Storage>) {
    let t = tenant();
    let (alice, bob) = (id("alice"), id("bob"));
    let ch = channel(&s, &t, &alice, &[(bob.as_str(), Role::Member)]).await;
    send(&s, msg(&t, &ch.id, &alice, "k", "before the call")).await;
    let call_id = id("call");
    let (call, started) = s
        .start_call(new_call(&t, &ch.id, &call_id, &alice))
        .await
        .expect("start");
    assert_eq!(
        (call.id.as_str(), call.ended_at.as_deref()),
        (call_id.as_str(), None)
    );
    let started = started.expect("a new call emits call.started");
    assert_eq!(started.seq, 2);
    assert!(matches!(started.body, EventBody::CallStarted { .. }));

    let (_, pa, joined) = s
        .join_call(&t, &call_id, &id("pa"), &alice, NO_CAP)
        .await
        .expect("alice joins");
    assert_eq!(joined.map(|e| e.seq), Some(3));
    let (_, again, none) = s
        .join_call(&t, &call_id, &id("pa2"), &alice, NO_CAP)
        .await
        .expect("alice joins again");
    assert_eq!(
        (again.participant_id.as_str(), none),
        (pa.participant_id.as_str(), None),
        "a present user keeps their participant"
    );
    let (call, pb, _) = s
        .join_call(&t, &call_id, &id("pb"), &bob, NO_CAP)
        .await
        .expect("bob joins");
    let present: Vec<&str> = call
        .participants
        .iter()
        .map(|p| p.user_id.as_str())
        .collect();
    assert_eq!(present, [alice.as_str(), bob.as_str()], "in join order");

    let left = s
        .leave_call(&t, &call_id, &pa.participant_id, LeaveReason::Left)
        .await
        .expect("alice leaves");
    assert_eq!(event_names(&left), ["call.participant_left"]);
    assert_eq!(left[0].seq, 5);
    assert!(
        s.leave_call(&t, &call_id, &pa.participant_id, LeaveReason::Left)
            .await
            .expect("again")
            .is_empty(),
        "leaving twice changes nothing"
    );
    let last = s
        .leave_call(&t, &call_id, &pb.participant_id, LeaveReason::Timeout)
        .await
        .expect("bob leaves");
    assert_eq!(
        event_names(&last),
        ["call.participant_left", "call.ended"],
        "the last one out ends the call"
    );
    assert_eq!(last.iter().map(|e| e.seq).collect::<Vec<_>>(), [6, 7]);
    match &last[0].body {
        EventBody::CallParticipantLeft {
            reason, user_id, ..
        } => {
            assert_eq!(
                (*reason, user_id.as_str()),
                (LeaveReason::Timeout, bob.as_str())
            );
        }
        other => panic!("expected call.participant_left, got {other:?}"),
    }

    let ended = s.call(&t, &call_id).await.expect("get").expect("exists");
    assert!(ended.ended_at.is_some(), "ended");
    assert!(ended.participants.iter().all(|p| p.left_at.is_some()));
    assert_err(
        s.join_call(&t, &call_id, &id("pc"), &alice, NO_CAP).await,
        |e| matches!(e, StorageError::NotFound),
        "joining an ended call",
    );
    assert_eq!(
        s.channel(&t, &ch.id)
            .await
            .expect("get")
            .expect("exists")
            .last_seq,
        7
    );
    // The channel's event stream holds them all, in order after the message.
    let events = s.events(&t, &ch.id, 0, None, 100).await.expect("events");
    assert_eq!(
        event_names(&events),
        [
            "message.new",
            "call.started",
            "call.participant_joined",
            "call.participant_joined",
            "call.participant_left",
            "call.participant_left",
            "call.ended"
        ]
    );
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=7).collect::<Vec<u64>>()
    );
    // Another tenant does not see the call.
    assert_eq!(s.call(&tenant(), &call_id).await.expect("get"), None);
}

/// A join cap the call cases never reach.
const NO_CAP: usize = 64;

/// Ten users join a call capped at three at once: exactly three get in and the others are
/// refused with `CallFull`; a present user re-joining a full call keeps their participant; after a
/// leave, the next join gets in.
pub async fn concurrent_joins_stop_at_the_cap(s: Arc<dyn Storage>) {
    let t = tenant();
    let alice = id("alice");
    let ch = channel(&s, &t, &alice, &[]).await;
    let call_id = id("call");
    s.start_call(new_call(&t, &ch.id, &call_id, &alice))
        .await
        .expect("start");
    let users: Vec<String> = (0..10).map(|i| id(&format!("u{i}"))).collect();
    let tasks: Vec<_> = users
        .iter()
        .map(|u| {
            let (s, t, call_id, u) = (s.clone(), t.clone(), call_id.clone(), u.clone());
            tokio::spawn(async move { s.join_call(&t, &call_id, &id("p"), &u, 3).await })
        })
        .collect();
    let mut joined = Vec::new();
    let mut full = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok((_, p, event)) => {
                assert!(event.is_some(), "a new participant emits its event");
                joined.push(p);
            }
            Err(StorageError::CallFull) => full += 1,
            Err(e) => panic!("join: {e:?}"),
        }
    }
    assert_eq!((joined.len(), full), (3, 7));
    let call = s.call(&t, &call_id).await.expect("get").expect("exists");
    assert_eq!(
        call.participants.len(),
        3,
        "nobody beyond the cap was added"
    );

    let (_, again, event) = s
        .join_call(&t, &call_id, &id("p"), &joined[0].user_id, 3)
        .await
        .expect("a present user re-joins a full call");
    assert_eq!(
        (again.participant_id.as_str(), event),
        (joined[0].participant_id.as_str(), None)
    );
    s.leave_call(&t, &call_id, &joined[1].participant_id, LeaveReason::Left)
        .await
        .expect("leave");
    let newcomer = users
        .iter()
        .find(|u| joined.iter().all(|p| p.user_id != **u))
        .expect("someone left out");
    s.join_call(&t, &call_id, &id("p"), newcomer, 3)
        .await
        .expect("a place is free again");
    assert_err(
        s.join_call(&t, &call_id, &id("p"), &alice, 3).await,
        |e| matches!(e, StorageError::CallFull),
        "full again",
    );
}

/// Ten concurrent starts in one channel make one call and one `call.started`; once it ended, a
/// start makes a new call, listed first.
pub async fn one_active_call_per_channel(s: Arc<dyn Storage>) {
    let t = tenant();
    let alice = id("alice");
    let ch = channel(&s, &t, &alice, &[]).await;
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let s = s.clone();
            let new = new_call(&t, &ch.id, &id("call"), &alice);
            tokio::spawn(async move { s.start_call(new).await })
        })
        .collect();
    let mut ids = Vec::new();
    let mut events = 0;
    for task in tasks {
        let (call, event) = task.await.expect("task").expect("start");
        ids.push(call.id);
        events += usize::from(event.is_some());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one call: {ids:?}");
    assert_eq!(events, 1, "one call.started");
    let first = ids.remove(0);
    s.end_call(&t, &first, &alice).await.expect("end");
    let (second, event) = s
        .start_call(new_call(&t, &ch.id, &id("call"), &alice))
        .await
        .expect("start again");
    assert_ne!(second.id, first);
    assert!(event.is_some());
    let listed: Vec<String> = s
        .channel_calls(&t, &ch.id, 10)
        .await
        .expect("list")
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(listed, [second.id.clone(), first], "newest first");
}

/// Ending a call makes every present participant leave (`Ended`), then `call.ended`; ending it
/// again changes nothing.
pub async fn end_call_makes_everyone_leave(s: Arc<dyn Storage>) {
    let t = tenant();
    let (alice, bob) = (id("alice"), id("bob"));
    let ch = channel(&s, &t, &alice, &[(bob.as_str(), Role::Member)]).await;
    let call_id = id("call");
    s.start_call(new_call(&t, &ch.id, &call_id, &alice))
        .await
        .expect("start");
    for (p, u) in [("pa", &alice), ("pb", &bob)] {
        s.join_call(&t, &call_id, &id(p), u, NO_CAP)
            .await
            .expect("join");
    }
    let events = s.end_call(&t, &call_id, &bob).await.expect("end");
    assert_eq!(
        event_names(&events),
        [
            "call.participant_left",
            "call.participant_left",
            "call.ended"
        ]
    );
    assert!(events.iter().all(|e| match &e.body {
        EventBody::CallParticipantLeft { reason, .. } => *reason == LeaveReason::Ended,
        EventBody::CallEnded { by, .. } => *by == bob,
        _ => false,
    }));
    assert!(
        s.end_call(&t, &call_id, &bob)
            .await
            .expect("again")
            .is_empty(),
        "ending twice changes nothing"
    );
}

fn new_call(tenant: &str, channel_id: &str, call_id: &str, by: &str) -> NewCall {
    NewCall {
        tenant_id: tenant.to_owned(),
        channel_id: channel_id.to_owned(),
        id: call_id.to_owned(),
        started_by: by.to_owned(),
        mode: CallMode::P2p,
    }
}

fn event_names(events: &[ChannelEvent]) -> Vec<&'static str> {
    events.iter().map(|e| e.body.name()).collect()
}

/// `last_seqs` gives the committed last seq of each named channel in one call; unknown
/// channels and channels named with another tenant are left out.
pub async fn last_seqs_in_one_call(s: Arc<dyn Storage>) {
    let (t, other) = (tenant(), tenant());
    let alice = id("alice");
    let a = channel(&s, &t, &alice, &[]).await;
    let b = channel(&s, &t, &alice, &[]).await;
    let quiet = channel(&s, &t, &alice, &[]).await;
    for i in 0..3 {
        send(&s, msg(&t, &a.id, &alice, &format!("a{i}"), "a")).await;
    }
    send(&s, msg(&t, &b.id, &alice, "b0", "b")).await;
    s.rename_channel(&t, &b.id, "renamed", &alice)
        .await
        .expect("rename");
    let mut got = s
        .last_seqs(&[
            (t.clone(), a.id.clone()),
            (t.clone(), b.id.clone()),
            (t.clone(), quiet.id.clone()),
            (t.clone(), id("ch")),
            (other.clone(), a.id.clone()),
        ])
        .await
        .expect("last_seqs");
    got.sort();
    let mut want = vec![(a.id.clone(), 3), (b.id.clone(), 2), (quiet.id.clone(), 0)];
    want.sort();
    assert_eq!(got, want);
    assert!(s.last_seqs(&[]).await.expect("empty").is_empty());
    // Only the other tenant's name for the channel: nothing.
    assert!(
        s.last_seqs(&[(other, a.id.clone())])
            .await
            .expect("other tenant")
            .is_empty()
    );
}

/// Unread counts stop at [`UNREAD_COUNT_CAP`] (in the channel list and the read state alike) and
/// are exact below it.
pub async fn unread_counts_stop_at_the_cap(s: Arc<dyn Storage>) {
    let t = tenant();
    let (alice, bob) = (id("alice"), id("bob"));
    let ch = channel(&s, &t, &alice, &[(bob.as_str(), Role::Member)]).await;
    let over = UNREAD_COUNT_CAP + 5;
    for chunk in (0..over).collect::<Vec<_>>().chunks(200) {
        send_all(
            &s,
            chunk
                .iter()
                .map(|i| msg(&t, &ch.id, &bob, &format!("k{i}"), "busy"))
                .collect(),
        )
        .await;
    }
    let counts = |s: Arc<dyn Storage>, t: String, ch: String, alice: String| async move {
        let listed = s
            .channels_of(&t, &alice)
            .await
            .expect("channels_of")
            .into_iter()
            .find(|c| c.id == ch)
            .expect("listed");
        let state = s.read_state(&t, &ch, &alice).await.expect("read_state");
        (listed.unread_count, state.unread_count)
    };
    let cap = UNREAD_COUNT_CAP;
    assert_eq!(
        counts(s.clone(), t.clone(), ch.id.clone(), alice.clone()).await,
        (Some(cap), cap),
        "{over} unread are shown as the cap"
    );
    // 6 read: 999 left, below the cap, so exact again.
    s.mark_read(&t, &ch.id, &alice, 6).await.expect("mark_read");
    assert_eq!(
        counts(s.clone(), t.clone(), ch.id.clone(), alice.clone()).await,
        (Some(over - 6), over - 6)
    );
    // Bob's own messages are never unread for him.
    assert_eq!(
        s.read_state(&t, &ch.id, &bob)
            .await
            .expect("bob")
            .unread_count,
        0
    );
}

/// The unread count the rules define, computed from the stored messages: every member's live
/// messages of others after the member's read position (capped). Checks it against `read_state`
/// and the channel list for each of `users` (all members).
pub async fn assert_unread_exact(
    s: &Arc<dyn Storage>,
    t: &str,
    ch: &str,
    users: &[&str],
    what: &str,
) {
    let mut all: Vec<Message> = Vec::new();
    loop {
        let after = all.last().map_or(0, |m| m.seq);
        let page = history(s, t, ch, HistoryAnchor::After(after), 200).await;
        all.extend(page.messages);
        if !page.has_after {
            break;
        }
    }
    let members = s.members(t, ch).await.expect("members");
    for user in users {
        let member = members
            .iter()
            .find(|m| m.user_id == *user)
            .unwrap_or_else(|| panic!("{what}: {user} is a member"));
        let expected = all
            .iter()
            .filter(|m| m.seq > member.last_read_seq && m.sender_id != *user && !m.deleted)
            .count() as u64;
        let expected = expected.min(UNREAD_COUNT_CAP);
        let state = s.read_state(t, ch, user).await.expect("read_state");
        assert_eq!(
            (state.last_read_seq, state.unread_count),
            (member.last_read_seq, expected),
            "{what}: read state of {user}"
        );
        let listed = s
            .channels_of(t, user)
            .await
            .expect("channels_of")
            .into_iter()
            .find(|c| c.id == ch)
            .expect("listed");
        assert_eq!(
            (listed.last_read_seq, listed.unread_count),
            (Some(member.last_read_seq), Some(expected)),
            "{what}: channel list of {user}"
        );
    }
}

/// The unread counts stay exact through everything that moves them: own messages, deletions
/// (of own and others' messages, before and after a reader's position), edits, reads at a
/// message seq and at an event seq in the middle, a member who joins late, and a member who
/// leaves and comes back (their messages from the first membership are still their own).
pub async fn unread_counts_follow_every_change(s: Arc<dyn Storage>) {
    let t = tenant();
    let (alice, bob, carol, dave) = (id("alice"), id("bob"), id("carol"), id("dave"));
    let ch = channel(
        &s,
        &t,
        &alice,
        &[(bob.as_str(), Role::Member), (carol.as_str(), Role::Member)],
    )
    .await;
    let ch = ch.id.as_str();
    let three = [alice.as_str(), bob.as_str(), carol.as_str()];
    assert_unread_exact(&s, &t, ch, &three, "a new channel").await;
    let mut sent = Vec::new();
    for (i, who) in [&bob, &alice, &bob, &carol, &bob, &alice]
        .into_iter()
        .enumerate()
    {
        sent.push(
            send(&s, msg(&t, ch, who, &format!("m{i}"), "hello"))
                .await
                .message,
        );
    }
    assert_unread_exact(&s, &t, ch, &three, "own messages are not unread").await;
    assert_eq!(
        s.read_state(&t, ch, &carol)
            .await
            .expect("carol")
            .unread_count,
        5,
        "carol has 5 unread (one of the 6 is hers)"
    );

    // Carol reads up to bob's second message (a message seq in the middle).
    s.mark_read(&t, ch, &carol, sent[2].seq)
        .await
        .expect("read");
    assert_unread_exact(&s, &t, ch, &three, "read at a message in the middle").await;
    // Deleting a message carol has read changes nothing for her; bob's own deleted message
    // changes nothing for him; alice had not read it: one fewer for her.
    s.delete_message(&t, ch, &sent[0].id, &bob)
        .await
        .expect("delete");
    assert_unread_exact(
        &s,
        &t,
        ch,
        &three,
        "an own message deleted, behind a reader",
    )
    .await;
    // A message none of the others has read, deleted by someone else than its sender.
    let deleted = s
        .delete_message(&t, ch, &sent[4].id, &alice)
        .await
        .expect("delete");
    assert_unread_exact(
        &s,
        &t,
        ch,
        &three,
        "a message deleted ahead of every reader",
    )
    .await;
    // An edit is not a new message.
    s.edit_message(&t, ch, &sent[5].id, "edited", None)
        .await
        .expect("edit");
    assert_unread_exact(&s, &t, ch, &three, "an edit").await;
    // Bob reads up to the deletion event's seq (an event, not a message).
    s.mark_read(&t, ch, &bob, deleted.seq).await.expect("read");
    assert_unread_exact(&s, &t, ch, &three, "read at an event seq").await;
    // Going back changes nothing.
    s.mark_read(&t, ch, &bob, 1).await.expect("read back");
    assert_unread_exact(&s, &t, ch, &three, "a read behind the position").await;

    // Dave joins late: the channel's live history is unread for him.
    s.add_member(&t, ch, &dave, Role::Member, &alice)
        .await
        .expect("add dave");
    let four = [alice.as_str(), bob.as_str(), carol.as_str(), dave.as_str()];
    assert_unread_exact(&s, &t, ch, &four, "a member who joins late").await;
    let dave_msg = send(&s, msg(&t, ch, &dave, "d1", "hi all")).await.message;
    send(&s, msg(&t, ch, &dave, "d2", "again")).await;
    assert_unread_exact(&s, &t, ch, &four, "the late member's own messages").await;

    // Carol leaves; messages meanwhile; she comes back with her old messages still her own.
    send(&s, msg(&t, ch, &carol, "c2", "bye")).await;
    s.remove_member(&t, ch, &carol, &alice)
        .await
        .expect("remove carol");
    send(&s, msg(&t, ch, &bob, "b-away", "while carol is away")).await;
    s.delete_message(&t, ch, &dave_msg.id, &dave)
        .await
        .expect("delete");
    s.add_member(&t, ch, &carol, Role::Member, &alice)
        .await
        .expect("add carol back");
    assert_unread_exact(&s, &t, ch, &four, "a member who came back").await;

    // Everybody reads to the end in turn, with messages in between.
    for (i, user) in four.iter().enumerate() {
        s.mark_read(&t, ch, user, u64::MAX).await.expect("read all");
        send(&s, msg(&t, ch, &alice, &format!("tail{i}"), "more")).await;
        assert_unread_exact(&s, &t, ch, &four, "reads to the end").await;
    }
}

/// For the engines' migration tests: a channel with own, others' and deleted messages and read
/// positions in the middle; returns `(tenant, channel, members)`. Check it with
/// [`assert_unread_exact`].
pub async fn unread_fixture(s: &Arc<dyn Storage>) -> (String, String, Vec<String>) {
    let t = tenant();
    let users: Vec<String> = (0..3).map(|i| id(&format!("u{i}"))).collect();
    let ch = channel(
        s,
        &t,
        &users[0],
        &[
            (users[1].as_str(), Role::Member),
            (users[2].as_str(), Role::Member),
        ],
    )
    .await;
    let mut sent = Vec::new();
    for i in 0..12 {
        sent.push(
            send(s, msg(&t, &ch.id, &users[i % 3], &format!("k{i}"), "x"))
                .await
                .message,
        );
    }
    for i in [1, 7, 10] {
        s.delete_message(&t, &ch.id, &sent[i].id, &users[0])
            .await
            .expect("delete");
    }
    s.mark_read(&t, &ch.id, &users[1], sent[4].seq)
        .await
        .expect("read");
    s.mark_read(&t, &ch.id, &users[2], sent[9].seq)
        .await
        .expect("read");
    (t, ch.id, users)
}

/// Reads at many positions of a long channel, forward in small and large steps (the counters are
/// moved by the range just read or set from the range still unread, whichever is shorter), with
/// own and deleted messages spread over it.
pub async fn unread_reads_in_the_middle_of_a_long_channel(s: Arc<dyn Storage>) {
    let t = tenant();
    let (alice, bob) = (id("alice"), id("bob"));
    let ch = channel(&s, &t, &alice, &[(bob.as_str(), Role::Member)]).await;
    let ch = ch.id.as_str();
    let users = [alice.as_str(), bob.as_str()];
    let mut sent = Vec::new();
    for chunk in (0..300).collect::<Vec<_>>().chunks(100) {
        let requests = chunk
            .iter()
            .map(|i| {
                let who = if i % 3 == 0 { &alice } else { &bob };
                msg(&t, ch, who, &format!("k{i}"), "text")
            })
            .collect();
        sent.extend(send_all(&s, requests).await.into_iter().map(|o| o.message));
    }
    for m in sent.iter().filter(|m| m.seq % 7 == 0) {
        s.delete_message(&t, ch, &m.id, &alice)
            .await
            .expect("delete");
    }
    assert_unread_exact(&s, &t, ch, &users, "300 messages, some deleted").await;
    let mut position = 0;
    for step in [1, 2, 40, 3, 150, 1, 60, 5, 200] {
        position += step;
        s.mark_read(&t, ch, &alice, position)
            .await
            .expect("alice reads");
        s.mark_read(&t, ch, &bob, position * 2)
            .await
            .expect("bob reads");
        assert_unread_exact(&s, &t, ch, &users, &format!("read to {position}")).await;
    }
}

/// Sends from several members, deletions and reads all at once: afterwards every count is
/// exact (no update of a counter is lost or applied twice under concurrency).
pub async fn unread_counts_exact_under_concurrency(s: Arc<dyn Storage>) {
    let t = tenant();
    let users: Vec<String> = (0..5).map(|i| id(&format!("u{i}"))).collect();
    let others: Vec<(&str, Role)> = users[1..]
        .iter()
        .map(|u| (u.as_str(), Role::Member))
        .collect();
    let ch = channel(&s, &t, &users[0], &others).await;
    let ch = ch.id.clone();
    let early = send_all(
        &s,
        (0..20)
            .map(|i| msg(&t, &ch, &users[i % 5], &format!("e{i}"), "early"))
            .collect(),
    )
    .await;
    let mut tasks = Vec::new();
    for round in 0..4 {
        for (u, user) in users.iter().enumerate() {
            let (s, t, ch, user) = (s.clone(), t.clone(), ch.clone(), user.clone());
            tasks.push(tokio::spawn(async move {
                for k in 0..5 {
                    send(&s, msg(&t, &ch, &user, &format!("r{round}-{k}"), "x")).await;
                    if (k + u) % 2 == 0 {
                        let last = s.channel(&t, &ch).await.expect("channel").expect("exists");
                        s.mark_read(&t, &ch, &user, last.last_seq.saturating_sub(3))
                            .await
                            .expect("read");
                    }
                }
            }));
        }
        let doomed = early[round * 5].message.id.clone();
        let (s2, t2, ch2, by) = (s.clone(), t.clone(), ch.clone(), users[0].clone());
        tasks.push(tokio::spawn(async move {
            s2.delete_message(&t2, &ch2, &doomed, &by)
                .await
                .expect("delete");
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    assert_unread_exact(
        &s,
        &t,
        &ch,
        &names,
        "after concurrent sends, reads and deletes",
    )
    .await;
}

/// `presence_channel_ids_of` lists the user's channels with at most the given number of
/// members, following joins and removals (and a backfilled migration, in the engines' tests).
pub async fn presence_channels_leave_out_large_ones(s: Arc<dyn Storage>) {
    let t = tenant();
    let users: Vec<String> = (0..5).map(|i| id(&format!("u{i}"))).collect();
    let small = channel(&s, &t, &users[0], &[(users[1].as_str(), Role::Member)]).await;
    let others: Vec<(&str, Role)> = users[1..4]
        .iter()
        .map(|u| (u.as_str(), Role::Member))
        .collect();
    let large = channel(&s, &t, &users[0], &others).await;
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let of = |user: String, max: u64| {
        let (s, t) = (s.clone(), t.clone());
        async move {
            let mut v = s
                .presence_channel_ids_of(&t, &user, max)
                .await
                .expect("presence_channel_ids_of");
            v.sort();
            v
        }
    };
    assert_eq!(
        of(users[0].clone(), 3).await,
        vec![small.id.clone()],
        "4 members > 3"
    );
    assert_eq!(
        of(users[0].clone(), 4).await,
        sorted(vec![small.id.clone(), large.id.clone()])
    );
    assert!(
        of(users[4].clone(), 100).await.is_empty(),
        "not a member anywhere"
    );
    s.remove_member(&t, &large.id, &users[3], &users[0])
        .await
        .expect("remove");
    assert_eq!(
        of(users[0].clone(), 3).await,
        sorted(vec![small.id.clone(), large.id.clone()]),
        "3 members after a removal"
    );
    s.add_member(&t, &large.id, &users[4], Role::Member, &users[0])
        .await
        .expect("add");
    assert_eq!(
        of(users[4].clone(), 3).await,
        Vec::<String>::new(),
        "4 again"
    );
    assert_eq!(of(users[4].clone(), 4).await, vec![large.id.clone()]);
    assert!(
        s.presence_channel_ids_of(&tenant(), &users[0], 100)
            .await
            .expect("other tenant")
            .is_empty()
    );
}

/// Read positions move forward only and are clamped to the channel's last seq; the unread count
/// is the others' live messages after the position; `shares_channel` sees common membership.
pub async fn read_state_and_unread_counts(s: Arc<dyn Storage>) {
    let (t, other_tenant) = (tenant(), tenant());
    let (alice, bob, carol) = (id("alice"), id("bob"), id("carol"));
    let ch = channel(&s, &t, &alice, &[(bob.as_str(), Role::Member)]).await;
    send(&s, msg(&t, &ch.id, &bob, "b1", "from bob")).await; // 1
    send(&s, msg(&t, &ch.id, &alice, "a1", "one")).await; // 2
    let doomed = send(&s, msg(&t, &ch.id, &alice, "a2", "two")).await.message; // 3
    send(&s, msg(&t, &ch.id, &alice, "a3", "three")).await; // 4
    s.delete_message(&t, &ch.id, &doomed.id, &alice)
        .await
        .expect("delete"); // 5
    // Every state is as of the channel's last seq (5: nothing is sent after the deletion).
    let state = |last_read_seq, unread_count| parley_proto::ReadState {
        channel_id: ch.id.clone(),
        last_read_seq,
        unread_count,
        seq: Some(5),
    };

    let read = |user: String| {
        let (s, t, ch) = (s.clone(), t.clone(), ch.id.clone());
        async move { s.read_state(&t, &ch, &user).await }
    };
    assert_eq!(
        read(bob.clone()).await.expect("bob"),
        state(0, 2),
        "own and deleted messages are not unread"
    );
    assert_eq!(read(alice.clone()).await.expect("alice"), state(0, 1));
    let marked = s.mark_read(&t, &ch.id, &bob, 2).await.expect("mark");
    assert_eq!(marked, state(2, 1));
    let marked = s.mark_read(&t, &ch.id, &bob, 1).await.expect("mark back");
    assert_eq!(marked, state(2, 1), "the read position never moves back");
    let marked = s
        .mark_read(&t, &ch.id, &bob, 999)
        .await
        .expect("mark past the end");
    assert_eq!(marked, state(5, 0), "clamped to the channel's last seq");
    assert_eq!(read(bob.clone()).await.expect("bob"), state(5, 0));

    let listed = s.channels_of(&t, &bob).await.expect("list");
    assert_eq!(
        (listed[0].last_read_seq, listed[0].unread_count),
        (Some(5), Some(0))
    );
    let listed = s.channels_of(&t, &alice).await.expect("list");
    assert_eq!(
        (listed[0].last_read_seq, listed[0].unread_count),
        (Some(0), Some(1))
    );
    let positions: Vec<(String, u64)> = s
        .members(&t, &ch.id)
        .await
        .expect("members")
        .into_iter()
        .map(|m| (m.user_id, m.last_read_seq))
        .collect();
    assert_eq!(positions, vec![(alice.clone(), 0), (bob.clone(), 5)]);

    assert_err(
        read(carol.clone()).await,
        is_not_a_member,
        "read_state of a non-member",
    );
    assert_err(
        s.mark_read(&t, &ch.id, &carol, 1).await,
        is_not_a_member,
        "mark_read by a non-member",
    );
    assert_err(
        s.mark_read(&other_tenant, &ch.id, &bob, 1).await,
        |e| is_not_a_member(e) || is_not_found(e),
        "mark_read across tenants",
    );
    assert!(s.shares_channel(&t, &alice, &bob).await.expect("shares"));
    assert!(s.shares_channel(&t, &bob, &alice).await.expect("shares"));
    assert!(!s.shares_channel(&t, &alice, &carol).await.expect("shares"));
    assert!(
        !s.shares_channel(&other_tenant, &alice, &bob)
            .await
            .expect("shares"),
        "tenants share nothing"
    );
    s.remove_member(&t, &ch.id, &bob, &alice)
        .await
        .expect("remove")
        .expect("removed");
    assert!(
        !s.shares_channel(&t, &alice, &bob).await.expect("shares"),
        "not after the removal"
    );
}

/// What an edge keeps for a subscriber (`parley_proto::unread`) agrees with storage at every
/// step: a read state is as of the channel's last seq (`ReadState::seq`), and from it the
/// channel's events alone give the count (others' messages +1, deletions of others' unread
/// messages −1, everything else nothing), including a read answered after later events were
/// delivered and a read made while events are still on their way.
pub async fn unread_counts_follow_from_the_event_stream(s: Arc<dyn Storage>) {
    use parley_proto::unread::{Snapshot, UnreadTracker, unread_change};
    let t = tenant();
    let (alice, bob, carol) = (id("alice"), id("bob"), id("carol"));
    let ch = channel(
        &s,
        &t,
        &alice,
        &[(bob.as_str(), Role::Member), (carol.as_str(), Role::Member)],
    )
    .await;
    let ch = ch.id.as_str();
    let snapshot = |r: &parley_proto::ReadState| Snapshot {
        last_read_seq: r.last_read_seq,
        unread_count: r.unread_count,
        seq: r.seq.expect("a read state says which seq it is as of"),
    };
    // Bob's tracker, fed like the edge feeds a subscriber: events in seq order, from `delivered`.
    let mut tracker = UnreadTracker::new(0);
    let mut delivered = 0;
    let first = s.read_state(&t, ch, &bob).await.expect("read_state");
    assert_eq!(first.seq, Some(0), "a new channel is at seq 0");
    tracker.snapshot(snapshot(&first));
    macro_rules! deliver_and_check {
        ($what:expr) => {{
            for ev in events(&s, &t, ch, delivered).await {
                if let Some((sender, change)) = unread_change(&ev.body)
                    && sender != bob
                {
                    tracker.event(ev.seq, change);
                }
                delivered = ev.seq;
            }
            let state = s.read_state(&t, ch, &bob).await.expect("read_state");
            assert_eq!(state.seq, Some(delivered), "{}: as of the last seq", $what);
            assert_eq!(
                tracker.shown(),
                Some((state.unread_count, state.last_read_seq)),
                "{}: the edge's count against storage's",
                $what
            );
        }};
    }
    let mut sent = Vec::new();
    for (i, who) in [&alice, &bob, &carol, &alice, &bob, &carol, &alice]
        .into_iter()
        .enumerate()
    {
        sent.push(
            send(&s, msg(&t, ch, who, &format!("m{i}"), "hi"))
                .await
                .message,
        );
    }
    deliver_and_check!("others' and own messages");
    // Bob reads up to message 4; two more arrive and are delivered before the read's answer.
    let read = s.mark_read(&t, ch, &bob, 4).await.expect("read");
    assert_eq!(read.seq, Some(7), "a read is as of the channel's last seq");
    send(&s, msg(&t, ch, &carol, "late1", "x")).await;
    send(&s, msg(&t, ch, &bob, "late2", "x")).await;
    for ev in events(&s, &t, ch, delivered).await {
        if let Some((sender, change)) = unread_change(&ev.body)
            && sender != bob
        {
            tracker.event(ev.seq, change);
        }
        delivered = ev.seq;
    }
    tracker.snapshot(snapshot(&read));
    deliver_and_check!("a read answered after later events");
    // Deletions: of a message bob read (alice's 1), of an unread one (carol's 6), of his own
    // message after his read position (5), of alice's unread 7 by carol.
    for (m, by) in [(0, &alice), (5, &carol), (4, &bob), (6, &carol)] {
        s.delete_message(&t, ch, &sent[m].id, by)
            .await
            .expect("delete");
        deliver_and_check!(format!("deleting message {}", sent[m].seq));
    }
    // An edit and a member change are not unread changes.
    s.edit_message(&t, ch, &sent[2].id, "edited", None)
        .await
        .expect("edit");
    let dave = id("dave");
    s.add_member(&t, ch, &dave, Role::Member, &alice)
        .await
        .expect("add");
    deliver_and_check!("an edit and a new member");
    // A read whose answer arrives before the events it counted: they are skipped when they come.
    send(&s, msg(&t, ch, &alice, "ahead1", "x")).await;
    send(&s, msg(&t, ch, &dave, "ahead2", "x")).await;
    let read = s.mark_read(&t, ch, &bob, 9).await.expect("read");
    tracker.snapshot(snapshot(&read));
    deliver_and_check!("a read answered before the events it counted");
    let read = s.mark_read(&t, ch, &bob, u64::MAX).await.expect("read all");
    tracker.snapshot(snapshot(&read));
    deliver_and_check!("read to the end");
}

// ---- helpers ----

fn tenant() -> String {
    format!("tenant-{}", ulid::Ulid::new())
}

fn id(prefix: &str) -> String {
    format!("{prefix}-{}", ulid::Ulid::new())
}

/// Creates a channel owned by `owner` with `others` as members.
async fn channel(
    s: &Arc<dyn Storage>,
    tenant: &str,
    owner: &str,
    others: &[(&str, Role)],
) -> Channel {
    let mut members = vec![(owner.to_owned(), Role::Owner)];
    members.extend(others.iter().map(|(u, r)| ((*u).to_owned(), *r)));
    let (ch, created) = s
        .create_channel(NewChannel {
            tenant_id: tenant.to_owned(),
            id: id("ch"),
            kind: ChannelKind::Channel,
            name: Some("test".into()),
            created_by: owner.to_owned(),
            members,
            dm_key: None,
        })
        .await
        .expect("create channel");
    assert!(created);
    ch
}

/// A DM between `from` (its creator) and `to`.
fn new_dm(tenant: &str, from: &str, to: &str) -> NewChannel {
    let mut pair = [from, to];
    pair.sort_unstable();
    NewChannel {
        tenant_id: tenant.to_owned(),
        id: id("dm"),
        kind: ChannelKind::Dm,
        name: None,
        created_by: from.to_owned(),
        members: vec![
            (from.to_owned(), Role::Member),
            (to.to_owned(), Role::Member),
        ],
        dm_key: Some(pair.join("\n")),
    }
}

fn msg(
    tenant: &str,
    channel_id: &str,
    sender: &str,
    client_msg_id: &str,
    text: &str,
) -> NewMessage {
    NewMessage {
        tenant_id: tenant.to_owned(),
        channel_id: channel_id.to_owned(),
        id: id("msg"),
        sender_id: sender.to_owned(),
        client_msg_id: client_msg_id.to_owned(),
        text: text.to_owned(),
        metadata: None,
    }
}

async fn send(s: &Arc<dyn Storage>, new: NewMessage) -> SendOutcome {
    let key = new.client_msg_id.clone();
    s.send_message(new)
        .await
        .unwrap_or_else(|e| panic!("send {key}: {e:?}"))
}

/// Sends all at once, each from its own task; the outcomes in request order.
async fn send_all(s: &Arc<dyn Storage>, requests: Vec<NewMessage>) -> Vec<SendOutcome> {
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|new| {
            let s = s.clone();
            tokio::spawn(async move { send(&s, new).await })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.push(task.await.expect("send task"));
    }
    outcomes
}

async fn history(
    s: &Arc<dyn Storage>,
    tenant: &str,
    channel_id: &str,
    anchor: HistoryAnchor,
    limit: u32,
) -> MessagePage {
    s.history(tenant, channel_id, anchor, limit)
        .await
        .unwrap_or_else(|e| panic!("history {anchor:?} limit {limit}: {e:?}"))
}

async fn events(
    s: &Arc<dyn Storage>,
    tenant: &str,
    channel_id: &str,
    after: u64,
) -> Vec<ChannelEvent> {
    s.events(tenant, channel_id, after, None, 1000)
        .await
        .expect("events")
}

fn assert_tombstone(m: &Message, original: &Message) {
    assert_eq!(
        (m.id.as_str(), m.seq, m.sender_id.as_str()),
        (
            original.id.as_str(),
            original.seq,
            original.sender_id.as_str()
        )
    );
    assert_eq!(
        (m.client_msg_id.as_str(), m.created_at.as_str()),
        (
            original.client_msg_id.as_str(),
            original.created_at.as_str()
        )
    );
    assert!(m.deleted, "tombstone: deleted");
    assert_eq!(
        (m.text.as_str(), &m.metadata),
        ("", &None),
        "tombstone: no text, no metadata"
    );
}

/// `2024-01-31T12:34:56.789Z`.
fn assert_rfc3339(s: &str) {
    let b = s.as_bytes();
    let shape = s.len() == 24 && b[4] == b'-' && b[10] == b'T' && b[19] == b'.' && b[23] == b'Z';
    assert!(shape, "not an RFC 3339 UTC millisecond timestamp: {s:?}");
}

fn assert_err<T: Debug>(
    result: StorageResult<T>,
    expected: impl Fn(&StorageError) -> bool,
    what: &str,
) {
    match result {
        Err(e) if expected(&e) => {}
        other => panic!("{what}: unexpected {other:?}"),
    }
}

/// Empty, or `NotFound`: the trait leaves open which one a missing channel gives.
fn assert_missing<T: Debug>(result: StorageResult<Vec<T>>, what: &str) {
    match result {
        Ok(v) if v.is_empty() => {}
        Err(StorageError::NotFound) => {}
        other => panic!("{what} of a channel missing in the tenant: {other:?}"),
    }
}

fn is_not_found(e: &StorageError) -> bool {
    matches!(e, StorageError::NotFound)
}

fn is_not_a_member(e: &StorageError) -> bool {
    matches!(e, StorageError::NotAMember)
}

fn is_conflict(e: &StorageError) -> bool {
    matches!(e, StorageError::IdempotencyConflict)
}
