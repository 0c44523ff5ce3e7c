//! The L4 datapath as userspace sees it: load the object, write its maps, attach its programs
//! (the XDP balancer, and the NAT return path at TC ingress) to every configured interface.
//!
//! The object is embedded at build time from aya-build's output (`forwarder/build.rs`), so the
//! daemon binary always carries the eBPF code it was built and tested with. Start-up writes
//! every map (settings, device map, VIPs, servers, tables) *before* the program is attached,
//! so the first packet already sees a complete configuration.
//!
//! With a [`PinDir`] the maps and links are pinned ([`crate::pins`]): a daemon that finds a
//! pinned datapath adopts it — its program is loaded against the pinned maps (flows, counters
//! and tables carry over) and swapped into the pinned links atomically.

use std::{
    collections::{BTreeSet, HashMap as StdHashMap},
    net::IpAddr,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, ArrayOfMaps, DevMapHash, HashMap, IterableMap, MapData, MapError, PerCpuArray,
        PerCpuValues,
    },
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::{XdpLink, XdpMode as AyaXdpMode},
    },
};
use weir_common::{
    Counter, Stat, TrafficCounter,
    edge::{AddressKey, EdgeSettings, Event},
    flow::{Embryonic, EmbryonicKey, FLOW_CLOSING, FlowKey, FlowState},
    l4::{
        DatapathSettings, ServerInfo, VIP_INDEX_EMPTY, VIP_INDEX_SHARED, VIP_INDEX_SLOTS, VipInfo,
        VipKey, VipSlot,
    },
    names,
};
use weir_config::{Config, XdpMode, control::XdpAttachment};

use crate::{
    map_batch,
    pins::{PinDir, PinError},
};

/// The eBPF object built from the `ebpf` crate.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weir"));

/// `BPF_F_INNER_MAP`: lets a Maglev table's size differ from the template in the object.
const BPF_F_INNER_MAP: u32 = 1 << 12;

/// Why the datapath could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("cannot load the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no `{0}` {1}")]
    Missing(&'static str, &'static str),
    #[error("cannot load a program of the datapath into the kernel: {0}")]
    Program(#[source] ProgramError),
    #[error("cannot attach the NAT return program (TC ingress) to `{interface}`: {source}")]
    AttachTc {
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error("cannot attach XDP to `{interface}` in {mode:?} mode: {source}")]
    Attach {
        interface: String,
        mode: XdpMode,
        #[source]
        source: ProgramError,
    },
    #[error("no interface named `{0}`")]
    NoInterface(String),
    #[error("cannot add `{0}` to the device map: {1}")]
    TxPort(String, #[source] aya::maps::xdp::XdpMapError),
    #[error("map `{0}`: {1}")]
    Map(&'static str, #[source] MapError),
    #[error("map `{0}`: batched update: {1}")]
    MapBatch(&'static str, #[source] std::io::Error),
    #[error("pinning the datapath: {0}")]
    Pin(#[from] PinError),
    #[error("cannot pin a link of `{0}`: {1}")]
    PinLink(String, #[source] aya::pin::PinError),
    #[error("a pinned link of `{0}`: {1}")]
    Link(String, #[source] LinkError),
}

/// What the datapath is started with.
#[derive(Debug, Clone)]
pub struct DatapathOptions {
    /// Interfaces both programs are attached to (where client traffic arrives).
    pub interfaces: Vec<String>,
    /// Interfaces that face only servers: the NAT return program alone is attached there.
    /// The programs may redirect to interfaces of both lists.
    pub server_interfaces: Vec<String>,
    pub xdp_mode: XdpMode,
    /// Entries in the flow table and in the NAT return table.
    pub flow_table_size: u32,
    /// Entries in the embryonic table.
    pub embryonic_table_size: u32,
    pub settings: DatapathSettings,
    /// Embryonic timeout and flood guard.
    pub edge: EdgeSettings,
    /// Where maps and links are pinned. `None`: nothing is pinned and the datapath lives
    /// exactly as long as the [`Datapath`] value (tests, benchmarks).
    pub pins: Option<PinDir>,
}

impl DatapathOptions {
    /// What `config`'s `[datapath]` asks for, pinned in `pins` (if any).
    pub fn from_config(config: &Config, pins: Option<PinDir>) -> DatapathOptions {
        DatapathOptions {
            interfaces: config.datapath.interface_names(),
            server_interfaces: config.datapath.server_interface_names(),
            xdp_mode: config.datapath.xdp_mode,
            flow_table_size: *config.datapath.flow_table_size.get_ref(),
            embryonic_table_size: *config.datapath.embryonic_table_size.get_ref(),
            settings: settings(config),
            edge: edge_settings(config),
            pins,
        }
    }

    /// Every interface the datapath uses: client-facing first, then server-facing.
    pub fn all_interfaces(&self) -> impl Iterator<Item = &String> {
        self.interfaces.iter().chain(&self.server_interfaces)
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

/// The edge settings the config asks for (embryonic timeout, flood guard).
pub fn edge_settings(config: &Config) -> EdgeSettings {
    EdgeSettings {
        embryonic_idle_ns: config
            .datapath
            .embryonic_timeout_secs
            .get_ref()
            .saturating_mul(1_000_000_000),
        flows_per_cpu_per_sec: config.datapath.new_flows_per_cpu_per_sec,
        _pad: 0,
    }
}

/// What one walk of the flow table found.
#[derive(Debug, Default)]
pub struct FlowCensus {
    /// Active flows per server id.
    pub per_server: StdHashMap<u32, usize>,
    /// Entries in all.
    pub entries: usize,
}

/// The loaded object, its attachments and typed handles on its maps.
///
/// Dropping it closes the daemon's handles. Unpinned, that detaches the program and frees
/// the maps; pinned, the datapath keeps running from the pins.
pub struct Datapath {
    /// Owns the program and its unpinned links: held so they live as long as the datapath.
    ebpf: Ebpf,
    maps: DatapathMaps,
    options: DatapathOptions,
    adopted: bool,
    attachments: Vec<XdpAttachment>,
}

impl Datapath {
    /// Loads the embedded object, sizes and fills the global maps (settings, device map). The
    /// program is loaded into the kernel but not attached: write the services into
    /// [`Datapath::maps_mut`], then call [`Datapath::attach`].
    ///
    /// With pins, maps already pinned are adopted as they are (a pinned flow table keeps the
    /// size it was created with) and missing ones are created and pinned.
    pub fn load(options: DatapathOptions) -> Result<Datapath, DatapathError> {
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(names::FLOWS_MAP, options.flow_table_size)
            .map_max_entries(names::NAT_RETURN_MAP, options.flow_table_size)
            .map_max_entries(names::EMBRYONIC_MAP, options.embryonic_table_size);
        let adopted = options.pins.as_ref().is_some_and(PinDir::has_maps);
        if let Some(pins) = &options.pins {
            for &name in names::ALL_MAPS {
                loader.map_pin_path(name, pins.map(name));
            }
            // A map an earlier version pinned and this one has no use for: the running
            // program keeps its own reference until it is replaced.
            for &name in names::RETIRED_MAPS {
                let path = pins.map(name);
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::info!(map = name, "unpinned a map this version no longer uses")
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(map = name, path = %path.display(), %e, "cannot unpin a retired map")
                    }
                }
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        let mut maps = DatapathMaps::take(&mut ebpf)?;
        maps.set_settings(options.settings)?;
        maps.set_edge_settings(options.edge)?;
        let mut wanted = Vec::new();
        for interface in options.all_interfaces() {
            let ifindex = nix::net::if_::if_nametoindex(interface.as_str())
                .map_err(|_| DatapathError::NoInterface(interface.clone()))?;
            maps.tx_ports
                .insert(ifindex, ifindex, None, 0)
                .map_err(|e| DatapathError::TxPort(interface.clone(), e))?;
            wanted.push(ifindex);
        }
        // An adopted device map may still list interfaces the config no longer has.
        let stale: Vec<u32> = maps.tx_ports.keys().filter_map(Result::ok).collect();
        for ifindex in stale.into_iter().filter(|i| !wanted.contains(i)) {
            let _ = maps.tx_ports.remove(ifindex);
        }
        let program: &mut Xdp = program_mut(&mut ebpf, names::XDP_PROGRAM)?;
        program.load().map_err(DatapathError::Program)?;
        let nat_return: &mut SchedClassifier =
            program_mut(&mut ebpf, names::TC_NAT_RETURN_PROGRAM)?;
        nat_return.load().map_err(DatapathError::Program)?;
        Ok(Datapath {
            ebpf,
            maps,
            options,
            adopted,
            attachments: Vec::new(),
        })
    }

    /// Whether the maps were adopted from a previous daemon's pins rather than created.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Attaches the NAT return program to every interface in the options, then the XDP
    /// program to the client-facing ones (`interfaces`) — in that order, as the XDP program
    /// leaves NAT replies to TC. (An adopted datapath's older XDP program may still rewrite
    /// them itself; until it is replaced, TC never sees them.)
    ///
    /// Pinned: an interface with a pinned link gets the new program swapped into that link
    /// (atomic: each packet runs the old or the new program); one without gets a new link,
    /// pinned; pinned links the options no longer ask for are unpinned, which detaches them —
    /// so an interface moved to `server_interfaces` loses its XDP program on restart.
    pub fn attach(&mut self) -> Result<(), DatapathError> {
        let tc_program_id = self.attach_nat_return()?;
        let mode = self.options.xdp_mode;
        let program: &mut Xdp = program_mut(&mut self.ebpf, names::XDP_PROGRAM)?;
        let program_id = program.info().map_err(DatapathError::Program)?.id();
        let pins = self.options.pins.as_ref();
        for interface in &self.options.interfaces {
            let aya_mode = match mode {
                XdpMode::Native => AyaXdpMode::Driver,
                XdpMode::Generic => AyaXdpMode::Skb,
            };
            let attach_error = |source| DatapathError::Attach {
                interface: interface.clone(),
                mode,
                source,
            };
            let replaced = match pins {
                Some(pins) => replace_pinned(interface, &pins.link(interface), |link: XdpLink| {
                    program.attach_to_link(link).map(drop)
                })?,
                None => false,
            };
            if !replaced {
                let id = program.attach(interface, aya_mode).map_err(attach_error)?;
                if let Some(pins) = pins {
                    let link = program.take_link(id).map_err(attach_error)?;
                    pin_link(link, interface, &pins.link(interface))?;
                }
            }
        }
        for interface in self.options.all_interfaces() {
            let xdp = self.options.interfaces.contains(interface);
            self.attachments.push(XdpAttachment {
                interface: interface.clone(),
                ifindex: nix::net::if_::if_nametoindex(interface.as_str()).unwrap_or(0),
                mode,
                program_id: xdp.then_some(program_id),
                tc_program_id,
            });
        }
        if let Some(pins) = pins {
            let linked = pins.linked_interfaces()?;
            unpin_unconfigured(linked, &self.options.interfaces, |i| pins.link(i), "XDP");
        }
        Ok(())
    }

    /// Attaches the NAT return program at TC ingress (tcx) of every interface, pinned like the
    /// XDP links; returns its program id.
    fn attach_nat_return(&mut self) -> Result<u32, DatapathError> {
        let program: &mut SchedClassifier =
            program_mut(&mut self.ebpf, names::TC_NAT_RETURN_PROGRAM)?;
        let program_id = program.info().map_err(DatapathError::Program)?.id();
        let pins = self.options.pins.as_ref();
        let all: Vec<String> = self.options.all_interfaces().cloned().collect();
        for interface in &all {
            let attach_error = |source| DatapathError::AttachTc {
                interface: interface.clone(),
                source,
            };
            let replaced = match pins {
                Some(pins) => replace_pinned(
                    interface,
                    &pins.tc_link(interface),
                    |link: SchedClassifierLink| program.attach_to_link(link).map(drop),
                )?,
                None => false,
            };
            if replaced {
                continue;
            }
            let id = program
                .attach_with_options(
                    interface,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(attach_error)?;
            if let Some(pins) = pins {
                let link = program.take_link(id).map_err(attach_error)?;
                pin_link(link, interface, &pins.tc_link(interface))?;
            }
        }
        if let Some(pins) = pins {
            let linked = pins.tc_linked_interfaces()?;
            unpin_unconfigured(linked, &all, |i| pins.tc_link(i), "TC");
        }
        Ok(program_id)
    }

    /// Where the programs are attached.
    pub fn attachments(&self) -> &[XdpAttachment] {
        &self.attachments
    }

    pub fn maps(&self) -> &DatapathMaps {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut DatapathMaps {
        &mut self.maps
    }

    /// One of the object's trivial programs (`names::FLOOR_*`), loaded on first use: what the
    /// benchmarks measure the balancer against.
    pub fn floor_program(&mut self, name: &'static str) -> Result<&Xdp, DatapathError> {
        let program: &mut Xdp = program_mut(&mut self.ebpf, name)?;
        if program.fd().is_err() {
            program.load().map_err(DatapathError::Program)?;
        }
        Ok(program)
    }

    /// The loaded XDP program, for `BPF_PROG_TEST_RUN` in tests and benchmarks.
    pub fn program(&self) -> Result<&Xdp, DatapathError> {
        program(&self.ebpf, names::XDP_PROGRAM)
    }

    /// The loaded NAT return program (TC), for `BPF_PROG_TEST_RUN` in tests and benchmarks.
    pub fn nat_return_program(&self) -> Result<&SchedClassifier, DatapathError> {
        program(&self.ebpf, names::TC_NAT_RETURN_PROGRAM)
    }
}

/// The program `name` of the object as its kind `P` (`Xdp`, `SchedClassifier`).
fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, DatapathError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing(name, "program"))?
        .try_into()
        .map_err(DatapathError::Program)
}

/// The program `name` of the object as its kind `P`, read-only.
fn program<'a, P>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a P, DatapathError>
where
    &'a P: TryFrom<&'a aya::programs::Program, Error = ProgramError>,
{
    ebpf.program(name)
        .ok_or(DatapathError::Missing(name, "program"))?
        .try_into()
        .map_err(DatapathError::Program)
}

/// Pins a new link of `interface` at `path`. The pin keeps the link; our handle on it closes
/// when dropped here.
fn pin_link<L: TryInto<FdLink, Error = LinkError>>(
    link: L,
    interface: &str,
    path: &std::path::Path,
) -> Result<(), DatapathError> {
    let link: FdLink = link
        .try_into()
        .map_err(|e| DatapathError::Link(interface.to_string(), e))?;
    link.pin(path)
        .map(drop)
        .map_err(|e| DatapathError::PinLink(interface.to_string(), e))
}

/// Unpins (and so detaches) the `kind` links of `linked` interfaces that are no longer in
/// `configured`.
fn unpin_unconfigured(
    linked: Vec<String>,
    configured: &[String],
    path_of: impl Fn(&str) -> std::path::PathBuf,
    kind: &str,
) {
    for interface in linked {
        if !configured.contains(&interface) {
            tracing::info!(interface, kind, "detaching: interface no longer configured");
            let _ = std::fs::remove_file(path_of(&interface));
        }
    }
}

/// Swaps a program into the link pinned at `path` with `attach_to_link`, if there is a link
/// that still works. A link whose interface went away (the kernel detached it) is unpinned
/// and reported as absent, so the caller attaches afresh.
fn replace_pinned<L: TryFrom<FdLink, Error = LinkError>>(
    interface: &str,
    path: &std::path::Path,
    attach_to_link: impl FnOnce(L) -> Result<(), ProgramError>,
) -> Result<bool, DatapathError> {
    if !path.exists() {
        return Ok(false);
    }
    let link_error = |e| DatapathError::Link(interface.to_string(), e);
    let link = L::try_from(FdLink::from(
        PinnedLink::from_pin(path).map_err(link_error)?,
    ))
    .map_err(link_error)?;
    match attach_to_link(link) {
        Ok(()) => Ok(true),
        Err(err) => {
            tracing::warn!(interface, path = %path.display(), %err, "pinned link is defunct: attaching afresh");
            let _ = std::fs::remove_file(path);
            Ok(false)
        }
    }
}

/// Typed handles on the maps the daemon writes and reads.
pub struct DatapathMaps {
    stats: PerCpuArray<MapData, Counter>,
    vips: HashMap<MapData, VipKey, VipInfo>,
    vip_index: Array<MapData, u16>,
    vip_slots: Array<MapData, VipSlot>,
    servers: Array<MapData, ServerInfo>,
    maglev: ArrayOfMaps<MapData, Array<MapData, u32>>,
    flows: HashMap<MapData, FlowKey, FlowState>,
    settings: Array<MapData, DatapathSettings>,
    tx_ports: DevMapHash<MapData>,
    vip_retired: Array<MapData, TrafficCounter>,
    server_stats: PerCpuArray<MapData, TrafficCounter>,
    embryonic: HashMap<MapData, EmbryonicKey, Embryonic>,
    self_addresses: HashMap<MapData, AddressKey, u8>,
    edge_settings: Array<MapData, EdgeSettings>,
    events: PerCpuArray<MapData, u64>,
}

/// The VIP index entry that names VIP `id`.
fn index_entry(id: u32) -> u16 {
    // VIP ids are below `MAX_VIPS` (256), far from the shared mark.
    id as u16 + 1
}

/// Takes the map `name` out of `ebpf` as a typed handle.
fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DatapathError::Missing(name, "map"))?;
    T::try_from(map).map_err(|e| DatapathError::Map(name, e))
}

impl DatapathMaps {
    fn take(ebpf: &mut Ebpf) -> Result<DatapathMaps, DatapathError> {
        Ok(DatapathMaps {
            stats: take(ebpf, names::STATS_MAP)?,
            vips: take(ebpf, names::VIPS_MAP)?,
            vip_index: take(ebpf, names::VIP_INDEX_MAP)?,
            vip_slots: take(ebpf, names::VIP_SLOTS_MAP)?,
            servers: take(ebpf, names::SERVERS_MAP)?,
            maglev: take(ebpf, names::MAGLEV_MAP)?,
            flows: take(ebpf, names::FLOWS_MAP)?,
            settings: take(ebpf, names::SETTINGS_MAP)?,
            tx_ports: take(ebpf, names::TX_PORTS_MAP)?,
            vip_retired: take(ebpf, names::VIP_RETIRED_TRAFFIC_MAP)?,
            server_stats: take(ebpf, names::SERVER_STATS_MAP)?,
            embryonic: take(ebpf, names::EMBRYONIC_MAP)?,
            self_addresses: take(ebpf, names::SELF_ADDRESSES_MAP)?,
            edge_settings: take(ebpf, names::EDGE_SETTINGS_MAP)?,
            events: take(ebpf, names::EVENTS_MAP)?,
        })
    }

    /// Replaces the edge settings (embryonic timeout, flood guard).
    pub fn set_edge_settings(&mut self, edge: EdgeSettings) -> Result<(), DatapathError> {
        set_at(&mut self.edge_settings, 0, edge, names::EDGE_SETTINGS_MAP)
    }

    /// Makes the self-address set exactly `addresses`: new flows from them are dropped as
    /// spoofed.
    pub fn set_self_addresses(
        &mut self,
        addresses: &BTreeSet<IpAddr>,
    ) -> Result<(), DatapathError> {
        let map_err = |e| DatapathError::Map(names::SELF_ADDRESSES_MAP, e);
        let wanted: BTreeSet<AddressKey> = addresses.iter().map(|&ip| AddressKey::of(ip)).collect();
        let present: Vec<AddressKey> = self.self_addresses.keys().filter_map(Result::ok).collect();
        for key in present.iter().filter(|k| !wanted.contains(k)) {
            match self.self_addresses.remove(key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(e)),
            }
        }
        for key in wanted.iter().filter(|k| !present.contains(k)) {
            self.self_addresses.insert(key, 1, 0).map_err(map_err)?;
        }
        Ok(())
    }

    /// The flow events (`Event`), summed over CPUs, in index order.
    pub fn events(&self) -> Result<Vec<(Event, u64)>, DatapathError> {
        Event::ALL
            .iter()
            .map(|&event| {
                let per_cpu = self
                    .events
                    .get(&(event as u32), 0)
                    .map_err(|e| DatapathError::Map(names::EVENTS_MAP, e))?;
                Ok((event, per_cpu.iter().copied().fold(0u64, u64::wrapping_add)))
            })
            .collect()
    }

    /// Embryonic flows that have not expired: first packets seen, not proven yet.
    ///
    /// Under a flood the table churns while it is walked, and the kernel restarts a walk whose
    /// current key was evicted, so a plain walk can visit entries twice or never end. The walk
    /// counts distinct keys and stops after twice the table's size: a count, never a loop.
    /// Under churn it is approximate — keys seen during the walk did not all exist at once —
    /// and never more than the table holds (an LRU map never exceeds its size).
    pub fn embryonic_flows(&self, idle_ns: u64) -> usize {
        let now = coarse_now_ns();
        let capacity = self
            .embryonic
            .map()
            .info()
            .map_or(u32::MAX, |info| info.max_entries()) as usize;
        let mut seen = std::collections::HashSet::new();
        for (key, embryo) in self
            .embryonic
            .iter()
            .take(capacity.saturating_mul(2))
            .filter_map(Result::ok)
        {
            if now.saturating_sub(embryo.last_seen_ns) <= idle_ns {
                seen.insert(key);
            }
        }
        seen.len().min(capacity)
    }

    /// Adds or replaces a VIP entry (a service, or an address-level entry).
    ///
    /// A service key is also indexed (`weir_common::l4::VIP_INDEX_SLOTS`), in the order that
    /// keeps the program's reads whole: the id's slot first, the VIP map, the index last — the
    /// program never follows the index to a slot being written.
    pub fn set_vip(&mut self, key: VipKey, info: VipInfo) -> Result<(), DatapathError> {
        let indexed = !key.is_address_level();
        if indexed {
            self.set_vip_slot(info.id, VipSlot { key, info })?;
        }
        self.vips
            .insert(key, info, 0)
            .map_err(|e| DatapathError::Map(names::VIPS_MAP, e))?;
        if !indexed {
            return Ok(());
        }
        let slot = key.index_slot();
        let ours = index_entry(info.id);
        let entry = match self.vip_index_entry(slot)? {
            VIP_INDEX_EMPTY => ours,
            entry if entry == ours || entry == VIP_INDEX_SHARED => entry,
            other => {
                if self.indexes_another_vip(other, &key)? {
                    VIP_INDEX_SHARED
                } else {
                    ours
                }
            }
        };
        set_at(&mut self.vip_index, slot, entry, names::VIP_INDEX_MAP)
    }

    /// Rebuilds the VIP index from the VIP map, in one write: a daemon that starts clears the
    /// marks of slots that were shared by VIPs since removed.
    pub fn rebuild_vip_index(&mut self) -> Result<(), DatapathError> {
        let mut index = vec![VIP_INDEX_EMPTY; VIP_INDEX_SLOTS as usize];
        for entry in self.vips.iter() {
            let (key, info) = entry.map_err(|e| DatapathError::Map(names::VIPS_MAP, e))?;
            if key.is_address_level() {
                continue;
            }
            let slot = &mut index[key.index_slot() as usize];
            *slot = if *slot == VIP_INDEX_EMPTY {
                index_entry(info.id)
            } else {
                VIP_INDEX_SHARED
            };
        }
        map_batch::fill_array(&self.vip_index, &index)
            .map_err(|e| DatapathError::MapBatch(names::VIP_INDEX_MAP, e))
    }

    /// Whether index entry `entry` (neither empty nor shared) names a live VIP other than
    /// `key`'s, whose key hashes to the same slot.
    fn indexes_another_vip(&self, entry: u16, key: &VipKey) -> Result<bool, DatapathError> {
        let id = u32::from(entry) - 1;
        let holder = get_at(&self.vip_slots, id, names::VIP_SLOTS_MAP)?;
        Ok(holder.key != *key
            && holder.key.index_slot() == key.index_slot()
            && self.vip(&holder.key)?.is_some_and(|info| info.id == id))
    }

    /// What the VIP index holds at `slot`: `VIP_INDEX_EMPTY`, `VIP_INDEX_SHARED`, or a VIP's
    /// id + 1.
    pub fn vip_index_entry(&self, slot: u32) -> Result<u16, DatapathError> {
        get_at(&self.vip_index, slot, names::VIP_INDEX_MAP)
    }

    fn set_vip_slot(&mut self, id: u32, slot: VipSlot) -> Result<(), DatapathError> {
        set_at(&mut self.vip_slots, id, slot, names::VIP_SLOTS_MAP)
    }

    /// Replaces the datapath settings (timeouts, hash seed).
    pub fn set_settings(&mut self, settings: DatapathSettings) -> Result<(), DatapathError> {
        set_at(&mut self.settings, 0, settings, names::SETTINGS_MAP)
    }

    /// Every key of the VIP map.
    pub fn vip_keys(&self) -> Result<Vec<VipKey>, DatapathError> {
        self.vips
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| DatapathError::Map(names::VIPS_MAP, e))
    }

    /// Removes a VIP entry; removing one that is not there is not an error. A service key
    /// leaves the index first and its slot last (the reverse of [`DatapathMaps::set_vip`]). A
    /// slot it shared goes back to the one VIP left there (or to empty), so that VIP's packets
    /// skip the hash lookup again.
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<(), DatapathError> {
        let indexed = match self.vip(key)? {
            Some(info) if !key.is_address_level() => Some(info.id),
            _ => None,
        };
        if let Some(id) = indexed
            && self.vip_index_entry(key.index_slot())? == index_entry(id)
        {
            set_at(
                &mut self.vip_index,
                key.index_slot(),
                VIP_INDEX_EMPTY,
                names::VIP_INDEX_MAP,
            )?;
        }
        match self.vips.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(DatapathError::Map(names::VIPS_MAP, e)),
        }
        if let Some(id) = indexed {
            let slot = get_at(&self.vip_slots, id, names::VIP_SLOTS_MAP)?;
            if slot.key == *key {
                self.set_vip_slot(id, VipSlot::default())?;
            }
            if self.vip_index_entry(key.index_slot())? == VIP_INDEX_SHARED {
                self.unshare_index_slot(key.index_slot())?;
            }
        }
        Ok(())
    }

    /// Points shared index slot `slot` at the one VIP left there, or empties it when none is;
    /// with two or more left it stays shared. The VIP's own slot (`WEIR_VIP_SLOTS`) was
    /// written when it was set, so the program may follow the index to it at once.
    fn unshare_index_slot(&mut self, slot: u32) -> Result<(), DatapathError> {
        let mut left = Vec::new();
        for entry in self.vips.iter() {
            let (key, info) = entry.map_err(|e| DatapathError::Map(names::VIPS_MAP, e))?;
            if !key.is_address_level() && key.index_slot() == slot {
                left.push((key, info.id));
            }
        }
        let entry = match left.as_slice() {
            [] => VIP_INDEX_EMPTY,
            [(key, id)] if get_at(&self.vip_slots, *id, names::VIP_SLOTS_MAP)?.key == *key => {
                index_entry(*id)
            }
            _ => return Ok(()),
        };
        set_at(&mut self.vip_index, slot, entry, names::VIP_INDEX_MAP)
    }

    /// What slot `id` of the server array holds.
    pub fn server(&self, id: u32) -> Result<ServerInfo, DatapathError> {
        get_at(&self.servers, id, names::SERVERS_MAP)
    }

    /// Writes server `id` (a present server, or `ServerInfo::emptied` to mark it removed).
    pub fn set_server(&mut self, id: u32, info: ServerInfo) -> Result<(), DatapathError> {
        set_at(&mut self.servers, id, info, names::SERVERS_MAP)
    }

    /// Switches VIP `vip_id` to a new Maglev table holding server ids `slots` (empty: no
    /// server takes new flows).
    ///
    /// The table is written into a fresh inner map, then installed with one update of the
    /// outer array. The kernel waits for every running program to finish (an RCU grace
    /// period) before that update returns, so when this returns no packet can still be
    /// reading the old table, and each packet saw either the old table or the new one.
    pub fn install_table(&mut self, vip_id: u32, slots: &[u32]) -> Result<(), DatapathError> {
        let map_err = |e| DatapathError::Map(names::MAGLEV_MAP, e);
        let size = slots.len() as u32;
        let table = Array::<MapData, u32>::create(size + 1, BPF_F_INNER_MAP).map_err(map_err)?;
        // Slot 0 holds the size, then the table; written in one batch (see `map_batch`).
        let values: Vec<u32> = std::iter::once(size).chain(slots.iter().copied()).collect();
        map_batch::fill_array(&table, &values)
            .map_err(|e| DatapathError::MapBatch(names::MAGLEV_MAP, e))?;
        self.maglev.set(vip_id, &table, 0).map_err(map_err)
    }

    /// The datapath counters, summed over CPUs, in [`Stat`] order.
    pub fn counters(&self) -> Result<Vec<(Stat, Counter)>, DatapathError> {
        Stat::ALL
            .iter()
            .map(|&stat| {
                let per_cpu = self
                    .stats
                    .get(&(stat as u32), 0)
                    .map_err(|e| DatapathError::Map(names::STATS_MAP, e))?;
                let mut total = Counter::default();
                per_cpu.iter().for_each(|c| total.merge(c));
                Ok((stat, total))
            })
            .collect()
    }

    /// The VIP entry of `key`, if there is one.
    pub fn vip(&self, key: &VipKey) -> Result<Option<VipInfo>, DatapathError> {
        match self.vips.get(key, 0) {
            Ok(info) => Ok(Some(info)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(DatapathError::Map(names::VIPS_MAP, e)),
        }
    }

    /// Zeroes what VIP `id`'s former servers carried (the id is given to a new VIP).
    pub fn clear_vip_traffic(&mut self, id: u32) -> Result<(), DatapathError> {
        self.set_vip_retired(id, TrafficCounter::default())
    }

    /// Zeroes server `server`'s counters, first moving what they hold into what VIP `vip`'s
    /// former servers carried (`None`: the VIP is gone, or was never known). The server has
    /// left the VIP, or its id starts anew (a new holder, or a server whose entry was emptied
    /// while it was down), and the VIP's traffic, the sum of both, must not go down. A packet
    /// counted between the read and the zeroing is lost: only one in flight as the server's
    /// entry changes can be.
    pub fn retire_server_traffic(
        &mut self,
        vip: Option<u32>,
        server: u32,
    ) -> Result<(), DatapathError> {
        if let Some(vip) = vip {
            let mut retired = self.vip_retired(vip)?;
            retired.merge(&self.server_traffic(server)?);
            self.set_vip_retired(vip, retired)?;
        }
        clear_traffic(&mut self.server_stats, server, names::SERVER_STATS_MAP)
    }

    fn vip_retired(&self, vip: u32) -> Result<TrafficCounter, DatapathError> {
        get_at(&self.vip_retired, vip, names::VIP_RETIRED_TRAFFIC_MAP)
    }

    fn set_vip_retired(&mut self, vip: u32, traffic: TrafficCounter) -> Result<(), DatapathError> {
        set_at(
            &mut self.vip_retired,
            vip,
            traffic,
            names::VIP_RETIRED_TRAFFIC_MAP,
        )
    }

    /// Traffic of VIP `id` whose servers are `servers`: theirs, summed over CPUs, and what
    /// its former servers carried. (The program counts per server only.)
    pub fn vip_traffic(
        &self,
        id: u32,
        servers: impl IntoIterator<Item = u32>,
    ) -> Result<TrafficCounter, DatapathError> {
        let mut total = self.vip_retired(id)?;
        for server in servers {
            total.merge(&self.server_traffic(server)?);
        }
        Ok(total)
    }

    /// Traffic sent to server `id`, summed over CPUs.
    pub fn server_traffic(&self, id: u32) -> Result<TrafficCounter, DatapathError> {
        sum_traffic(&self.server_stats, id, names::SERVER_STATS_MAP)
    }

    /// The flow table's size and the embryonic table's.
    pub fn flow_capacities(&self) -> (usize, usize) {
        let size = |map: &aya::maps::MapData| map.info().map_or(0, |i| i.max_entries()) as usize;
        (size(self.flows.map()), size(self.embryonic.map()))
    }

    /// Active flows per server id — entries that are not closing and were seen within
    /// `idle_ns` (the flow timeout of their protocol, as the caller decides) — and the
    /// table's entries in all.
    pub fn active_flows(
        &self,
        idle_ns: impl Fn(&FlowKey) -> u64,
    ) -> Result<FlowCensus, DatapathError> {
        let now = coarse_now_ns();
        let mut census = FlowCensus::default();
        for entry in self.flows.iter() {
            let (key, state) = match entry {
                Ok(entry) => entry,
                // An entry evicted between two iteration steps: skip it.
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(DatapathError::Map(names::FLOWS_MAP, e)),
            };
            census.entries += 1;
            let idle = now.saturating_sub(state.last_seen_ns);
            if state.flags & FLOW_CLOSING == 0 && idle <= idle_ns(&key) {
                *census.per_server.entry(state.server).or_default() += 1;
            }
        }
        Ok(census)
    }

    /// Forgets one flow (as the LRU does under pressure): its next packet picks afresh.
    pub fn forget_flow(&mut self, key: &FlowKey) -> Result<(), DatapathError> {
        match self.flows.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(DatapathError::Map(names::FLOWS_MAP, e)),
        }
    }

    /// The server a flow is pinned to, if the flow table has it.
    pub fn flow(&self, key: &FlowKey) -> Option<FlowState> {
        self.flows.get(key, 0).ok()
    }
}

/// Element `index` of the array `name`.
fn get_at<V: aya::Pod>(
    array: &Array<MapData, V>,
    index: u32,
    name: &'static str,
) -> Result<V, DatapathError> {
    array
        .get(&index, 0)
        .map_err(|e| DatapathError::Map(name, e))
}

/// Writes element `index` of the array `name`.
fn set_at<V: aya::Pod>(
    array: &mut Array<MapData, V>,
    index: u32,
    value: V,
    name: &'static str,
) -> Result<(), DatapathError> {
    array
        .set(index, value, 0)
        .map_err(|e| DatapathError::Map(name, e))
}

fn clear_traffic(
    map: &mut PerCpuArray<MapData, TrafficCounter>,
    id: u32,
    name: &'static str,
) -> Result<(), DatapathError> {
    let cpus =
        aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Map(name, MapError::from(e)))?;
    let zeros = PerCpuValues::try_from(vec![TrafficCounter::default(); cpus])
        .map_err(|e| DatapathError::Map(name, MapError::from(e)))?;
    map.set(id, zeros, 0)
        .map_err(|e| DatapathError::Map(name, e))
}

fn sum_traffic(
    map: &PerCpuArray<MapData, TrafficCounter>,
    id: u32,
    name: &'static str,
) -> Result<TrafficCounter, DatapathError> {
    let per_cpu = map.get(&id, 0).map_err(|e| DatapathError::Map(name, e))?;
    let mut total = TrafficCounter::default();
    per_cpu.iter().for_each(|c| total.merge(c));
    Ok(total)
}

/// The clock `bpf_ktime_get_coarse_ns` reads (CLOCK_MONOTONIC, coarse).
fn coarse_now_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .expect("CLOCK_MONOTONIC_COARSE is always available on Linux");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every map of the compiled object is pinned (a map missing from `names::ALL_MAPS` would
    /// be created anew by every daemon, losing its state on restart), and every name pinned is
    /// a map of the object.
    #[test]
    fn the_pinned_maps_are_exactly_the_maps_of_the_object() {
        let object = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded object parses");
        let in_object: BTreeSet<&str> = object
            .maps
            .keys()
            .map(String::as_str)
            // Sections of static data, which the object has none of, would not be pinned.
            .filter(|name| !name.starts_with('.'))
            .collect();
        let pinned: BTreeSet<&str> = names::ALL_MAPS.iter().copied().collect();
        assert_eq!(in_object, pinned);
    }
}
