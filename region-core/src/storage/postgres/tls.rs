//! TLS to PostgreSQL: the `sslmode` and `sslrootcert` parameters of the database URL, with
//! rustls on aws-lc-rs.
//!
//! tokio-postgres itself knows `sslmode=disable|prefer|require` only, so this module takes both
//! parameters out of the URL before tokio-postgres parses it, and chooses the connector:
//!
//! | `sslmode`            | TLS        | server certificate checked                              |
//! |----------------------|------------|---------------------------------------------------------|
//! | absent, `disable`, `prefer` | no  | (plain TCP, as before)                                   |
//! | `require`            | required   | no (as libpq), unless `sslrootcert` is given: then as `verify-ca` |
//! | `verify-ca`          | required   | chain to a trusted root                                 |
//! | `verify-full`        | required   | chain to a trusted root, and the host name (or IP address) |
//!
//! Trusted roots: the PEM file named by `sslrootcert`, else the system's roots.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;

use crate::storage::StorageError;

/// The TLS wanted by a database URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A database URL without its TLS parameters, and those parameters.
#[derive(Debug)]
pub(crate) struct TlsParams {
    pub url: String,
    pub mode: Mode,
    pub root_cert: Option<PathBuf>,
}

/// Takes `sslmode` and `sslrootcert` out of `url` (URL form `postgres://...?a=b&c=d`, or the
/// key/value form `host=... sslmode=...`).
pub(crate) fn split(url: &str) -> Result<TlsParams, StorageError> {
    let mut mode = None;
    let mut root_cert = None;
    let mut take = |key: &str, value: String| -> Result<bool, StorageError> {
        match key {
            "sslmode" => {
                mode = Some(match value.as_str() {
                    "disable" => Mode::Disable,
                    "prefer" => Mode::Prefer,
                    "require" => Mode::Require,
                    "verify-ca" => Mode::VerifyCa,
                    "verify-full" => Mode::VerifyFull,
                    other => {
                        return Err(StorageError::Internal(format!(
                            "invalid PostgreSQL url: sslmode={other:?}; use disable, prefer, require, verify-ca or verify-full"
                        )));
                    }
                });
                Ok(true)
            }
            "sslrootcert" => {
                root_cert = Some(PathBuf::from(value));
                Ok(true)
            }
            _ => Ok(false),
        }
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_owned(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    if !take(k, percent_decode(v))? {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for word in url.split_whitespace() {
            let (k, v) = word.split_once('=').unwrap_or((word, ""));
            if !take(k, v.trim_matches('\'').to_owned())? {
                kept.push(word);
            }
        }
        kept.join(" ")
    };
    Ok(TlsParams {
        url: rest,
        mode: mode.unwrap_or(Mode::Prefer),
        root_cert,
    })
}

/// `%XX` escapes of a URL query value decoded (a path may carry them).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What tokio-postgres should do for `mode`.
pub(crate) fn ssl_mode(mode: Mode) -> SslMode {
    match mode {
        Mode::Disable => SslMode::Disable,
        Mode::Prefer => SslMode::Prefer,
        Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
    }
}

/// The rustls client configuration for a TLS mode (`None`: no TLS).
pub(crate) fn client_config(params: &TlsParams) -> Result<Option<ClientConfig>, StorageError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| StorageError::Internal(format!("TLS configuration: {e}")))?;
    let verify = match (params.mode, &params.root_cert) {
        (Mode::Disable | Mode::Prefer, _) => return Ok(None),
        (Mode::Require, None) => {
            return Ok(Some(
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyCertificate { provider }))
                    .with_no_client_auth(),
            ));
        }
        (Mode::Require | Mode::VerifyCa, _) => Mode::VerifyCa,
        (Mode::VerifyFull, _) => Mode::VerifyFull,
    };
    let roots = Arc::new(roots(params.root_cert.as_ref())?);
    let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(|e| StorageError::Internal(format!("TLS configuration: {e}")))?;
    let config = if verify == Mode::VerifyFull {
        builder.with_webpki_verifier(webpki).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly { webpki }))
            .with_no_client_auth()
    };
    Ok(Some(config))
}

/// The trusted roots: the PEM file at `path`, or the system's.
fn roots(path: Option<&PathBuf>) -> Result<RootCertStore, StorageError> {
    let mut store = RootCertStore::empty();
    match path {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    StorageError::Internal(format!(
                        "cannot read sslrootcert {}: {e}",
                        path.display()
                    ))
                })?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(StorageError::Internal(format!(
                    "sslrootcert {} holds no usable certificate",
                    path.display()
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(StorageError::Internal(
                    "sslmode asks to verify the server but no system root certificate was found; \
                     name the CA with sslrootcert=/path/to/ca.pem in the database URL"
                        .into(),
                ));
            }
        }
    }
    Ok(store)
}

/// `sslmode=verify-ca`: the chain must lead to a trusted root; the name is not checked.
#[derive(Debug)]
struct ChainOnly {
    webpki: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error};
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// `sslmode=require` without `sslrootcert`: encrypted, the certificate not checked (libpq's
/// meaning of `require`). The handshake signatures are still verified.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_the_url() {
        let p = split("postgres://u@h:5432/db?sslmode=verify-full&sslrootcert=/tmp/ca%20x.pem&application_name=x")
            .expect("valid");
        assert_eq!(p.url, "postgres://u@h:5432/db?application_name=x");
        assert_eq!(p.mode, Mode::VerifyFull);
        assert_eq!(p.root_cert, Some(PathBuf::from("/tmp/ca x.pem")));
        let p = split("postgres://u@h/db").expect("valid");
        assert_eq!(
            (p.url.as_str(), p.mode),
            ("postgres://u@h/db", Mode::Prefer)
        );
        let p = split("host=h user=u sslmode=require").expect("valid");
        assert_eq!((p.url.as_str(), p.mode), ("host=h user=u", Mode::Require));
        assert!(split("postgres://h/db?sslmode=maybe").is_err());
    }
}
