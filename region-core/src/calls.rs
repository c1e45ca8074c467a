//! Call rules: who may start, join, leave or end a call, what each returns, which events follow,
//! and whether a signal may pass between two participants. ICE servers and short-lived TURN
//! credentials (coturn's REST API scheme) are handed out on join.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, Mac};
use parley_proto::calls::{
    Call, CallMode, CallParticipant, IceServer, JoinedCall, LeaveReason, ModeChangeReason, Peer,
    SfuAccess, SfuClientRequest, SfuReply, SfuRequest,
};
use parley_proto::{
    ChannelEvent, EventBody, NegotiationRole, Principal, Role, ServerFrame, Side, SignalKind,
    impolite_side,
};

use crate::domain::{Core, CoreError, CoreResult, new_id};
use crate::storage::NewCall;
use crate::validate;

/// STUN/TURN configuration.
#[derive(Debug, Clone, Default)]
pub struct IceConfig {
    /// `stun:` URLs, given to every participant as they are.
    pub stun_urls: Vec<String>,
    /// `turn:`/`turns:` URLs; given with credentials when `turn_secret` is set.
    pub turn_urls: Vec<String>,
    /// Shared secret with the TURN server (coturn `static-auth-secret`).
    pub turn_secret: Option<String>,
    /// Lifetime of TURN credentials.
    pub turn_ttl: Duration,
}

impl IceConfig {
    /// The ICE servers for `user`, with TURN credentials valid for `turn_ttl` from `now`:
    /// username `expiry:user`, credential base64(HMAC-SHA1(secret, username)).
    pub fn servers_for(&self, user: &str, now: SystemTime) -> Vec<IceServer> {
        let mut out = Vec::new();
        if !self.stun_urls.is_empty() {
            out.push(IceServer {
                urls: self.stun_urls.clone(),
                username: None,
                credential: None,
            });
        }
        if let (false, Some(secret)) = (self.turn_urls.is_empty(), &self.turn_secret) {
            let expiry = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
                + self.turn_ttl.as_secs();
            let username = format!("{expiry}:{user}");
            out.push(IceServer {
                urls: self.turn_urls.clone(),
                credential: Some(turn_password(secret, &username)),
                username: Some(username),
            });
        }
        out
    }
}

/// coturn's REST API password: base64 of HMAC-SHA1 over the username, keyed by the secret.
pub fn turn_password(secret: &str, username: &str) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// What the edge needs to relay a signal: the target's user, and which side is impolite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalRoute {
    pub channel_id: String,
    pub target_user: String,
    /// `Side::A` is the sender, `Side::B` the target.
    pub impolite: Side,
}

/// A live SFU process, as the registry shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SfuNode {
    pub id: String,
    /// Participants it serves (the placement picks the lowest).
    pub load: u64,
}

/// How a core reaches SFU processes: the registry of live ones and their control requests
/// (in-process for `--role all`, over the bus for `--role sfu` processes).
#[async_trait::async_trait]
pub trait SfuDirectory: Send + Sync {
    /// The live SFU processes with their load.
    fn live(&self) -> Vec<SfuNode>;
    /// One request to one SFU process; `Err` when it cannot be reached.
    async fn request(&self, node: &str, req: SfuRequest) -> Result<SfuReply, String>;
    /// The live SFUs that claim the call, with the session of each claim (from their
    /// heartbeats): how a core learns placements other cores made.
    fn claims(&self, _tenant: &str, _call_id: &str) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// The session id of a call on an SFU node: the same on every core.
fn session_of(call_id: &str, node: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{call_id}\n{node}").as_bytes());
    format!("sfus_{}", hex::encode(&digest[..10]))
}

/// Highest-random-weight rank of `node` for the call: every core ranks the same way.
fn rank(call_id: &str, node: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(format!("rank\n{call_id}\n{node}").as_bytes()).into()
}

/// When calls go to the SFU, and the credentials the core issues for it.
#[derive(Debug, Clone)]
pub struct SfuSettings {
    /// Shared with the SFU processes (HMAC-SHA256 of the credentials).
    pub secret: Vec<u8>,
    /// Present participants at which a call escalates (0: never).
    pub threshold: usize,
    /// Every call starts on the SFU.
    pub always: bool,
    /// Lifetime of a participant's SFU credential.
    pub credential_ttl: Duration,
}

/// Where a call's media goes: one SFU process, under a session id that changes when the call
/// moves to another one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Placement {
    node: String,
    session: String,
    channel_id: String,
}

/// The core's SFU side: settings, the directory, and the placement of this core's SFU calls.
pub struct SfuPlane {
    settings: SfuSettings,
    directory: Arc<dyn SfuDirectory>,
    /// (tenant, call) -> placement.
    calls: Mutex<HashMap<(String, String), Placement>>,
}

impl SfuPlane {
    pub fn new(settings: SfuSettings, directory: Arc<dyn SfuDirectory>) -> SfuPlane {
        SfuPlane {
            settings,
            directory,
            calls: Mutex::default(),
        }
    }

    pub fn settings(&self) -> &SfuSettings {
        &self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Placement>> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The least-loaded live SFU (counting the calls this core placed on each); ties go to the
    /// highest rank for the call.
    fn pick(&self, call_id: &str) -> Option<String> {
        let placed: HashMap<String, u64> = self.lock().values().fold(HashMap::new(), |mut m, p| {
            *m.entry(p.node.clone()).or_default() += 1;
            m
        });
        self.directory
            .live()
            .into_iter()
            .min_by_key(|n| {
                let load = n.load + placed.get(&n.id).copied().unwrap_or(0);
                let r = rank(call_id, &n.id);
                (load, std::cmp::Reverse(r))
            })
            .map(|n| n.id)
    }

    /// Where a call whose SFU died goes: the live SFU of highest rank for the call, so that
    /// every core moves it to the same one without talking to each other.
    fn pick_failover(&self, call_id: &str) -> Option<String> {
        self.directory
            .live()
            .into_iter()
            .max_by_key(|n| rank(call_id, &n.id))
            .map(|n| n.id)
    }

    /// The claim to follow for the call: the one with the smallest session among live SFUs.
    fn claimed(&self, tenant: &str, call_id: &str) -> Option<(String, String)> {
        self.directory
            .claims(tenant, call_id)
            .into_iter()
            .min_by(|a, b| a.1.cmp(&b.1))
    }

    fn send_claim(&self, tenant: &str, call_id: &str, p: &Placement) {
        let directory = self.directory.clone();
        let (node, req) = (
            p.node.clone(),
            SfuRequest::Claim {
                tenant: tenant.to_owned(),
                call_id: call_id.to_owned(),
                session: p.session.clone(),
            },
        );
        tokio::spawn(async move {
            if let Err(e) = directory.request(&node, req).await {
                tracing::debug!(sfu = %node, error = %e, "claim not delivered");
            }
        });
    }

    fn placement(&self, tenant: &str, call_id: &str) -> Option<Placement> {
        self.lock()
            .get(&(tenant.to_owned(), call_id.to_owned()))
            .cloned()
    }

    /// Places the call if it is not placed yet. Returns the placement and whether it is new.
    fn place(&self, tenant: &str, call_id: &str, channel_id: &str) -> Option<(Placement, bool)> {
        if let Some(p) = self.placement(tenant, call_id) {
            return Some((p, false));
        }
        let key = (tenant.to_owned(), call_id.to_owned());
        // Placed by another core already: follow it.
        if let Some((node, session)) = self.claimed(tenant, call_id) {
            let p = Placement {
                node,
                session,
                channel_id: channel_id.to_owned(),
            };
            let mut calls = self.lock();
            return Some((calls.entry(key).or_insert(p).clone(), false));
        }
        let node = self.pick(call_id)?;
        let p = Placement {
            session: session_of(call_id, &node),
            node,
            channel_id: channel_id.to_owned(),
        };
        {
            let mut calls = self.lock();
            if let Some(p) = calls.get(&key) {
                return Some((p.clone(), false));
            }
            calls.insert(key, p.clone());
        }
        self.send_claim(tenant, call_id, &p);
        Some((p, true))
    }

    fn forget(&self, tenant: &str, call_id: &str) -> Option<Placement> {
        self.lock().remove(&(tenant.to_owned(), call_id.to_owned()))
    }

    /// A credential for `participant` of the call, with its expiry.
    fn credential(&self, tenant: &str, call_id: &str, participant: &str) -> (String, u64) {
        let expiry = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            + self.settings.credential_ttl.as_secs();
        let claims = parley_sfu::credential::Claims {
            tenant: tenant.to_owned(),
            call: call_id.to_owned(),
            participant: participant.to_owned(),
            expiry,
        };
        (
            parley_sfu::credential::issue(&self.settings.secret, &claims),
            expiry,
        )
    }

    /// Follows the registry: a call whose SFU is no longer live moves to the live SFU of
    /// highest rank (or the one another core already moved it to); a call that another core
    /// placed elsewhere under a smaller session follows that placement (two cores that
    /// escalated the same call at once agree within one heartbeat). Returns what moved.
    fn reconcile(&self) -> Vec<(String, String, Placement)> {
        let live: Vec<String> = self.directory.live().into_iter().map(|n| n.id).collect();
        let placed: Vec<((String, String), Placement)> = self
            .lock()
            .iter()
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        let mut moved = Vec::new();
        for ((tenant, call), current) in placed {
            let claim = self.claimed(&tenant, &call);
            let target = match claim {
                Some((node, session)) if session < current.session => Some((node, session, false)),
                _ if live.contains(&current.node) => None,
                Some((node, session)) if node != current.node => Some((node, session, false)),
                _ => self
                    .pick_failover(&call)
                    .map(|node| (node.clone(), session_of(&call, &node), true)),
            };
            let Some((node, session, claim_it)) = target else {
                continue;
            };
            if node == current.node && session == current.session {
                continue;
            }
            let p = Placement {
                node,
                session,
                channel_id: current.channel_id.clone(),
            };
            {
                let mut calls = self.lock();
                match calls.get_mut(&(tenant.clone(), call.clone())) {
                    Some(slot) if *slot == current => *slot = p.clone(),
                    _ => continue,
                }
            }
            if claim_it {
                self.send_claim(&tenant, &call, &p);
            }
            moved.push((tenant, call, p));
        }
        moved
    }
}

/// How a refusal of the SFU reaches the client: the code and a message that starts with the
/// SFU's reason.
fn sfu_refusal(code: &str) -> CoreError {
    match code {
        c if c.starts_with("credential_") => CoreError::Forbidden(format!(
            "{c}: the SFU credential was refused; join the call again for a fresh one"
        )),
        "bad_sdp" | "bad_candidate" => {
            CoreError::InvalidArgument(format!("{code}: the SFU could not use it"))
        }
        "room_full" | "server_full" => {
            CoreError::Conflict(format!("{code}: the SFU holds no more participants"))
        }
        "unknown_track" => CoreError::NotFoundIn(format!("{code}: no such track in this call")),
        "not_allowed" => {
            CoreError::Forbidden(format!("{code}: not your own track, nor another call's"))
        }
        "unknown_participant" | "credential_missing" => CoreError::Forbidden(
            "credential_missing: the first offer of an SFU connection carries the credential \
             from the join answer"
                .into(),
        ),
        _ => CoreError::Unavailable(format!("SFU refused: {code}")),
    }
}

/// Order key of a participant in a pair: the earlier joiner is impolite.
fn join_key(p: &CallParticipant) -> (&str, &str) {
    (p.joined_at.as_str(), p.participant_id.as_str())
}

impl Core {
    /// Starts a call in a channel or DM, or returns the active one (`false`).
    pub async fn start_call(&self, p: &Principal, channel_id: &str) -> CoreResult<(Call, bool)> {
        self.require_member(p, channel_id).await?;
        let (call, event) = self
            .storage()
            .start_call(NewCall {
                tenant_id: p.tenant_id.clone(),
                channel_id: channel_id.to_owned(),
                id: new_id("call_"),
                started_by: p.user_id.clone(),
                mode: if self.sfu().is_some_and(|s| s.settings.always) {
                    CallMode::Sfu
                } else {
                    CallMode::P2p
                },
            })
            .await?;
        let created = event.is_some();
        let mut call = call;
        self.overlay_sfu(&p.tenant_id, &mut call);
        let event = event.map(|mut e| {
            if let EventBody::CallStarted { call: c } = &mut e.body {
                *c = call.clone();
            }
            e
        });
        self.publish_all(event).await;
        Ok((call, created))
    }

    /// Shows the call's SFU state: its mode and session. A call stored in `sfu` mode (started
    /// with "always SFU") is placed here on first sight.
    fn overlay_sfu(&self, tenant: &str, call: &mut Call) {
        let Some(plane) = self.sfu() else { return };
        let placement = if call.ended_at.is_some() {
            plane.placement(tenant, &call.id)
        } else if call.mode == CallMode::Sfu {
            plane
                .place(tenant, &call.id, &call.channel_id)
                .map(|(p, _)| p)
        } else {
            plane.placement(tenant, &call.id).or_else(|| {
                // Escalated by another core: its claim is in the SFUs' heartbeats.
                plane.claimed(tenant, &call.id)?;
                plane
                    .place(tenant, &call.id, &call.channel_id)
                    .map(|(p, _)| p)
            })
        };
        if let Some(p) = placement {
            call.mode = CallMode::Sfu;
            call.sfu_session = Some(p.session);
        }
    }

    /// A call of a channel the caller is a member of.
    pub async fn get_call(&self, p: &Principal, call_id: &str) -> CoreResult<Call> {
        validate::generated_id("call", "call_", call_id).map_err(CoreError::InvalidArgument)?;
        let mut call = self
            .storage()
            .call(&p.tenant_id, call_id)
            .await?
            .ok_or(CoreError::CallNotFound)?;
        self.require_member(p, &call.channel_id).await?;
        self.overlay_sfu(&p.tenant_id, &mut call);
        Ok(call)
    }

    /// The channel's calls, newest first.
    pub async fn channel_calls(&self, p: &Principal, channel_id: &str) -> CoreResult<Vec<Call>> {
        self.require_member(p, channel_id).await?;
        let mut calls = self
            .storage()
            .channel_calls(&p.tenant_id, channel_id, 50)
            .await?;
        for call in &mut calls {
            self.overlay_sfu(&p.tenant_id, call);
        }
        Ok(calls)
    }

    /// Joins an active call. Returns the participant id, the others with the joiner's role
    /// towards each (polite: they were there first), and the ICE servers.
    pub async fn join_call(&self, p: &Principal, call_id: &str) -> CoreResult<JoinedCall> {
        let call = self.get_call(p, call_id).await?;
        if call.ended_at.is_some() {
            return Err(CoreError::Conflict("the call has ended".into()));
        }
        let (call, me, event) = self
            .storage()
            .join_call(
                &p.tenant_id,
                call_id,
                &new_id("part_"),
                &p.user_id,
                self.limits().max_call_participants,
            )
            .await
            .map_err(|e| match e {
                crate::storage::StorageError::NotFound => {
                    CoreError::Conflict("the call has ended".into())
                }
                crate::storage::StorageError::CallFull => {
                    CoreError::CallFull(self.limits().max_call_participants)
                }
                other => other.into(),
            })?;
        self.publish_all(event).await;
        let mut call = call;
        self.overlay_sfu(&p.tenant_id, &mut call);
        if let Some(plane) = self.sfu()
            && call.mode == CallMode::P2p
            && plane.settings.threshold > 0
            && call
                .participants
                .iter()
                .filter(|x| x.left_at.is_none())
                .count()
                >= plane.settings.threshold
            && let Some((placement, new)) = plane.place(&p.tenant_id, call_id, &call.channel_id)
        {
            call.mode = CallMode::Sfu;
            call.sfu_session = Some(placement.session.clone());
            if new {
                tracing::info!(call = %call_id, sfu = %placement.node, "call escalated to the SFU");
                // Durable: a core that restarts (or never heard of the placement) still shows
                // the call in `sfu` mode, and places it again on first sight.
                if let Err(e) = self
                    .storage()
                    .set_call_mode(&p.tenant_id, call_id, CallMode::Sfu)
                    .await
                {
                    tracing::warn!(call = %call_id, error = %e, "could not record the call's SFU mode");
                }
                self.announce_mode(
                    &call.channel_id,
                    call_id,
                    &placement,
                    ModeChangeReason::Threshold,
                )
                .await;
            }
        }
        let sfu = match (self.sfu(), &call.sfu_session) {
            (Some(plane), Some(session)) => {
                let (credential, expires_at) =
                    plane.credential(&p.tenant_id, call_id, &me.participant_id);
                Some(SfuAccess {
                    session: session.clone(),
                    credential,
                    expires_at,
                })
            }
            _ => None,
        };
        let peers = call
            .participants
            .iter()
            .filter(|o| o.left_at.is_none() && o.participant_id != me.participant_id)
            .map(|o| Peer {
                participant_id: o.participant_id.clone(),
                user_id: o.user_id.clone(),
                role: if impolite_side(join_key(&me), join_key(o)) == Side::A {
                    NegotiationRole::Impolite
                } else {
                    NegotiationRole::Polite
                },
            })
            .collect();
        Ok(JoinedCall {
            ice_servers: self.ice().servers_for(&p.user_id, SystemTime::now()),
            participant_id: me.participant_id,
            call,
            peers,
            sfu,
        })
    }

    /// Leaves a call (the caller's own participant). The call ends with its last participant.
    pub async fn leave_call(
        &self,
        p: &Principal,
        call_id: &str,
        participant_id: &str,
    ) -> CoreResult<()> {
        validate::generated_id("participant", "part_", participant_id)
            .map_err(CoreError::InvalidArgument)?;
        let call = self.get_call(p, call_id).await?;
        match call
            .participants
            .iter()
            .find(|x| x.participant_id == participant_id)
        {
            None => {
                return Err(CoreError::NotFoundIn(format!(
                    "{participant_id} is no participant of this call"
                )));
            }
            Some(x) if x.user_id != p.user_id => {
                return Err(CoreError::InvalidArgument(format!(
                    "{participant_id} is not your participant in this call"
                )));
            }
            Some(_) => {}
        }
        self.leave_participant(&p.tenant_id, call_id, participant_id, LeaveReason::Left)
            .await
    }

    /// A participant leaves for `reason` (also used by the edge when a reconnect times out).
    pub async fn leave_participant(
        &self,
        tenant: &str,
        call_id: &str,
        participant_id: &str,
        reason: LeaveReason,
    ) -> CoreResult<()> {
        let events = self
            .storage()
            .leave_call(tenant, call_id, participant_id, reason)
            .await?;
        self.publish_many(&events).await;
        self.sfu_after_leave(tenant, call_id, Some(participant_id), &events)
            .await;
        Ok(())
    }

    /// Tells the call's SFU that a participant left, or that the call ended.
    async fn sfu_after_leave(
        &self,
        tenant: &str,
        call_id: &str,
        participant_id: Option<&str>,
        events: &[ChannelEvent],
    ) {
        let Some(plane) = self.sfu() else { return };
        let ended = events
            .iter()
            .any(|e| matches!(e.body, EventBody::CallEnded { .. }));
        let placement = if ended {
            plane.forget(tenant, call_id)
        } else {
            plane.placement(tenant, call_id)
        };
        let Some(placement) = placement else { return };
        let req = match (ended, participant_id) {
            (false, Some(pid)) => SfuRequest::Leave {
                tenant: tenant.to_owned(),
                call_id: call_id.to_owned(),
                participant_id: pid.to_owned(),
            },
            _ => SfuRequest::EndCall {
                tenant: tenant.to_owned(),
                call_id: call_id.to_owned(),
            },
        };
        if let Err(e) = plane.directory.request(&placement.node, req).await {
            tracing::debug!(call = %call_id, error = %e, "SFU not told of a leave");
        }
    }

    async fn announce_mode(
        &self,
        channel_id: &str,
        call_id: &str,
        placement: &Placement,
        reason: ModeChangeReason,
    ) {
        let frame = ServerFrame::CallModeChanged {
            call_id: call_id.to_owned(),
            mode: CallMode::Sfu,
            sfu_session: Some(placement.session.clone()),
            reason,
        };
        self.realtime().to_channel(channel_id, None, &frame).await;
    }

    /// A participant's request to its call's SFU (docs/calls.md): the offer's answer SDP, or
    /// nothing.
    pub async fn sfu_request(
        &self,
        p: &Principal,
        call_id: &str,
        participant_id: &str,
        req: SfuClientRequest,
    ) -> CoreResult<Option<String>> {
        let call = self.get_call(p, call_id).await?;
        if call.ended_at.is_some() {
            return Err(CoreError::Conflict("the call has ended".into()));
        }
        let present = call.participants.iter().any(|x| {
            x.participant_id == participant_id && x.user_id == p.user_id && x.left_at.is_none()
        });
        if !present {
            return Err(CoreError::Forbidden(format!(
                "{participant_id} is not your present participant in this call"
            )));
        }
        let (Some(plane), Some(placement)) = (
            self.sfu(),
            self.sfu().and_then(|s| s.placement(&p.tenant_id, call_id)),
        ) else {
            return Err(CoreError::Conflict(
                "not_sfu: the call is in p2p mode; signal the other participants".into(),
            ));
        };
        let (tenant, call_id, participant_id) = (
            p.tenant_id.clone(),
            call_id.to_owned(),
            participant_id.to_owned(),
        );
        let request = match req {
            SfuClientRequest::Signal(signal) => match signal.kind {
                SignalKind::Offer => SfuRequest::Offer {
                    tenant,
                    call_id,
                    channel_id: call.channel_id.clone(),
                    participant_id,
                    user_id: p.user_id.clone(),
                    sdp: signal.sdp.ok_or_else(|| {
                        CoreError::InvalidArgument("an offer needs its sdp".into())
                    })?,
                    credential: signal.credential,
                },
                SignalKind::Candidate => SfuRequest::Candidate {
                    tenant,
                    call_id,
                    participant_id,
                    candidate: signal.candidate.ok_or_else(|| {
                        CoreError::InvalidArgument("a candidate signal needs its candidate".into())
                    })?,
                },
                _ => return Ok(None),
            },
            SfuClientRequest::Subscription {
                op,
                track_id,
                paused,
                max_size,
            } => SfuRequest::Subscription {
                tenant,
                call_id,
                participant_id,
                op,
                track_id,
                paused,
                max_size,
            },
        };
        match plane.directory.request(&placement.node, request).await {
            Ok(SfuReply::Answer { sdp }) => Ok(Some(sdp)),
            Ok(SfuReply::Done) => Ok(None),
            Ok(SfuReply::Refused { code }) => Err(sfu_refusal(&code)),
            Err(e) => Err(CoreError::Unavailable(format!("SFU unreachable: {e}"))),
        }
    }

    /// Moves the calls of SFU processes that stopped announcing themselves to live ones and
    /// tells their channels (`call.mode_changed`, reason `sfu_failover`). Runs until the
    /// process ends; checks every `every`.
    pub async fn run_sfu_failover(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(plane) = self.sfu() else { return };
            for (_tenant, call_id, placement) in plane.reconcile() {
                tracing::warn!(call = %call_id, sfu = %placement.node, "call moved to another SFU");
                self.announce_mode(
                    &placement.channel_id,
                    &call_id,
                    &placement,
                    ModeChangeReason::SfuFailover,
                )
                .await;
            }
        }
    }

    /// Ends a call: owners and moderators of the channel (either party in a DM).
    pub async fn end_call(&self, p: &Principal, call_id: &str) -> CoreResult<()> {
        let call = self.get_call(p, call_id).await?;
        let role = self.require_member(p, &call.channel_id).await?;
        let channel = self
            .storage()
            .channel(&p.tenant_id, &call.channel_id)
            .await?
            .ok_or(CoreError::NotFound)?;
        if channel.kind == parley_proto::ChannelKind::Channel && role < Role::Moderator {
            return Err(CoreError::Forbidden(
                "ending a call needs the moderator role or higher".into(),
            ));
        }
        let events = self
            .storage()
            .end_call(&p.tenant_id, call_id, &p.user_id)
            .await?;
        self.publish_many(&events).await;
        self.sfu_after_leave(&p.tenant_id, call_id, None, &events)
            .await;
        Ok(())
    }

    /// Drops a user removed from a channel from the channel's active call.
    pub async fn drop_from_calls(
        &self,
        tenant: &str,
        channel_id: &str,
        user_id: &str,
    ) -> CoreResult<()> {
        let calls = self.storage().channel_calls(tenant, channel_id, 1).await?;
        for call in calls.into_iter().filter(|c| c.ended_at.is_none()) {
            for part in call
                .participants
                .iter()
                .filter(|x| x.user_id == user_id && x.left_at.is_none())
            {
                self.leave_participant(
                    tenant,
                    &call.id,
                    &part.participant_id,
                    LeaveReason::Removed,
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Checks that `participant_id` is the caller's present participant of an active call, so
    /// a connection may carry its signals; returns the call's channel.
    pub async fn attach_check(
        &self,
        p: &Principal,
        call_id: &str,
        participant_id: &str,
    ) -> CoreResult<String> {
        let call = self.get_call(p, call_id).await?;
        let present = call.participants.iter().any(|x| {
            x.participant_id == participant_id && x.user_id == p.user_id && x.left_at.is_none()
        });
        if call.ended_at.is_some() || !present {
            return Err(CoreError::Conflict(format!(
                "{participant_id} is not your present participant in this active call; join it first"
            )));
        }
        Ok(call.channel_id)
    }

    /// Checks that `p` is a member of the call's channel and present as `from`, and that `to`
    /// is another present participant of the same call.
    pub async fn check_signal(
        &self,
        p: &Principal,
        call_id: &str,
        from: &str,
        to: &str,
    ) -> CoreResult<SignalRoute> {
        let call = self.get_call(p, call_id).await?;
        if call.ended_at.is_some() {
            return Err(CoreError::Conflict("the call has ended".into()));
        }
        let present = |id: &str| {
            call.participants
                .iter()
                .find(|x| x.participant_id == id && x.left_at.is_none())
        };
        let sender = present(from)
            .filter(|x| x.user_id == p.user_id)
            .ok_or_else(|| {
                CoreError::Forbidden(format!("{from} is not your participant in this call"))
            })?;
        let target = present(to).ok_or_else(|| {
            CoreError::Conflict(format!("{to} is not a participant of this call"))
        })?;
        if sender.participant_id == target.participant_id {
            return Err(CoreError::InvalidArgument(
                "a participant cannot signal itself".into(),
            ));
        }
        Ok(SignalRoute {
            channel_id: call.channel_id.clone(),
            target_user: target.user_id.clone(),
            impolite: impolite_side(join_key(sender), join_key(target)),
        })
    }

    async fn publish_all(&self, event: Option<ChannelEvent>) {
        if let Some(e) = event {
            self.publish_event(&e).await;
        }
    }

    async fn publish_many(&self, events: &[ChannelEvent]) {
        for e in events {
            self.publish_event(e).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turn_credentials_follow_the_coturn_rest_scheme() {
        // HMAC-SHA1("secret", "1700000000:alice"), base64 — computed independently with openssl:
        // printf '1700000000:alice' | openssl dgst -sha1 -hmac secret -binary | base64
        let cfg = IceConfig {
            stun_urls: vec!["stun:127.0.0.1:3478".into()],
            turn_urls: vec!["turn:127.0.0.1:3478".into()],
            turn_secret: Some("secret".into()),
            turn_ttl: Duration::from_secs(600),
        };
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000 - 600);
        let servers = cfg.servers_for("alice", now);
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[1].username.as_deref(), Some("1700000000:alice"));
        assert_eq!(servers[1].credential.as_deref(), Some(OPENSSL_REFERENCE));
    }

    #[test]
    fn without_a_secret_no_turn_server_is_given() {
        let cfg = IceConfig {
            turn_urls: vec!["turn:x".into()],
            ..IceConfig::default()
        };
        assert!(cfg.servers_for("alice", SystemTime::now()).is_empty());
    }

    const OPENSSL_REFERENCE: &str = "d8soP47RbdIKLDUOpnJPVQyq5Ts=";
}
