//! The crypto provider under rustls: aws-lc-rs (what weir uses) against ring, in one process
//! and in memory, so only the server's own work is timed: full TLS 1.3 handshakes (X25519,
//! an ECDSA P-256 and an RSA 2048 certificate, tickets issued as weir issues them) and
//! sealing and opening 16 KiB application-data records. Providers run interleaved within each
//! repetition.

use std::{
    io::{Read, Write},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    server::ProducesTickets,
};
use serde::Serialize;
use weir_tests::tls::{IssuedFiles, KeyKind, TestCa};

use crate::stats::Sample;

/// Bytes of one application-data record's plaintext (the largest TLS allows).
const RECORD: usize = 16 * 1024;

/// One provider with one certificate over the repetitions.
#[derive(Debug, Clone, Serialize)]
pub struct ProviderResult {
    pub provider: &'static str,
    pub key: &'static str,
    /// Full handshakes per second of server time.
    pub handshakes_per_sec: Sample,
    /// Plaintext MB/s sealed into records, and opened from them, by the server.
    pub seal_mb_per_sec: Sample,
    pub open_mb_per_sec: Sample,
}

/// A provider and the ticketer it brings.
struct Provider {
    name: &'static str,
    crypto: Arc<CryptoProvider>,
    ticketer: fn() -> Result<Arc<dyn ProducesTickets>, rustls::Error>,
}

fn providers() -> Vec<Provider> {
    vec![
        Provider {
            name: "ring",
            crypto: Arc::new(rustls::crypto::ring::default_provider()),
            ticketer: rustls::crypto::ring::Ticketer::new,
        },
        Provider {
            name: "aws-lc-rs",
            crypto: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            ticketer: rustls::crypto::aws_lc_rs::Ticketer::new,
        },
    ]
}

/// Runs `repetitions` rounds of `handshakes` handshakes and `records` records each way.
pub fn run(
    dir: &Path,
    repetitions: usize,
    handshakes: u32,
    records: u32,
) -> Result<Vec<ProviderResult>> {
    std::fs::create_dir_all(dir)?;
    let ca = TestCa::new(dir);
    let keys = [
        (
            "ECDSA P-256",
            ca.issue(dir, "ecdsa", &["bench.test"], KeyKind::EcdsaP256),
        ),
        (
            "RSA 2048",
            ca.issue(dir, "rsa", &["bench.test"], KeyKind::Rsa2048),
        ),
    ];
    let providers = providers();
    let mut samples = vec![(Vec::new(), Vec::new(), Vec::new()); providers.len() * keys.len()];
    for _ in 0..repetitions {
        for (k, (_, files)) in keys.iter().enumerate() {
            for (p, provider) in providers.iter().enumerate() {
                let (server, client) = configs(provider, files, &ca.path)?;
                let per_sec = handshake_rate(&server, &client, handshakes)?;
                let (seal, open) = record_rates(&server, &client, records)?;
                let sample = &mut samples[k * providers.len() + p];
                sample.0.push(per_sec);
                sample.1.push(seal);
                sample.2.push(open);
            }
        }
    }
    let mut results = Vec::new();
    for (k, (key, _)) in keys.iter().enumerate() {
        for (p, provider) in providers.iter().enumerate() {
            let (handshakes, seal, open) = samples[k * providers.len() + p].clone();
            let result = ProviderResult {
                provider: provider.name,
                key,
                handshakes_per_sec: Sample::new(handshakes),
                seal_mb_per_sec: Sample::new(seal),
                open_mb_per_sec: Sample::new(open),
            };
            eprintln!(
                "  {:<10} {:<12} {:>8.0} handshakes/s  seal {:>6.0} MB/s  open {:>6.0} MB/s",
                result.provider,
                result.key,
                result.handshakes_per_sec.median,
                result.seal_mb_per_sec.median,
                result.open_mb_per_sec.median
            );
            results.push(result);
        }
    }
    Ok(results)
}

/// A server config as weir builds one (tickets, ALPN) and a client trusting the CA.
fn configs(
    provider: &Provider,
    files: &IssuedFiles,
    ca: &Path,
) -> Result<(Arc<ServerConfig>, Arc<ClientConfig>)> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&files.certificate)?.collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&files.key)?;
    let mut server = ServerConfig::builder_with_provider(Arc::clone(&provider.crypto))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    server.ticketer = (provider.ticketer)()?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let mut client = ClientConfig::builder_with_provider(Arc::clone(&provider.crypto))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Every handshake full: the client keeps no session.
    client.resumption = rustls::client::Resumption::disabled();
    Ok((Arc::new(server), Arc::new(client)))
}

/// Completes `count` full handshakes; handshakes per second of the server's own time.
fn handshake_rate(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
    count: u32,
) -> Result<f64> {
    let mut spent = Duration::ZERO;
    for _ in 0..count {
        let (_, _, time) = connect(server, client)?;
        spent += time;
    }
    Ok(f64::from(count) / spent.as_secs_f64())
}

/// A client and a server connection after a full handshake, and the server's time in it.
fn connect(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
) -> Result<(ServerConnection, ClientConnection, Duration)> {
    let name = ServerName::try_from("bench.test")?;
    let mut client = ClientConnection::new(Arc::clone(client), name)?;
    let mut server = ServerConnection::new(Arc::clone(server))?;
    let mut spent = Duration::ZERO;
    while client.is_handshaking() || server.is_handshaking() || server.wants_write() {
        let mut to_server = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut to_server)?;
        }
        let started = Instant::now();
        feed(&mut server, &to_server)?;
        let mut to_client = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut to_client)?;
        }
        spent += started.elapsed();
        feed(&mut client, &to_client)?;
    }
    Ok((server, client, spent))
}

/// Hands all of `wire` to `conn` and processes it (one `read_tls` takes a record's worth at
/// most).
fn feed<Data>(conn: &mut rustls::ConnectionCommon<Data>, mut wire: &[u8]) -> Result<()> {
    while !wire.is_empty() {
        conn.read_tls(&mut wire)?;
        conn.process_new_packets()?;
    }
    Ok(())
}

/// MB/s of plaintext the server seals into records, and opens from the client's.
fn record_rates(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
    records: u32,
) -> Result<(f64, f64)> {
    let (mut server, mut client, _) = connect(server, client)?;
    let plain = vec![0x5a; RECORD];
    let mut sink = vec![0; RECORD];
    let (mut seal, mut open) = (Duration::ZERO, Duration::ZERO);
    let mut wire = Vec::with_capacity(RECORD + 64);
    for _ in 0..records {
        // Server → client: sealed by the server (timed), opened by the client.
        wire.clear();
        let started = Instant::now();
        server.writer().write_all(&plain)?;
        while server.wants_write() {
            server.write_tls(&mut wire)?;
        }
        seal += started.elapsed();
        feed(&mut client, &wire)?;
        client
            .reader()
            .read_exact(&mut sink)
            .context("client read")?;
        // Client → server: sealed by the client, opened by the server (timed).
        wire.clear();
        client.writer().write_all(&plain)?;
        while client.wants_write() {
            client.write_tls(&mut wire)?;
        }
        let started = Instant::now();
        feed(&mut server, &wire)?;
        server
            .reader()
            .read_exact(&mut sink)
            .context("server read")?;
        open += started.elapsed();
    }
    let megabytes = f64::from(records) * RECORD as f64 / 1e6;
    Ok((
        megabytes / seal.as_secs_f64(),
        megabytes / open.as_secs_f64(),
    ))
}
