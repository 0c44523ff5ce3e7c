//! The daemon's life: start-up in the order operators rely on, the loop that serves the
//! control socket and the signals, and the stop (sockets to the next daemon, lock released,
//! L7 drained, datapath left pinned). Also `weir upgrade` and `weir detach`.

use std::{
    collections::{HashMap, VecDeque},
    path::Path,
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};
use weir_config::{
    Config,
    control::{Request, Response},
};

use super::{Inner, State};
use crate::{
    bgp::Announcer,
    control,
    datapath::{Datapath, DatapathOptions},
    handover,
    health::HealthChecker,
    l4::{self, L4Services},
    l7::{
        L7Snapshot, L7Workers,
        tls::{Sessions, TlsListeners},
    },
    lock::InstanceLock,
    pins::PinDir,
    state::RuntimeState,
    vhosts::Vhosts,
};

/// Descriptors budgeted per L7 connection: the client's and its server's, and room for a
/// share of the pipes (a quarter of the connections may splice at once, two descriptors
/// each) and of the idle server connections kept for reuse.
const DESCRIPTORS_PER_CONNECTION: u64 = 4;
/// Descriptors for everything else: listeners, maps, the control socket, health checks.
const DESCRIPTORS_SPARE: u64 = 1024;

/// Raises the soft limit on open descriptors to the hard limit, as a proxy must (a service
/// manager's default soft limit, 1024, would refuse connections long before the configured
/// maximum), and warns when even the hard limit is below what the L7 limits can need.
fn raise_descriptor_limit(config: &Config) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain get/setrlimit calls with a valid struct.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        }
    };
    if !raised {
        tracing::warn!(err = %std::io::Error::last_os_error(), "cannot raise the descriptor limit");
        return;
    }
    let workers = crate::l7::worker_count(config.l7.workers) as u64;
    let needed = workers * config.l7.max_connections_per_worker as u64 * DESCRIPTORS_PER_CONNECTION
        + DESCRIPTORS_SPARE;
    if !config.l7_listen_addresses().is_empty() && limit.rlim_max < needed {
        tracing::warn!(
            limit = limit.rlim_max,
            needed,
            "the descriptor limit is below what the L7 connection limits can use; raise \
             LimitNOFILE (systemd) or lower [l7] max_connections_per_worker"
        );
    }
}

/// How a daemon comes to serve.
pub enum Start {
    /// On its own; the service manager may pass it listening sockets (`LISTEN_FDS`).
    Fresh,
    /// In place of the running daemon (`weir upgrade`): with the listening sockets that one
    /// handed over, once it has let go of the lock.
    TakeOver(Vec<std::net::TcpListener>),
}

/// How long `weir upgrade` waits for the daemon it took over from to let go of the lock.
const TAKE_OVER_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs the daemon with the config at `config_path` until it is told to stop.
pub fn run(config_path: &Path) -> Result<()> {
    run_with(config_path, Start::Fresh)
}

/// [`run`], started as `start` says.
pub fn run_with(config_path: &Path, start: Start) -> Result<()> {
    let config = Config::load(config_path)?;
    let state_file = config.daemon.state_file.clone();
    // Before anything is read, attached or bound: a second daemon stops here (one taking
    // over waits for the running one to let go).
    let (lock, inherited) = match start {
        Start::Fresh => (
            InstanceLock::acquire(&state_file)?,
            handover::from_service_manager(),
        ),
        Start::TakeOver(sockets) => (
            InstanceLock::acquire_waiting(&state_file, TAKE_OVER_WAIT)?,
            sockets,
        ),
    };
    let previous = RuntimeState::load(&state_file)?;
    // Before anything is attached or bound: a bad certificate stops the start here.
    let sessions = Sessions::new().context("cannot set up TLS session resumption")?;
    let tls =
        Arc::new(TlsListeners::load(&config, &sessions).context("cannot load a TLS certificate")?);
    let l4 = L4Services::plan(&config, previous.as_ref())
        .context("the config and the runtime state do not combine into valid pools")?;
    let vhosts = Vhosts::plan(&config, previous.as_ref())
        .context("the config and the runtime state do not combine into valid vhost pools")?;
    let pins = PinDir::prepare(&config.daemon.bpf_dir)?;
    let mut datapath = Datapath::load(DatapathOptions::from_config(&config, Some(pins.clone())))?;
    if datapath.adopted() {
        tracing::info!(dir = %pins.root().display(), "adopting the pinned datapath: established flows are kept");
    }
    l4::warm_neighbours(l4.fresh_servers(None));
    l4.sync(datapath.maps_mut(), None)
        .context("cannot install the L4 services")?;
    datapath.attach()?;
    for attachment in datapath.attachments() {
        tracing::info!(
            interface = attachment.interface,
            mode = ?attachment.mode,
            role = if attachment.program_id.is_some() {
                "interfaces: XDP and TC"
            } else {
                "server_interfaces: TC only"
            },
            program_id = attachment.program_id,
            tc_program_id = attachment.tc_program_id,
            "datapath programs attached"
        );
    }
    let node_drained = previous.as_ref().is_some_and(|state| state.node_drained);
    Inner::runtime_state(&l4, &vhosts, node_drained).save(&state_file)?;
    raise_descriptor_limit(&config);
    let listen = config.l7_listen_addresses();
    let l7 = L7Workers::start_with(
        L7Snapshot::of(&vhosts, &config, Arc::clone(&tls), None),
        config.l7.workers,
        config.l7.pin_workers,
        inherited,
    )
    .with_context(|| format!("cannot start L7 listeners on {listen:?}"))?;
    for listener in l7.status() {
        tracing::info!(address = %listener.address, workers = listener.workers, "L7 listener up");
    }
    // From now on, not only at stop: the next start gets these sockets however this daemon ends.
    handover::store_with_service_manager(l7.listening_sockets());
    l7.set_access_log(
        super::open_access_log(&config.access_log).map_err(|err| anyhow::anyhow!(err.message))?,
    );
    let (transitions_tx, mut transitions) = tokio::sync::mpsc::unbounded_channel();
    let health = HealthChecker::start(transitions_tx).context("cannot start the health checker")?;
    let socket_path = config.daemon.control_socket.clone();
    let metrics_listen = config.metrics.listen;
    let announcer = Announcer::new(&config.bgp);
    let state = Arc::new(State {
        config_path: config_path.to_path_buf(),
        started: Instant::now(),
        handed_over: tokio::sync::Notify::new(),
        inner: Mutex::new(Inner {
            config,
            datapath,
            l4,
            l7,
            vhosts,
            health,
            health_records: HashMap::new(),
            reloads: Default::default(),
            events: VecDeque::new(),
            next_event: 0,
            flow_census: None,
            node_drained,
            announcer,
            speaker_error: None,
            sessions,
            tls,
        }),
    });
    if let Ok(mut inner) = state.inner.lock() {
        inner.health.set_targets(inner.health_targets());
        inner.sync_announcements();
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        if let Some(address) = metrics_listen {
            let metrics = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen for metrics on {address}"))?;
            tracing::info!(%address, "metrics at /metrics, the dashboard at /");
            tokio::spawn(super::web::serve(metrics, Arc::clone(&state)));
        }
        let listener = control::bind(&socket_path).with_context(|| {
            format!("cannot create the control socket {}", socket_path.display())
        })?;
        tracing::info!(socket = %socket_path.display(), "weir is ready");
        if let Err(err) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
            tracing::warn!(%err, "cannot notify systemd");
        }
        let handler = {
            let state = Arc::clone(&state);
            Arc::new(move |request| state.handle(request))
        };
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sighup = signal(SignalKind::hangup())?;
        let mut sigusr1 = signal(SignalKind::user_defined1())?;
        let mut slow_starts = tokio::time::interval(std::time::Duration::from_secs(1));
        let hand_over = {
            let (state, notify) = (Arc::clone(&state), Arc::clone(&state));
            Arc::new(control::HandOver {
                sockets: Box::new(move || {
                    let inner = state
                        .inner
                        .lock()
                        .map_err(|_| std::io::Error::other("daemon state poisoned"))?;
                    inner
                        .l7
                        .listening_sockets()
                        .iter()
                        .map(|fd| fd.try_clone())
                        .collect()
                }),
                sent: Box::new(move || notify.handed_over.notify_one()),
            })
        };
        let mut handed_over = false;
        let serve = control::serve(listener, handler, hand_over);
        tokio::pin!(serve);
        loop {
            tokio::select! {
                () = &mut serve => break,
                _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping, the datapath stays pinned"); break }
                _ = sigint.recv() => { tracing::info!("SIGINT: stopping, the datapath stays pinned"); break }
                () = state.handed_over.notified() => {
                    tracing::info!("handed over to the next daemon (weir upgrade): stopping, the datapath stays pinned");
                    handed_over = true;
                    break
                }
                _ = slow_starts.tick() => {
                    if let Ok(mut inner) = state.inner.lock() {
                        inner.step_slow_starts();
                        // A speaker that was down, or restarted, catches up.
                        inner.sync_announcements();
                    }
                }
                Some(transition) = transitions.recv() => {
                    if let Ok(mut inner) = state.inner.lock() {
                        inner.apply_health(transition);
                    }
                }
                _ = sighup.recv() => match state.handle(Request::Reload) {
                    Response::Changed(changes) => {
                        tracing::info!(changes = changes.len(), "SIGHUP: config reloaded");
                    }
                    Response::Error(err) => tracing::error!(%err.message, "SIGHUP: reload refused"),
                    _ => {}
                },
                _ = sigusr1.recv() => match state.handle(Request::ReopenLogs) {
                    Response::Error(err) => tracing::error!(%err.message, "SIGUSR1: access log not reopened"),
                    _ => tracing::info!("SIGUSR1: access log reopened"),
                },
            }
        }
        // The service manager (if any) holds the listening sockets since the start, and with
        // them the connections that arrive until the next daemon accepts them.
        if let Ok(mut inner) = state.inner.lock() {
            // A stopping node withdraws its VIPs, so routers send their flows to the other
            // nodes (the pinned datapath still forwards what arrives meanwhile). Handed over
            // to `weir upgrade`, the next daemon serves at once: the routes stay.
            if !handed_over {
                inner.announce(std::collections::BTreeSet::new());
            }
        }
        let _ = std::fs::remove_file(&socket_path);
        Ok::<_, anyhow::Error>(())
    })?;
    // Nothing writes the maps or the state file any more (health and slow starts were the
    // loop's): the next daemon may start while the L7 exchanges under way finish.
    drop(lock);
    // The control socket is gone; L7 exchanges under way may finish.
    if let Ok(mut inner) = state.inner.lock() {
        let grace = std::time::Duration::from_millis(inner.config.l7.shutdown_grace_ms);
        let started = Instant::now();
        let open = inner.l7.shut_down(grace);
        tracing::info!(
            open,
            ms = started.elapsed().as_millis() as u64,
            "L7 workers stopped"
        );
    }
    Ok(())
}

/// `weir upgrade`: takes the L7 listening sockets from the daemon running with this config,
/// which then stops (exchanges under way finish there), and serves in its place.
pub fn upgrade(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    let socket = &config.daemon.control_socket;
    let sockets = control::take_over(socket).with_context(|| {
        format!(
            "cannot take over from the daemon on {} (one older than `weir upgrade` cannot hand \
             over: stop it and start this one)",
            socket.display()
        )
    })?;
    tracing::info!(
        sockets = sockets.len(),
        "the running daemon handed over its L7 sockets"
    );
    let sockets = sockets
        .into_iter()
        .map(std::net::TcpListener::from)
        .collect();
    run_with(config_path, Start::TakeOver(sockets))
}

/// `weir detach`: unpins the datapath a stopped daemon left, which detaches XDP from every
/// interface and frees the maps. Established L4 flows end with it.
pub fn detach(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    let _lock = InstanceLock::acquire(&config.daemon.state_file)
        .context("a weir daemon is running: stop it first")?;
    let socket = &config.daemon.control_socket;
    if control::Client::connect(socket).is_ok() {
        anyhow::bail!(
            "a weir daemon is running on {}: stop it first",
            socket.display()
        );
    }
    PinDir::remove(&config.daemon.bpf_dir)?;
    tracing::info!(dir = %config.daemon.bpf_dir.display(), "datapath detached and unpinned");
    Ok(())
}
