//! The membership cache: who is (and who is not) a member of the channels this node receives,
//! as the core last said, so that the edge's own decisions skip a round trip to the core.
//!
//! It is a layer around any [`CoreGateway`]: every call goes through to the core, except
//! [`CoreGateway::member_check`] on a cached answer (a subscribe to a channel whose hub is
//! already live here needs no seq from storage, only the membership), and the edge-local
//! preconditions of typing and reads: a caller the cache knows is not a member is refused at
//! once. The core still checks every call that reaches it (the edge is not trusted with rules).
//!
//! **Correctness.** An answer is cached only for a channel this node is *watching*: its bus
//! topic is registered (see `interest.rs`), so every later `member.*` and `channel.deleted`
//! event reaches the dispatcher, which invalidates the entries they concern *before* the hubs
//! deliver them. An answer that raced with an invalidation is not cached: every invalidation
//! bumps an epoch, and an answer is kept only if the epoch did not move while it was computed.
//! When the channel stops being watched (its hub is gone) or the bus may have lost events (a
//! resync), its entries go.
//!
//! **Call signals.** The core's answer to a `call.signal` check (the call's channel, the target's
//! user, which side is impolite) is kept per (caller, call, from, to) while the call's channel is
//! watched, and answers the pair's later signals as long as the caller is a cached member of
//! that channel. `call.participant_left` and `call.ended` (persisted channel events, so they
//! reach a watched channel's node) drop the call's routes before they are delivered, and a
//! `member.*` event drops the member's answer, which the route needs: a participant who left and
//! a member who was removed are refused by the core again, at once.
//!
//! **Bounds.** At most `channels` channels (least recently used evicted), each with at most
//! [`MAX_USERS_PER_CHANNEL`] answers (cleared when full), and at most [`MAX_ROUTES`] signal
//! routes (least recently used evicted). Hits and misses are counted on `/metrics`
//! (`parley_membership_cache_lookups_total{result}`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use hashlink::LruCache;
use parley_proto::{
    ChannelEvent, ErrorCode, EventBody, Principal, ReadState, SendMessage, SendResult, TypingState,
};
use parley_sync::Ephemeral;

use crate::{CoreGateway, GatewayError, SignalRoute};

/// Most cached answers per channel; a full channel's answers are dropped at once.
pub(crate) const MAX_USERS_PER_CHANNEL: usize = 4096;

/// Most cached call-signal routes.
pub(crate) const MAX_ROUTES: usize = 4096;

/// A signal route's key: tenant, caller, call, from, to.
type RouteKey = (String, String, String, String, String);

/// What the core said about a user of a channel.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Answer {
    Member,
    NotMember,
}

/// Answers kept in a list before they move to a map.
const FEW_ANSWERS: usize = 16;

/// A channel's answers, for its tenant. Most channels a node watches are personal channels and
/// small rooms with one to a few local members: their answers are a short list (one 24 B entry
/// per user) instead of a hash table (256 B for the first entry). Past [`FEW_ANSWERS`] they move
/// to a map.
#[derive(Default)]
struct ChannelAnswers {
    /// The channel's tenant (ids are global, but the tenant is part of the rule, so it is
    /// checked): answers of another tenant are not kept.
    tenant: Box<str>,
    few: Vec<(Box<str>, Answer)>,
    #[expect(
        clippy::box_collection,
        reason = "8 B in every small channel's entry instead of 48 B; only large channels pay the extra allocation"
    )]
    many: Option<Box<HashMap<Box<str>, Answer>>>,
}

impl ChannelAnswers {
    fn new(tenant: &str) -> ChannelAnswers {
        ChannelAnswers {
            tenant: tenant.into(),
            ..ChannelAnswers::default()
        }
    }

    fn get(&self, tenant: &str, user: &str) -> Option<Answer> {
        if *self.tenant != *tenant {
            return None;
        }
        match &self.many {
            Some(many) => many.get(user).copied(),
            None => self.few.iter().find(|(u, _)| **u == *user).map(|(_, a)| *a),
        }
    }

    fn len(&self) -> usize {
        self.many.as_ref().map_or(self.few.len(), |m| m.len())
    }

    fn insert(&mut self, user: &str, answer: Answer) {
        if let Some(many) = &mut self.many {
            many.insert(user.into(), answer);
        } else if let Some(entry) = self.few.iter_mut().find(|(u, _)| **u == *user) {
            entry.1 = answer;
        } else if self.few.len() < FEW_ANSWERS {
            if self.few.capacity() == 0 {
                self.few.reserve_exact(1);
            }
            self.few.push((user.into(), answer));
        } else {
            let mut many: HashMap<Box<str>, Answer> =
                std::mem::take(&mut self.few).into_iter().collect();
            many.insert(user.into(), answer);
            self.many = Some(Box::new(many));
        }
    }

    fn remove(&mut self, user: &str) {
        match &mut self.many {
            Some(many) => {
                many.remove(user);
            }
            None => self.few.retain(|(u, _)| **u != *user),
        }
    }

    fn clear(&mut self) {
        self.few = Vec::new();
        self.many = None;
    }
}

#[derive(Default)]
struct State {
    /// channel → its answers.
    entries: Option<LruCache<String, ChannelAnswers>>,
    /// Channels whose events reach this node.
    watched: HashSet<String>,
    /// Moves on every invalidation.
    epoch: u64,
    /// Call-signal routes the core gave.
    routes: Option<LruCache<RouteKey, SignalRoute>>,
}

/// A [`CoreGateway`] that remembers membership answers.
pub struct MembershipCache {
    inner: Arc<dyn CoreGateway>,
    state: Mutex<State>,
}

fn not_a_member() -> GatewayError {
    GatewayError {
        code: ErrorCode::NotAMember,
        message: "you are not a member of this channel".into(),
    }
}

impl State {
    /// Drops the routes `stale` picks (a bounded scan: at most [`MAX_ROUTES`]).
    /// Forgets the routes `stale` picks, by key (tenant, caller, call, from, to) or route.
    fn drop_routes(&mut self, stale: impl Fn(&RouteKey, &SignalRoute) -> bool) {
        let Some(routes) = self.routes.as_mut() else {
            return;
        };
        let gone: Vec<RouteKey> = routes
            .iter()
            .filter(|(k, r)| stale(k, r))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            routes.remove(&k);
        }
    }
}

impl MembershipCache {
    /// A cache of at most `channels` channels in front of `inner`.
    pub fn new(inner: Arc<dyn CoreGateway>, channels: usize) -> MembershipCache {
        MembershipCache {
            inner,
            state: Mutex::new(State {
                entries: Some(LruCache::new(channels.max(1))),
                routes: Some(LruCache::new(MAX_ROUTES)),
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The channel's events reach this node from now on: its answers may be cached.
    pub fn watch(&self, channel_id: &str) {
        self.lock().watched.insert(channel_id.to_owned());
    }

    /// The channel's events stop reaching this node: its answers go.
    pub fn unwatch(&self, channel_id: &str) {
        let mut s = self.lock();
        s.epoch += 1;
        s.watched.remove(channel_id);
        if let Some(e) = s.entries.as_mut() {
            e.remove(channel_id);
        }
        s.drop_routes(|_, r| r.channel_id == channel_id);
    }

    /// Events may have been lost: forget every answer (the channels stay watched).
    pub fn clear(&self) {
        let mut s = self.lock();
        s.epoch += 1;
        if let Some(e) = s.entries.as_mut() {
            e.clear();
        }
        if let Some(r) = s.routes.as_mut() {
            r.clear();
        }
    }

    /// A persisted event is about to be delivered: drop what it makes stale.
    pub fn on_event(&self, ev: &ChannelEvent) {
        let user = match &ev.body {
            EventBody::MemberAdded { member, .. } | EventBody::MemberUpdated { member, .. } => {
                Some(member.user_id.as_str())
            }
            EventBody::MemberRemoved { user_id, .. } => Some(user_id.as_str()),
            EventBody::ChannelDeleted { .. } => None,
            EventBody::CallParticipantLeft { call_id, .. }
            | EventBody::CallEnded { call_id, .. } => {
                let mut s = self.lock();
                s.epoch += 1;
                s.drop_routes(|k, _| &k.2 == call_id);
                return;
            }
            _ => return,
        };
        let mut s = self.lock();
        s.epoch += 1;
        let Some(entries) = s.entries.as_mut() else {
            return;
        };
        match user {
            Some(user) => {
                if let Some(users) = entries.get_mut(&ev.channel_id) {
                    users.remove(user);
                }
            }
            None => {
                entries.remove(&ev.channel_id);
                s.drop_routes(|_, r| r.channel_id == ev.channel_id);
            }
        }
    }

    /// The cached route of a signal, if the caller is a cached member of the call's channel.
    fn route(&self, key: &RouteKey, p: &Principal) -> Option<SignalRoute> {
        let mut s = self.lock();
        let route = s.routes.as_mut().and_then(|r| r.get(key)).cloned();
        let hit = route.filter(|route| {
            s.entries
                .as_mut()
                .and_then(|e| e.get(&route.channel_id))
                .and_then(|users| users.get(&p.tenant_id, &p.user_id))
                .is_some_and(|a| a == Answer::Member)
        });
        crate::metrics::membership_lookup(hit.is_some());
        hit
    }

    /// Keeps a route, under the same conditions as a membership answer.
    fn remember_route(&self, epoch: u64, key: RouteKey, route: &SignalRoute) {
        let mut s = self.lock();
        if s.epoch != epoch || !s.watched.contains(&route.channel_id) {
            return;
        }
        if let Some(routes) = s.routes.as_mut() {
            routes.insert(key, route.clone());
        }
    }

    /// The cached answer for `p` in the channel, counted as a hit or a miss.
    fn lookup(&self, p: &Principal, channel_id: &str) -> Option<Answer> {
        let mut s = self.lock();
        let answer = s
            .entries
            .as_mut()
            .and_then(|e| e.get(channel_id))
            .and_then(|users| users.get(&p.tenant_id, &p.user_id));
        crate::metrics::membership_lookup(answer.is_some());
        answer
    }

    fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Keeps the core's answer, if the channel is watched and nothing was invalidated since
    /// `epoch`.
    fn remember(&self, epoch: u64, p: &Principal, channel_id: &str, answer: Answer) {
        let mut s = self.lock();
        if s.epoch != epoch || !s.watched.contains(channel_id) {
            return;
        }
        let Some(entries) = s.entries.as_mut() else {
            return;
        };
        if entries
            .get(channel_id)
            .is_none_or(|users| *users.tenant != *p.tenant_id)
        {
            // A channel's answers are for one tenant: another tenant's start afresh.
            entries.insert(channel_id.to_owned(), ChannelAnswers::new(&p.tenant_id));
        }
        if let Some(users) = entries.get_mut(channel_id) {
            if users.len() >= MAX_USERS_PER_CHANNEL {
                users.clear();
            }
            users.insert(&p.user_id, answer);
        }
    }

    /// Caches what a core result says about membership.
    fn learn<T>(&self, epoch: u64, p: &Principal, channel_id: &str, r: &Result<T, GatewayError>) {
        match r {
            Ok(_) => self.remember(epoch, p, channel_id, Answer::Member),
            Err(e) if e.code == ErrorCode::NotAMember => {
                self.remember(epoch, p, channel_id, Answer::NotMember)
            }
            Err(_) => {}
        }
    }

    /// A non-member known to the cache is refused without asking the core.
    fn precondition(&self, p: &Principal, channel_id: &str) -> Result<u64, GatewayError> {
        match self.lookup(p, channel_id) {
            Some(Answer::NotMember) => Err(not_a_member()),
            _ => Ok(self.epoch()),
        }
    }

    #[cfg(test)]
    fn cached(&self, p: &Principal, channel_id: &str) -> Option<Answer> {
        let mut s = self.lock();
        s.entries
            .as_mut()
            .and_then(|e| e.get(channel_id))
            .and_then(|u| u.get(&p.tenant_id, &p.user_id))
    }
}

#[async_trait]
impl CoreGateway for MembershipCache {
    fn authenticate(&self, token: &str) -> Result<Principal, GatewayError> {
        self.inner.authenticate(token)
    }

    async fn subscribe_check(&self, p: &Principal, channel_id: &str) -> Result<u64, GatewayError> {
        let epoch = self.epoch();
        let r = self.inner.subscribe_check(p, channel_id).await;
        self.learn(epoch, p, channel_id, &r);
        r
    }

    async fn member_check(&self, p: &Principal, channel_id: &str) -> Result<(), GatewayError> {
        match self.lookup(p, channel_id) {
            Some(Answer::Member) => Ok(()),
            Some(Answer::NotMember) => Err(not_a_member()),
            None => self.subscribe_check(p, channel_id).await.map(|_| ()),
        }
    }

    async fn send_message(
        &self,
        p: &Principal,
        channel_id: &str,
        req: SendMessage,
    ) -> Result<SendResult, GatewayError> {
        self.inner.send_message(p, channel_id, req).await
    }

    async fn connection_opened(&self, p: &Principal) {
        self.inner.connection_opened(p).await
    }

    fn connection_closed(&self, p: &Principal) {
        self.inner.connection_closed(p)
    }

    async fn typing(
        &self,
        p: &Principal,
        channel_id: &str,
        state: TypingState,
    ) -> Result<(), GatewayError> {
        let epoch = self.precondition(p, channel_id)?;
        let r = self.inner.typing(p, channel_id, state).await;
        self.learn(epoch, p, channel_id, &r);
        r
    }

    async fn mark_read(
        &self,
        p: &Principal,
        channel_id: &str,
        seq: u64,
    ) -> Result<ReadState, GatewayError> {
        let epoch = self.precondition(p, channel_id)?;
        let r = self.inner.mark_read(p, channel_id, seq).await;
        self.learn(epoch, p, channel_id, &r);
        r
    }

    async fn read_state(&self, p: &Principal, channel_id: &str) -> Result<ReadState, GatewayError> {
        let epoch = self.precondition(p, channel_id)?;
        let r = self.inner.read_state(p, channel_id).await;
        self.learn(epoch, p, channel_id, &r);
        r
    }

    async fn set_away(&self, p: &Principal, away: bool) {
        self.inner.set_away(p, away).await
    }

    async fn attach_call(
        &self,
        p: &Principal,
        call_id: &str,
        participant_id: &str,
    ) -> Result<String, GatewayError> {
        self.inner.attach_call(p, call_id, participant_id).await
    }

    async fn check_signal(
        &self,
        p: &Principal,
        call_id: &str,
        from: &str,
        to: &str,
    ) -> Result<SignalRoute, GatewayError> {
        let key: RouteKey = (
            p.tenant_id.clone(),
            p.user_id.clone(),
            call_id.to_owned(),
            from.to_owned(),
            to.to_owned(),
        );
        if let Some(route) = self.route(&key, p) {
            return Ok(route);
        }
        // The call's channel is only known from the answer; a successful check says the caller
        // is a member of it.
        let epoch = self.epoch();
        let r = self.inner.check_signal(p, call_id, from, to).await;
        if let Ok(route) = &r {
            self.remember(epoch, p, &route.channel_id, Answer::Member);
            self.remember_route(epoch, key, route);
        }
        r
    }

    async fn publish_ephemeral(&self, event: Ephemeral) {
        self.inner.publish_ephemeral(event).await
    }

    async fn sfu_request(
        &self,
        p: &Principal,
        call_id: &str,
        participant_id: &str,
        req: parley_proto::calls::SfuClientRequest,
    ) -> Result<Option<String>, GatewayError> {
        self.inner
            .sfu_request(p, call_id, participant_id, req)
            .await
    }

    async fn participant_timed_out(&self, tenant: &str, call_id: &str, participant_id: &str) {
        self.inner
            .participant_timed_out(tenant, call_id, participant_id)
            .await
    }

    async fn channel_events(
        &self,
        tenant: &str,
        channel_id: &str,
        after: u64,
        up_to: Option<u64>,
        limit: u32,
    ) -> Result<Vec<ChannelEvent>, GatewayError> {
        self.inner
            .channel_events(tenant, channel_id, after, up_to, limit)
            .await
    }

    async fn last_seqs(
        &self,
        channels: &[(String, String)],
    ) -> Result<Vec<(String, u64)>, GatewayError> {
        self.inner.last_seqs(channels).await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use parley_proto::{Member, Role};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A core where only `alice` of tenant `t` is a member; counts membership checks.
    #[derive(Default)]
    pub(crate) struct Core {
        checks: AtomicU64,
    }

    fn principal(tenant: &str, user: &str) -> Principal {
        Principal {
            user_id: user.into(),
            tenant_id: tenant.into(),
            roles: Vec::new(),
            expires_at: u64::MAX,
        }
    }

    fn member(p: &Principal) -> Result<(), GatewayError> {
        if p.tenant_id == "t" && p.user_id == "alice" {
            Ok(())
        } else {
            Err(not_a_member())
        }
    }

    #[async_trait]
    impl CoreGateway for Core {
        fn authenticate(&self, _: &str) -> Result<Principal, GatewayError> {
            Err(not_a_member())
        }
        async fn subscribe_check(&self, p: &Principal, _: &str) -> Result<u64, GatewayError> {
            self.checks.fetch_add(1, Ordering::SeqCst);
            member(p).map(|()| 7)
        }
        async fn send_message(
            &self,
            _: &Principal,
            _: &str,
            _: SendMessage,
        ) -> Result<SendResult, GatewayError> {
            Err(not_a_member())
        }
        async fn connection_opened(&self, _: &Principal) {}
        fn connection_closed(&self, _: &Principal) {}
        async fn typing(&self, p: &Principal, _: &str, _: TypingState) -> Result<(), GatewayError> {
            self.checks.fetch_add(1, Ordering::SeqCst);
            member(p)
        }
        async fn mark_read(
            &self,
            _: &Principal,
            _: &str,
            _: u64,
        ) -> Result<ReadState, GatewayError> {
            Err(not_a_member())
        }
        async fn read_state(&self, _: &Principal, _: &str) -> Result<ReadState, GatewayError> {
            Err(not_a_member())
        }
        async fn set_away(&self, _: &Principal, _: bool) {}
        async fn attach_call(
            &self,
            _: &Principal,
            _: &str,
            _: &str,
        ) -> Result<String, GatewayError> {
            Err(not_a_member())
        }
        async fn check_signal(
            &self,
            _: &Principal,
            _: &str,
            _: &str,
            _: &str,
        ) -> Result<SignalRoute, GatewayError> {
            Err(not_a_member())
        }
        async fn publish_ephemeral(&self, _: Ephemeral) {}
        async fn participant_timed_out(&self, _: &str, _: &str, _: &str) {}
        async fn channel_events(
            &self,
            _: &str,
            _: &str,
            _: u64,
            _: Option<u64>,
            _: u32,
        ) -> Result<Vec<ChannelEvent>, GatewayError> {
            Ok(Vec::new())
        }
        async fn last_seqs(
            &self,
            _: &[(String, String)],
        ) -> Result<Vec<(String, u64)>, GatewayError> {
            Ok(Vec::new())
        }
    }

    fn removal(channel: &str, user: &str) -> ChannelEvent {
        ChannelEvent {
            channel_id: channel.into(),
            seq: 9,
            body: EventBody::MemberRemoved {
                user_id: user.into(),
                by: "owner".into(),
            },
        }
    }

    #[test]
    fn a_channels_answers_move_from_a_list_to_a_map_and_keep_the_tenant_rule() {
        let mut answers = ChannelAnswers::new("t");
        let users: Vec<String> = (0..=FEW_ANSWERS).map(|i| format!("u{i}")).collect();
        for (i, u) in users.iter().enumerate() {
            let a = if i % 2 == 0 {
                Answer::Member
            } else {
                Answer::NotMember
            };
            answers.insert(u, a);
            assert_eq!(answers.len(), i + 1);
            assert_eq!(
                answers.many.is_some(),
                i + 1 > FEW_ANSWERS,
                "{} answers",
                i + 1
            );
        }
        for (i, u) in users.iter().enumerate() {
            let want = if i % 2 == 0 {
                Answer::Member
            } else {
                Answer::NotMember
            };
            assert_eq!(answers.get("t", u), Some(want), "{u}");
            assert_eq!(answers.get("other", u), None, "another tenant's {u}");
        }
        answers.insert("u1", Answer::Member);
        assert_eq!(
            answers.get("t", "u1"),
            Some(Answer::Member),
            "updated in place"
        );
        answers.remove("u0");
        assert_eq!(answers.get("t", "u0"), None);
        assert_eq!(answers.len(), FEW_ANSWERS);

        let mut small = ChannelAnswers::new("t");
        small.insert("a", Answer::Member);
        small.insert("a", Answer::NotMember);
        assert_eq!(
            (small.len(), small.get("t", "a")),
            (1, Some(Answer::NotMember))
        );
        small.remove("a");
        assert_eq!(small.get("t", "a"), None);
    }

    #[tokio::test]
    async fn another_tenants_answer_is_not_taken_for_this_tenants() {
        let (core, cache) = setup();
        cache.watch("ch");
        let alice = principal("t", "alice");
        let other = principal("t2", "alice");
        cache.member_check(&alice, "ch").await.expect("member");
        cache
            .member_check(&alice, "ch")
            .await
            .expect("member, cached");
        assert_eq!(
            core.checks.load(Ordering::SeqCst),
            1,
            "the second answer is cached"
        );
        cache
            .member_check(&other, "ch")
            .await
            .expect_err("another tenant's alice is not a member");
        assert_eq!(
            core.checks.load(Ordering::SeqCst),
            2,
            "asked the core, not the cache"
        );
    }

    fn setup() -> (Arc<Core>, MembershipCache) {
        let core = Arc::new(Core::default());
        let cache = MembershipCache::new(core.clone(), 2);
        (core, cache)
    }

    #[tokio::test]
    async fn answers_are_cached_only_for_watched_channels() {
        let (core, cache) = setup();
        let alice = principal("t", "alice");
        cache.member_check(&alice, "ch").await.expect("member");
        cache.member_check(&alice, "ch").await.expect("member");
        assert_eq!(
            core.checks.load(Ordering::SeqCst),
            2,
            "not watched: no caching"
        );
        cache.watch("ch");
        cache.member_check(&alice, "ch").await.expect("member");
        cache.member_check(&alice, "ch").await.expect("member");
        assert_eq!(
            core.checks.load(Ordering::SeqCst),
            3,
            "the second check was a hit"
        );
    }

    #[tokio::test]
    async fn a_removal_event_invalidates_before_the_next_check() {
        let (core, cache) = setup();
        let alice = principal("t", "alice");
        cache.watch("ch");
        cache.member_check(&alice, "ch").await.expect("member");
        assert_eq!(cache.cached(&alice, "ch"), Some(Answer::Member));
        cache.on_event(&removal("ch", "alice"));
        assert_eq!(cache.cached(&alice, "ch"), None);
        cache
            .member_check(&alice, "ch")
            .await
            .expect("asks the core again");
        assert_eq!(core.checks.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_known_non_member_is_refused_without_the_core() {
        let (core, cache) = setup();
        let bob = principal("t", "bob");
        cache.watch("ch");
        let e = cache
            .typing(&bob, "ch", TypingState::Start)
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NotAMember);
        let e = cache
            .typing(&bob, "ch", TypingState::Start)
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NotAMember);
        assert_eq!(
            core.checks.load(Ordering::SeqCst),
            1,
            "the second was refused at the edge"
        );
        // Added to the channel: the event clears the negative answer.
        cache.on_event(&ChannelEvent {
            channel_id: "ch".into(),
            seq: 3,
            body: EventBody::MemberAdded {
                member: Member {
                    user_id: "bob".into(),
                    role: Role::Member,
                    joined_at: "t".into(),
                    last_read_seq: 0,
                },
                by: "owner".into(),
            },
        });
        assert_eq!(cache.cached(&bob, "ch"), None);
    }

    #[tokio::test]
    async fn answers_do_not_cross_tenants_and_unwatch_or_clear_forgets() {
        let (_core, cache) = setup();
        let alice = principal("t", "alice");
        let other_alice = principal("u", "alice");
        cache.watch("ch");
        cache.member_check(&alice, "ch").await.expect("member");
        let e = cache.member_check(&other_alice, "ch").await.unwrap_err();
        assert_eq!(
            e.code,
            ErrorCode::NotAMember,
            "another tenant's alice is not a member"
        );
        cache.unwatch("ch");
        assert_eq!(cache.cached(&alice, "ch"), None);
        cache.watch("ch");
        cache.member_check(&alice, "ch").await.expect("member");
        cache.clear();
        assert_eq!(cache.cached(&alice, "ch"), None);
    }

    #[tokio::test]
    async fn an_answer_that_raced_an_invalidation_is_not_kept() {
        let (_core, cache) = setup();
        let alice = principal("t", "alice");
        cache.watch("ch");
        let epoch = cache.epoch();
        cache.on_event(&removal("ch", "alice")); // arrives while the core was answering
        cache.remember(epoch, &alice, "ch", Answer::Member);
        assert_eq!(cache.cached(&alice, "ch"), None);
    }

    #[tokio::test]
    async fn at_most_the_configured_channels_are_kept() {
        let (_core, cache) = setup();
        let alice = principal("t", "alice");
        for ch in ["a", "b", "c"] {
            cache.watch(ch);
            cache.member_check(&alice, ch).await.expect("member");
        }
        assert_eq!(
            cache.cached(&alice, "a"),
            None,
            "the least recently used went"
        );
        assert!(cache.cached(&alice, "b").is_some() && cache.cached(&alice, "c").is_some());
    }
}
