//! The OpenAPI document served at /v1/openapi.json: every reference resolves, and schemas that
//! share a Rust name do not hide each other.

mod common;

use common::Server;
use serde_json::Value;

fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                out.push(r);
            }
            m.values().for_each(|v| refs(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

fn enum_of<'a>(doc: &'a Value, schema: &str) -> Vec<&'a str> {
    doc["components"]["schemas"][schema]["enum"]
        .as_array()
        .unwrap_or_else(|| {
            panic!(
                "schema {schema} is not an enum: {}",
                doc["components"]["schemas"][schema]
            )
        })
        .iter()
        .filter_map(|v| v.as_str())
        .collect()
}

#[tokio::test]
async fn openapi_document_is_consistent() {
    let server = Server::sqlite();
    let doc: Value = reqwest::get(server.url("/v1/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));

    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected reference {r}"));
        assert!(
            doc["components"]["schemas"].get(name).is_some(),
            "{r} does not resolve"
        );
    }

    // A member's role and a call participant's negotiation role are different schemas.
    let member_role = doc["components"]["schemas"]["Member"]["properties"]["role"]["$ref"]
        .as_str()
        .expect("Member.role is a reference")
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let roles = enum_of(&doc, &member_role);
    for r in ["owner", "moderator", "member"] {
        assert!(roles.contains(&r), "{member_role} lacks {r}: {roles:?}");
    }
    let negotiation = enum_of(&doc, "NegotiationRole");
    assert_eq!(negotiation, ["polite", "impolite"]);

    // The development route is documented.
    assert!(doc["paths"]["/v1/dev/token"]["post"].is_object());
}
