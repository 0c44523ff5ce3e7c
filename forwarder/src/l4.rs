//! The L4 services: VIPs, their pools and their servers' states, and how a change to them
//! reaches the datapath maps.
//!
//! This is the model the control plane drives. Every change follows one discipline:
//! 1. apply it to a copy of the VIP and build the new Maglev table (everything that can be
//!    refused is refused here, before any map is touched);
//! 2. write the maps in the order that keeps every packet safe —
//!    a new server's entry before the table that points at it; the new table (one atomic
//!    switch, see [`DatapathMaps::install_table`]); a removed server's entry cleared last, so
//!    its pinned flows re-pick;
//! 3. commit the copy.
//!
//! Only new flows whose Maglev slot changed move; established flows stay pinned by the flow
//! table. A draining or disabled server leaves the table but stays present, so its flows
//! finish where they are.
//!
//! Server ids index the server array that flows point into. A freed id is reused only after
//! every other free id (FIFO), so a flow pinned to a removed server almost surely finds the id
//! empty (and re-picks) rather than taken by a newcomer.

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
};

use weir_common::{
    flow::FlowKey,
    l4::{
        DatapathSettings, ForwardMode, HashFields, MAX_SERVERS, MAX_VIPS, PROTO_TCP, PROTO_UDP,
        ServerInfo, VipInfo, VipKey,
    },
    user::addr_words,
};
use weir_config::{
    Config, ForwardingMode, HashFieldsConfig, L4Vip, MAX_WEIGHT, Protocol, control::AdminState,
};

use crate::{
    datapath::{DatapathError, DatapathMaps},
    maglev::{MaglevError, MaglevServer, MaglevTable},
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
    #[error("no room for another {0} (the datapath holds at most {1})")]
    Full(&'static str, u32),
    #[error("cannot build the Maglev table: {0}")]
    Maglev(#[from] MaglevError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// A server in an L4 pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L4Server {
    pub address: SocketAddr,
    pub weight: u32,
    pub state: AdminState,
    /// Index in the datapath's server array.
    pub id: u32,
}

/// An L4 VIP and its pool.
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

impl L4Service {
    fn key(&self) -> VipKey {
        VipKey::new(self.address, protocol_number(self.protocol))
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
        self.servers
            .iter()
            .position(|s| s.address == address)
            .ok_or_else(|| L4Error::UnknownServer {
                vip: self.name.clone(),
                server: address,
            })
    }

    /// The Maglev table over the servers that take new flows, as server ids.
    fn table(&self, seed: u32) -> Result<Vec<u32>, L4Error> {
        let ready: Vec<&L4Server> = self
            .servers
            .iter()
            .filter(|s| s.state == AdminState::Ready)
            .collect();
        let input: Vec<MaglevServer> = ready
            .iter()
            .map(|s| MaglevServer {
                address: s.address,
                weight: s.weight,
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

/// The datapath settings the config asks for.
pub fn settings(config: &Config) -> DatapathSettings {
    let ns = |secs: u64| secs.saturating_mul(1_000_000_000);
    DatapathSettings {
        hash_seed: config.datapath.hash_seed,
        _pad: 0,
        tcp_idle_ns: ns(config.datapath.tcp_idle_timeout_secs),
        udp_idle_ns: ns(config.datapath.udp_idle_timeout_secs),
        closing_idle_ns: ns(config.datapath.closing_timeout_secs),
    }
}

/// Lowest-first ids for new entries, FIFO reuse of freed ones.
#[derive(Debug, Clone)]
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

/// All L4 services, and the datapath maps they are mirrored into.
#[derive(Debug)]
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

    /// The services of `config`, written into `maps`.
    pub fn from_config(config: &Config, maps: &mut DatapathMaps) -> Result<L4Services, L4Error> {
        let mut services = L4Services::new(config.datapath.hash_seed);
        for vip in &config.l4_vips {
            services.add_vip(maps, vip)?;
        }
        Ok(services)
    }

    pub fn services(&self) -> impl Iterator<Item = &L4Service> {
        self.services.values()
    }

    pub fn service(&self, name: &str) -> Result<&L4Service, L4Error> {
        self.services
            .get(name)
            .ok_or_else(|| L4Error::UnknownVip(name.to_string()))
    }

    /// Adds a VIP with the pool of its config (all servers ready).
    pub fn add_vip(&mut self, maps: &mut DatapathMaps, spec: &L4Vip) -> Result<(), L4Error> {
        let name = spec.name.get_ref().clone();
        if self.services.contains_key(&name) {
            return Err(L4Error::DuplicateVip(name));
        }
        let id = self.vip_ids.peek("VIP")?;
        let mut service = L4Service {
            name: name.clone(),
            address: SocketAddr::new(spec.address, spec.port),
            protocol: spec.protocol,
            mode: spec.mode,
            hash: spec.hash,
            table_size: *spec.table_size.get_ref(),
            id,
            servers: Vec::new(),
        };
        let mut server_ids = self.server_ids.clone();
        for server in spec.servers.get_ref() {
            check_server(&service, server.address, server.weight)?;
            let id = server_ids.peek("server")?;
            server_ids.take(id);
            service.servers.push(L4Server {
                address: server.address,
                weight: server.weight,
                state: AdminState::Ready,
                id,
            });
        }
        let table = service.table(self.seed)?;
        for server in &service.servers {
            maps.set_server(server.id, ServerInfo::new(server.address))?;
        }
        warm_neighbours(service.servers.iter().map(|s| s.address));
        maps.install_table(id, &table)?;
        maps.set_vip(service.key(), service.info())?;
        let (words, family) = addr_words(service.address.ip());
        maps.set_vip(VipKey::address_only(words, family), service.info())?;
        self.vip_ids.take(id);
        self.server_ids = server_ids;
        self.services.insert(name, service);
        Ok(())
    }

    /// Adds `address` to VIP `vip` with `weight`, ready for new flows.
    pub fn add_server(
        &mut self,
        maps: &mut DatapathMaps,
        vip: &str,
        address: SocketAddr,
        weight: u32,
    ) -> Result<(), L4Error> {
        let mut service = self.service(vip)?.clone();
        if service.server(address).is_ok() {
            return Err(L4Error::DuplicateServer {
                vip: vip.to_string(),
                server: address,
            });
        }
        check_server(&service, address, weight)?;
        let id = self.server_ids.peek("server")?;
        service.servers.push(L4Server {
            address,
            weight,
            state: AdminState::Ready,
            id,
        });
        let table = service.table(self.seed)?;
        maps.set_server(id, ServerInfo::new(address))?;
        warm_neighbours([address]);
        maps.install_table(service.id, &table)?;
        self.server_ids.take(id);
        self.services.insert(vip.to_string(), service);
        Ok(())
    }

    /// Sets a server's admin state: `Ready` takes new flows, `Draining` and `Disabled` do not
    /// (their established flows continue).
    pub fn set_state(
        &mut self,
        maps: &mut DatapathMaps,
        vip: &str,
        address: SocketAddr,
        state: AdminState,
    ) -> Result<(), L4Error> {
        self.change(maps, vip, address, |server| server.state = state)
    }

    /// Sets a server's weight.
    pub fn set_weight(
        &mut self,
        maps: &mut DatapathMaps,
        vip: &str,
        address: SocketAddr,
        weight: u32,
    ) -> Result<(), L4Error> {
        check_weight(weight)?;
        self.change(maps, vip, address, |server| server.weight = weight)
    }

    /// Removes a server: it leaves the table, then the server array, so flows pinned to it
    /// pick another server on their next packet. (Whether to wait for its flows to drain
    /// first is the caller's policy.)
    pub fn remove_server(
        &mut self,
        maps: &mut DatapathMaps,
        vip: &str,
        address: SocketAddr,
    ) -> Result<(), L4Error> {
        let mut service = self.service(vip)?.clone();
        let removed = service.servers.remove(service.server(address)?);
        let table = service.table(self.seed)?;
        maps.install_table(service.id, &table)?;
        maps.set_server(removed.id, ServerInfo::default())?;
        self.server_ids.free(removed.id);
        self.services.insert(vip.to_string(), service);
        Ok(())
    }

    fn change(
        &mut self,
        maps: &mut DatapathMaps,
        vip: &str,
        address: SocketAddr,
        apply: impl FnOnce(&mut L4Server),
    ) -> Result<(), L4Error> {
        let mut service = self.service(vip)?.clone();
        let index = service.server(address)?;
        apply(&mut service.servers[index]);
        let table = service.table(self.seed)?;
        maps.install_table(service.id, &table)?;
        self.services.insert(vip.to_string(), service);
        Ok(())
    }
}

/// Gets the kernel to resolve the MAC of each server before traffic needs it.
///
/// DSR packets cannot fall back to the kernel's forwarding (their destination is a VIP), so the
/// program drops them while a server's neighbour entry is missing; NAT packets fall back to the
/// kernel's slow path until it is resolved. A TCP connection attempt to
/// the server (closed at once, or refused: either way the MAC is resolved) is the probe a
/// health check makes anyway. Bounded: at most [`WARM_TIMEOUT`] for all servers together.
fn warm_neighbours(servers: impl IntoIterator<Item = SocketAddr>) {
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
