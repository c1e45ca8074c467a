//! The OpenAPI 3.1 document of API v1, generated from the handlers' annotations and the wire
//! types, served at `/v1/openapi.json`.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::routes;

#[derive(OpenApi)]
#[openapi(
    info(title = "Parley API", version = "v1", description = "Chat channels, DMs, members and messages. Real-time events travel over the WebSocket at /v1/ws (subprotocol parley.v1), described in docs/protocol.md."),
    paths(
        routes::create_channel, routes::list_channels, routes::get_channel, routes::patch_channel, routes::delete_channel,
        routes::list_members, routes::add_member, routes::update_member, routes::remove_member,
        routes::send_message, routes::history, routes::events, routes::edit_message, routes::delete_message,
        routes::mark_read, routes::read_state, routes::typing, routes::user_presence, routes::presence_query,
        routes::start_call, routes::channel_calls, routes::get_call, routes::join_call, routes::leave_call, routes::end_call, routes::dev_token,
    ),
    components(schemas(parley_proto::ErrorCode, parley_proto::ChannelEvent, parley_proto::EventBody, parley_proto::ServerFrame, parley_proto::SessionLimits)),
    modifiers(&BearerAuth),
    tags((name = "channels"), (name = "members"), (name = "messages"), (name = "read state"), (name = "presence"), (name = "calls"), (name = "development")),
)]
pub struct ApiDoc;

/// The document as this server serves it: [`ApiDoc`] with the limits of its configuration filled
/// in: the longest message text (`--max-text-chars`) and the longest development token
/// (`--max-token-lifetime`, at least 60 s; `POST /v1/dev/token` refuses a longer `ttl_secs`).
pub fn served_document(
    limits: &crate::DomainLimits,
    max_token_lifetime_secs: u64,
) -> utoipa::openapi::OpenApi {
    use utoipa::openapi::RefOr;
    use utoipa::openapi::schema::Schema;
    let mut doc = ApiDoc::openapi();
    if let Some(components) = doc.components.as_mut() {
        for body in ["SendMessage", "EditMessage"] {
            if let Some(RefOr::T(Schema::Object(object))) = components.schemas.get_mut(body)
                && let Some(RefOr::T(Schema::Object(text))) = object.properties.get_mut("text")
            {
                text.max_length = Some(limits.max_text_chars);
            }
        }
        if let Some(RefOr::T(Schema::Object(object))) =
            components.schemas.get_mut("DevTokenRequest")
            && let Some(RefOr::T(Schema::Object(ttl))) = object.properties.get_mut("ttl_secs")
        {
            ttl.maximum = Some(max_token_lifetime_secs.max(60).into());
        }
    }
    doc
}

/// The HTTP methods of the API, for CORS (`Access-Control-Allow-Methods`): every method of every
/// documented operation, and GET for the WebSocket upgrade. Taken from the document, which is
/// generated from the handlers' annotations, so a new route's method is allowed as it is added
/// (`routes_and_document_agree` in `parley/tests/openapi_routes.rs` checks that they agree).
pub fn api_methods() -> Vec<axum::http::Method> {
    use axum::http::Method;
    let doc = ApiDoc::openapi();
    let mut methods = vec![Method::GET];
    for item in doc.paths.paths.values() {
        let ops = [
            (Method::GET, &item.get),
            (Method::PUT, &item.put),
            (Method::POST, &item.post),
            (Method::DELETE, &item.delete),
            (Method::PATCH, &item.patch),
            (Method::HEAD, &item.head),
            (Method::OPTIONS, &item.options),
            (Method::TRACE, &item.trace),
        ];
        for (method, op) in ops {
            if op.is_some() && !methods.contains(&method) {
                methods.push(method);
            }
        }
    }
    methods
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}
