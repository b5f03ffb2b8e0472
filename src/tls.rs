//! TLS with rustls: loading PEM files (every error names the file), the server's
//! certificate resolver, and the client configs that https backends are verified with.
//!
//! The resolver reads the certificates from the live runtime on every handshake, so a
//! reload, including one caused by renewed certificate files, applies to the next
//! handshake and never to one in progress.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::ResolvesServerCert;
use rustls::sign::CertifiedKey;

use crate::host::HostMatch;

/// The one crypto provider balancer uses (ring), passed explicitly everywhere.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.2 and 1.3, nothing older.
const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: cannot read certificates: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in the file", path.display()));
    }
    Ok(certs)
}

/// A certificate chain and its private key, checked to belong together.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, String> {
    let chain = certs(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{}: cannot read a PEM private key: {e}", key.display()))?;
    CertifiedKey::from_der(chain, key_der, &provider()).map(Arc::new).map_err(|e| {
        format!("{}: the private key does not match the certificate in {}: {e}", key.display(), cert.display())
    })
}

/// The certificates an HTTPS listener serves: a default, and others chosen by SNI.
#[derive(Clone, Debug)]
pub struct ServerCerts {
    pub default: Arc<CertifiedKey>,
    pub sni: Vec<(HostMatch, Arc<CertifiedKey>)>,
}

impl ServerCerts {
    /// The certificate for a handshake that named `server_name`.
    pub fn choose(&self, server_name: Option<&str>) -> Arc<CertifiedKey> {
        server_name
            .and_then(|name| self.sni.iter().find(|(m, _)| m.matches(name)))
            .map_or_else(|| self.default.clone(), |(_, ck)| ck.clone())
    }
}

/// TLS 1.2 sessions kept for clients that resume by session id (each a few hundred
/// bytes): rustls's default of 256 covers a few seconds of a busy site's returning clients.
const SESSION_CACHE_ENTRIES: usize = 20_480;

/// The ticket keys could not be made (the system's random source failed).
#[derive(Debug, thiserror::Error)]
#[error("cannot make TLS session ticket keys: {0}")]
pub struct TicketKeysError(#[source] rustls::Error);

/// The rustls config of every HTTPS listener: TLS 1.2/1.3, ALPN `h2` then `http/1.1`;
/// `certs` picks each handshake's certificate (from the live runtime, so a reload renews).
///
/// Made once per process, so that resumption state outlives reloads: session tickets
/// (TLS 1.3, and TLS 1.2 clients that ask for them) sealed with keys rustls rotates every
/// 6 hours, a ticket staying valid for 12; and a session cache for TLS 1.2 clients that
/// resume by session id.
pub fn server_config(certs: Arc<dyn ResolvesServerCert>) -> Result<Arc<rustls::ServerConfig>, TicketKeysError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ticketer = rustls::crypto::ring::Ticketer::new().map_err(TicketKeysError)?;
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
    Ok(Arc::new(cfg))
}

/// How an upstream's `https://` backends are reached.
#[derive(Clone)]
pub struct BackendTls {
    pub connector: tokio_rustls::TlsConnector,
    /// The name their certificates must carry, when not the URL's host.
    pub server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendTls").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

/// Verification against `ca` (a PEM file), or else the system's root certificates.
pub fn backend_tls(ca: Option<&Path>, server_name: Option<&str>) -> Result<BackendTls, String> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in certs(path)? {
                roots.add(cert).map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err("no system root certificates were found: set `ca` on the upstream".into());
            }
        }
    }
    let server_name = match server_name {
        Some(n) => {
            Some(ServerName::try_from(n.to_owned()).map_err(|e| format!(r#""{n}" is not a valid server name: {e}"#))?)
        }
        None => None,
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(BackendTls { connector: tokio_rustls::TlsConnector::from(Arc::new(cfg)), server_name })
}
