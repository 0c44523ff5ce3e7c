//! The XDP datapath as userspace sees it: load the object, attach the program, read the maps.
//!
//! The object is embedded at build time from aya-build's output (`forwarder/build.rs`), so the
//! daemon binary always carries the eBPF code it was built and tested with.

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
    programs::{ProgramError, Xdp, xdp::XdpMode as AyaXdpMode},
};
use weir_common::{Counter, Stat, names};
use weir_config::{XdpMode, control::XdpAttachment};

/// The eBPF object built from the `ebpf` crate.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weir"));

/// Why the datapath could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("cannot load the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no `{0}` {1}")]
    Missing(&'static str, &'static str),
    #[error("cannot load the XDP program into the kernel: {0}")]
    Program(#[source] ProgramError),
    #[error("cannot attach XDP to `{interface}` in {mode:?} mode: {source}")]
    Attach {
        interface: String,
        mode: XdpMode,
        #[source]
        source: ProgramError,
    },
    #[error("cannot read map `{0}`: {1}")]
    Map(&'static str, #[source] aya::maps::MapError),
}

/// The loaded object, the program's attachments and the maps userspace reads.
///
/// Dropping it detaches the program and frees the maps (nothing is pinned yet).
pub struct Datapath {
    /// Owns the program and its links: held, never read, so they live as long as the datapath.
    _ebpf: Ebpf,
    stats: PerCpuArray<MapData, Counter>,
    attachments: Vec<XdpAttachment>,
}

impl Datapath {
    /// Loads the embedded object and attaches the XDP program to every interface.
    pub fn start(interfaces: &[String], mode: XdpMode) -> Result<Datapath, DatapathError> {
        let mut ebpf = Ebpf::load(EBPF_OBJECT)?;
        let stats = ebpf
            .take_map(names::STATS_MAP)
            .ok_or(DatapathError::Missing(names::STATS_MAP, "map"))?;
        let stats =
            PerCpuArray::try_from(stats).map_err(|e| DatapathError::Map(names::STATS_MAP, e))?;
        let program: &mut Xdp = ebpf
            .program_mut(names::XDP_PROGRAM)
            .ok_or(DatapathError::Missing(names::XDP_PROGRAM, "program"))?
            .try_into()
            .map_err(DatapathError::Program)?;
        program.load().map_err(DatapathError::Program)?;
        let program_id = program.info().map_err(DatapathError::Program)?.id();
        let mut attachments = Vec::with_capacity(interfaces.len());
        for interface in interfaces {
            let attach_error = |source| DatapathError::Attach {
                interface: interface.clone(),
                mode,
                source,
            };
            let aya_mode = match mode {
                XdpMode::Native => AyaXdpMode::Driver,
                XdpMode::Generic => AyaXdpMode::Skb,
            };
            program.attach(interface, aya_mode).map_err(attach_error)?;
            attachments.push(XdpAttachment {
                interface: interface.clone(),
                ifindex: nix::net::if_::if_nametoindex(interface.as_str()).unwrap_or(0),
                mode,
                program_id,
            });
        }
        Ok(Datapath {
            _ebpf: ebpf,
            stats,
            attachments,
        })
    }

    /// Where the program is attached.
    pub fn attachments(&self) -> &[XdpAttachment] {
        &self.attachments
    }

    /// The counters, summed over CPUs, in [`Stat`] order.
    pub fn counters(&self) -> Result<Vec<(Stat, Counter)>, DatapathError> {
        Stat::ALL
            .iter()
            .map(|&stat| {
                let per_cpu = self
                    .stats
                    .get(&(stat as u32), 0)
                    .map_err(|e| DatapathError::Map(names::STATS_MAP, e))?;
                Ok((stat, sum(per_cpu.iter())))
            })
            .collect()
    }
}

fn sum<'a>(per_cpu: impl Iterator<Item = &'a Counter>) -> Counter {
    per_cpu.fold(Counter::default(), |mut total, counter| {
        total.merge(counter);
        total
    })
}
