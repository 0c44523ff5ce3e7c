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
//!
//! Rooms: this file holds the state and the one dispatch of requests (`State::handle`) and
//! the transaction (`Inner::commit`); [`pools`] resolves pool names and applies the verbs,
//! [`report`] assembles what the daemon reports, [`metrics`] writes it for Prometheus,
//! [`web`] serves that and the dashboard, [`lifecycle`] starts, runs and stops it. What the
//! node announces by BGP is decided here (`Inner::wanted_announcements`) and told to the
//! speaker by `crate::bgp`.

mod lifecycle;
mod metrics;
mod pools;
mod report;
mod web;

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use weir_config::{
    AccessLogConfig, Announce, Config, DEFAULT_WEIGHT,
    control::{AdminState, ControlError, ControlErrorKind, Event, ReloadReport, Request, Response},
};

pub use lifecycle::{Start, detach, run, run_with, upgrade};
use pools::{Plane, Verb};

use crate::{
    bgp::Announcer,
    datapath::{self, Datapath},
    health::{HealthChecker, Target, Transition},
    l4::{self, L4Error, L4Services, transaction},
    l7::{
        L7Snapshot, L7Workers,
        access_log::LogFile,
        tls::{Sessions, TlsListeners},
    },
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
    /// Why each server has the health it has, since when, and how often it changed.
    health_records: HashMap<(String, SocketAddr), HealthRecord>,
    /// Config reloads since the daemon started.
    reloads: ReloadReport,
    /// The last [`MAX_EVENTS`] state changes.
    events: VecDeque<Event>,
    next_event: u64,
    /// The last walk of the flow table for `/metrics` and the dashboard, and when it was
    /// made (`report::CENSUS_MAX_AGE`).
    flow_census: Option<(Instant, std::sync::Arc<crate::datapath::FlowCensus>)>,
    /// `weirctl node drain`: the node announces no VIP (kept in the state file).
    node_drained: bool,
    /// The BGP speaker weir tells what to announce (`[bgp]`), and why it last failed.
    announcer: Option<Announcer>,
    speaker_error: Option<String>,
    /// TLS resumption state, kept across reloads, and the certificates loaded last.
    sessions: Sessions,
    tls: Arc<TlsListeners>,
}

/// The last health transition of a server, and how many it had.
#[derive(Default)]
struct HealthRecord {
    since_unix_ms: u64,
    reason: String,
    transitions: u64,
}

/// Events kept for `weirctl events`.
const MAX_EVENTS: usize = 1000;

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl State {
    fn handle(&self, request: Request) -> Response {
        // A server about to be added gets its neighbour resolved before the lock is taken:
        // the connection attempt may take a while, and no other request need wait for it.
        if let Request::ServerAdd { address, .. } = &request {
            l4::warm_neighbours([*address]);
        }
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
            Request::Reload => {
                let result = inner.reload(&self.config_path);
                inner.count_reload(result.is_ok());
                result
            }
            Request::ReopenLogs => inner.reopen_access_log(),
            Request::NodeDrain => inner.set_node_drained(true),
            Request::NodeUndrain => inner.set_node_drained(false),
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
            inner.forget_removed_servers();
            inner.sync_announcements();
        }
        result.unwrap_or_else(Response::Error)
    }
}

impl Inner {
    /// The durable state of both models.
    fn runtime_state(l4: &L4Services, vhosts: &Vhosts, node_drained: bool) -> RuntimeState {
        RuntimeState {
            vhosts: vhosts.state(),
            node_drained,
            ..l4.runtime_state()
        }
    }

    /// The VIP addresses this node should announce: none while drained; otherwise every
    /// address with a VIP that says so — by default, one with a server taking new flows
    /// (admin-ready, not unhealthy); `announce = "always"` or `"never"` per VIP.
    fn wanted_announcements(&self) -> BTreeSet<std::net::IpAddr> {
        if self.node_drained {
            return BTreeSet::new();
        }
        self.l4
            .services()
            .filter(|service| match service.announce {
                Announce::Always => true,
                Announce::Never => false,
                Announce::WhenReady => service.servers.iter().any(|s| {
                    s.state == AdminState::Ready
                        && s.health != weir_config::control::HealthState::Unhealthy
                }),
            })
            .map(|service| service.address.ip())
            .collect()
    }

    /// Tells the speaker what to announce now, if it is not announcing that already (called
    /// after every change and every second, so a speaker that was down catches up). Each
    /// route announced or withdrawn is an event.
    fn sync_announcements(&mut self) {
        self.announce(self.wanted_announcements());
    }

    fn announce(&mut self, wanted: BTreeSet<std::net::IpAddr>) {
        let Some(announcer) = self.announcer.as_mut() else {
            return;
        };
        match announcer.announce(&wanted) {
            Ok(lines) => {
                self.speaker_error = None;
                for line in lines {
                    tracing::info!(change = %line, "applied");
                    self.record(line);
                }
            }
            Err(err) => {
                let text = err.to_string();
                if self.speaker_error.as_deref() != Some(&text) {
                    tracing::warn!(err = %text, "BGP speaker not told; retrying every second");
                }
                self.speaker_error = Some(text);
            }
        }
    }

    /// Takes the node out of service (`drained`) or puts it back; kept in the state file.
    fn set_node_drained(&mut self, drained: bool) -> Result<Response, ControlError> {
        if self.node_drained == drained {
            return Ok(Response::Changed(Vec::new()));
        }
        Inner::runtime_state(&self.l4, &self.vhosts, drained)
            .save(&self.config.daemon.state_file)
            .map_err(|err| internal(err.to_string()))?;
        self.node_drained = drained;
        Ok(Response::Changed(vec![if drained {
            "node drained: it announces no VIP".to_string()
        } else {
            "node back in service".to_string()
        }]))
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
        let l7_changes = config
            .as_ref()
            .map_or_else(Vec::new, |c| c.l7.changes_from(&self.config.l7));
        let l7_settings_changed = !l7_changes.is_empty();
        changes.extend(l7_changes.into_iter().map(|change| format!("l7 {change}")));
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
        if config.is_some() {
            // A reload may bring servers in: their neighbours, before their tables switch.
            l4::warm_neighbours(next.fresh_servers(Some(&self.l4)));
        }
        let state = Inner::runtime_state(&next, &next_vhosts, self.node_drained);
        if !changes.is_empty()
            || state != Inner::runtime_state(&self.l4, &self.vhosts, self.node_drained)
        {
            let change = transaction::Change {
                current: &self.l4,
                next: &next,
                settings: settings.zip(edge).map(|next| transaction::SettingsChange {
                    next,
                    current: (old_settings, old_edge),
                }),
                state: Some((&state, &self.config.daemon.state_file)),
            };
            if let Err(err) = transaction::write(self.datapath.maps_mut(), change) {
                tracing::error!(%err, undone = err.undone.is_ok(), "change failed");
                return Err(internal(err.to_string()));
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
        let current = self.l7.snapshot();
        let tls_reloaded = !Arc::ptr_eq(&self.tls, &current.tls);
        if next_vhosts != self.vhosts || l7_settings_changed || tls_reloaded {
            let tls = Arc::clone(&self.tls);
            let snapshot = L7Snapshot::of(&next_vhosts, &self.config, tls, Some(&current));
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
                let record = self.health_records.entry((pool, address)).or_default();
                record.since_unix_ms = unix_ms(SystemTime::now());
                record.reason = reason;
                record.transitions += 1;
                // A VIP whose last server went down stops being announced (and comes back).
                self.sync_announcements();
            }
            // The server left the pool since the check ran.
            Err(err) => {
                tracing::debug!(pool, %address, err = %err.message, "health transition dropped")
            }
        }
    }

    /// Counts a reload asked for, applied or not.
    fn count_reload(&mut self, succeeded: bool) {
        let now = unix_ms(SystemTime::now());
        let reloads = &mut self.reloads;
        if succeeded {
            reloads.succeeded += 1;
            reloads.last_success_unix_ms = Some(now);
        } else {
            reloads.failed += 1;
        }
        reloads.last_unix_ms = Some(now);
        reloads.last_succeeded = Some(succeeded);
    }

    /// Drops the health records of servers no longer in their pool, so one added again
    /// starts with none.
    fn forget_removed_servers(&mut self) {
        let (l4, vhosts) = (&self.l4, &self.vhosts);
        self.health_records.retain(|(pool, address), _| {
            l4.service(pool)
                .is_ok_and(|s| s.servers.iter().any(|server| server.address == *address))
                || vhosts.iter().any(|v| {
                    v.name == *pool && v.servers.iter().any(|server| server.address == *address)
                })
        });
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
            let flows = self
                .active_flows()?
                .per_server
                .get(&server.id)
                .copied()
                .unwrap_or(0);
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
        let previous = Inner::runtime_state(&self.l4, &self.vhosts, self.node_drained);
        let mut next = L4Services::plan(&config, Some(&previous)).map_err(refusal)?;
        next.carry_health(&self.l4).map_err(refusal)?;
        let mut next_vhosts = Vhosts::plan(&config, Some(&previous)).map_err(vhost_refusal)?;
        next_vhosts.carry_health(&self.vhosts);
        // Opened before anything changes: a path that cannot be opened refuses the reload.
        let access_log = (config.access_log != self.config.access_log)
            .then(|| open_access_log(&config.access_log))
            .transpose()?;
        // Read before anything changes too: a bad certificate or key refuses the reload.
        let tls = TlsListeners::load(&config, &self.sessions).map_err(|err| {
            ControlError::new(
                ControlErrorKind::Config,
                format!("TLS certificate {err} (nothing changed)"),
            )
        })?;
        let renewed = renewed_certificates(&self.tls, &tls);
        let previous_tls = std::mem::replace(&mut self.tls, Arc::new(tls));
        let mut changes = match self.commit(next, next_vhosts, Some(config)) {
            Ok(changes) => changes,
            Err(err) => {
                self.tls = previous_tls;
                return Err(err);
            }
        };
        changes.extend(renewed);
        if let Some(file) = access_log {
            changes.push(match &file {
                Some(file) => format!("access log {}", file.path().display()),
                None => "access log off".to_string(),
            });
            self.l7.set_access_log(file);
        }
        Ok(Response::Changed(changes))
    }

    /// Opens the access log again at its configured path (after logrotate moved the file).
    /// If it cannot be opened, the file open now stays.
    fn reopen_access_log(&mut self) -> Result<Response, ControlError> {
        let Some(path) = &self.config.access_log.path else {
            return Err(ControlError::new(
                ControlErrorKind::Invalid,
                "no access log is configured ([access_log] path)",
            ));
        };
        let file = open_access_log(&self.config.access_log)?;
        self.l7.set_access_log(file);
        Ok(Response::Changed(vec![format!(
            "access log reopened: {}",
            path.display()
        )]))
    }
}

/// A line per vhost whose certificate differs in `next` from `running`.
fn renewed_certificates(running: &TlsListeners, next: &TlsListeners) -> Vec<String> {
    let leaf = |listeners: &TlsListeners, vhost: &str| {
        listeners
            .certificates
            .iter()
            .find(|(name, _)| name == vhost)
            .and_then(|(_, c)| c.key.cert.first().cloned())
    };
    next.certificates
        .iter()
        .filter(|(vhost, _)| leaf(running, vhost) != leaf(next, vhost))
        .map(|(vhost, certificate)| {
            format!(
                "vhost {vhost}: certificate {} loaded (valid until {})",
                certificate.certificate.display(),
                weir_config::control::utc_date(certificate.not_after_unix)
            )
        })
        .collect()
}

/// The access log file `config` names, opened; `None` when it names none.
fn open_access_log(config: &AccessLogConfig) -> Result<Option<LogFile>, ControlError> {
    let Some(path) = &config.path else {
        return Ok(None);
    };
    LogFile::open(path, config.format).map(Some).map_err(|err| {
        ControlError::new(
            ControlErrorKind::Refused,
            format!(
                "cannot open the access log {}: {err} (nothing changed)",
                path.display()
            ),
        )
    })
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
    check(running.metrics != next.metrics, "metrics.listen");
    check(running.bgp != next.bgp, "bgp");
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
    check(
        running.l7.pin_workers != next.l7.pin_workers,
        "l7.pin_workers",
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
