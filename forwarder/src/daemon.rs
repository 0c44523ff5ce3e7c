//! The daemon: loads the config, starts the datapath and the L7 workers, then serves the
//! control socket until SIGINT/SIGTERM.
//!
//! Start-up order matters to operators: everything that can fail on bad config or a busy port
//! fails before the control socket appears, so "socket exists" means "daemon is serving".

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};
use weir_config::{
    Config,
    control::{
        ControlError, ControlErrorKind, DaemonStatus, DatapathCounter, Request, Response,
        StatusReport,
    },
};

use crate::{
    control,
    datapath::{Datapath, DatapathOptions},
    l4::{self, L4Services},
    l7::L7Workers,
};

/// Everything the control server answers from.
struct State {
    config_path: PathBuf,
    started: Instant,
    // Behind a mutex because aya's map handles are not `Sync`; only the control task locks it.
    datapath: Mutex<Datapath>,
    /// The L4 services mirrored in the datapath's maps (driven by the control plane next).
    _l4: Mutex<L4Services>,
    l7: L7Workers,
}

impl State {
    fn handle(&self, request: Request) -> Response {
        match request {
            Request::Status => match self.status() {
                Ok(report) => Response::Status(report),
                Err(err) => Response::Error(ControlError::new(
                    ControlErrorKind::Internal,
                    format!("{err:#}"),
                )),
            },
        }
    }

    fn status(&self) -> Result<StatusReport> {
        let datapath = self
            .datapath
            .lock()
            .map_err(|_| anyhow::anyhow!("datapath lock poisoned"))?;
        let counters = datapath
            .maps()
            .counters()?
            .into_iter()
            .map(|(stat, counter)| DatapathCounter {
                reason: stat.name().to_string(),
                packets: counter.packets,
                bytes: counter.bytes,
            })
            .collect();
        Ok(StatusReport {
            daemon: DaemonStatus {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                config: self.config_path.display().to_string(),
                uptime_secs: self.started.elapsed().as_secs(),
            },
            xdp: datapath.attachments().to_vec(),
            counters,
            listeners: self.l7.status(),
        })
    }
}

/// Runs the daemon with the config at `config_path` until it is told to stop.
pub fn run(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    let interfaces: Vec<String> = config
        .datapath
        .interfaces
        .iter()
        .map(|interface| interface.get_ref().clone())
        .collect();
    let mut datapath = Datapath::load(DatapathOptions {
        interfaces,
        xdp_mode: config.datapath.xdp_mode,
        flow_table_size: *config.datapath.flow_table_size.get_ref(),
        settings: l4::settings(&config),
    })?;
    let l4 = L4Services::from_config(&config, datapath.maps_mut())
        .context("cannot install the L4 services")?;
    datapath.attach()?;
    for attachment in datapath.attachments() {
        tracing::info!(
            interface = attachment.interface,
            mode = ?attachment.mode,
            program_id = attachment.program_id,
            "XDP program attached"
        );
    }
    let listen = config.l7_listen_addresses();
    let l7 = L7Workers::start(&listen, config.l7.workers)
        .with_context(|| format!("cannot start L7 listeners on {listen:?}"))?;
    for listener in l7.status() {
        tracing::info!(address = %listener.address, workers = listener.workers, "L7 listener up");
    }
    let state = Arc::new(State {
        config_path: config_path.to_path_buf(),
        started: Instant::now(),
        datapath: Mutex::new(datapath),
        _l4: Mutex::new(l4),
        l7,
    });

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let socket_path = config.daemon.control_socket.clone();
    runtime.block_on(async {
        let listener = control::bind(&socket_path).with_context(|| {
            format!("cannot create the control socket {}", socket_path.display())
        })?;
        tracing::info!(socket = %socket_path.display(), "weir is ready");
        let handler = Arc::new(move |request| state.handle(request));
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        tokio::select! {
            () = control::serve(listener, handler) => {}
            _ = sigterm.recv() => tracing::info!("SIGTERM: stopping"),
            _ = sigint.recv() => tracing::info!("SIGINT: stopping"),
        }
        let _ = std::fs::remove_file(&socket_path);
        Ok(())
    })
}
