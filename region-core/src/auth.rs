//! Access-token verification (JWT) and the development signing key.
//!
//! Every key pins one algorithm: a token whose header names another algorithm is refused, which
//! rules out `alg: none` and HS/RS confusion. `exp`, `aud`, `iss` and `sub` are required; `nbf`
//! is honoured, and `exp` may lie at most the configured maximum lifetime ahead. Keys are chosen
//! by `kid`; an unknown `kid` is refused. Tokens are never logged.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use parley_proto::{ErrorCode, Principal};
use serde::{Deserialize, Serialize};

/// Name of the tenant claim.
pub const TENANT_CLAIM: &str = "tid";
/// Tenant of tokens that carry no tenant claim, for single-tenant deployments.
pub const DEFAULT_TENANT: &str = "default";

/// A verification key with its pinned algorithm.
pub struct VerificationKey {
    /// `None` matches only tokens without a `kid` (allowed when it is the only key).
    pub kid: Option<String>,
    pub algorithm: Algorithm,
    key: DecodingKey,
}

impl VerificationKey {
    /// An HS256 shared secret.
    pub fn hs256(kid: Option<String>, secret: &[u8]) -> Self {
        VerificationKey {
            kid,
            algorithm: Algorithm::HS256,
            key: DecodingKey::from_secret(secret),
        }
    }

    /// An RS256 public key in PEM.
    pub fn rs256_pem(kid: Option<String>, pem: &[u8]) -> Result<Self, String> {
        let key =
            DecodingKey::from_rsa_pem(pem).map_err(|e| format!("invalid RSA public key: {e}"))?;
        Ok(VerificationKey {
            kid,
            algorithm: Algorithm::RS256,
            key,
        })
    }

    /// An Ed25519 (EdDSA) public key in PEM.
    pub fn eddsa_pem(kid: Option<String>, pem: &[u8]) -> Result<Self, String> {
        let key = DecodingKey::from_ed_pem(pem)
            .map_err(|e| format!("invalid Ed25519 public key: {e}"))?;
        Ok(VerificationKey {
            kid,
            algorithm: Algorithm::EdDSA,
            key,
        })
    }
}

/// Why a token was refused. Each maps to one public error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AuthError {
    pub code: ErrorCode,
    pub message: String,
}

impl AuthError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        AuthError {
            code,
            message: message.into(),
        }
    }
}

/// The claims Parley reads.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tid: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    pub aud: Audience,
    pub iss: String,
}

/// `aud` is a string or an array of strings (RFC 7519 §4.1.3); `jsonwebtoken` checks that ours
/// is among them.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

/// The longest token lifetime accepted unless configured otherwise: 24 hours.
pub const DEFAULT_MAX_LIFETIME_SECS: u64 = 86_400;
/// Allowance on the maximum lifetime for an issuer whose clock runs ahead of ours: a token issued
/// for exactly the maximum by such an issuer is still accepted.
pub const LIFETIME_SLACK_SECS: u64 = 300;

/// Verifies access tokens.
pub struct Authenticator {
    keys: Vec<VerificationKey>,
    issuer: String,
    audience: String,
    leeway_secs: u64,
    max_lifetime_secs: u64,
    bad_signature_hint: Option<String>,
}

impl Authenticator {
    pub fn new(keys: Vec<VerificationKey>, issuer: String, audience: String) -> Self {
        Authenticator {
            keys,
            issuer,
            audience,
            leeway_secs: 5,
            max_lifetime_secs: DEFAULT_MAX_LIFETIME_SECS,
            bad_signature_hint: None,
        }
    }

    /// Refuses tokens whose `exp` lies more than `secs` ahead (whatever their `iat` says).
    pub fn with_max_lifetime(mut self, secs: u64) -> Self {
        self.max_lifetime_secs = secs;
        self
    }

    /// A sentence appended to `token_bad_signature` messages, telling what to check (the
    /// development mode names where its key lives).
    pub fn with_bad_signature_hint(mut self, hint: impl Into<String>) -> Self {
        self.bad_signature_hint = Some(hint.into());
        self
    }

    /// The longest accepted lifetime, in seconds.
    pub fn max_lifetime_secs(&self) -> u64 {
        self.max_lifetime_secs
    }

    /// Verifies `token` and returns who it speaks for.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        self.verify_inner(token).map_err(|mut e| {
            if e.code == ErrorCode::TokenBadSignature
                && let Some(hint) = &self.bad_signature_hint
            {
                e.message = format!("{}; {hint}", e.message);
            }
            e
        })
    }

    fn verify_inner(&self, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            AuthError::new(
                ErrorCode::TokenMalformed,
                format!("token is not a JWT with a supported algorithm: {e}"),
            )
        })?;
        let key = self.key_for(header.kid.as_deref())?;
        if header.alg != key.algorithm {
            return Err(AuthError::new(
                ErrorCode::TokenBadSignature,
                format!(
                    "token algorithm {:?} is not the one pinned for its key",
                    header.alg
                ),
            ));
        }
        let mut validation = Validation::new(key.algorithm);
        validation.set_audience(&[&self.audience]);
        validation.set_issuer(&[&self.issuer]);
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway_secs;
        let data =
            jsonwebtoken::decode::<Claims>(token, &key.key, &validation).map_err(map_jwt_error)?;
        let claims = data.claims;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let latest = now
            .saturating_add(self.max_lifetime_secs)
            .saturating_add(LIFETIME_SLACK_SECS);
        if claims.exp > latest {
            return Err(AuthError::new(
                ErrorCode::TokenInvalidClaims,
                format!(
                    "token expires too far ahead: this server accepts tokens that expire within {} \
                     seconds (--max-token-lifetime); issue shorter-lived tokens",
                    self.max_lifetime_secs
                ),
            ));
        }
        if !crate::validate::is_valid_user_id(&claims.sub) {
            return Err(AuthError::new(
                ErrorCode::TokenInvalidClaims,
                "claim sub must be 1-128 characters of A-Z a-z 0-9 _ . : @ - |",
            ));
        }
        let tenant = claims.tid.unwrap_or_else(|| DEFAULT_TENANT.to_owned());
        if !crate::validate::is_valid_user_id(&tenant) {
            return Err(AuthError::new(
                ErrorCode::TokenInvalidClaims,
                "claim tid is not a valid tenant id",
            ));
        }
        Ok(Principal {
            user_id: claims.sub,
            tenant_id: tenant,
            roles: claims.roles,
            expires_at: claims.exp,
        })
    }

    fn key_for(&self, kid: Option<&str>) -> Result<&VerificationKey, AuthError> {
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .ok_or_else(|| {
                    AuthError::new(
                        ErrorCode::TokenUnknownKey,
                        "token kid does not name a key this server knows",
                    )
                }),
            None => match self.keys.as_slice() {
                [only] => Ok(only),
                _ => self.keys.iter().find(|k| k.kid.is_none()).ok_or_else(|| {
                    AuthError::new(
                        ErrorCode::TokenUnknownKey,
                        "token has no kid and the server has several keys",
                    )
                }),
            },
        }
    }
}

fn map_jwt_error(e: jsonwebtoken::errors::Error) -> AuthError {
    let (code, message) = match e.kind() {
        ErrorKind::ExpiredSignature => (ErrorCode::TokenExpired, "token has expired"),
        ErrorKind::ImmatureSignature => {
            (ErrorCode::TokenNotYetValid, "token is not valid yet (nbf)")
        }
        ErrorKind::InvalidSignature => (
            ErrorCode::TokenBadSignature,
            "token signature does not verify",
        ),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => (
            ErrorCode::TokenBadSignature,
            "token algorithm is not accepted for this key",
        ),
        ErrorKind::InvalidAudience => (
            ErrorCode::TokenInvalidClaims,
            "token audience (aud) is not this server's",
        ),
        ErrorKind::InvalidIssuer => (
            ErrorCode::TokenInvalidClaims,
            "token issuer (iss) is not accepted",
        ),
        ErrorKind::MissingRequiredClaim(_) => (
            ErrorCode::TokenInvalidClaims,
            "token lacks a required claim (exp, aud, iss, sub)",
        ),
        ErrorKind::InvalidSubject => (ErrorCode::TokenInvalidClaims, "token subject is invalid"),
        ErrorKind::Json(_) => (
            ErrorCode::TokenInvalidClaims,
            "token claims have the wrong types or are missing",
        ),
        _ => (ErrorCode::TokenMalformed, "token could not be decoded"),
    };
    AuthError::new(code, message)
}

/// The development signing key: an HS256 secret generated once and kept in the data folder, so
/// `parley token` and `parley serve` agree without any configuration. Not for production.
pub struct DevSigningKey {
    secret: Vec<u8>,
}

/// File name of the development key inside the data folder.
pub const DEV_KEY_FILE: &str = "dev-signing-key";
/// `kid` of tokens signed with the development key.
pub const DEV_KID: &str = "dev";

impl DevSigningKey {
    /// Loads the key from `data_dir`; `NotFound` when there is none (it is never created here:
    /// only the server creates it, so a token command run elsewhere cannot make a key of its own).
    pub fn load(data_dir: &Path) -> std::io::Result<DevSigningKey> {
        let path = data_dir.join(DEV_KEY_FILE);
        let s = std::fs::read_to_string(&path)?;
        let secret = hex::decode(s.trim()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?;
        Ok(DevSigningKey { secret })
    }

    /// Loads the key from `data_dir`, generating and saving it (mode 0600) the first time.
    pub fn load_or_create(data_dir: &Path) -> std::io::Result<DevSigningKey> {
        let path = data_dir.join(DEV_KEY_FILE);
        match Self::load(data_dir) {
            Ok(key) => Ok(key),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(data_dir)?;
                let secret: [u8; 32] = rand::random();
                write_private(&path, &hex::encode(secret))?;
                Ok(DevSigningKey {
                    secret: secret.to_vec(),
                })
            }
            Err(e) => Err(e),
        }
    }

    pub fn from_secret(secret: Vec<u8>) -> Self {
        DevSigningKey { secret }
    }

    /// The verification key matching this signing key.
    pub fn verification_key(&self) -> VerificationKey {
        VerificationKey::hs256(Some(DEV_KID.to_owned()), &self.secret)
    }

    /// Signs a token for `user` in `tenant`, valid for `ttl_secs`.
    pub fn sign(
        &self,
        user: &str,
        tenant: &str,
        roles: Vec<String>,
        ttl_secs: u64,
        issuer: &str,
        audience: &str,
    ) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = Claims {
            sub: user.to_owned(),
            tid: Some(tenant.to_owned()),
            roles,
            exp: now + ttl_secs,
            nbf: None,
            iat: Some(now),
            aud: Audience::One(audience.to_owned()),
            iss: issuer.to_owned(),
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(DEV_KID.to_owned());
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&self.secret))
            .expect("HS256 signing with an in-memory secret cannot fail")
    }
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    #[test]
    fn exp_may_lie_at_most_the_maximum_lifetime_and_the_slack_ahead() {
        let key = DevSigningKey::from_secret(vec![9; 32]);
        let auth = Authenticator::new(vec![key.verification_key()], "i".into(), "a".into())
            .with_max_lifetime(3600);
        let within = key.sign(
            "u",
            "t",
            Vec::new(),
            3600 + LIFETIME_SLACK_SECS - 60,
            "i",
            "a",
        );
        assert!(auth.verify(&within).is_ok());
        let beyond = key.sign(
            "u",
            "t",
            Vec::new(),
            3600 + LIFETIME_SLACK_SECS + 60,
            "i",
            "a",
        );
        let e = auth.verify(&beyond).expect_err("too long");
        assert_eq!(e.code, ErrorCode::TokenInvalidClaims);
        assert!(e.message.contains("--max-token-lifetime"));
        let forever = key.sign("u", "t", Vec::new(), (1u64 << 62) - now(), "i", "a");
        assert_eq!(
            auth.verify(&forever).map_err(|e| e.code),
            Err(ErrorCode::TokenInvalidClaims)
        );
    }

    #[test]
    fn the_bad_signature_hint_is_appended() {
        let key = DevSigningKey::from_secret(vec![9; 32]);
        let other = DevSigningKey::from_secret(vec![8; 32]);
        let auth = Authenticator::new(vec![key.verification_key()], "i".into(), "a".into())
            .with_bad_signature_hint("check the data folder");
        let t = other.sign("u", "t", Vec::new(), 60, "i", "a");
        let e = auth.verify(&t).expect_err("bad signature");
        assert_eq!(e.code, ErrorCode::TokenBadSignature);
        assert!(
            e.message.ends_with("check the data folder"),
            "{}",
            e.message
        );
    }
}
