//! TLS test helpers: a test CA and leaf certificates made at test time with rcgen, an
//! HTTPS client that reports what was negotiated (ALPN, protocol version, the peer's
//! certificate) and sends HTTP/1.1 or HTTP/2 over it, and an HTTPS echo upstream.
//!
//! Every rustls config is built with an explicit ring provider; nothing relies on a
//! process-default provider.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, HandshakeKind, ProtocolVersion, RootCertStore, ServerConfig,
    SignatureScheme, SupportedProtocolVersion,
};
use tokio::net::{TcpListener, TcpStream};

use super::{Balancer, Reply};

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// ---------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------

/// A test certificate authority that signs leaf certificates.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
}

/// A leaf certificate and its private key, in PEM, and the certificate's DER.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert_pem: cert.pem(), cert_der: cert.der().to_vec(), issuer: rcgen::Issuer::new(params, key) }
    }

    /// A leaf certificate for `names`: DNS names, or IP addresses (e.g. "127.0.0.1") which
    /// become IP SANs.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names.first().cloned().unwrap_or_else(|| "leaf".into()));
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().to_vec() }
    }

    /// Writes the CA certificate as `DIR/NAME` and returns the path.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, &self.cert_pem).unwrap();
        p
    }

    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(self.cert_der.clone())).unwrap();
        roots
    }
}

impl Leaf {
    /// Writes `DIR/STEM.pem` (certificate) and `DIR/STEM.key`; returns both paths.
    pub fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (cert, key)
    }
}

/// A path as a TOML basic string.
pub fn toml_path(p: &Path) -> String {
    format!("{:?}", p.to_str().unwrap())
}

// ---------------------------------------------------------------------------------------
// Balancer's listeners
// ---------------------------------------------------------------------------------------

/// Waits for `n` `listening` lines with `"protocol": PROTOCOL` ("http" or "https") and
/// returns their addresses.
pub fn listeners(b: &Balancer, protocol: &str, n: usize) -> Vec<SocketAddr> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let addrs: Vec<SocketAddr> = b
            .logs_matching("listening")
            .iter()
            .filter(|l| l["protocol"] == protocol)
            .filter_map(|l| l["addr"].as_str().and_then(|a| a.parse().ok()))
            .collect();
        if addrs.len() >= n {
            return addrs;
        }
        assert!(
            Instant::now() < deadline,
            "{n} `listening` line(s) with protocol {protocol:?} not seen; logs: {:#?}",
            b.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The first HTTPS listener's address.
pub fn https_addr(b: &Balancer) -> SocketAddr {
    listeners(b, "https", 1)[0]
}

/// The first plain HTTP listener's address.
pub fn http_addr(b: &Balancer) -> SocketAddr {
    listeners(b, "http", 1)[0]
}

// ---------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------

/// What a test client offers and checks.
#[derive(Clone)]
pub struct ClientOpts {
    /// ALPN protocols offered, in order (e.g. `["h2", "http/1.1"]`); empty: no ALPN.
    pub alpn: Vec<&'static str>,
    /// Protocol versions allowed; empty: rustls' safe defaults (1.2 and 1.3).
    pub versions: Vec<&'static SupportedProtocolVersion>,
    /// Verify that the certificate is for the name connected to. When false the chain is
    /// still verified against the CA, but any name is accepted (to look at what a server
    /// sends for a name it has no certificate for).
    pub check_name: bool,
    /// Send the SNI extension.
    pub sni: bool,
}

impl Default for ClientOpts {
    fn default() -> Self {
        ClientOpts { alpn: vec!["h2", "http/1.1"], versions: Vec::new(), check_name: true, sni: true }
    }
}

impl ClientOpts {
    pub fn alpn(mut self, alpn: &[&'static str]) -> Self {
        self.alpn = alpn.to_vec();
        self
    }
    pub fn versions(mut self, v: &[&'static SupportedProtocolVersion]) -> Self {
        self.versions = v.to_vec();
        self
    }
    pub fn any_name(mut self) -> Self {
        self.check_name = false;
        self
    }
    pub fn no_sni(mut self) -> Self {
        self.sni = false;
        self
    }
}

/// Verifies the chain against the roots but accepts a certificate for any name.
#[derive(Debug)]
struct AnyName(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
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
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A client config that trusts only `ca`.
pub fn client_config(ca: &TestCa, opts: &ClientOpts) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider());
    let builder = if opts.versions.is_empty() {
        builder.with_safe_default_protocol_versions().unwrap()
    } else {
        builder.with_protocol_versions(&opts.versions).unwrap()
    };
    let mut config = if opts.check_name {
        builder.with_root_certificates(ca.roots()).with_no_client_auth()
    } else {
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(ca.roots()), provider())
            .build()
            .unwrap();
        builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyName(inner))).with_no_client_auth()
    };
    config.alpn_protocols = opts.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    config.enable_sni = opts.sni;
    Arc::new(config)
}

/// An established TLS connection and what its handshake negotiated.
pub struct TlsConn {
    pub stream: tokio_rustls::client::TlsStream<TcpStream>,
    /// The negotiated ALPN protocol, e.g. `Some(b"h2")`.
    pub alpn: Option<Vec<u8>>,
    /// The server's end-entity certificate (DER).
    pub peer_cert: Vec<u8>,
    pub version: ProtocolVersion,
    /// A full handshake, or a resumed session.
    pub kind: HandshakeKind,
}

impl TlsConn {
    pub fn alpn_str(&self) -> Option<String> {
        self.alpn.as_ref().map(|a| String::from_utf8_lossy(a).into_owned())
    }

    /// Starts HTTP on the connection: HTTP/2 when ALPN chose `h2`, else HTTP/1.1.
    pub async fn http(self) -> HttpsConn {
        if self.alpn.as_deref() == Some(b"h2") { self.h2().await } else { self.http1().await }
    }

    pub async fn http1(self) -> HttpsConn {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(self.stream)).await.unwrap();
        tokio::spawn(conn);
        HttpsConn::H1(sender)
    }

    pub async fn h2(self) -> HttpsConn {
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(self.stream)).await.unwrap();
        tokio::spawn(conn);
        HttpsConn::H2(sender)
    }
}

/// Connects to `addr` over TLS, with `name` as the SNI (and as the name verified when
/// `opts.check_name`), trusting only `ca`.
pub async fn tls_connect(addr: SocketAddr, name: &str, ca: &TestCa, opts: &ClientOpts) -> std::io::Result<TlsConn> {
    tls_connect_with(addr, name, client_config(ca, opts)).await
}

/// Connects with `config`: a client that keeps its config (and so its sessions) between
/// connections resumes when the server lets it.
pub async fn tls_connect_with(addr: SocketAddr, name: &str, config: Arc<ClientConfig>) -> std::io::Result<TlsConn> {
    let connector = tokio_rustls::TlsConnector::from(config);
    let tcp = TcpStream::connect(addr).await?;
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    let stream = tokio::time::timeout(Duration::from_secs(5), connector.connect(server_name, tcp))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    let (_, c) = stream.get_ref();
    let alpn = c.alpn_protocol().map(|a| a.to_vec());
    let peer_cert = c.peer_certificates().and_then(|certs| certs.first()).map(|c| c.to_vec()).unwrap_or_default();
    let version = c.protocol_version().unwrap();
    let kind = c.handshake_kind().unwrap();
    Ok(TlsConn { stream, alpn, peer_cert, version, kind })
}

/// The end-entity certificate `addr` presents for SNI `name` (any name accepted).
pub async fn peer_cert(addr: SocketAddr, name: &str, ca: &TestCa) -> Vec<u8> {
    tls_connect(addr, name, ca, &ClientOpts::default().any_name())
        .await
        .unwrap_or_else(|e| panic!("TLS handshake with {addr} as {name:?} failed: {e}"))
        .peer_cert
}

/// An HTTP/1.1 or HTTP/2 client connection over TLS.
pub enum HttpsConn {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl HttpsConn {
    /// Sends `req` and reads the whole response; returns the response's HTTP version too.
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<(Version, Reply), hyper::Error> {
        let resp = match self {
            HttpsConn::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            HttpsConn::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        let version = resp.version();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok((version, Reply { status: parts.status, headers: parts.headers, body }))
    }

    /// A GET of `path` for host `host` (absolute-form URI over HTTP/2, Host header over 1.1).
    pub async fn get(&mut self, host: &str, path: &str) -> Result<(Version, Reply), hyper::Error> {
        let req = match self {
            HttpsConn::H1(_) => Request::get(path).header("host", host),
            HttpsConn::H2(_) => Request::get(format!("https://{host}{path}")),
        };
        self.send(req.body(Full::default()).unwrap()).await
    }
}

/// One HTTPS GET on a new connection (ALPN offers h2 and http/1.1).
pub async fn https_get(addr: SocketAddr, name: &str, ca: &TestCa, path: &str) -> (Version, Reply) {
    https_get_with(addr, name, ca, path, &ClientOpts::default()).await
}

pub async fn https_get_with(
    addr: SocketAddr,
    name: &str,
    ca: &TestCa,
    path: &str,
    opts: &ClientOpts,
) -> (Version, Reply) {
    let conn = tls_connect(addr, name, ca, opts)
        .await
        .unwrap_or_else(|e| panic!("TLS handshake with {addr} as {name:?} failed: {e}"));
    conn.http().await.get(name, path).await.unwrap()
}

// ---------------------------------------------------------------------------------------
// HTTPS upstream
// ---------------------------------------------------------------------------------------

/// An HTTPS echo server (HTTP/1.1 over rustls): answers every request with 200,
/// `x-upstream: NAME` and a JSON body `{name, method, path, headers}`.
pub struct TlsUpstream {
    pub addr: SocketAddr,
    pub name: String,
    /// TCP connections accepted.
    pub connections: Arc<AtomicUsize>,
    /// TLS handshakes completed.
    pub handshakes: Arc<AtomicUsize>,
    /// Requests answered.
    pub hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsUpstream {
    pub async fn start(name: &str, leaf: &Leaf) -> TlsUpstream {
        Self::start_on("127.0.0.1:0".parse().unwrap(), name, leaf).await
    }

    /// Like [`TlsUpstream::start`], on `addr` (another loopback address, for DNS tests).
    pub async fn start_on(addr: SocketAddr, name: &str, leaf: &Leaf) -> TlsUpstream {
        let certs = vec![CertificateDer::from(leaf.der.clone())];
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let handshakes = Arc::new(AtomicUsize::new(0));
        let hits = Arc::new(AtomicUsize::new(0));
        let (c, hs, h, n) = (connections.clone(), handshakes.clone(), hits.clone(), name.to_owned());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (acceptor, hs, h, n) = (acceptor.clone(), hs.clone(), h.clone(), n.clone());
                // Dropping the JoinSet (when the task is aborted) cuts every connection.
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    hs.fetch_add(1, Ordering::SeqCst);
                    let svc = service_fn(move |req| echo(req, n.clone(), h.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        TlsUpstream { addr, name: name.to_owned(), connections, handshakes, hits, task }
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo(
    req: Request<Incoming>,
    name: String,
    hits: Arc<AtomicUsize>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    hits.fetch_add(1, Ordering::SeqCst);
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_str().unwrap_or("?").to_owned())))
        .collect();
    let echo = serde_json::json!({
        "name": name,
        "method": req.method().to_string(),
        "path": req.uri().to_string(),
        "headers": headers,
    });
    let _ = req.into_body().collect().await;
    let mut resp = Response::new(Full::new(Bytes::from(echo.to_string())));
    resp.headers_mut().insert("x-upstream", name.parse().unwrap());
    resp.headers_mut().insert("content-type", "application/json".parse().unwrap());
    Ok(resp)
}
