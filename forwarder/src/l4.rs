//! The L4 services: VIPs, their pools and their servers' states, and how a change to them
//! reaches the datapath maps.
//!
//! This is the model the control plane drives. Every change follows one discipline:
//! 1. apply it to a copy of the model; the copy rebuilds the Maglev tables it changes, so
//!    everything that can be refused is refused here, before any map is touched;
//! 2. write the difference into the maps ([`L4Services::sync`]), in the order that keeps every
//!    packet safe — a new server's entry before the table that points at it; the new table
//!    (one atomic switch, see [`DatapathMaps::install_table`]); a removed server's entry
//!    cleared last, so its pinned flows re-pick;
//! 3. commit the copy.
//!
//! Only new flows whose Maglev slot changed move; established flows stay pinned by the flow
//! table. A draining or disabled server leaves the table but stays present, so its flows
//! finish where they are.
//!
//! Server ids index the server array that flows point into. A freed id is reused only after
//! every other free id (FIFO), so a flow pinned to a removed server almost surely finds the id
//! empty (and re-picks) rather than taken by a newcomer. Ids are part of the runtime state
//! ([`crate::state`]), so a restarted daemon keeps them.

pub mod transaction;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    fmt,
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use weir_common::{
    flow::FlowKey,
    l4::{
        ForwardMode, HashFields, MAX_SERVERS, MAX_VIPS, PROTO_TCP, PROTO_UDP, ServerInfo, VipInfo,
        VipKey,
    },
    user::addr_words,
};
use weir_config::{
    AllDown, Config, DownFlows, ForwardingMode, HashFieldsConfig, HealthCheck, L4Vip, MAX_WEIGHT,
    Protocol, ServerSpec,
    address::{PoolKind, server_address_problem},
    control::{AdminState, HealthState},
};

use crate::{
    datapath::{DatapathError, DatapathMaps},
    maglev::{MaglevError, MaglevServer, MaglevTable},
    pool::{
        self, PoolEdit, ServerLine, in_rotation, merge_config_pool, ramped_weight, ramping,
        server_changes,
    },
    state::{RuntimeState, STATE_VERSION, ServerState, VipState},
};

/// Why a change to the L4 services was refused. Nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum L4Error {
    #[error("no L4 VIP named `{0}`")]
    UnknownVip(String),
    #[error("L4 VIP `{0}` already exists")]
    DuplicateVip(String),
    #[error("VIP `{vip}` has no server {server}")]
    UnknownServer { vip: String, server: SocketAddr },
    #[error("VIP `{vip}` already has server {server}")]
    DuplicateServer { vip: String, server: SocketAddr },
    #[error("server {server} is not of VIP `{vip}`'s address family")]
    FamilyMismatch { vip: String, server: SocketAddr },
    #[error("VIP `{vip}` is in DSR mode: server {server} must use the VIP's port {port}")]
    DsrPort {
        vip: String,
        server: SocketAddr,
        port: u16,
    },
    #[error("weight {0} is out of range: expected 1 to {MAX_WEIGHT}")]
    Weight(u32),
    /// A server address that cannot work (`weir_config::address`), with why.
    #[error("{0}")]
    Address(String),
    #[error("no room for another {0} (the datapath holds at most {1})")]
    Full(&'static str, u32),
    #[error("cannot build the Maglev table: {0}")]
    Maglev(#[from] MaglevError),
}

/// Why a change to the services did not take effect: the model refused it (nothing changed),
/// or the maps could not be written (the datapath may hold part of it).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Refused(#[from] L4Error),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Failed(#[from] transaction::ChangeFailed),
}

/// A server in an L4 pool; its id is its index in the datapath's server array.
pub type L4Server = pool::Server<u32>;

/// An L4 VIP and its pool.
#[derive(Clone, PartialEq, Eq)]
pub struct L4Service {
    pub name: String,
    pub address: SocketAddr,
    pub protocol: Protocol,
    pub mode: ForwardingMode,
    pub hash: HashFieldsConfig,
    pub table_size: u32,
    /// Index in the per-VIP arrays.
    pub id: u32,
    pub servers: Vec<L4Server>,
    /// The config file's pool as last applied (see [`L4Services::plan`]).
    pub config_servers: Vec<ServerSpec>,
    /// How its servers are checked, if they are.
    pub health: Option<HealthCheck>,
    pub slow_start_ms: u64,
    /// When the node announces the VIP's address by BGP.
    pub announce: weir_config::Announce,
    /// The Maglev table of the ready servers, as server ids: what the datapath holds.
    table: Vec<u32>,
}

impl fmt::Debug for L4Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("L4Service")
            .field("name", &self.name)
            .field("address", &self.address)
            .field("protocol", &self.protocol)
            .field("mode", &self.mode)
            .field("id", &self.id)
            .field("servers", &self.servers)
            .field("table_slots", &self.table.len())
            .finish_non_exhaustive()
    }
}

impl L4Service {
    /// The VIP `spec` describes, with id `id` and no servers yet.
    fn from_spec(spec: &L4Vip, id: u32) -> L4Service {
        L4Service {
            name: spec.name.get_ref().clone(),
            address: SocketAddr::new(spec.address, spec.port),
            protocol: spec.protocol,
            mode: spec.mode,
            hash: spec.hash,
            table_size: *spec.table_size.get_ref(),
            id,
            servers: Vec::new(),
            config_servers: Vec::new(),
            health: spec.health.clone(),
            slow_start_ms: spec.slow_start_ms,
            announce: spec.announce,
            table: Vec::new(),
        }
    }

    /// Whether the VIP's table needs slow-start steps at `now`: a server is ramping, or
    /// finished within the last two seconds (one step past the end, so the table reaches
    /// full weights).
    fn stepping(&self, now: Instant) -> bool {
        let recent = now
            .checked_sub(std::time::Duration::from_secs(2))
            .unwrap_or(now);
        self.ramping(now) || self.ramping(recent)
    }

    /// Whether a server of this VIP is part-way through its slow start at `now`.
    pub fn ramping(&self, now: Instant) -> bool {
        self.servers
            .iter()
            .any(|s| ramping(s.ramp_since, self.slow_start_ms, now))
    }

    fn all_down(&self) -> AllDown {
        self.health.as_ref().map_or(AllDown::Refuse, |h| h.all_down)
    }

    /// Whether the datapath keeps server `server`'s entry: not when it is down and the
    /// policy re-picks its flows.
    fn keeps_entry(&self, server: &L4Server) -> bool {
        server.health.is_up()
            || self
                .health
                .as_ref()
                .is_some_and(|h| h.down_flows == DownFlows::Keep)
    }

    /// Its entries in the VIP map: the service, and the address-level entry.
    fn vip_keys(&self) -> [VipKey; 2] {
        let (words, family) = addr_words(self.address.ip());
        [
            VipKey::new(self.address, protocol_number(self.protocol)),
            VipKey::address_only(words, family),
        ]
    }

    fn info(&self) -> VipInfo {
        VipInfo {
            id: self.id,
            mode: match self.mode {
                ForwardingMode::Nat => ForwardMode::Nat as u8,
                ForwardingMode::Dsr => ForwardMode::Dsr as u8,
            },
            hash_fields: match self.hash {
                HashFieldsConfig::FiveTuple => HashFields::FiveTuple as u8,
                HashFieldsConfig::SourceIp => HashFields::SourceIp as u8,
            },
            _pad: [0; 2],
        }
    }

    fn server(&self, address: SocketAddr) -> Result<usize, L4Error> {
        pool::position(&self.servers, address).ok_or_else(|| L4Error::UnknownServer {
            vip: self.name.clone(),
            server: address,
        })
    }

    /// The pool as the lines `pool::server_changes` compares.
    fn server_lines(&self) -> Vec<ServerLine> {
        self.servers.iter().map(L4Server::line).collect()
    }

    /// The server `address`, if it is in the pool.
    pub fn find_server(&self, address: SocketAddr) -> Option<&L4Server> {
        self.servers.iter().find(|s| s.address == address)
    }

    /// The Maglev table over the servers that take new flows, as server ids.
    fn build_table(&self, seed: u32) -> Result<Vec<u32>, L4Error> {
        let states: Vec<_> = self.servers.iter().map(|s| (s.state, s.health)).collect();
        let ready: Vec<&L4Server> = in_rotation(&states, self.all_down())
            .into_iter()
            .map(|i| &self.servers[i])
            .collect();
        let now = Instant::now();
        let input: Vec<MaglevServer> = ready
            .iter()
            .map(|s| MaglevServer {
                address: s.address,
                weight: ramped_weight(s.weight, s.ramp_since, self.slow_start_ms, now),
            })
            .collect();
        Ok(
            match MaglevTable::build(&input, self.table_size, seed as u64)? {
                Some(table) => table
                    .slots()
                    .iter()
                    .map(|&i| ready[i as usize].id)
                    .collect(),
                None => Vec::new(),
            },
        )
    }

    /// A digest of the Maglev table the datapath holds, as the servers' addresses slot by slot
    /// (not their ids, which depend on a node's history): nodes that built the same table
    /// from the same pools — what lets any node take any flow — report the same digest.
    pub fn table_digest(&self) -> u64 {
        let addresses: std::collections::HashMap<u32, SocketAddr> =
            self.servers.iter().map(|s| (s.id, s.address)).collect();
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        hasher.update(&(self.table.len() as u64).to_le_bytes());
        for id in &self.table {
            match addresses.get(id) {
                Some(SocketAddr::V4(a)) => hasher.update(&a.ip().octets()),
                Some(SocketAddr::V6(a)) => hasher.update(&a.ip().octets()),
                None => hasher.update(&[0xff]),
            }
            hasher.update(&addresses.get(id).map_or(0, |a| a.port()).to_be_bytes());
        }
        hasher.digest()
    }

    /// The flow key of a client→VIP flow, for tests and tools that ask where a flow went.
    pub fn flow_key(&self, client: SocketAddr) -> FlowKey {
        FlowKey::new(client, self.address, protocol_number(self.protocol))
    }
}

/// IP protocol number of an L4 VIP's protocol.
pub fn protocol_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
    }
}

/// The addresses no new flow may come from: every L4 VIP's, and every address of this host's
/// interfaces (in the daemon's network namespace), which include the L7 VIPs.
fn self_addresses<'a>(vips: impl Iterator<Item = &'a L4Service>) -> BTreeSet<IpAddr> {
    let mut addresses: BTreeSet<IpAddr> = vips.map(|vip| vip.address.ip()).collect();
    addresses.extend(own_addresses());
    addresses
}

/// Every address of this host's interfaces, in the daemon's network namespace (empty, with a
/// warning, if they cannot be listed).
fn own_addresses() -> BTreeSet<IpAddr> {
    match nix::ifaddrs::getifaddrs() {
        Ok(interfaces) => interfaces
            .filter_map(|i| {
                let address = i.address?;
                if let Some(v4) = address.as_sockaddr_in() {
                    Some(IpAddr::V4(v4.ip()))
                } else {
                    address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                }
            })
            .collect(),
        Err(err) => {
            tracing::warn!(%err, "cannot list this host's addresses");
            BTreeSet::new()
        }
    }
}

/// An L4 server may not be the balancer itself: XDP forwards to other hosts.
fn check_not_own(address: SocketAddr, own: &BTreeSet<IpAddr>) -> Result<(), L4Error> {
    if own.contains(&address.ip()) {
        return Err(L4Error::Address(format!(
            "server {address} cannot work: {} is an address of this balancer, and the XDP \
             datapath forwards to other hosts, never to this one",
            address.ip()
        )));
    }
    Ok(())
}

/// Lowest-first ids for new entries, FIFO reuse of freed ones.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ids {
    next: u32,
    limit: u32,
    freed: VecDeque<u32>,
}

impl Ids {
    fn new(limit: u32) -> Ids {
        Ids {
            next: 0,
            limit,
            freed: VecDeque::new(),
        }
    }

    /// Ids of which `used` are taken: the others below the highest used are free, lowest
    /// first.
    fn with_used(limit: u32, used: &[u32]) -> Ids {
        let next = used.iter().max().map_or(0, |&max| max + 1);
        Ids {
            next,
            limit,
            freed: (0..next).filter(|id| !used.contains(id)).collect(),
        }
    }

    fn peek(&self, what: &'static str) -> Result<u32, L4Error> {
        if self.next < self.limit {
            Ok(self.next)
        } else {
            self.freed
                .front()
                .copied()
                .ok_or(L4Error::Full(what, self.limit))
        }
    }

    /// Takes the id `peek` returned.
    fn take(&mut self, id: u32) {
        if id == self.next {
            self.next += 1;
        } else {
            self.freed.retain(|&f| f != id);
        }
    }

    fn free(&mut self, id: u32) {
        self.freed.push_back(id);
    }
}

/// All L4 services: the model the datapath's maps mirror.
///
/// Changes are made on a copy and reach the maps through [`L4Services::sync`];
/// [`L4Services::apply`] does both for one change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L4Services {
    seed: u32,
    services: BTreeMap<String, L4Service>,
    vip_ids: Ids,
    server_ids: Ids,
}

impl L4Services {
    /// No services yet; `seed` is the hash seed the datapath uses.
    pub fn new(seed: u32) -> L4Services {
        L4Services {
            seed,
            services: BTreeMap::new(),
            vip_ids: Ids::new(MAX_VIPS),
            server_ids: Ids::new(MAX_SERVERS),
        }
    }

    /// The services of `config`, written into `maps` (which may hold anything).
    pub fn from_config(config: &Config, maps: &mut DatapathMaps) -> Result<L4Services, ApplyError> {
        let services = L4Services::plan(config, None)?;
        warm_neighbours(services.fresh_servers(None));
        services.sync(maps, None)?;
        Ok(services)
    }

    /// The services `config` asks for, given the runtime state a daemon left (`previous`).
    ///
    /// VIP definitions (address, protocol, mode, hash, table size) come from the config. Pools
    /// are merged three ways: a VIP new to the state gets its config pool; for the others,
    /// what the config changed since it was last applied (servers added, removed,
    /// reweighted in the file) is applied to the running pool, and everything operators did
    /// at run time (added servers, drains, weights) is kept. Ids are kept, so pinned flows
    /// keep pointing at their servers. Nothing is written: the result is checked whole,
    /// tables built, before [`L4Services::sync`] touches a map.
    pub fn plan(config: &Config, previous: Option<&RuntimeState>) -> Result<L4Services, L4Error> {
        let mut services = L4Services::new(config.datapath.hash_seed);
        let previous_vips = previous.map(|p| &p.l4_vips);
        let kept = |name: &str| previous_vips.and_then(|vips| vips.get(name));
        // Reserve the ids of everything carried over before handing out new ones.
        let mut vip_used = Vec::new();
        let mut server_used = Vec::new();
        for spec in &config.l4_vips {
            if let Some(state) = kept(spec.name.get_ref()) {
                vip_used.push(state.id);
                server_used.extend(state.servers.iter().map(|s| s.id));
            }
        }
        services.vip_ids = Ids::with_used(MAX_VIPS, &vip_used);
        services.server_ids = Ids::with_used(MAX_SERVERS, &server_used);
        for spec in &config.l4_vips {
            let name = spec.name.get_ref();
            match kept(name) {
                None => services.add_vip(spec)?,
                Some(state) => {
                    let mut service = L4Service::from_spec(spec, state.id);
                    service.servers = state
                        .servers
                        .iter()
                        .map(|s| {
                            let checked = spec.health.is_some();
                            L4Server::restored(s.address, s.weight, s.state, checked, s.id)
                        })
                        .collect();
                    services.services.insert(name.clone(), service);
                    services.merge_config_pool(
                        name,
                        &state.config_servers,
                        spec.servers.get_ref(),
                    )?;
                }
            }
        }
        // The one address rule the file alone cannot settle: the host's own addresses.
        let own = own_addresses();
        for spec in &config.l4_vips {
            for server in spec.servers.get_ref() {
                check_not_own(server.address, &own)?;
            }
        }
        Ok(services)
    }

    /// Merges the config's pool change from `base` to `new` into `vip`'s running pool (see
    /// [`merge_config_pool`]) and records `new` as the base for next time.
    fn merge_config_pool(
        &mut self,
        vip: &str,
        base: &[ServerSpec],
        new: &[ServerSpec],
    ) -> Result<(), L4Error> {
        merge_config_pool(self, vip, base, new)?;
        let seed = self.seed;
        let service = self.service_mut(vip)?;
        service.config_servers = new.to_vec();
        service.table = service.build_table(seed)?;
        Ok(())
    }

    pub fn services(&self) -> impl Iterator<Item = &L4Service> {
        self.services.values()
    }

    pub fn service(&self, name: &str) -> Result<&L4Service, L4Error> {
        self.services
            .get(name)
            .ok_or_else(|| L4Error::UnknownVip(name.to_string()))
    }

    fn service_mut(&mut self, name: &str) -> Result<&mut L4Service, L4Error> {
        self.services
            .get_mut(name)
            .ok_or_else(|| L4Error::UnknownVip(name.to_string()))
    }

    /// The durable form of these services.
    pub fn runtime_state(&self) -> RuntimeState {
        RuntimeState {
            version: STATE_VERSION,
            vhosts: BTreeMap::new(),
            node_drained: false,
            l4_vips: self
                .services
                .values()
                .map(|service| {
                    let state = VipState {
                        id: service.id,
                        config_servers: service.config_servers.clone(),
                        servers: service
                            .servers
                            .iter()
                            .map(|s| ServerState {
                                address: s.address,
                                weight: s.weight,
                                state: s.state,
                                id: s.id,
                            })
                            .collect(),
                    };
                    (service.name.clone(), state)
                })
                .collect(),
        }
    }

    /// Makes one change on a copy, writes the maps, then commits the copy: the model and
    /// the maps never disagree, and a refused change touches neither.
    pub fn apply(
        &mut self,
        maps: &mut DatapathMaps,
        change: impl FnOnce(&mut L4Services) -> Result<(), L4Error>,
    ) -> Result<(), ApplyError> {
        let mut next = self.clone();
        change(&mut next)?;
        warm_neighbours(next.fresh_servers(Some(self)));
        let change = transaction::Change {
            current: self,
            next: &next,
            settings: None,
            state: None,
        };
        transaction::write(maps, change)?;
        *self = next;
        Ok(())
    }

    /// Adds a VIP with the pool of its config (all servers ready).
    pub fn add_vip(&mut self, spec: &L4Vip) -> Result<(), L4Error> {
        let name = spec.name.get_ref().clone();
        if self.services.contains_key(&name) {
            return Err(L4Error::DuplicateVip(name));
        }
        let id = self.vip_ids.peek("VIP")?;
        self.vip_ids.take(id);
        self.services
            .insert(name.clone(), L4Service::from_spec(spec, id));
        for server in spec.servers.get_ref() {
            self.add_server(&name, server.address, server.weight)?;
        }
        let seed = self.seed;
        let service = self.service_mut(&name)?;
        service.config_servers = spec.servers.get_ref().clone();
        // A new VIP's pool starts whole: slow start is for servers joining a running pool.
        for server in &mut service.servers {
            server.ramp_since = None;
        }
        service.table = service.build_table(seed)?;
        Ok(())
    }

    /// Adds `address` to VIP `vip` with `weight`, ready for new flows.
    pub fn add_server(
        &mut self,
        vip: &str,
        address: SocketAddr,
        weight: u32,
    ) -> Result<(), L4Error> {
        let service = self.service(vip)?;
        if service.server(address).is_ok() {
            return Err(L4Error::DuplicateServer {
                vip: vip.to_string(),
                server: address,
            });
        }
        check_server(service, address, weight)?;
        let vips: Vec<IpAddr> = self.services.values().map(|s| s.address.ip()).collect();
        if let Some(problem) = server_address_problem(address, &PoolKind::L4 { vips: &vips }) {
            return Err(L4Error::Address(problem));
        }
        check_not_own(address, &own_addresses())?;
        let id = self.server_ids.peek("server")?;
        self.server_ids.take(id);
        let seed = self.seed;
        let service = self.service_mut(vip)?;
        let checked = service.health.is_some();
        service
            .servers
            .push(L4Server::added(address, weight, checked, id));
        service.table = service.build_table(seed)?;
        Ok(())
    }

    /// Sets a server's admin state: `Ready` takes new flows, `Draining` and `Disabled` do not
    /// (their established flows continue).
    pub fn set_state(
        &mut self,
        vip: &str,
        address: SocketAddr,
        state: AdminState,
    ) -> Result<(), L4Error> {
        self.change_server(vip, address, |server| server.state = state)
    }

    /// Records what health checks say of a server: an unhealthy one leaves the table (and,
    /// with `down_flows = "repick"`, the server array, so its flows move).
    pub fn set_health(
        &mut self,
        vip: &str,
        address: SocketAddr,
        health: HealthState,
    ) -> Result<(), L4Error> {
        self.change_server(vip, address, |server| server.health = health)
    }

    /// Takes over the health (and slow starts) `previous` knows for servers that are in both:
    /// a reload must not forget that a server is down.
    pub fn carry_health(&mut self, previous: &L4Services) -> Result<(), L4Error> {
        let seed = self.seed;
        for service in self.services.values_mut() {
            let Some(old) = previous.services.get(&service.name) else {
                continue;
            };
            let checked = service.health.is_some();
            for server in &mut service.servers {
                if let Some(before) = old.find_server(server.address) {
                    server.carry_runtime(before, checked);
                }
            }
            service.table = service.build_table(seed)?;
        }
        Ok(())
    }

    /// Sets a server's weight.
    pub fn set_weight(
        &mut self,
        vip: &str,
        address: SocketAddr,
        weight: u32,
    ) -> Result<(), L4Error> {
        check_weight(weight)?;
        self.change_server(vip, address, |server| server.weight = weight)
    }

    /// Removes a server: it leaves the table, then the server array, so flows pinned to it
    /// pick another server on their next packet. (Whether to wait for its flows to drain
    /// first is the caller's policy.)
    pub fn remove_server(&mut self, vip: &str, address: SocketAddr) -> Result<(), L4Error> {
        let seed = self.seed;
        let service = self.service_mut(vip)?;
        let removed = service.servers.remove(service.server(address)?);
        service.table = service.build_table(seed)?;
        self.server_ids.free(removed.id);
        Ok(())
    }

    fn change_server(
        &mut self,
        vip: &str,
        address: SocketAddr,
        apply: impl FnOnce(&mut L4Server),
    ) -> Result<(), L4Error> {
        let seed = self.seed;
        let service = self.service_mut(vip)?;
        let index = service.server(address)?;
        service.servers[index].change(apply);
        service.table = service.build_table(seed)?;
        Ok(())
    }

    /// Whether any VIP needs a slow-start step now (checked before copying the model).
    pub fn slow_starts_pending(&self) -> bool {
        let now = Instant::now();
        self.services.values().any(|s| s.stepping(now))
    }

    /// Rebuilds the tables of VIPs with a server in slow start (the daemon calls it once a
    /// second and writes what changed).
    pub fn step_slow_starts(&mut self) -> Result<bool, L4Error> {
        let (seed, now) = (self.seed, Instant::now());
        let mut changed = false;
        for service in self.services.values_mut() {
            if service.stepping(now) {
                let table = service.build_table(seed)?;
                changed |= table != service.table;
                service.table = table;
            }
        }
        Ok(changed)
    }

    /// Writes these services into `maps`, which mirror `old` (`None`: unknown contents, e.g.
    /// maps adopted from a previous daemon; every entry is then rewritten and every stale
    /// one cleared).
    ///
    /// Order keeps every packet safe: new servers' entries first, so no table points at an
    /// empty slot; then tables (each an atomic switch) and VIP entries; then VIP entries no
    /// longer served; and last, entries of servers that are gone, so their pinned flows
    /// re-pick only once no table sends new flows there. A server that leaves its VIP (or
    /// whose id starts anew) has its traffic moved to the VIP's retired total, so a VIP's
    /// counters never go down; with `old` unknown, the VIP index is rebuilt from the VIP map.
    pub fn sync(
        &self,
        maps: &mut DatapathMaps,
        old: Option<&L4Services>,
    ) -> Result<(), DatapathError> {
        let old_servers: HashMap<u32, SocketAddr> =
            old.map(L4Services::server_addresses).unwrap_or_default();
        let servers = self.server_addresses();
        // Which VIP each server id counted for: a VIP's traffic is its servers' plus what its
        // former servers carried (`DatapathMaps::vip_traffic`), as long as the VIP keeps its
        // id (one given to another VIP starts from zero). A restarted daemon takes the ids'
        // holders as they are now.
        let members = self.server_vips();
        let kept_vips: HashSet<u32> = self
            .services
            .values()
            .filter(|s| {
                old.is_none_or(|old| old.services.get(&s.name).is_some_and(|o| o.id == s.id))
            })
            .map(|s| s.id)
            .collect();
        let old_members = old.map_or_else(|| members.clone(), L4Services::server_vips);
        let counted_for = |id: u32| {
            let (vip, _) = old_members.get(&id)?;
            kept_vips.contains(vip).then_some(*vip)
        };
        for (&id, &address) in &servers {
            if old_servers.get(&id) != Some(&address) {
                // The same server in a live slot keeps its generation (a restarted daemon
                // keeps every flow); a slot given anew takes the next one, so flows recorded
                // for the id's previous holder pick afresh.
                let slot = maps.server(id)?;
                let generation = if slot.is_present() && slot.socket_addr() == address {
                    slot.generation()
                } else {
                    // A new holder of the id starts with zero counters, not its predecessor's;
                    // those stay in the total of the VIP it counted for.
                    maps.retire_server_traffic(counted_for(id), id)?;
                    ServerInfo::next_generation(slot.generation())
                };
                maps.set_server(id, ServerInfo::with_generation(address, generation))?;
            }
        }

        for service in self.services.values() {
            let before = old.and_then(|o| o.services.get(&service.name));
            // A VIP id given anew (the map does not already hold this VIP under it, as it does
            // for a restarted daemon's VIPs) starts with zero counters.
            if before.is_none_or(|b| b.id != service.id)
                && maps.vip(&service.vip_keys()[0])?.map(|info| info.id) != Some(service.id)
            {
                maps.clear_vip_traffic(service.id)?;
            }
            if before.is_none_or(|b| b.id != service.id || b.table != service.table) {
                maps.install_table(service.id, &service.table)?;
            }
            if before
                .is_none_or(|b| b.vip_keys() != service.vip_keys() || b.info() != service.info())
            {
                for key in service.vip_keys() {
                    maps.set_vip(key, service.info())?;
                }
            }
        }

        let wanted: HashSet<VipKey> = self
            .services
            .values()
            .flat_map(L4Service::vip_keys)
            .collect();
        let present: Vec<VipKey> = match old {
            Some(old) => old
                .services
                .values()
                .flat_map(L4Service::vip_keys)
                .collect(),
            None => maps.vip_keys()?,
        };
        if old.is_none() {
            maps.rebuild_vip_index()?;
        }
        for key in present.iter().filter(|k| !wanted.contains(k)) {
            maps.remove_vip(key)?;
        }

        let gone: Vec<u32> = match old {
            Some(_) => old_servers
                .keys()
                .copied()
                .filter(|id| !servers.contains_key(id))
                .collect(),
            None => (0..MAX_SERVERS)
                .filter(|id| !servers.contains_key(id))
                .collect(),
        };
        for id in gone {
            let generation = maps.server(id)?.generation();
            maps.set_server(id, ServerInfo::emptied(generation))?;
        }
        // Servers that left their VIP, their entries emptied: what they carried stays the VIP's.
        for (&id, &(_, vip_name)) in &old_members {
            if members.get(&id).map(|&(_, name)| name) != Some(vip_name) {
                maps.retire_server_traffic(counted_for(id), id)?;
            }
        }
        maps.set_self_addresses(&self_addresses(self.services.values()))?;
        Ok(())
    }

    /// Every server id, with the id and name of the VIP it belongs to.
    fn server_vips(&self) -> HashMap<u32, (u32, &str)> {
        self.services
            .values()
            .flat_map(|s| {
                s.servers
                    .iter()
                    .map(|server| (server.id, (s.id, s.name.as_str())))
            })
            .collect()
    }

    /// The server entries the datapath holds: every server, except down ones whose flows
    /// re-pick.
    fn server_addresses(&self) -> HashMap<u32, SocketAddr> {
        self.services
            .values()
            .flat_map(|s| {
                s.servers
                    .iter()
                    .filter(|server| s.keeps_entry(server))
                    .map(|server| (server.id, server.address))
            })
            .collect()
    }

    /// The servers whose entries [`L4Services::sync`] writes anew coming from `old` (all of
    /// them from nothing): the ones whose neighbours to warm first ([`warm_neighbours`]).
    pub fn fresh_servers(&self, old: Option<&L4Services>) -> Vec<SocketAddr> {
        let old = old.map(L4Services::server_addresses).unwrap_or_default();
        self.server_addresses()
            .into_iter()
            .filter(|(id, address)| old.get(id) != Some(address))
            .map(|(_, address)| address)
            .collect()
    }

    /// What changes from `self` to `next`, one line per change, for operators.
    pub fn diff(&self, next: &L4Services) -> Vec<String> {
        let mut lines = Vec::new();
        for name in self.services.keys() {
            if !next.services.contains_key(name) {
                lines.push(format!("vip {name}: removed"));
            }
        }
        for (name, new) in &next.services {
            let Some(old) = self.services.get(name) else {
                lines.push(format!(
                    "vip {name}: added ({} {} {}, {} servers)",
                    new.address,
                    new.protocol,
                    new.mode,
                    new.servers.len()
                ));
                continue;
            };
            if (
                old.address,
                old.protocol,
                old.mode,
                old.hash,
                old.table_size,
            ) != (
                new.address,
                new.protocol,
                new.mode,
                new.hash,
                new.table_size,
            ) {
                lines.push(format!(
                    "vip {name}: now {} {} {} hash {} table {}",
                    new.address, new.protocol, new.mode, new.hash, new.table_size
                ));
            }
            lines.extend(server_changes(
                "vip",
                name,
                &old.server_lines(),
                &new.server_lines(),
            ));
        }
        if self.seed != next.seed {
            lines.push(format!("hash seed {} -> {}", self.seed, next.seed));
        }
        lines
    }
}

impl PoolEdit for L4Services {
    type Error = L4Error;

    fn has_server(&self, vip: &str, address: SocketAddr) -> Result<bool, L4Error> {
        Ok(self.service(vip)?.server(address).is_ok())
    }
    fn add_server(&mut self, vip: &str, address: SocketAddr, weight: u32) -> Result<(), L4Error> {
        L4Services::add_server(self, vip, address, weight)
    }
    fn set_weight(&mut self, vip: &str, address: SocketAddr, weight: u32) -> Result<(), L4Error> {
        L4Services::set_weight(self, vip, address, weight)
    }
    fn remove_server(&mut self, vip: &str, address: SocketAddr) -> Result<(), L4Error> {
        L4Services::remove_server(self, vip, address)
    }
}

/// Gets the kernel to resolve the MAC of each server before traffic needs it. Network I/O
/// (up to [`WARM_TIMEOUT`]), never part of [`L4Services::sync`]: callers warm the servers they
/// are about to add ([`L4Services::fresh_servers`]) where waiting costs nothing — the daemon
/// before it takes its lock for `server add`, at start-up and on reload.
///
/// DSR packets cannot fall back to the kernel's forwarding (their destination is a VIP), so the
/// program drops them while a server's neighbour entry is missing; NAT packets fall back to the
/// kernel's slow path until it is resolved. A TCP connection attempt to
/// the server (closed at once, or refused: either way the MAC is resolved) is the probe a
/// health check makes anyway. Bounded: at most [`WARM_TIMEOUT`] for all servers together.
pub fn warm_neighbours(servers: impl IntoIterator<Item = SocketAddr>) {
    std::thread::scope(|scope| {
        for server in servers {
            scope.spawn(move || {
                let _ = std::net::TcpStream::connect_timeout(&server, WARM_TIMEOUT);
            });
        }
    });
}

const WARM_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(200);

fn check_server(service: &L4Service, address: SocketAddr, weight: u32) -> Result<(), L4Error> {
    if address.is_ipv4() != service.address.is_ipv4() {
        return Err(L4Error::FamilyMismatch {
            vip: service.name.clone(),
            server: address,
        });
    }
    if service.mode == ForwardingMode::Dsr && address.port() != service.address.port() {
        return Err(L4Error::DsrPort {
            vip: service.name.clone(),
            server: address,
            port: service.address.port(),
        });
    }
    check_weight(weight)
}

fn check_weight(weight: u32) -> Result<(), L4Error> {
    if (1..=MAX_WEIGHT).contains(&weight) {
        Ok(())
    } else {
        Err(L4Error::Weight(weight))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pool: &str) -> Config {
        let source = format!(
            "[[l4_vip]]\nname = \"web\"\naddress = \"198.18.100.10\"\nport = 80\nprotocol = \"tcp\"\ntable_size = 251\nservers = [{pool}]\n"
        );
        Config::parse(std::path::Path::new("weir.toml"), &source).expect("valid config")
    }

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([198, 18, 11, last], 80))
    }

    /// (weight, state, id) of each server of `web`, by its address's last byte.
    fn pool(services: &L4Services) -> BTreeMap<u8, (u32, AdminState, u32)> {
        services
            .service("web")
            .unwrap()
            .servers
            .iter()
            .map(|s| match s.address.ip() {
                std::net::IpAddr::V4(ip) => (ip.octets()[3], (s.weight, s.state, s.id)),
                std::net::IpAddr::V6(_) => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn a_new_config_merges_with_runtime_changes_three_ways() {
        let first = config(
            r#"{ address = "198.18.11.1:80" }, { address = "198.18.11.2:80" }, { address = "198.18.11.3:80" }"#,
        );
        let mut running = L4Services::plan(&first, None).unwrap();
        // Runtime: .4 added, .1 drained, .2 reweighted.
        running.add_server("web", addr(4), 40).unwrap();
        running
            .set_state("web", addr(1), AdminState::Draining)
            .unwrap();
        running.set_weight("web", addr(2), 7).unwrap();
        let ids = pool(&running);

        // The file: .2 removed, .3 reweighted, .5 added.
        let edited = config(
            r#"{ address = "198.18.11.1:80" }, { address = "198.18.11.3:80", weight = 250 }, { address = "198.18.11.5:80" }"#,
        );
        let merged = L4Services::plan(&edited, Some(&running.runtime_state())).unwrap();
        let after = pool(&merged);
        assert_eq!(after[&1], (100, AdminState::Draining, ids[&1].2));
        assert_eq!(after[&3], (250, AdminState::Ready, ids[&3].2));
        assert_eq!(after[&4], (40, AdminState::Ready, ids[&4].2));
        assert_eq!((after[&5].0, after[&5].1), (100, AdminState::Ready));
        assert!(!after.contains_key(&2));
        // The newcomer never takes an id a carried-over server holds.
        assert!(![ids[&1].2, ids[&3].2, ids[&4].2].contains(&after[&5].2));
        assert_eq!(
            running.diff(&merged),
            [
                "vip web: server 198.18.11.2:80 removed",
                "vip web: server 198.18.11.3:80 weight 100 -> 250",
                "vip web: server 198.18.11.5:80 added (weight 100, ready)",
            ]
        );

        // The same config again is no change; the state is a fixed point.
        // (Runtime-only marks such as a slow start's beginning are not part of the state.)
        let again = L4Services::plan(&edited, Some(&merged.runtime_state())).unwrap();
        assert_eq!(again.runtime_state(), merged.runtime_state());
        assert!(merged.diff(&again).is_empty());
        for (a, b) in again.services().zip(merged.services()) {
            assert_eq!(a.table, b.table);
        }
    }

    #[test]
    fn the_table_digest_names_the_table_not_the_ids_or_the_order() {
        let plan = |servers: &str| {
            let source = format!(
                "[datapath]\nhash_seed = 9\n\n[[l4_vip]]\nname = \"web\"\naddress = \"198.18.100.10\"\nport = 80\nprotocol = \"tcp\"\nservers = [{servers}]\n"
            );
            let config = Config::parse(std::path::Path::new("weir.toml"), &source).unwrap();
            L4Services::plan(&config, None).unwrap()
        };
        let a = plan(
            r#"{ address = "198.18.11.1:80" }, { address = "198.18.11.2:80" }, { address = "198.18.11.3:80", weight = 50 }"#,
        );
        // Another node: the same pool listed in another order, so its servers have other ids.
        let b = plan(
            r#"{ address = "198.18.11.3:80", weight = 50 }, { address = "198.18.11.1:80" }, { address = "198.18.11.2:80" }"#,
        );
        let digest = |s: &L4Services| s.service("web").unwrap().table_digest();
        let id_of = |s: &L4Services| s.service("web").unwrap().find_server(addr(3)).unwrap().id;
        assert_ne!(id_of(&a), id_of(&b), "the ids differ");
        assert_eq!(digest(&a), digest(&b));
        // A different pool is a different table.
        let c = plan(
            r#"{ address = "198.18.11.1:80" }, { address = "198.18.11.2:80" }, { address = "198.18.11.3:80", weight = 60 }"#,
        );
        assert_ne!(digest(&a), digest(&c));
    }

    #[test]
    fn a_server_added_at_run_time_starts_with_a_sliver_of_the_table_and_ramps() {
        let source = "[[l4_vip]]\nname = \"web\"\naddress = \"198.18.100.10\"\nport = 80\nprotocol = \"tcp\"\nslow_start_ms = 1500\nservers = [{ address = \"198.18.11.1:80\" }, { address = \"198.18.11.2:80\" }]\n";
        let config = Config::parse(std::path::Path::new("weir.toml"), source).unwrap();
        let mut services = L4Services::plan(&config, None).unwrap();
        let share = |services: &L4Services, last: u8| {
            let service = services.service("web").unwrap();
            let id = service.find_server(addr(last)).unwrap().id;
            service.table.iter().filter(|&&s| s == id).count() as f64 / service.table.len() as f64
        };
        // The initial pool is whole from the start.
        assert!((share(&services, 1) - 0.5).abs() < 0.01);
        assert!(!services.slow_starts_pending());
        assert!(!services.step_slow_starts().unwrap());
        services.add_server("web", addr(3), 100).unwrap();
        assert!(services.slow_starts_pending());
        // Weight 1 of 201 at first.
        assert!(share(&services, 3) < 0.02, "{}", share(&services, 3));
        std::thread::sleep(std::time::Duration::from_millis(750));
        assert!(services.step_slow_starts().unwrap());
        let halfway = share(&services, 3);
        assert!((0.15..0.4).contains(&halfway), "{halfway}");
        std::thread::sleep(std::time::Duration::from_millis(800));
        assert!(services.step_slow_starts().unwrap());
        assert!((share(&services, 3) - 1.0 / 3.0).abs() < 0.01);
    }

    #[test]
    fn when_every_server_is_down_the_table_is_empty_or_fails_open() {
        for (policy, expected) in [("refuse", 0), ("fail_open", 2)] {
            let source = format!(
                "[[l4_vip]]\nname = \"web\"\naddress = \"198.18.100.10\"\nport = 80\nprotocol = \"tcp\"\nservers = [{{ address = \"198.18.11.1:80\" }}, {{ address = \"198.18.11.2:80\" }}, {{ address = \"198.18.11.3:80\" }}]\n[l4_vip.health]\nall_down = \"{policy}\"\n"
            );
            let config = Config::parse(std::path::Path::new("weir.toml"), &source).unwrap();
            let mut services = L4Services::plan(&config, None).unwrap();
            services
                .set_state("web", addr(3), AdminState::Disabled)
                .unwrap();
            for last in [1, 2, 3] {
                services
                    .set_health("web", addr(last), HealthState::Unhealthy)
                    .unwrap();
            }
            let service = services.service("web").unwrap();
            let in_table: HashSet<u32> = service.table.iter().copied().collect();
            assert_eq!(in_table.len(), expected, "{policy}");
            // Fail open never brings back a disabled server.
            let disabled = service.find_server(addr(3)).unwrap().id;
            assert!(!in_table.contains(&disabled));
        }
    }
}
