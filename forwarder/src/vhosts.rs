//! The L7 virtual hosts as the control plane sees them: each vhost's routing (from the
//! config) and its pool (config merged with runtime changes, like L4 pools), and the
//! [`L7Snapshot`] the workers route with, rebuilt and published on every change.
//!
//! A change here cannot half-apply: the workers swap in a whole new snapshot, and requests
//! already under way finish on the connection they have. So an L7 server can always be
//! removed at once; its in-flight requests are counted (`weirctl server list`) so
//! `remove --wait` can wait for them.

use std::{collections::BTreeMap, net::SocketAddr};

use weir_config::{
    Balance, Config, HashOn, HealthCheck, MAX_WEIGHT, OutlierDetection, ServerSpec,
    address::{PoolKind, server_address_problem},
    control::{AdminState, HealthState},
};

use crate::{
    pool::{self, PoolEdit, ServerLine, merge_config_pool, server_changes},
    state::{RuntimeState, VhostServerState, VhostState},
};

/// Why a change to a vhost's pool was refused. Nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error("no vhost named `{0}`")]
    UnknownVhost(String),
    #[error("vhost `{vhost}` has no server {server}")]
    UnknownServer { vhost: String, server: SocketAddr },
    #[error("vhost `{vhost}` already has server {server}")]
    DuplicateServer { vhost: String, server: SocketAddr },
    #[error("weight {0} is out of range: expected 1 to {MAX_WEIGHT}")]
    Weight(u32),
    /// A server address that cannot work (`weir_config::address`), with why.
    #[error("{0}")]
    Address(String),
}

/// A server of a vhost's pool.
pub type VhostServer = pool::Server;

/// A virtual host: how requests reach it, and its pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vhost {
    pub name: String,
    pub listen: SocketAddr,
    pub hosts: Vec<String>,
    pub default: bool,
    pub balance: Balance,
    pub hash_on: Option<HashOn>,
    /// How its servers are checked, if they are.
    pub health: Option<HealthCheck>,
    pub outlier: Option<OutlierDetection>,
    pub slow_start_ms: u64,
    /// Requests get a redirect to HTTPS instead of reaching the pool.
    pub redirect_to_https: bool,
    /// `Strict-Transport-Security: max-age=` on every response.
    pub hsts_max_age_secs: Option<u64>,
    pub servers: Vec<VhostServer>,
    /// The config file's pool as last applied.
    pub config_servers: Vec<ServerSpec>,
}

impl Vhost {
    fn server_index(&self, address: SocketAddr) -> Result<usize, VhostError> {
        pool::position(&self.servers, address).ok_or_else(|| VhostError::UnknownServer {
            vhost: self.name.clone(),
            server: address,
        })
    }

    /// The pool as the lines `pool::server_changes` compares.
    fn lines(&self) -> Vec<ServerLine> {
        self.servers.iter().map(VhostServer::line).collect()
    }
}

/// All virtual hosts, in config order (which is the order routing sees them in).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vhosts {
    vhosts: Vec<Vhost>,
}

impl Vhosts {
    /// The vhosts `config` asks for, with pools merged with the runtime state a daemon left
    /// (see [`merge_config_pool`]).
    pub fn plan(config: &Config, previous: Option<&RuntimeState>) -> Result<Vhosts, VhostError> {
        let mut vhosts = Vhosts::default();
        for spec in &config.vhosts {
            let name = spec.name.get_ref().clone();
            let kept = previous.and_then(|p| p.vhosts.get(&name));
            let servers = match kept {
                Some(state) => state
                    .servers
                    .iter()
                    .map(|s| {
                        let checked = spec.health.is_some();
                        VhostServer::restored(s.address, s.weight, s.state, checked, ())
                    })
                    .collect(),
                None => Vec::new(),
            };
            vhosts.vhosts.push(Vhost {
                name: name.clone(),
                listen: spec.listen,
                hosts: spec.hosts.iter().map(|h| h.get_ref().clone()).collect(),
                default: spec.default,
                balance: spec.balance,
                hash_on: spec.hash_key(),
                health: spec.health.clone(),
                outlier: spec.outlier.clone(),
                slow_start_ms: spec.slow_start_ms,
                redirect_to_https: spec.redirect_to_https,
                hsts_max_age_secs: spec.hsts_max_age_secs,
                servers,
                config_servers: Vec::new(),
            });
            let base = kept
                .map(|s| s.config_servers.as_slice())
                .unwrap_or_default();
            merge_config_pool(&mut vhosts, &name, base, spec.servers.get_ref())?;
            let vhost = vhosts.vhost_mut(&name)?;
            vhost.config_servers = spec.servers.get_ref().clone();
            if kept.is_none() {
                // A new vhost's pool starts whole: slow start is for servers joining a
                // running pool.
                for server in &mut vhost.servers {
                    server.ramp_since = None;
                }
            }
        }
        Ok(vhosts)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.vhosts.iter().any(|v| v.name == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Vhost> {
        self.vhosts.iter()
    }

    pub fn vhost(&self, name: &str) -> Result<&Vhost, VhostError> {
        self.vhosts
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| VhostError::UnknownVhost(name.to_string()))
    }

    fn vhost_mut(&mut self, name: &str) -> Result<&mut Vhost, VhostError> {
        self.vhosts
            .iter_mut()
            .find(|v| v.name == name)
            .ok_or_else(|| VhostError::UnknownVhost(name.to_string()))
    }

    /// Adds `address` to `vhost`'s pool, ready for new requests.
    pub fn add_server(
        &mut self,
        vhost: &str,
        address: SocketAddr,
        weight: u32,
    ) -> Result<(), VhostError> {
        check_weight(weight)?;
        let listen: Vec<SocketAddr> = self.vhosts.iter().map(|v| v.listen).collect();
        if let Some(problem) = server_address_problem(address, &PoolKind::L7 { listen: &listen }) {
            return Err(VhostError::Address(problem));
        }
        let pool = self.vhost_mut(vhost)?;
        if pool.server_index(address).is_ok() {
            return Err(VhostError::DuplicateServer {
                vhost: vhost.to_string(),
                server: address,
            });
        }
        let checked = pool.health.is_some();
        pool.servers
            .push(VhostServer::added(address, weight, checked, ()));
        Ok(())
    }

    /// Sets a server's admin state: only `Ready` servers get new requests.
    pub fn set_state(
        &mut self,
        vhost: &str,
        address: SocketAddr,
        state: AdminState,
    ) -> Result<(), VhostError> {
        self.change_server(vhost, address, |server| server.state = state)
    }

    /// Records what health checks say of a server.
    pub fn set_health(
        &mut self,
        vhost: &str,
        address: SocketAddr,
        health: HealthState,
    ) -> Result<(), VhostError> {
        self.change_server(vhost, address, |server| server.health = health)
    }

    /// Applies `apply` to a server; one that enters the rotation by it starts its slow start.
    fn change_server(
        &mut self,
        vhost: &str,
        address: SocketAddr,
        apply: impl FnOnce(&mut VhostServer),
    ) -> Result<(), VhostError> {
        let pool = self.vhost_mut(vhost)?;
        let index = pool.server_index(address)?;
        pool.servers[index].change(apply);
        Ok(())
    }

    /// Takes over the health `previous` knows for servers in both.
    pub fn carry_health(&mut self, previous: &Vhosts) {
        for vhost in &mut self.vhosts {
            let Ok(old) = previous.vhost(&vhost.name) else {
                continue;
            };
            let checked = vhost.health.is_some();
            for server in &mut vhost.servers {
                if let Some(i) = pool::position(&old.servers, server.address) {
                    server.carry_runtime(&old.servers[i], checked);
                }
            }
        }
    }

    pub fn set_weight(
        &mut self,
        vhost: &str,
        address: SocketAddr,
        weight: u32,
    ) -> Result<(), VhostError> {
        check_weight(weight)?;
        self.change_server(vhost, address, |server| server.weight = weight)
    }

    /// Removes a server: it gets no new request; those in flight finish.
    pub fn remove_server(&mut self, vhost: &str, address: SocketAddr) -> Result<(), VhostError> {
        let pool = self.vhost_mut(vhost)?;
        let index = pool.server_index(address)?;
        pool.servers.remove(index);
        Ok(())
    }

    /// The durable form of the pools.
    pub fn state(&self) -> BTreeMap<String, VhostState> {
        self.vhosts
            .iter()
            .map(|v| {
                let state = VhostState {
                    config_servers: v.config_servers.clone(),
                    servers: v
                        .servers
                        .iter()
                        .map(|s| VhostServerState {
                            address: s.address,
                            weight: s.weight,
                            state: s.state,
                        })
                        .collect(),
                };
                (v.name.clone(), state)
            })
            .collect()
    }

    /// Every vhost, in config order (what [`crate::l7::L7Snapshot::of`] publishes).
    pub fn as_slice(&self) -> &[Vhost] {
        &self.vhosts
    }

    /// What changes from `self` to `next`, one line per change.
    pub fn diff(&self, next: &Vhosts) -> Vec<String> {
        let mut lines = Vec::new();
        for old in &self.vhosts {
            if !next.contains(&old.name) {
                lines.push(format!("vhost {}: removed", old.name));
            }
        }
        for new in &next.vhosts {
            match self.vhost(&new.name) {
                Err(_) => lines.push(format!(
                    "vhost {}: added ({} hosts {}, {} servers)",
                    new.name,
                    new.listen,
                    new.hosts.join(" "),
                    new.servers.len()
                )),
                Ok(old) => {
                    if (old.redirect_to_https, old.hsts_max_age_secs)
                        != (new.redirect_to_https, new.hsts_max_age_secs)
                    {
                        lines.push(format!(
                            "vhost {}: redirect_to_https {}, hsts_max_age_secs {:?}",
                            new.name, new.redirect_to_https, new.hsts_max_age_secs
                        ));
                    }
                    if (
                        &old.listen,
                        &old.hosts,
                        old.default,
                        old.balance,
                        &old.hash_on,
                    ) != (
                        &new.listen,
                        &new.hosts,
                        new.default,
                        new.balance,
                        &new.hash_on,
                    ) {
                        lines.push(format!(
                            "vhost {}: now {} hosts {}{} balance {}",
                            new.name,
                            new.listen,
                            new.hosts.join(" "),
                            if new.default { " (default)" } else { "" },
                            new.balance
                        ));
                    }
                    lines.extend(server_changes(
                        "vhost",
                        &new.name,
                        &old.lines(),
                        &new.lines(),
                    ));
                }
            }
        }
        lines
    }
}

impl PoolEdit for Vhosts {
    type Error = VhostError;

    fn has_server(&self, vhost: &str, address: SocketAddr) -> Result<bool, VhostError> {
        Ok(self.vhost(vhost)?.server_index(address).is_ok())
    }
    fn add_server(
        &mut self,
        vhost: &str,
        address: SocketAddr,
        weight: u32,
    ) -> Result<(), VhostError> {
        Vhosts::add_server(self, vhost, address, weight)
    }
    fn set_weight(
        &mut self,
        vhost: &str,
        address: SocketAddr,
        weight: u32,
    ) -> Result<(), VhostError> {
        Vhosts::set_weight(self, vhost, address, weight)
    }
    fn remove_server(&mut self, vhost: &str, address: SocketAddr) -> Result<(), VhostError> {
        Vhosts::remove_server(self, vhost, address)
    }
}

fn check_weight(weight: u32) -> Result<(), VhostError> {
    if (1..=MAX_WEIGHT).contains(&weight) {
        Ok(())
    } else {
        Err(VhostError::Weight(weight))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(servers: &str) -> Config {
        let source = format!(
            "[[vhost]]\nname = \"shop\"\nlisten = \"127.0.0.1:8080\"\nhosts = [\"shop.test\"]\nservers = [{servers}]\n"
        );
        Config::parse(Path::new("weir.toml"), &source).unwrap()
    }

    fn pool(vhosts: &Vhosts) -> Vec<(String, u32, AdminState)> {
        vhosts
            .vhost("shop")
            .unwrap()
            .servers
            .iter()
            .map(|s| (s.address.to_string(), s.weight, s.state))
            .collect()
    }

    #[test]
    fn a_new_config_merges_with_runtime_changes_three_ways() {
        let first = config("{ address = \"127.0.0.2:80\" }, { address = \"127.0.0.3:80\" }");
        let mut running = Vhosts::plan(&first, None).unwrap();
        running
            .add_server("shop", "127.0.0.4:80".parse().unwrap(), 50)
            .unwrap();
        running
            .set_state(
                "shop",
                "127.0.0.2:80".parse().unwrap(),
                AdminState::Draining,
            )
            .unwrap();
        let state = RuntimeState {
            vhosts: running.state(),
            ..RuntimeState::default()
        };
        // The file drops .3 and adds .5; the runtime's .4 and the drain of .2 stay.
        let second =
            config("{ address = \"127.0.0.2:80\" }, { address = \"127.0.0.5:80\", weight = 7 }");
        let merged = Vhosts::plan(&second, Some(&state)).unwrap();
        assert_eq!(
            pool(&merged),
            vec![
                ("127.0.0.2:80".into(), 100, AdminState::Draining),
                ("127.0.0.4:80".into(), 50, AdminState::Ready),
                ("127.0.0.5:80".into(), 7, AdminState::Ready),
            ]
        );
        let lines = running.diff(&merged);
        assert_eq!(
            lines,
            vec![
                "vhost shop: server 127.0.0.3:80 removed",
                "vhost shop: server 127.0.0.5:80 added (weight 7, ready)",
            ]
        );
    }

    #[test]
    fn refused_changes_name_what_is_wrong() {
        let mut vhosts = Vhosts::plan(&config("{ address = \"127.0.0.2:80\" }"), None).unwrap();
        let address = "127.0.0.2:80".parse().unwrap();
        assert!(matches!(
            vhosts.add_server("shop", address, 1),
            Err(VhostError::DuplicateServer { .. })
        ));
        assert!(matches!(
            vhosts.add_server("nope", address, 1),
            Err(VhostError::UnknownVhost(_))
        ));
        assert!(matches!(
            vhosts.set_weight("shop", address, 0),
            Err(VhostError::Weight(0))
        ));
        assert!(matches!(
            vhosts.remove_server("shop", "127.0.0.9:80".parse().unwrap()),
            Err(VhostError::UnknownServer { .. })
        ));
    }
}
