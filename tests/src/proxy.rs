//! The L7 workers in this process, on loopback, driven as the daemon drives them: what the
//! proxy tests (`l7_proxy`, `l7_tls`) start, with mock origins ([`crate::http_origin`]) behind.
//!
//! Each test takes its own loopback /24 (127.0.N.0), so tests run in parallel.

use std::{
    net::{SocketAddr, TcpListener},
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
};

use weir_config::Config;
use weir_forwarder::{
    l7::{
        L7Snapshot, L7Workers,
        tls::{Sessions, TlsListeners},
    },
    vhosts::Vhosts,
};

use crate::{
    http_client::{Body, HttpConn},
    http_origin::HttpOrigin,
};

/// The next loopback /24 a test may take (127.0.N.0).
static NEXT_NET: AtomicU8 = AtomicU8::new(10);

/// A proxy on its own loopback network, with the model the control plane would drive.
pub struct Proxy {
    pub workers: L7Workers,
    pub vhosts: Vhosts,
    pub config: Config,
    pub address: SocketAddr,
}

/// TLS state for every proxy a test starts, kept across its changes as the daemon keeps it.
pub fn tls_of(config: &Config) -> Arc<TlsListeners> {
    static SESSIONS: std::sync::OnceLock<Sessions> = std::sync::OnceLock::new();
    let sessions = SESSIONS.get_or_init(|| Sessions::new().unwrap());
    Arc::new(TlsListeners::load(config, sessions).expect("the test's certificates load"))
}

impl Proxy {
    /// Starts the workers for `vhosts` (TOML `[[vhost]]` tables with `LISTEN` and
    /// `SERVERn` placeholders) and `l7` (extra `[l7]` keys), with origins for `SERVERn`.
    pub fn start(l7: &str, vhosts: &str, origins: &[&HttpOrigin]) -> Proxy {
        let net = origins
            .first()
            .map_or_else(next_net, |o| match o.address.ip() {
                std::net::IpAddr::V4(v4) => v4.octets()[2],
                _ => unreachable!(),
            });
        let port = free_port(net);
        let address: SocketAddr = format!("127.0.{net}.1:{port}").parse().unwrap();
        // Two workers unless the test says otherwise.
        let workers = if l7.contains("workers =") {
            ""
        } else {
            "workers = 2\n"
        };
        let mut text =
            format!("[l7]\n{workers}{l7}\n{vhosts}").replace("LISTEN", &address.to_string());
        for (i, origin) in origins.iter().enumerate().rev() {
            text = text.replace(&format!("SERVER{}", i + 1), &origin.address.to_string());
        }
        let config = Config::parse(std::path::Path::new("test.toml"), &text).expect("test config");
        let vhosts = Vhosts::plan(&config, None).unwrap();
        let snapshot = L7Snapshot::of(&vhosts, &config, tls_of(&config), None);
        let workers = L7Workers::start(snapshot, config.l7.workers, config.l7.pin_workers)
            .expect("workers start");
        Proxy {
            workers,
            vhosts,
            config,
            address,
        }
    }

    /// Applies a change to the pools and publishes it, as the daemon does.
    pub fn change(&mut self, change: impl FnOnce(&mut Vhosts)) {
        change(&mut self.vhosts);
        let current = self.workers.snapshot();
        let tls = Arc::clone(&current.tls);
        let snapshot = L7Snapshot::of(&self.vhosts, &self.config, tls, Some(&current));
        self.workers.publish(snapshot);
    }

    /// Reads the certificates again and publishes them, as a reload does.
    pub fn reload_tls(&mut self) {
        let current = self.workers.snapshot();
        let snapshot = L7Snapshot::of(
            &self.vhosts,
            &self.config,
            tls_of(&self.config),
            Some(&current),
        );
        self.workers.publish(snapshot);
    }

    pub fn conn(&self) -> HttpConn {
        HttpConn::connect(self.address).expect("connect to the proxy")
    }

    pub fn get(&self, host: &str, path: &str) -> crate::http_client::Response {
        self.conn()
            .request("GET", path, host, "", Body::None)
            .expect("request through the proxy")
    }
}

pub fn next_net() -> u8 {
    NEXT_NET.fetch_add(1, Ordering::Relaxed)
}

pub fn free_port(net: u8) -> u16 {
    TcpListener::bind(format!("127.0.{net}.1:0"))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `count` origins on a fresh loopback network, named `s1`, `s2`, ...
pub fn origins(count: usize) -> Vec<HttpOrigin> {
    let net = next_net();
    (1..=count)
        .map(|i| {
            HttpOrigin::start(
                format!("127.0.{net}.{}:0", 10 + i).parse().unwrap(),
                &format!("s{i}"),
            )
            .expect("origin starts")
        })
        .collect()
}

/// One vhost `name` answering for `name.test`, with servers `SERVER1`..`SERVERn`; `more`
/// holds further keys of the vhost and its sub-tables (`[vhost.outlier]`, …).
pub fn vhost(name: &str, servers: usize, more: &str) -> String {
    let pool: Vec<String> = (1..=servers)
        .map(|i| format!("{{ address = \"SERVER{i}\" }}"))
        .collect();
    // Keys of the vhost go before `servers`, its sub-tables after.
    let split = if more.starts_with('[') {
        0
    } else {
        more.find("\n[").map_or(more.len(), |at| at + 1)
    };
    let (keys, tables) = more.split_at(split);
    format!(
        "[[vhost]]\nname = \"{name}\"\nlisten = \"LISTEN\"\nhosts = [\"{name}.test\"]\n{keys}servers = [{}]\n{tables}",
        pool.join(", ")
    )
}
