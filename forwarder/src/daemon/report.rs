//! What the daemon reports: status, counters, flow tables, VIPs and servers with their traffic
//! and health. Read-only views of the running state (`super::Inner`), assembled under the same
//! lock as changes, so a report never mixes two states.

use std::{collections::HashMap, net::SocketAddr, sync::atomic::Ordering};

use serde::Serialize;
use weir_common::{flow::FlowKey, l4::PROTO_TCP};
use weir_config::control::{
    AdminState, CertificateStatus, ControlError, DaemonStatus, DatapathCounter, Event, FlowEvent,
    FlowTableReport, HealthState, L7Traffic, NodeStatus, ServerReport, StatsReport, StatusReport,
    Traffic, VipReport,
};

use super::{Inner, State, internal, refusal};
use crate::datapath::{self, FlowCensus};

/// Everything the daemon reports, taken at one moment: what a scrape and the dashboard show.
#[derive(Serialize)]
pub(super) struct Overview {
    status: StatusReport,
    vips: Vec<VipReport>,
    servers: Vec<ServerReport>,
    /// The latest events, oldest first.
    events: Vec<Event>,
}

/// Events the dashboard shows.
const DASHBOARD_EVENTS: usize = 50;

/// How long a walk of the flow table serves `/metrics` and the dashboard. A walk of the
/// default 1 Mi-entry table is about 22 ms under the daemon's lock (decision 0016); the
/// dashboard polls every second, so without this an open page would hold the lock 2 % of the
/// time, and a full table for seconds. `weirctl` and `server remove` always walk afresh.
const CENSUS_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(5);

impl State {
    /// Every report, under one hold of the lock.
    fn overview(&self) -> Result<Overview, ControlError> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| internal("daemon state lock poisoned"))?;
        // One walk of the flow table for both reports, at most every `CENSUS_MAX_AGE`: with
        // the default table (1 Mi entries) a walk is most of a scrape's cost, even when the
        // table is nearly empty.
        let flows = inner.recent_flow_census()?;
        let skip = inner.events.len().saturating_sub(DASHBOARD_EVENTS);
        let mut status = self.status(&inner)?;
        status.flows.entries = Some(flows.entries);
        Ok(Overview {
            status,
            vips: inner.vip_reports_from(&flows.per_server)?,
            servers: inner.server_reports_from(None, &flows.per_server)?,
            events: inner.events.iter().skip(skip).cloned().collect(),
        })
    }

    /// The Prometheus exposition of everything the daemon reports (`super::metrics`).
    pub(super) fn metrics(&self) -> Result<String, ControlError> {
        let o = self.overview()?;
        // Written out after the lock is released: control commands need not wait for it.
        Ok(super::metrics::render(&o.status, &o.vips, &o.servers))
    }

    /// What the dashboard polls (`super::web`), as JSON.
    pub(super) fn dashboard(&self) -> Result<String, ControlError> {
        let overview = self.overview()?;
        serde_json::to_string(&overview).map_err(|err| internal(err.to_string()))
    }

    pub(super) fn status(&self, inner: &Inner) -> Result<StatusReport, ControlError> {
        Ok(StatusReport {
            daemon: DaemonStatus {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                config: self.config_path.display().to_string(),
                uptime_secs: self.started.elapsed().as_secs(),
                state_file: inner.config.daemon.state_file.display().to_string(),
                bpf_dir: inner.config.daemon.bpf_dir.display().to_string(),
                adopted_datapath: inner.datapath.adopted(),
                reloads: inner.reloads.clone(),
                node: inner.node_status(),
            },
            xdp: inner.datapath.attachments().to_vec(),
            counters: inner.counters()?,
            flows: inner.flow_table_report()?,
            listeners: inner.l7.status(),
            certificates: inner
                .tls
                .certificates
                .iter()
                .map(|(vhost, certificate)| CertificateStatus {
                    vhost: vhost.clone(),
                    path: certificate.certificate.display().to_string(),
                    not_after_unix: certificate.not_after_unix,
                })
                .collect(),
        })
    }
}

impl Inner {
    /// The node's service state and what its BGP speaker says.
    fn node_status(&self) -> NodeStatus {
        let mut node = NodeStatus {
            drained: self.node_drained,
            speaker_error: self.speaker_error.clone(),
            ..NodeStatus::default()
        };
        if let Some(announcer) = &self.announcer {
            node.speaker = Some(announcer.socket().display().to_string());
            node.announced = announcer
                .announced()
                .map(|set| set.iter().copied().collect())
                .unwrap_or_default();
            match announcer.sessions() {
                Ok(sessions) => node.sessions = sessions,
                Err(err) => node.speaker_error = Some(err),
            }
        }
        node
    }

    pub(super) fn counters(&self) -> Result<Vec<DatapathCounter>, ControlError> {
        Ok(self
            .datapath
            .maps()
            .counters()
            .map_err(|err| internal(err.to_string()))?
            .into_iter()
            .map(|(stat, counter)| DatapathCounter {
                reason: stat.name().to_string(),
                packets: counter.packets,
                bytes: counter.bytes,
            })
            .collect())
    }

    /// Embryonic flows and flow events.
    pub(super) fn flow_table_report(&self) -> Result<FlowTableReport, ControlError> {
        let maps = self.datapath.maps();
        let idle = datapath::edge_settings(&self.config).embryonic_idle_ns;
        let events = maps
            .events()
            .map_err(|err| internal(err.to_string()))?
            .into_iter()
            .map(|(event, count)| FlowEvent {
                event: event.name().to_string(),
                count,
            })
            .collect();
        let (capacity, embryonic_capacity) = maps.flow_capacities();
        Ok(FlowTableReport {
            embryonic: maps.embryonic_flows(idle),
            events,
            entries: None,
            capacity,
            embryonic_capacity,
        })
    }

    /// The last flow census if it is younger than [`CENSUS_MAX_AGE`], else a fresh one.
    fn recent_flow_census(&mut self) -> Result<std::sync::Arc<FlowCensus>, ControlError> {
        if let Some((at, census)) = &self.flow_census
            && at.elapsed() < CENSUS_MAX_AGE
        {
            return Ok(std::sync::Arc::clone(census));
        }
        let census = std::sync::Arc::new(self.active_flows()?);
        self.flow_census = Some((std::time::Instant::now(), std::sync::Arc::clone(&census)));
        Ok(census)
    }

    /// Active flows per server id.
    pub(super) fn active_flows(&self) -> Result<FlowCensus, ControlError> {
        let settings = datapath::settings(&self.config);
        let never = |ns: u64| if ns == 0 { u64::MAX } else { ns };
        let idle = |key: &FlowKey| {
            never(if key.protocol == PROTO_TCP {
                settings.tcp_idle_ns
            } else {
                settings.udp_idle_ns
            })
        };
        self.datapath
            .maps()
            .active_flows(idle)
            .map_err(|err| internal(err.to_string()))
    }

    pub(super) fn vip_reports(&self) -> Result<Vec<VipReport>, ControlError> {
        self.vip_reports_from(&self.active_flows()?.per_server)
    }

    /// The VIP reports, with active flows from `flows` ([`Inner::active_flows`]).
    fn vip_reports_from(
        &self,
        flows: &HashMap<u32, usize>,
    ) -> Result<Vec<VipReport>, ControlError> {
        let maps = self.datapath.maps();
        self.l4
            .services()
            .map(|service| {
                let traffic = maps
                    .vip_traffic(service.id, service.servers.iter().map(|s| s.id))
                    .map_err(|err| internal(err.to_string()))?;
                Ok(VipReport {
                    name: service.name.clone(),
                    address: service.address,
                    protocol: service.protocol,
                    mode: service.mode,
                    hash: service.hash,
                    table_size: service.table_size,
                    table_digest: format!("{:016x}", service.table_digest()),
                    servers: service.servers.len(),
                    ready: service
                        .servers
                        .iter()
                        .filter(|s| s.state == weir_config::control::AdminState::Ready)
                        .count(),
                    active_flows: service
                        .servers
                        .iter()
                        .map(|s| flows.get(&s.id).copied().unwrap_or(0))
                        .sum(),
                    traffic: traffic_report(traffic),
                })
            })
            .collect()
    }

    pub(super) fn server_reports(
        &self,
        vip: Option<&str>,
    ) -> Result<Vec<ServerReport>, ControlError> {
        if let Some(vip) = vip
            && !self.vhosts.contains(vip)
        {
            self.l4.service(vip).map_err(refusal)?;
        }
        self.server_reports_from(vip, &self.active_flows()?.per_server)
    }

    /// The server reports of pool `vip` (all pools if `None`, which must exist), with active
    /// flows from `flows` ([`Inner::active_flows`]).
    fn server_reports_from(
        &self,
        vip: Option<&str>,
        flows: &HashMap<u32, usize>,
    ) -> Result<Vec<ServerReport>, ControlError> {
        let maps = self.datapath.maps();
        let mut reports = Vec::new();
        for service in self
            .l4
            .services()
            .filter(|s| vip.is_none_or(|v| v == s.name))
        {
            for server in &service.servers {
                let traffic = maps
                    .server_traffic(server.id)
                    .map_err(|err| internal(err.to_string()))?;
                reports.push(ServerReport {
                    active_flows: flows.get(&server.id).copied().unwrap_or(0),
                    traffic: traffic_report(traffic),
                    ..self.server_report(
                        &service.name,
                        server.address,
                        server.weight,
                        server.state,
                        server.health,
                    )
                });
            }
        }
        let snapshot = self.l7.snapshot();
        for vhost in self
            .vhosts
            .iter()
            .filter(|v| vip.is_none_or(|n| n == v.name))
        {
            for server in &vhost.servers {
                let l7 = snapshot
                    .server_stats(&vhost.name, server.address)
                    .map(|stats| {
                        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
                        L7Traffic {
                            requests: load(&stats.requests),
                            in_flight: load(&stats.in_flight),
                            responses: stats.responses.each_ref().map(load),
                            failures: load(&stats.failures),
                            connections: load(&stats.connections),
                            open_connections: load(&stats.open_connections),
                            connect_failures: load(&stats.connect_failures),
                            retries: load(&stats.retries),
                            request_bytes: load(&stats.request_bytes),
                            response_bytes: load(&stats.response_bytes),
                            ejected_ms: stats
                                .ejected_until_ms
                                .load(Ordering::Relaxed)
                                .saturating_sub(crate::l7::snapshot::now_ms()),
                            response_time_buckets: stats.response_time_buckets.each_ref().map(load),
                            response_time_sum_us: load(&stats.response_time_sum_us),
                        }
                    })
                    .unwrap_or_default();
                reports.push(ServerReport {
                    active_flows: l7.in_flight as usize,
                    l7: Some(l7),
                    ..self.server_report(
                        &vhost.name,
                        server.address,
                        server.weight,
                        server.state,
                        server.health,
                    )
                });
            }
        }
        Ok(reports)
    }

    /// A server's report without its traffic (which L4 and L7 count differently).
    fn server_report(
        &self,
        pool: &str,
        address: SocketAddr,
        weight: u32,
        admin: AdminState,
        health: HealthState,
    ) -> ServerReport {
        let (mut last_check, mut health_since_unix_ms, mut health_reason, health_transitions) =
            self.health_detail(pool, address);
        if health == HealthState::Unchecked {
            // No check runs (none configured any more, or the server is disabled): the last
            // one's result and reason describe a past that no longer holds.
            (last_check, health_since_unix_ms, health_reason) = (None, None, None);
        }
        ServerReport {
            vip: pool.to_string(),
            address,
            weight,
            admin,
            health,
            last_check,
            health_since_unix_ms,
            health_reason,
            health_transitions,
            active_flows: 0,
            traffic: Traffic::default(),
            l7: None,
        }
    }

    /// The last check, since when and why the health is what it is, and how often it changed.
    fn health_detail(
        &self,
        pool: &str,
        address: SocketAddr,
    ) -> (Option<String>, Option<u64>, Option<String>, u64) {
        let key = (pool.to_string(), address);
        let last = self
            .health
            .last_checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .map(|check| {
                let ago = check.at.elapsed().unwrap_or_default().as_secs_f64();
                let verdict = if check.ok { "ok" } else { "failed" };
                format!("{verdict}: {} ({ago:.1} s ago)", check.result)
            });
        let (since, reason, transitions) =
            self.health_records
                .get(&key)
                .map_or((None, None, 0), |record| {
                    (
                        Some(record.since_unix_ms),
                        Some(record.reason.clone()),
                        record.transitions,
                    )
                });
        (last, since, reason, transitions)
    }

    pub(super) fn stats(&self) -> Result<StatsReport, ControlError> {
        Ok(StatsReport {
            counters: self.counters()?,
            vips: self.vip_reports()?,
            flows: self.flow_table_report()?,
        })
    }
}

fn traffic_report(traffic: weir_common::TrafficCounter) -> Traffic {
    Traffic {
        packets: traffic.packets,
        bytes: traffic.bytes,
        new_flows: traffic.new_flows,
    }
}
