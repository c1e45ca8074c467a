//! Short-lived per-call credentials: the core issues one at join, the SFU verifies it before a
//! participant gets an `Rtc` (and so any media).
//!
//! A credential is `v1.<payload>.<tag>`, both parts unpadded base64url:
//! - `payload` is `<tenant>\n<call>\n<participant>\n<expiry unix seconds>` (UTF-8; the three ids
//!   must not contain a newline);
//! - `tag` is HMAC-SHA256 over `"parley-sfu-v1\n" || payload` with the secret shared by the cores
//!   and the SFU processes.
//!
//! Verification checks the tag in constant time (`Mac::verify_slice`), then the expiry, then that
//! the claims name the room and participant asked for. Every failure is the same
//! [`CredentialError`] variant family; none echoes the input back.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const VERSION: &str = "v1";
const DOMAIN: &[u8] = b"parley-sfu-v1\n";
/// Longest credential accepted (protects the parser; real ones are ~150 bytes).
pub const MAX_CREDENTIAL_LEN: usize = 1024;

/// What a credential grants: this participant may join this call of this tenant until `expiry`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Claims {
    pub tenant: String,
    pub call: String,
    pub participant: String,
    /// Unix seconds after which the credential is refused.
    pub expiry: u64,
}

/// Why a credential was refused. Stable, and free of the credential's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("credential is malformed")]
    Malformed,
    #[error("credential signature is invalid")]
    BadSignature,
    #[error("credential has expired")]
    Expired,
    #[error("credential is for another call or participant")]
    WrongSubject,
}

impl CredentialError {
    /// A stable machine-readable code.
    pub fn code(self) -> &'static str {
        match self {
            CredentialError::Malformed => "credential_malformed",
            CredentialError::BadSignature => "credential_bad_signature",
            CredentialError::Expired => "credential_expired",
            CredentialError::WrongSubject => "credential_wrong_subject",
        }
    }
}

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length.
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(DOMAIN);
    mac
}

/// Issues a credential for `claims` (the core does this at join). Panics if an id contains a
/// newline (ids are ULIDs/UUIDs in Parley; a newline would be a caller bug).
pub fn issue(secret: &[u8], claims: &Claims) -> String {
    for id in [&claims.tenant, &claims.call, &claims.participant] {
        assert!(
            !id.contains('\n'),
            "credential ids must not contain a newline"
        );
    }
    let payload = format!(
        "{}\n{}\n{}\n{}",
        claims.tenant, claims.call, claims.participant, claims.expiry
    );
    let mut mac = mac(secret);
    mac.update(payload.as_bytes());
    let tag = mac.finalize().into_bytes();
    format!(
        "{VERSION}.{}.{}",
        URL_SAFE_NO_PAD.encode(payload.as_bytes()),
        URL_SAFE_NO_PAD.encode(tag)
    )
}

/// Checks the signature and expiry (against `now_unix`, seconds) and returns the claims.
pub fn verify(secret: &[u8], credential: &str, now_unix: u64) -> Result<Claims, CredentialError> {
    if credential.len() > MAX_CREDENTIAL_LEN {
        return Err(CredentialError::Malformed);
    }
    let mut parts = credential.split('.');
    let (Some(VERSION), Some(payload), Some(tag), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(CredentialError::Malformed);
    };
    let payload = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| CredentialError::Malformed)?;
    let tag = URL_SAFE_NO_PAD
        .decode(tag)
        .map_err(|_| CredentialError::Malformed)?;
    let mut mac = mac(secret);
    mac.update(&payload);
    mac.verify_slice(&tag)
        .map_err(|_| CredentialError::BadSignature)?;
    // Authentic from here on; still parse defensively.
    let payload = String::from_utf8(payload).map_err(|_| CredentialError::Malformed)?;
    let fields: Vec<&str> = payload.split('\n').collect();
    let [tenant, call, participant, expiry] = fields[..] else {
        return Err(CredentialError::Malformed);
    };
    let expiry: u64 = expiry.parse().map_err(|_| CredentialError::Malformed)?;
    if now_unix >= expiry {
        return Err(CredentialError::Expired);
    }
    Ok(Claims {
        tenant: tenant.to_owned(),
        call: call.to_owned(),
        participant: participant.to_owned(),
        expiry,
    })
}

/// [`verify`], then checks that the claims are for exactly this tenant, call and participant.
pub fn verify_for(
    secret: &[u8],
    credential: &str,
    now_unix: u64,
    tenant: &str,
    call: &str,
    participant: &str,
) -> Result<Claims, CredentialError> {
    let claims = verify(secret, credential, now_unix)?;
    if claims.tenant != tenant || claims.call != call || claims.participant != participant {
        return Err(CredentialError::WrongSubject);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"a shared secret of the cores and SFUs";

    fn claims() -> Claims {
        Claims {
            tenant: "t1".into(),
            call: "c1".into(),
            participant: "p1".into(),
            expiry: 1_000,
        }
    }

    #[test]
    fn issued_credential_verifies_until_expiry() {
        let c = issue(SECRET, &claims());
        assert_eq!(verify(SECRET, &c, 999), Ok(claims()));
        assert_eq!(verify_for(SECRET, &c, 0, "t1", "c1", "p1"), Ok(claims()));
        assert_eq!(verify(SECRET, &c, 1_000), Err(CredentialError::Expired));
        assert_eq!(verify(SECRET, &c, 5_000), Err(CredentialError::Expired));
    }

    #[test]
    fn other_secret_is_refused() {
        let c = issue(b"another secret", &claims());
        assert_eq!(verify(SECRET, &c, 0), Err(CredentialError::BadSignature));
    }

    #[test]
    fn wrong_subject_is_refused() {
        let c = issue(SECRET, &claims());
        for (t, call, p) in [("t2", "c1", "p1"), ("t1", "c2", "p1"), ("t1", "c1", "p2")] {
            assert_eq!(
                verify_for(SECRET, &c, 0, t, call, p),
                Err(CredentialError::WrongSubject)
            );
        }
    }

    #[test]
    fn tampered_payload_or_tag_is_refused() {
        let c = issue(SECRET, &claims());
        let mut parts: Vec<String> = c.split('.').map(str::to_owned).collect();
        // A payload naming another participant, with the original tag.
        let forged = Claims {
            participant: "p2".into(),
            ..claims()
        };
        let forged_payload = issue(b"x", &forged).split('.').nth(1).unwrap().to_owned();
        let original_payload = std::mem::replace(&mut parts[1], forged_payload);
        assert_eq!(
            verify(SECRET, &parts.join("."), 0),
            Err(CredentialError::BadSignature)
        );
        // A longer expiry, same tag.
        let later = Claims {
            expiry: 9_999_999,
            ..claims()
        };
        parts[1] = issue(b"x", &later).split('.').nth(1).unwrap().to_owned();
        assert_eq!(
            verify(SECRET, &parts.join("."), 0),
            Err(CredentialError::BadSignature)
        );
        // The original payload with one tag byte flipped.
        parts[1] = original_payload;
        let mut tag = URL_SAFE_NO_PAD.decode(&parts[2]).unwrap();
        tag[0] ^= 1;
        parts[2] = URL_SAFE_NO_PAD.encode(tag);
        assert_eq!(
            verify(SECRET, &parts.join("."), 0),
            Err(CredentialError::BadSignature)
        );
    }

    #[test]
    fn malformed_input_is_refused_without_panicking() {
        let long = "v1.".repeat(1000);
        for bad in [
            "",
            "v1",
            "v1..",
            "v2.AAAA.AAAA",
            "v1.!!!.AAAA",
            "v1.AAAA.AAAA.AAAA",
            "v1.AAAA.!!",
            long.as_str(),
        ] {
            let got = verify(SECRET, bad, 0);
            assert!(
                matches!(
                    got,
                    Err(CredentialError::Malformed | CredentialError::BadSignature)
                ),
                "{bad:?} -> {got:?}"
            );
        }
        // Correctly signed but not four fields / not a number: malformed, not a panic.
        for payload in ["t\nc\np", "t\nc\np\nsoon", "t\nc\np\n1\nextra"] {
            let mut mac = mac(SECRET);
            mac.update(payload.as_bytes());
            let tag = mac.finalize().into_bytes();
            let c = format!(
                "v1.{}.{}",
                URL_SAFE_NO_PAD.encode(payload),
                URL_SAFE_NO_PAD.encode(tag)
            );
            assert_eq!(verify(SECRET, &c, 0), Err(CredentialError::Malformed));
        }
    }
}
