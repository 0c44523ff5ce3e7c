//! The daemon: loads the config and the runtime state, adopts or starts the datapath, starts
//! the L7 workers, then serves the control socket until SIGINT/SIGTERM (SIGHUP reloads).
//!
//! Start-up order matters to operators: everything that can fail on bad config or a busy port
//! fails before the control socket appears, so "socket exists" means "daemon is serving"
//! (and systemd hears `READY=1` at that moment).
//!
//! The daemon is the single writer: control requests are handled one at a time under one
//! lock, each as "change a copy of the model → write the maps → write the state file →
//! commit", undone in the maps if a later step fails. Stopping the daemon leaves the datapath
//! pinned and forwarding; `weir detach` takes it down.

mod pools;
mod report;

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};
use weir_config::{
    Config, DEFAULT_WEIGHT,
    control::{AdminState, ControlError, ControlErrorKind, Event, Request, Response},
};

use pools::{Plane, Verb};

use crate::{
    control,
    datapath::{self, Datapath, DatapathOptions},
    handover,
    health::{HealthChecker, Target, Transition},
    l4::{L4Error, L4Services},
    l7::L7Workers,
    lock::InstanceLock,
    pins::PinDir,
    pool::health_name,
    state::RuntimeState,
    vhosts::{VhostError, Vhosts},
};

/// Everything the control server answers from.
struct State {
    config_path: PathBuf,
    started: Instant,
    /// Notified once the L7 sockets went to the next daemon (`weir upgrade`): stop.
    handed_over: tokio::sync::Notify,
    /// The one lock every request takes: what makes the daemon the single writer.
    inner: Mutex<Inner>,
}

/// The running configuration, the datapath and the L7 workers, and the models mirrored in
/// them.
struct Inner {
    config: Config,
    datapath: Datapath,
    l4: L4Services,
    l7: L7Workers,
    vhosts: Vhosts,
    health: HealthChecker,
    /// Why each server has the health it has, and since when (Unix ms).
    health_reasons: HashMap<(String, SocketAddr), (u64, String)>,
    /// The last [`MAX_EVENTS`] state changes.
    events: VecDeque<Event>,
    next_event: u64,
}

/// Events kept for `weirctl events`.
const MAX_EVENTS: usize = 1000;

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl State {
    fn handle(&self, request: Request) -> Response {
        let Ok(mut inner) = self.inner.lock() else {
            return Response::Error(internal("daemon state lock poisoned"));
        };
        let result = match request {
            Request::Status => self.status(&inner).map(Response::Status),
            Request::VipList => inner.vip_reports().map(Response::Vips),
            Request::ServerList { vip } => {
                inner.server_reports(vip.as_deref()).map(Response::Servers)
            }
            Request::Stats => inner.stats().map(Response::Stats),
            Request::ServerAdd {
                vip,
                address,
                weight,
            } => {
                let weight = weight.unwrap_or(DEFAULT_WEIGHT);
                inner.edit(&vip, address, Verb::Add { weight })
            }
            Request::ServerRemove {
                vip,
                address,
                force,
            } => inner.remove_server(&vip, address, force),
            Request::ServerSetState {
                vip,
                address,
                state,
            } => inner.edit(&vip, address, Verb::SetState(state)),
            Request::ServerWeight {
                vip,
                address,
                weight,
            } => inner.edit(&vip, address, Verb::SetWeight(weight)),
            Request::Reload => inner.reload(&self.config_path),
            // Answered by the control server itself, which passes the sockets with it.
            Request::HandOver => Err(ControlError::new(
                ControlErrorKind::BadRequest,
                "a hand-over is asked for on the control socket, by `weir upgrade`",
            )),
            Request::Events { after } => Ok(Response::Events(
                inner
                    .events
                    .iter()
                    .filter(|e| e.seq > after)
                    .cloned()
                    .collect(),
            )),
        };
        // What operators changed is an event; a health transition records its own, with
        // its reason (`apply_health`).
        if let Ok(Response::Changed(lines)) = &result {
            for line in lines {
                inner.record(line.clone());
            }
        }
        result.unwrap_or_else(Response::Error)
    }
}

impl Inner {
    /// The durable state of both models.
    fn runtime_state(l4: &L4Services, vhosts: &Vhosts) -> RuntimeState {
        RuntimeState {
            vhosts: vhosts.state(),
            ..l4.runtime_state()
        }
    }

    /// Writes `next` (and new datapath settings, on reload) into the maps, then the state
    /// file, then makes it the running model and publishes the vhosts to the L7 workers. If
    /// a step fails the maps are put back as they were and nothing is committed.
    fn commit(
        &mut self,
        next: L4Services,
        next_vhosts: Vhosts,
        config: Option<Config>,
    ) -> Result<Vec<String>, ControlError> {
        let mut changes = self.l4.diff(&next);
        changes.extend(self.vhosts.diff(&next_vhosts));
        let l7_settings_changed = config.as_ref().is_some_and(|c| c.l7 != self.config.l7);
        if l7_settings_changed {
            changes.push("l7 settings (limits, timeouts, headers, access log)".to_string());
        }
        let settings = config.as_ref().map(datapath::settings);
        let old_settings = datapath::settings(&self.config);
        if let Some(settings) = settings.filter(|s| *s != old_settings) {
            changes.push(format!(
                "datapath timeouts (ns): tcp {} udp {} closing {}",
                settings.tcp_idle_ns, settings.udp_idle_ns, settings.closing_idle_ns
            ));
        }
        let edge = config.as_ref().map(datapath::edge_settings);
        let old_edge = datapath::edge_settings(&self.config);
        if let Some(edge) = edge.filter(|e| *e != old_edge) {
            changes.push(format!(
                "datapath edge: embryonic timeout {} ns, flood guard {} flows per CPU per second",
                edge.embryonic_idle_ns, edge.flows_per_cpu_per_sec
            ));
        }
        let state = Inner::runtime_state(&next, &next_vhosts);
        if !changes.is_empty() || state != Inner::runtime_state(&self.l4, &self.vhosts) {
            let maps = self.datapath.maps_mut();
            let written = settings
                .map_or(Ok(()), |s| maps.set_settings(s))
                .and_then(|()| edge.map_or(Ok(()), |e| maps.set_edge_settings(e)))
                .and_then(|()| next.sync(maps, Some(&self.l4)))
                .map_err(|err| internal(format!("{err}")))
                .and_then(|()| {
                    state
                        .save(&self.config.daemon.state_file)
                        .map_err(|err| internal(format!("{err}")))
                });
            if let Err(err) = written {
                let undone = maps
                    .set_settings(old_settings)
                    .and_then(|()| maps.set_edge_settings(old_edge))
                    .and_then(|()| self.l4.sync(maps, Some(&next)));
                tracing::error!(%err.message, undone = undone.is_ok(), "change failed");
                return Err(match undone {
                    Ok(()) => {
                        ControlError::new(err.kind, format!("{}; nothing was changed", err.message))
                    }
                    Err(undo) => internal(format!(
                        "{}; undoing the partial change also failed: {undo}",
                        err.message
                    )),
                });
            }
        }
        for line in &changes {
            tracing::info!(change = %line, "applied");
        }
        self.l4 = next;
        if let Some(config) = config {
            self.config = config;
        }
        // The workers' snapshot changes only when L7 did: republishing it for an L4 change
        // would restart every worker's weighted round robin.
        if next_vhosts != self.vhosts || l7_settings_changed {
            let snapshot = next_vhosts.snapshot(&self.config, Some(&self.l7.snapshot()));
            self.l7.publish(snapshot);
            self.vhosts = next_vhosts;
        }
        self.health.set_targets(self.health_targets());
        Ok(changes)
    }

    fn record(&mut self, text: String) {
        self.next_event += 1;
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(Event {
            seq: self.next_event,
            unix_ms: unix_ms(SystemTime::now()),
            text,
        });
    }

    /// Every server of a checked pool that is not disabled (maintenance is not checked).
    fn health_targets(&self) -> Vec<Target> {
        let l4 = self.l4.services().map(|service| {
            let servers = service.servers.iter();
            (
                &service.name,
                &service.health,
                servers
                    .map(|s| (s.address, s.state, s.health))
                    .collect::<Vec<_>>(),
            )
        });
        let l7 = self.vhosts.iter().map(|vhost| {
            let servers = vhost.servers.iter();
            (
                &vhost.name,
                &vhost.health,
                servers.map(|s| (s.address, s.state, s.health)).collect(),
            )
        });
        l4.chain(l7)
            .filter_map(|(pool, check, servers)| Some((pool, check.as_ref()?, servers)))
            .flat_map(|(pool, check, servers)| {
                servers
                    .into_iter()
                    .filter(|(_, state, _)| *state != AdminState::Disabled)
                    .map(|(address, _, health)| Target {
                        pool: pool.clone(),
                        address,
                        check: check.clone(),
                        health,
                    })
            })
            .collect()
    }

    /// Moves L4 slow starts one step: rebuilds the tables of VIPs with a ramping server and
    /// writes those that changed (each an atomic switch).
    fn step_slow_starts(&mut self) {
        if !self.l4.slow_starts_pending() {
            return;
        }
        let mut next = self.l4.clone();
        match next.step_slow_starts() {
            Ok(false) => {}
            Ok(true) => match next.sync(self.datapath.maps_mut(), Some(&self.l4)) {
                Ok(()) => self.l4 = next,
                Err(err) => tracing::error!(%err, "slow start step not written"),
            },
            Err(err) => tracing::error!(%err, "slow start step failed"),
        }
    }

    /// Applies what a health check decided, as a change like any other.
    fn apply_health(&mut self, transition: Transition) {
        let Transition {
            pool,
            address,
            health,
            reason,
        } = transition;
        let result = self.edit(&pool, address, Verb::SetHealth(health));
        match result {
            Ok(response) => {
                tracing::warn!(pool, %address, health = health_name(health), reason, "health changed");
                if let Response::Changed(lines) = response {
                    for line in lines {
                        self.record(format!("{line}: {reason}"));
                    }
                }
                self.health_reasons
                    .insert((pool, address), (unix_ms(SystemTime::now()), reason));
            }
            // The server left the pool since the check ran.
            Err(err) => {
                tracing::debug!(pool, %address, err = %err.message, "health transition dropped")
            }
        }
    }

    /// Removes a server, unless that would cut flows or empty the pool (without `force`).
    fn remove_server(
        &mut self,
        name: &str,
        address: std::net::SocketAddr,
        force: bool,
    ) -> Result<Response, ControlError> {
        if !force {
            self.refuse_cutting(name, address)?;
        }
        self.edit(name, address, Verb::Remove)
    }

    /// Why removing `address` from pool `name` would hurt: it is the last server, or (L4) it
    /// still has active flows. In-flight L7 requests finish on their own connection whatever
    /// the pool says, so an L7 server's removal never cuts one.
    fn refuse_cutting(
        &self,
        name: &str,
        address: std::net::SocketAddr,
    ) -> Result<(), ControlError> {
        let (servers, what, without) = match self.resolve(name)? {
            Plane::L7 => {
                let vhost = self.vhosts.vhost(name).map_err(vhost_refusal)?;
                let servers: Vec<_> = vhost.servers.iter().map(|s| s.address).collect();
                (servers, "vhost", "every request gets 503")
            }
            Plane::L4 => {
                let service = self.l4.service(name).map_err(refusal)?;
                let servers: Vec<_> = service.servers.iter().map(|s| s.address).collect();
                (servers, "VIP", "every new connection is dropped")
            }
        };
        if servers == [address] {
            return Err(ControlError::new(
                ControlErrorKind::Refused,
                format!(
                    "{address} is the last server of {what} `{name}`: without it {without}. \
                     Add another server first, or use --force"
                ),
            ));
        }
        if let Ok(service) = self.l4.service(name)
            && let Some(server) = service.find_server(address)
        {
            let flows = self.active_flows()?.get(&server.id).copied().unwrap_or(0);
            if flows > 0 {
                return Err(ControlError::new(
                    ControlErrorKind::Refused,
                    format!(
                        "{address} still has {flows} active flow(s): drain it and remove it once \
                         they end (--wait does that), or use --force to cut them"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Re-reads the config and applies all of it, or none of it.
    fn reload(&mut self, path: &Path) -> Result<Response, ControlError> {
        let config = Config::load(path)
            .map_err(|err| ControlError::new(ControlErrorKind::Config, err.to_string()))?;
        let restart_only = restart_only_changes(&self.config, &config);
        if !restart_only.is_empty() {
            return Err(ControlError::new(
                ControlErrorKind::Refused,
                format!(
                    "nothing was reloaded: changing {} needs a restart of weir",
                    restart_only.join(", ")
                ),
            ));
        }
        let previous = Inner::runtime_state(&self.l4, &self.vhosts);
        let mut next = L4Services::plan(&config, Some(&previous)).map_err(refusal)?;
        next.carry_health(&self.l4).map_err(refusal)?;
        let mut next_vhosts = Vhosts::plan(&config, Some(&previous)).map_err(vhost_refusal)?;
        next_vhosts.carry_health(&self.vhosts);
        self.commit(next, next_vhosts, Some(config))
            .map(Response::Changed)
    }
}

/// Config keys a reload cannot apply, named as in the file.
fn restart_only_changes(running: &Config, next: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |differs: bool, key| {
        if differs {
            changed.push(key);
        }
    };
    check(
        running.datapath.interface_names() != next.datapath.interface_names(),
        "datapath.interfaces",
    );
    check(
        running.datapath.server_interface_names() != next.datapath.server_interface_names(),
        "datapath.server_interfaces",
    );
    check(
        running.datapath.xdp_mode != next.datapath.xdp_mode,
        "datapath.xdp_mode",
    );
    check(
        running.datapath.flow_table_size.get_ref() != next.datapath.flow_table_size.get_ref(),
        "datapath.flow_table_size",
    );
    check(
        running.datapath.embryonic_table_size.get_ref()
            != next.datapath.embryonic_table_size.get_ref(),
        "datapath.embryonic_table_size",
    );
    check(
        running.daemon.control_socket != next.daemon.control_socket,
        "daemon.control_socket",
    );
    check(
        running.daemon.bpf_dir != next.daemon.bpf_dir,
        "daemon.bpf_dir",
    );
    check(
        running.daemon.state_file != next.daemon.state_file,
        "daemon.state_file",
    );
    check(
        running.l7.workers != next.l7.workers
            || running.l7_listen_addresses() != next.l7_listen_addresses(),
        "l7 workers or vhost listen addresses",
    );
    changed
}

fn internal(message: impl Into<String>) -> ControlError {
    ControlError::new(ControlErrorKind::Internal, message)
}

/// The control error for a refused model change.
fn refusal(err: L4Error) -> ControlError {
    let kind = match err {
        L4Error::UnknownVip(_) | L4Error::UnknownServer { .. } => ControlErrorKind::NotFound,
        L4Error::DuplicateVip(_)
        | L4Error::DuplicateServer { .. }
        | L4Error::FamilyMismatch { .. }
        | L4Error::DsrPort { .. }
        | L4Error::Weight(_)
        | L4Error::Address(_)
        | L4Error::Full(..)
        | L4Error::Maglev(_) => ControlErrorKind::Invalid,
    };
    ControlError::new(kind, err.to_string())
}

/// The control error for a refused vhost change.
fn vhost_refusal(err: VhostError) -> ControlError {
    let kind = match err {
        VhostError::UnknownVhost(_) | VhostError::UnknownServer { .. } => {
            ControlErrorKind::NotFound
        }
        VhostError::DuplicateServer { .. } | VhostError::Weight(_) | VhostError::Address(_) => {
            ControlErrorKind::Invalid
        }
    };
    ControlError::new(kind, err.to_string())
}

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
    let l4 = L4Services::plan(&config, previous.as_ref())
        .context("the config and the runtime state do not combine into valid pools")?;
    let vhosts = Vhosts::plan(&config, previous.as_ref())
        .context("the config and the runtime state do not combine into valid vhost pools")?;
    let pins = PinDir::prepare(&config.daemon.bpf_dir)?;
    let mut datapath = Datapath::load(DatapathOptions::from_config(&config, Some(pins.clone())))?;
    if datapath.adopted() {
        tracing::info!(dir = %pins.root().display(), "adopting the pinned datapath: established flows are kept");
    }
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
    Inner::runtime_state(&l4, &vhosts).save(&state_file)?;
    raise_descriptor_limit(&config);
    let listen = config.l7_listen_addresses();
    let l7 = L7Workers::start_with(vhosts.snapshot(&config, None), config.l7.workers, inherited)
        .with_context(|| format!("cannot start L7 listeners on {listen:?}"))?;
    for listener in l7.status() {
        tracing::info!(address = %listener.address, workers = listener.workers, "L7 listener up");
    }
    let (transitions_tx, mut transitions) = tokio::sync::mpsc::unbounded_channel();
    let health = HealthChecker::start(transitions_tx).context("cannot start the health checker")?;
    let socket_path = config.daemon.control_socket.clone();
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
            health_reasons: HashMap::new(),
            events: VecDeque::new(),
            next_event: 0,
        }),
    });
    if let Ok(inner) = state.inner.lock() {
        inner.health.set_targets(inner.health_targets());
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
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
        let serve = control::serve(listener, handler, hand_over);
        tokio::pin!(serve);
        loop {
            tokio::select! {
                () = &mut serve => break,
                _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping, the datapath stays pinned"); break }
                _ = sigint.recv() => { tracing::info!("SIGINT: stopping, the datapath stays pinned"); break }
                () = state.handed_over.notified() => {
                    tracing::info!("handed over to the next daemon (weir upgrade): stopping, the datapath stays pinned");
                    break
                }
                _ = slow_starts.tick() => {
                    if let Ok(mut inner) = state.inner.lock() {
                        inner.step_slow_starts();
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
            }
        }
        // The next daemon's sockets, before this one stops accepting: the service manager
        // holds them (and their backlogs) until it starts the next.
        if let Ok(inner) = state.inner.lock() {
            handover::to_service_manager(inner.l7.listening_sockets());
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

/// `weir detach`: unpins the datapath a stopped daemon left, which detaches XDP from every
/// interface and frees the maps. Established L4 flows end with it.
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
