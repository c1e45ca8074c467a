//! Handlers of the `/v1` REST routes. Each one validates ids, calls the domain, and maps the
//! result; none holds logic of its own.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use parley_proto::{
    AddMember, Channel, ChannelList, CreateChannel, DevToken, DevTokenRequest, EditMessage,
    ErrorBody, EventPage, MarkRead, Member, MemberList, Message, MessagePage, PatchChannel,
    Presence, PresenceList, PresenceQuery, ReadState, SendMessage, SendResult, TypingRequest,
    UpdateMember,
};

use super::{ApiError, ApiJson, ApiQuery, ApiState, Authed};
use crate::domain::{ChannelsQuery, EventsQuery, HistoryQuery};
use crate::validate;
use parley_proto::calls::{Call, CallList, JoinedCall, LeaveCall};

pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/channels", post(create_channel).get(list_channels))
        .route(
            "/v1/channels/{channel_id}",
            get(get_channel).patch(patch_channel).delete(delete_channel),
        )
        .route(
            "/v1/channels/{channel_id}/members",
            post(add_member).get(list_members),
        )
        .route(
            "/v1/channels/{channel_id}/members/{user_id}",
            axum::routing::delete(remove_member).patch(update_member),
        )
        .route(
            "/v1/channels/{channel_id}/messages",
            post(send_message).get(history),
        )
        .route("/v1/channels/{channel_id}/events", get(events))
        .route(
            "/v1/channels/{channel_id}/messages/{message_id}",
            axum::routing::patch(edit_message).delete(delete_message),
        )
        .route(
            "/v1/channels/{channel_id}/read",
            axum::routing::put(mark_read).get(read_state),
        )
        .route("/v1/channels/{channel_id}/typing", post(typing))
        .route("/v1/users/{user_id}/presence", get(user_presence))
        .route("/v1/presence/query", post(presence_query))
        .route(
            "/v1/channels/{channel_id}/calls",
            post(start_call).get(channel_calls),
        )
        .route("/v1/calls/{call_id}", get(get_call))
        .route("/v1/calls/{call_id}/join", post(join_call))
        .route("/v1/calls/{call_id}/leave", post(leave_call))
        .route("/v1/calls/{call_id}/end", post(end_call))
        .route("/v1/dev/token", post(dev_token))
}

fn channel_id(id: &str) -> Result<(), ApiError> {
    validate::channel_id(id).map_err(|m| ApiError::new(parley_proto::ErrorCode::InvalidArgument, m))
}

fn message_id(id: &str) -> Result<(), ApiError> {
    validate::message_id(id).map_err(|m| ApiError::new(parley_proto::ErrorCode::InvalidArgument, m))
}

/// Create a channel or a DM. A DM between the same two users is created once: the second call
/// returns it with 200 instead of 201.
#[utoipa::path(post, path = "/v1/channels", tag = "channels", request_body = CreateChannel,
    responses((status = 201, body = Channel, description = "created"), (status = 200, body = Channel, description = "the existing DM"),
        (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn create_channel(
    State(s): State<ApiState>,
    Authed(p): Authed,
    ApiJson(req): ApiJson<CreateChannel>,
) -> Result<Response, ApiError> {
    let (channel, created) = s.core.create_channel(&p, req).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(channel)).into_response())
}

/// A page of the caller's channels, newest first (by channel id, descending), each with its
/// `last_seq`, the caller's role, read position and unread count. `limit` 1–200 (default 100);
/// `next_cursor` is `null` on the last page, else pass it as `cursor` for the next one. A cursor
/// this server did not hand out is 400 `invalid_argument`.
#[utoipa::path(get, path = "/v1/channels", tag = "channels", params(ChannelsQuery),
    responses((status = 200, body = ChannelList), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn list_channels(
    State(s): State<ApiState>,
    Authed(p): Authed,
    ApiQuery(q): ApiQuery<ChannelsQuery>,
) -> Result<axum::Json<ChannelList>, ApiError> {
    Ok(axum::Json(s.core.list_channels(&p, q).await?))
}

#[utoipa::path(get, path = "/v1/channels/{channel_id}", tag = "channels", params(("channel_id" = String, Path, pattern = r"^ch_[0-9A-Za-z]{26}$")),
    responses((status = 200, body = Channel), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn get_channel(
    State(s): State<ApiState>,
    Authed(p): Authed,
    Path(id): Path<String>,
) -> Result<axum::Json<Channel>, ApiError> {
    channel_id(&id)?;
    Ok(axum::Json(s.core.get_channel(&p, &id).await?))
}

/// Rename a channel (owners and moderators). Emits `channel.updated`.
#[utoipa::path(patch, path = "/v1/channels/{channel_id}", tag = "channels", params(("channel_id" = String, Path, pattern = r"^ch_[0-9A-Za-z]{26}$")), request_body = PatchChannel,
    responses((status = 200, body = Channel), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn patch_channel(
    State(s): State<ApiState>,
    Authed(p): Authed,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<PatchChannel>,
) -> Result<axum::Json<Channel>, ApiError> {
    channel_id(&id)?;
    Ok(axum::Json(s.core.rename_channel(&p, &id, req).await?))
}

/// Delete a channel (owners; either party of a DM) with its history.
#[utoipa::path(delete, path = "/v1/channels/{channel_id}", tag = "channels", params(("channel_id" = String, Path, pattern = r"^ch_[0-9A-Za-z]{26}$")),
    responses((status = 204), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn delete_channel(
    State(s): State<ApiState>,
    Authed(p): Authed,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    channel_id(&id)?;
    s.core.delete_channel(&p, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/channels/{channel_id}/members", tag = "members", params(("channel_id" = String, Path, pattern = r"^ch_[0-9A-Za-z]{26}$")),
    responses((status = 200, body = MemberList), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn list_members(
    State(s): State<ApiState>,
    Authed(p): Authed,
    Path(id): Path<String>,
) -> Result<axum::Json<MemberList>, ApiError> {
    channel_id(&id)?;
    Ok(axum::Json(MemberList {
        members: s.core.list_members(&p, &id).await?,
    }))
}

/// Add a member (owners and moderators; only owners add moderators or owners). Emits `member.added`.
#[utoipa::path(post, path = "/v1/channels/{channel_id}/members", tag = "members", params(("channel_id" = String, Path, pattern = r"^ch_[0-9A-Za-z]{26}$")), request_body = AddMember,
    responses((status = 201, body = Member, description = "added"), (status = 200, body = Member, description = "already a member"),
        (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn add_member(
    State(s): State<ApiState>,
    Authed(p): Authed,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<AddMember>,
) -> Result<Response, ApiError> {
    channel_id(&id)?;
    let (member, added) = s.core.add_member(&p, &id, req).await?;
    let status = if added {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(member)).into_response())
}

/// Remove a member, or leave when `user_id` is yourself. Emits `member.removed`; the removed user
/// receives nothing more from the channel from that event on.
#[utoipa::path(delete, path = "/v1/channels/{channel_id}/members/{user_id}", tag = "members",
    params(("channel_id" = String, Path, pattern = r"^ch_[0-9A-Za-z]{26}$"), ("user_id" = String, Path, min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9_.:@|-]{1,128}$")),
    responses((status = 204), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn remove_member(
    State(s): State<ApiState>,
    Authed(p): Authed,
    Path((id, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    channel_id(&id)?;
    s.core.remove_member(&p, &id, &user).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Change a member's role. Only an owner changes another member's role; anyone may lower their
/// own role, never raise it. The channel's only owner cannot be demoted (409 `conflict`); the
/// roles of a DM are fixed (409 `conflict`). Emits `member.updated` when the role changed; setting
/// the role the member already has changes nothing. Answers the member as they now are.
#[utoipa::path(patch, path = "/v1/channels/{channel_id}/members/{user_id}", tag = "members",
    params(("channel_id" = String, Path, pattern = r"^ch_[0-9A-Za-z]{26}$"), ("user_id" = String, Path, min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9_.:@|-]{1,128}$")),
    request_body = UpdateMember,
    responses((status = 200, body = Member), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn update_member(
    State(s): State<ApiState>,
    Authed(p): Authed,
    Path((id, user)): Path<(String, String)>,
    ApiJson(req): ApiJson<UpdateMember>,
) -> Result<axum::Json<Member>, ApiError> {
    channel_id(&id)?;
    let (member, _) = s.core.update_member_role(&p, &id, &user, req).await?;
    Ok(axum::Json(member))
}

/// Send a message. Idempotent on `client_msg_id`: a retry returns the original message (200,
/// `created: false`); the same key with another body is 409 `idempotency_conflict`. The response
/// is sent only after the commit is durable.
#[utoipa::path(post, path = "/v1/channels/{channel_id}/messages", tag = "messages", params(("channel_id" = String, Path, pattern = r"^ch_[0-9A-Za-z]{26}$")), request_body = SendMessage,
    responses((status = 201, body = SendResult, description = "created"), (status = 200, body = SendResult, description = "idempotent retry"),
        (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn send_message(
    State(s): State<ApiState>,
    Authed(p): Authed,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<SendMessage>,
) -> Result<Response, ApiError> {
    channel_id(&id)?;
    let result = s.core.send_message(&p, &id, req).await?;
    let status = if result.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(result)).into_response())
}

/// A page of history, keyset-paginated on seq: `before`, `after` or `around` (at most one), and
/// `limit` 1–200 (default 50). Messages come ascending by seq; deleted ones as tombstones.
#[utoipa::path(get, path = "/v1/channels/{channel_id}/messages", tag = "messages", params(("channel_id" = String, Path, pattern = r"^ch_[0-9A-Za-z]{26}$"), HistoryQuery),
    responses((status = 200, body = MessagePage), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn history(
    State(s): State<ApiState>,
    Authed(p): Authed,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> Result<axum::Json<MessagePage>, ApiError> {
    channel_id(&id)?;
    Ok(axum::Json(s.core.history(&p, &id, q).await?))
}

/// The channel's persisted events after `after` (default 0), ascending by seq, `limit` 1–200
/// (default 100): messages, edits, deletions, membership changes and renames, each as its
/// WebSocket event frame. For filling a gap in what a client received live.
#[utoipa::path(get, path = "/v1/channels/{channel_id}/events", tag = "messages", params(("channel_id" = String, Path, pattern = r"^ch_[0-9A-Za-z]{26}$"), EventsQuery),
    responses((status = 200, body = EventPage), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn events(
    State(s): State<ApiState>,
    Authed(p): Authed,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<axum::Json<EventPage>, ApiError> {
    channel_id(&id)?;
    Ok(axum::Json(s.core.events(&p, &id, q).await?))
}

/// Edit your own message. Emits `message.updated` with a seq of its own.
#[utoipa::path(patch, path = "/v1/channels/{channel_id}/messages/{message_id}", tag = "messages",
    params(("channel_id" = String, Path, pattern = r"^ch_[0-9A-Za-z]{26}$"), ("message_id" = String, Path, pattern = r"^msg_[0-9A-Za-z]{26}$")), request_body = EditMessage,
    responses((status = 200, body = Message), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn edit_message(
    State(s): State<ApiState>,
    Authed(p): Authed,
    Path((id, msg)): Path<(String, String)>,
    ApiJson(req): ApiJson<EditMessage>,
) -> Result<axum::Json<Message>, ApiError> {
    channel_id(&id)?;
    message_id(&msg)?;
    Ok(axum::Json(s.core.edit_message(&p, &id, &msg, req).await?))
}

/// Delete a message (yours; any, for owners and moderators). Leaves a tombstone and emits
/// `message.deleted`.
#[utoipa::path(delete, path = "/v1/channels/{channel_id}/messages/{message_id}", tag = "messages",
    params(("channel_id" = String, Path, pattern = r"^ch_[0-9A-Za-z]{26}$"), ("message_id" = String, Path, pattern = r"^msg_[0-9A-Za-z]{26}$")),
    responses((status = 200, body = Message, description = "the tombstone"), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn delete_message(
    State(s): State<ApiState>,
    Authed(p): Authed,
    Path((id, msg)): Path<(String, String)>,
) -> Result<axum::Json<Message>, ApiError> {
    channel_id(&id)?;
    message_id(&msg)?;
    Ok(axum::Json(s.core.delete_message(&p, &id, &msg).await?))
}

/// Mark the channel read up to `seq`. The position only moves forward (an older seq returns the
/// current state unchanged) and is clamped to the channel's last seq. Emits `read.updated` to the
/// channel and `unread.updated` to the caller's connections.
#[utoipa::path(put, path = "/v1/channels/{channel_id}/read", tag = "read state", params(("channel_id" = String, Path, pattern = r"^ch_[0-9A-Za-z]{26}$")), request_body = MarkRead,
    responses((status = 200, body = ReadState), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn mark_read(
    State(s): State<ApiState>,
    Authed(p): Authed,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<MarkRead>,
) -> Result<axum::Json<ReadState>, ApiError> {
    channel_id(&id)?;
    Ok(axum::Json(
        s.core.mark_read(&p, &id, req.seq).await?.public(),
    ))
}

/// The caller's read position and unread count in a channel.
#[utoipa::path(get, path = "/v1/channels/{channel_id}/read", tag = "read state", params(("channel_id" = String, Path, pattern = r"^ch_[0-9A-Za-z]{26}$")),
    responses((status = 200, body = ReadState), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn read_state(
    State(s): State<ApiState>,
    Authed(p): Authed,
    Path(id): Path<String>,
) -> Result<axum::Json<ReadState>, ApiError> {
    channel_id(&id)?;
    Ok(axum::Json(s.core.read_state(&p, &id).await?.public()))
}

/// Typing started or stopped (the WebSocket `typing.start`/`typing.stop` over REST). Throttled
/// per user and channel; the indicator expires on its own.
#[utoipa::path(post, path = "/v1/channels/{channel_id}/typing", tag = "presence", params(("channel_id" = String, Path, pattern = r"^ch_[0-9A-Za-z]{26}$")), request_body = TypingRequest,
    responses((status = 204), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn typing(
    State(s): State<ApiState>,
    Authed(p): Authed,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<TypingRequest>,
) -> Result<StatusCode, ApiError> {
    channel_id(&id)?;
    s.core.typing(&p, &id, req.state).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A user's presence. Only users who share a channel with the caller are visible; others are
/// `not_found`, like users who do not exist.
#[utoipa::path(get, path = "/v1/users/{user_id}/presence", tag = "presence", params(("user_id" = String, Path, min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9_.:@|-]{1,128}$")),
    responses((status = 200, body = Presence), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn user_presence(
    State(s): State<ApiState>,
    Authed(p): Authed,
    Path(user): Path<String>,
) -> Result<axum::Json<Presence>, ApiError> {
    Ok(axum::Json(s.core.presence(&p, &user).await?))
}

/// Presence of up to 200 users at once. Users who share no channel with the caller are left out
/// of the answer.
#[utoipa::path(post, path = "/v1/presence/query", tag = "presence", request_body = PresenceQuery,
    responses((status = 200, body = PresenceList), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn presence_query(
    State(s): State<ApiState>,
    Authed(p): Authed,
    ApiJson(req): ApiJson<PresenceQuery>,
) -> Result<axum::Json<PresenceList>, ApiError> {
    Ok(axum::Json(PresenceList {
        presence: s.core.presence_many(&p, &req.user_ids).await?,
    }))
}

/// Start a call in a channel or DM (members only). One active call per channel: a second start
/// returns the active call with 200. Emits `call.started`.
#[utoipa::path(post, path = "/v1/channels/{channel_id}/calls", tag = "calls", params(("channel_id" = String, Path, pattern = r"^ch_[0-9A-Za-z]{26}$")),
    responses((status = 201, body = Call, description = "started"), (status = 200, body = Call, description = "the active call"),
        (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn start_call(
    State(s): State<ApiState>,
    Authed(p): Authed,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    channel_id(&id)?;
    let (call, created) = s.core.start_call(&p, &id).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(call)).into_response())
}

/// The channel's calls, newest first (its call history).
#[utoipa::path(get, path = "/v1/channels/{channel_id}/calls", tag = "calls", params(("channel_id" = String, Path, pattern = r"^ch_[0-9A-Za-z]{26}$")),
    responses((status = 200, body = CallList), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn channel_calls(
    State(s): State<ApiState>,
    Authed(p): Authed,
    Path(id): Path<String>,
) -> Result<axum::Json<CallList>, ApiError> {
    channel_id(&id)?;
    Ok(axum::Json(CallList {
        calls: s.core.channel_calls(&p, &id).await?,
    }))
}

#[utoipa::path(get, path = "/v1/calls/{call_id}", tag = "calls", params(("call_id" = String, Path, pattern = r"^call_[0-9A-Za-z]{26}$")),
    responses((status = 200, body = Call), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn get_call(
    State(s): State<ApiState>,
    Authed(p): Authed,
    Path(id): Path<String>,
) -> Result<axum::Json<Call>, ApiError> {
    Ok(axum::Json(s.core.get_call(&p, &id).await?))
}

/// Join an active call: returns your participant id, the participants already there with your
/// negotiation role towards each (you are polite towards earlier joiners), and the ICE servers.
/// Emits `call.participant_joined`. Then attach your WebSocket with `call.attach`.
#[utoipa::path(post, path = "/v1/calls/{call_id}/join", tag = "calls", params(("call_id" = String, Path, pattern = r"^call_[0-9A-Za-z]{26}$")),
    responses((status = 200, body = JoinedCall), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn join_call(
    State(s): State<ApiState>,
    Authed(p): Authed,
    Path(id): Path<String>,
) -> Result<axum::Json<JoinedCall>, ApiError> {
    Ok(axum::Json(s.core.join_call(&p, &id).await?))
}

/// Leave a call. The call ends when its last participant leaves. Emits `call.participant_left`
/// (and `call.ended`).
#[utoipa::path(post, path = "/v1/calls/{call_id}/leave", tag = "calls", params(("call_id" = String, Path, pattern = r"^call_[0-9A-Za-z]{26}$")), request_body = LeaveCall,
    responses((status = 204), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn leave_call(
    State(s): State<ApiState>,
    Authed(p): Authed,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<LeaveCall>,
) -> Result<StatusCode, ApiError> {
    s.core.leave_call(&p, &id, &req.participant_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// End a call for everyone (owners and moderators; either party of a DM). Emits
/// `call.participant_left` for each participant, then `call.ended`.
#[utoipa::path(post, path = "/v1/calls/{call_id}/end", tag = "calls", params(("call_id" = String, Path, pattern = r"^call_[0-9A-Za-z]{26}$")),
    responses((status = 204), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn end_call(
    State(s): State<ApiState>,
    Authed(p): Authed,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.core.end_call(&p, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Development mode only (the server runs with its generated development key): a token for any
/// user, so the web client and scripts can sign in without an identity provider. Absent (404)
/// when JWT keys are configured.
#[utoipa::path(post, path = "/v1/dev/token", tag = "development", request_body = DevTokenRequest,
    responses((status = 200, body = DevToken), (status = "4XX", body = ErrorBody)))]
pub(super) async fn dev_token(
    State(s): State<ApiState>,
    ApiJson(req): ApiJson<DevTokenRequest>,
) -> Result<axum::Json<DevToken>, ApiError> {
    let Some(dev) = &s.dev_tokens else {
        return Err(super::route_not_found().await);
    };
    let invalid = |m: String| ApiError::new(parley_proto::ErrorCode::InvalidArgument, m);
    validate::user_id(&req.user_id).map_err(invalid)?;
    let tenant = req.tenant_id.unwrap_or_else(|| "default".to_owned());
    validate::user_id(&tenant).map_err(|m| invalid(format!("tenant: {m}")))?;
    // Never longer than the server accepts (--max-token-lifetime).
    let max_ttl = dev.max_ttl_secs.max(60);
    let ttl = req.ttl_secs.unwrap_or(86_400.min(max_ttl));
    if !(60..=max_ttl).contains(&ttl) {
        return Err(invalid(format!(
            "ttl_secs {ttl} is out of range; use 60-{max_ttl} (the server's maximum token lifetime)"
        )));
    }
    let token = dev.key.sign(
        &req.user_id,
        &tenant,
        Vec::new(),
        ttl,
        &dev.issuer,
        &dev.audience,
    );
    let expires_ms =
        crate::storage::now_ms().saturating_add(i64::try_from(ttl * 1000).unwrap_or(0));
    Ok(axum::Json(DevToken {
        token,
        user_id: req.user_id,
        tenant_id: tenant,
        expires_at: crate::storage::rfc3339(expires_ms),
    }))
}
