//! Input validation shared by REST and WebSocket: ids, names, texts, metadata.
//!
//! Each check returns the sentence a person needs to fix their input.

/// Longest user or tenant id.
pub const MAX_USER_ID: usize = 128;
/// Longest `client_msg_id`.
pub const MAX_CLIENT_MSG_ID: usize = 64;
/// Longest channel name, in characters.
pub const MAX_CHANNEL_NAME: usize = 100;
/// Largest serialized message metadata, in bytes.
pub const MAX_METADATA_BYTES: usize = 2048;
/// Most members given when creating a channel.
pub const MAX_INITIAL_MEMBERS: usize = 100;

fn id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '@' | '-' | '|')
}

/// User and tenant ids: 1–128 characters of `A-Z a-z 0-9 _ . : @ -`.
pub fn is_valid_user_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_USER_ID && s.chars().all(id_char)
}

pub fn user_id(s: &str) -> Result<(), String> {
    if is_valid_user_id(s) {
        Ok(())
    } else {
        Err(format!(
            "user id {s:?} must be 1-{MAX_USER_ID} characters of A-Z a-z 0-9 _ . : @ - |"
        ))
    }
}

/// Ids the server generates: `prefix` followed by a 26-character ULID.
pub fn generated_id(kind: &str, prefix: &str, s: &str) -> Result<(), String> {
    let ok = s
        .strip_prefix(prefix)
        .is_some_and(|rest| rest.len() == 26 && rest.chars().all(|c| c.is_ascii_alphanumeric()));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{kind} id {s:?} is not valid: expected {prefix} followed by 26 letters and digits"
        ))
    }
}

pub fn channel_id(s: &str) -> Result<(), String> {
    generated_id("channel", "ch_", s)
}

pub fn message_id(s: &str) -> Result<(), String> {
    generated_id("message", "msg_", s)
}

pub fn client_msg_id(s: &str) -> Result<(), String> {
    if !s.is_empty() && s.len() <= MAX_CLIENT_MSG_ID && s.chars().all(id_char) {
        Ok(())
    } else {
        Err(format!(
            "client_msg_id must be 1-{MAX_CLIENT_MSG_ID} characters of A-Z a-z 0-9 _ . : @ - |"
        ))
    }
}

pub fn channel_name(s: &str) -> Result<(), String> {
    let n = s.chars().count();
    if s.trim().is_empty() || n > MAX_CHANNEL_NAME || s.chars().any(char::is_control) {
        Err(format!(
            "channel name must be 1-{MAX_CHANNEL_NAME} characters, not blank, without control characters"
        ))
    } else {
        Ok(())
    }
}

pub fn message_text(s: &str, max_chars: usize) -> Result<(), String> {
    if s.is_empty() {
        return Err("message text must not be empty".into());
    }
    if s.trim().is_empty() {
        return Err("message text must not be blank (only whitespace)".into());
    }
    if s.contains('\0') {
        // PostgreSQL cannot store NUL in text; refuse it on every engine alike.
        return Err("message text must not contain NUL characters".into());
    }
    let n = s.chars().count();
    if n > max_chars {
        return Err(format!(
            "message text is {n} characters; the limit is {max_chars}"
        ));
    }
    Ok(())
}

pub fn metadata(m: Option<&serde_json::Value>) -> Result<(), String> {
    match m {
        None | Some(serde_json::Value::Null) => Ok(()),
        Some(v @ serde_json::Value::Object(_)) => {
            let len = v.to_string().len();
            if len > MAX_METADATA_BYTES {
                Err(format!(
                    "metadata is {len} bytes serialized; the limit is {MAX_METADATA_BYTES}"
                ))
            } else {
                Ok(())
            }
        }
        Some(_) => Err("metadata must be a JSON object".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_for_shape() {
        assert!(channel_id("ch_01JABCDEFGHJKMNPQRSTVWXYZ0").is_ok());
        assert!(channel_id("ch_short").is_err());
        assert!(channel_id("msg_01JABCDEFGHJKMNPQRSTVWXYZ0").is_err());
        assert!(user_id("alice@example.com").is_ok());
        assert!(user_id("").is_err());
        assert!(user_id("a b").is_err());
    }

    #[test]
    fn text_limit_counts_characters_not_bytes() {
        assert!(message_text(&"é".repeat(10), 10).is_ok());
        assert!(message_text(&"é".repeat(11), 10).is_err());
        assert!(message_text("", 10).is_err());
        assert!(message_text(" \t\n\u{3000}", 10).is_err());
        assert!(message_text(" hi ", 10).is_ok());
    }

    #[test]
    fn metadata_must_be_a_small_object() {
        assert!(metadata(Some(&serde_json::json!({"a": 1}))).is_ok());
        assert!(metadata(Some(&serde_json::json!([1]))).is_err());
        let big = serde_json::json!({ "a": "x".repeat(MAX_METADATA_BYTES) });
        assert!(metadata(Some(&big)).is_err());
    }
}
