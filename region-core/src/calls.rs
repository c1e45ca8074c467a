//! Call rules: who may start, join, leave or end a call, what each returns, which events follow,
//! and whether a signal may pass between two participants. ICE servers and short-lived TURN
//! credentials (coturn's REST API scheme) are handed out on join.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, Mac};
use parley_proto::calls::{
    Call, CallMode, CallParticipant, IceServer, JoinedCall, LeaveReason, Peer,
};
use parley_proto::{ChannelEvent, NegotiationRole, Principal, Role, Side, impolite_side};

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
                mode: CallMode::P2p,
            })
            .await?;
        let created = event.is_some();
        self.publish_all(event).await;
        Ok((call, created))
    }

    /// A call of a channel the caller is a member of.
    pub async fn get_call(&self, p: &Principal, call_id: &str) -> CoreResult<Call> {
        validate::generated_id("call", "call_", call_id).map_err(CoreError::InvalidArgument)?;
        let call = self
            .storage()
            .call(&p.tenant_id, call_id)
            .await?
            .ok_or(CoreError::CallNotFound)?;
        self.require_member(p, &call.channel_id).await?;
        Ok(call)
    }

    /// The channel's calls, newest first.
    pub async fn channel_calls(&self, p: &Principal, channel_id: &str) -> CoreResult<Vec<Call>> {
        self.require_member(p, channel_id).await?;
        Ok(self
            .storage()
            .channel_calls(&p.tenant_id, channel_id, 50)
            .await?)
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
        Ok(())
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
