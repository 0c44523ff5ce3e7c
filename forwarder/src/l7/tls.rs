//! TLS termination: the certificates vhosts present, chosen by SNI, and the session state all
//! listeners share (decision 0019).
//!
//! Certificates are read when the daemon starts and on every reload, before anything changes:
//! a file that cannot be read or parsed, or a key that does not match its certificate, refuses
//! the reload with the path and the reason, and the running certificates stay. What is loaded
//! ([`TlsListeners`]) is published with the L7 snapshot; a connection keeps the config it was
//! accepted with, so a reload changes what new handshakes get and nothing else.
//!
//! The certificate is chosen as a request is routed: the SNI name through the listener's host
//! table ([`ListenerRoutes`]): an exact name, else the longest wildcard, else the listener's
//! default vhost. A name no vhost serves (or no SNI, without a default vhost) fails the
//! handshake with an `access_denied` alert, counted as `unknown_name`.
//!
//! Resumption: one rotating ticketer (keys change every 6 hours, a ticket lives 12) and one
//! session-id cache serve every listener for the daemon's life ([`Sessions`]), so a reload
//! does not cost clients their sessions.

use std::{
    cell::Cell,
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ProducesTickets, ResolvesServerCert, StoresServerSessions},
    sign::CertifiedKey,
};
use weir_config::{Config, VhostTls};

use super::snapshot::ListenerRoutes;

/// The one protocol offered by ALPN today (`h2` would join it here).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// Sessions the id cache holds (TLS 1.2 clients without tickets), for all listeners.
const SESSION_CACHE_ENTRIES: usize = 16 * 1024;

/// Why certificates could not be loaded: the file and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError {
    pub path: PathBuf,
    pub reason: String,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

impl std::error::Error for TlsError {}

/// The crypto provider every TLS config uses: aws-lc-rs (decision 0019), its cipher suites
/// in weir's order of preference (see [`suite_preference`]).
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite_preference(suite.suite()));
    Arc::new(provider)
}

/// Where a cipher suite comes in weir's order, which the server applies rather than the
/// client's (`ignore_client_order`): AES-128-GCM first, then AES-256-GCM, then
/// ChaCha20-Poly1305, TLS 1.3 and 1.2 alike. AES-128 with SHA-256 is the cheapest on servers:
/// SHA-256 has instructions of its own on current x86 CPUs, while SHA-384 (the AES-256 suites'
/// hash) runs in software; it was a tenth of a resumed handshake's CPU on this project's test
/// machine, where OpenSSL clients ask for AES-256 first. Every client weir serves offers
/// AES-128-GCM, and browsers prefer it too.
fn suite_preference(suite: rustls::CipherSuite) -> u8 {
    use rustls::CipherSuite::{
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384,
    };
    match suite {
        TLS13_AES_128_GCM_SHA256
        | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        TLS13_AES_256_GCM_SHA384
        | TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
        _ => 2,
    }
}

/// Session resumption state, kept for the daemon's life across reloads.
#[derive(Debug, Clone)]
pub struct Sessions {
    ticketer: Arc<dyn ProducesTickets>,
    cache: Arc<dyn StoresServerSessions>,
}

impl Sessions {
    pub fn new() -> Result<Sessions, rustls::Error> {
        Ok(Sessions {
            ticketer: rustls::crypto::aws_lc_rs::Ticketer::new()?,
            cache: rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES),
        })
    }
}

/// A certificate as a vhost presents it, with what `weirctl status` and metrics show.
#[derive(Debug, Clone)]
pub struct LoadedCertificate {
    pub key: Arc<CertifiedKey>,
    pub certificate: PathBuf,
    /// The end of the leaf certificate's validity, in seconds since the Unix epoch.
    pub not_after_unix: i64,
}

/// What one L7 listener does with TLS.
#[derive(Debug, Clone)]
pub enum ListenerTls {
    /// Nothing: it speaks plain HTTP.
    Plain,
    /// It terminates TLS under this config.
    Terminate(Arc<ServerConfig>),
    /// It routes TLS by the ClientHello's SNI and relays it, untouched, to a server.
    Passthrough,
}

/// What the TLS listeners need, built from one config.
#[derive(Debug, Clone, Default)]
pub struct TlsListeners {
    /// In the order of the config's L7 listen addresses.
    pub listeners: Vec<ListenerTls>,
    /// Every TLS vhost's certificate, by vhost name, in config order.
    pub certificates: Vec<(String, LoadedCertificate)>,
}

impl TlsListeners {
    /// Reads every vhost's certificate and key and builds each TLS listener's config.
    pub fn load(config: &Config, sessions: &Sessions) -> Result<TlsListeners, TlsError> {
        let provider = provider();
        // Vhosts naming the same files share one loaded certificate: then a request routed to
        // either is served under the certificate the handshake presented (`same_certificate`).
        let mut loaded: HashMap<&VhostTls, LoadedCertificate> = HashMap::new();
        let mut certificates = Vec::new();
        for vhost in &config.vhosts {
            let Some(tls) = &vhost.tls else { continue };
            if !loaded.contains_key(tls) {
                loaded.insert(tls, load_certificate(tls, &provider)?);
            }
            certificates.push((vhost.name.get_ref().clone(), loaded[tls].clone()));
        }
        let listeners = config
            .l7_listen_addresses()
            .into_iter()
            .map(|address| {
                // Every vhost of a listener speaks its protocol (the config checks it).
                let first = config.vhosts.iter().find(|v| v.listen == address);
                match first {
                    Some(v) if v.tls_passthrough => return Ok(ListenerTls::Passthrough),
                    Some(v) if v.tls.is_some() => {}
                    _ => return Ok(ListenerTls::Plain),
                }
                let keys = config
                    .vhosts
                    .iter()
                    .map(|v| {
                        v.tls
                            .as_ref()
                            .filter(|_| v.listen == address)
                            .map(|tls| Arc::clone(&loaded[tls].key))
                    })
                    .collect();
                let resolver = SniResolver {
                    routes: ListenerRoutes::of_config(address, config),
                    keys,
                };
                server_config(resolver, &provider, sessions).map(ListenerTls::Terminate)
            })
            .collect::<Result<_, _>>()?;
        Ok(TlsListeners {
            listeners,
            certificates,
        })
    }

    /// What listener `index` (config order) does with TLS.
    pub fn listener(&self, index: usize) -> &ListenerTls {
        self.listeners.get(index).unwrap_or(&ListenerTls::Plain)
    }

    /// The config of listener `index`, if it terminates TLS.
    pub fn config_for(&self, index: usize) -> Option<&Arc<ServerConfig>> {
        match self.listener(index) {
            ListenerTls::Terminate(config) => Some(config),
            _ => None,
        }
    }
}

fn server_config(
    resolver: SniResolver,
    provider: &Arc<CryptoProvider>,
    sessions: &Sessions,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut server = ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_safe_default_protocol_versions()
        .map_err(|err| TlsError {
            path: PathBuf::new(),
            reason: err.to_string(),
        })?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    server.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    server.ignore_client_order = true;
    server.ticketer = Arc::clone(&sessions.ticketer);
    server.session_storage = Arc::clone(&sessions.cache);
    Ok(Arc::new(server))
}

fn load_certificate(
    tls: &VhostTls,
    provider: &CryptoProvider,
) -> Result<LoadedCertificate, TlsError> {
    let chain = read_chain(&tls.certificate)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|err| TlsError {
        path: tls.key.clone(),
        reason: format!("no usable private key: {err}"),
    })?;
    let not_after_unix = not_after(&chain[0]).map_err(|reason| TlsError {
        path: tls.certificate.clone(),
        reason,
    })?;
    let key = CertifiedKey::from_der(chain, key, provider).map_err(|err| TlsError {
        path: tls.key.clone(),
        reason: match err {
            rustls::Error::InconsistentKeys(_) => format!(
                "the key does not belong to the certificate in {}",
                tls.certificate.display()
            ),
            other => format!("unusable private key: {other}"),
        },
    })?;
    Ok(LoadedCertificate {
        key: Arc::new(key),
        certificate: tls.certificate.clone(),
        not_after_unix,
    })
}

/// The certificates in the PEM file at `path`, leaf first; at least one.
fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let error = |reason: String| TlsError {
        path: path.to_path_buf(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|err| error(format!("cannot read: {err}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| error(format!("not a PEM certificate chain: {err}")))?;
    if chain.is_empty() {
        return Err(error(
            "holds no certificate (PEM `CERTIFICATE` block)".into(),
        ));
    }
    Ok(chain)
}

/// When `certificate` stops being valid (Unix seconds).
fn not_after(certificate: &CertificateDer<'_>) -> Result<i64, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref())
        .map_err(|err| format!("the first certificate does not parse: {err}"))?;
    Ok(parsed.validity().not_after.timestamp())
}

thread_local! {
    /// Set when this thread's last handshake found no certificate for the client's name (the
    /// resolver runs inside rustls on the worker's thread; see [`take_unknown_name`]).
    static UNKNOWN_NAME: Cell<bool> = const { Cell::new(false) };
}

/// Whether the handshake that just failed on this thread did so for want of a certificate.
pub fn take_unknown_name() -> bool {
    UNKNOWN_NAME.with(|flag| flag.replace(false))
}

/// A listener's certificates by SNI name.
#[derive(Debug)]
struct SniResolver {
    routes: ListenerRoutes,
    /// By vhost index (config order): the certificate of each TLS vhost on this listener.
    keys: Vec<Option<Arc<CertifiedKey>>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let key = sni_vhost(&self.routes, hello.server_name()).and_then(|v| self.keys[v].clone());
        if key.is_none() {
            UNKNOWN_NAME.with(|flag| flag.set(true));
        }
        key
    }
}

/// The vhost an SNI name selects on a listener (as a Host would route).
pub fn sni_vhost(routes: &ListenerRoutes, name: Option<&str>) -> Option<usize> {
    match name {
        Some(name) if name.bytes().any(|b| b.is_ascii_uppercase()) => {
            routes.route(Some(&name.to_ascii_lowercase()))
        }
        name => routes.route(name),
    }
}

/// Whether vhosts `a` and `b` present the same certificate (so a request for one may be served
/// on a connection whose handshake selected the other).
pub fn same_certificate(listeners: &TlsListeners, a: &str, b: &str) -> bool {
    let key = |name: &str| {
        listeners
            .certificates
            .iter()
            .find(|(vhost, _)| vhost == name)
            .map(|(_, c)| Arc::as_ptr(&c.key))
    };
    a == b || key(a).is_some_and(|k| Some(k) == key(b))
}
