//! The Prometheus endpoint: `GET /metrics` on `[metrics] listen`, in the text exposition
//! format, written by the `prometheus` crate from the same reports `weirctl` reads — so a scrape
//! and `weirctl status` never disagree. Built afresh per scrape — the maps are read under the
//! daemon's lock, the text written after it — which keeps the hot paths free of any metrics
//! work. What a scrape costs with 1 000 servers, and why it is built this way: decision 0016.
//!
//! Names follow Prometheus conventions: `weir_` prefix, `_total` for counters, labels `vip`,
//! `vhost`, `server`, `reason`, `code`, `event`. The list with meanings is in
//! `docs/operations.md`.

use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{
    TextEncoder,
    proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType},
};
use weir_config::control::{
    HealthState, RESPONSE_TIME_BOUNDS_SECS, RESPONSE_TIME_BUCKETS, ServerReport, StatusReport,
    VipReport,
};

/// One scrape's metric families, built directly from totals the daemon already summed. Not
/// through a `Registry`: it hashes every label set to find its series and sorts them again,
/// which with 1 000 servers (8 600 series) was two thirds of a scrape; the crate's text encoder
/// still writes the exposition.
struct Scrape(Vec<MetricFamily>);

impl Scrape {
    fn counters(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
        values: impl IntoIterator<Item = (Vec<String>, u64)>,
    ) {
        self.family(
            name,
            help,
            MetricType::COUNTER,
            labels,
            values,
            |metric, value| {
                let mut counter = Counter::default();
                counter.set_value(value as f64);
                metric.set_counter(counter);
            },
        );
    }

    fn gauges(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
        values: impl IntoIterator<Item = (Vec<String>, i64)>,
    ) {
        self.family(
            name,
            help,
            MetricType::GAUGE,
            labels,
            values,
            |metric, value| {
                let mut gauge = Gauge::default();
                gauge.set_value(value as f64);
                metric.set_gauge(gauge);
            },
        );
    }

    /// Histograms from per-bucket counts (not cumulative; bounds
    /// [`RESPONSE_TIME_BOUNDS_SECS`], the last bucket past them) and a sum in microseconds.
    fn histograms(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
        values: impl IntoIterator<Item = (Vec<String>, ([u64; RESPONSE_TIME_BUCKETS], u64))>,
    ) {
        self.family(
            name,
            help,
            MetricType::HISTOGRAM,
            labels,
            values,
            |metric, (counts, sum_us)| {
                let mut cumulative = 0;
                let buckets = RESPONSE_TIME_BOUNDS_SECS
                    .iter()
                    .zip(counts)
                    .map(|(&bound, count)| {
                        cumulative += count;
                        let mut bucket = Bucket::default();
                        bucket.set_upper_bound(bound);
                        bucket.set_cumulative_count(cumulative);
                        bucket
                    })
                    .collect();
                let mut histogram = Histogram::default();
                histogram.set_bucket(buckets);
                // The encoder writes the `+Inf` bucket from the count.
                histogram.set_sample_count(counts.iter().sum());
                histogram.set_sample_sum(sum_us as f64 / 1e6);
                metric.set_histogram(histogram);
            },
        );
    }

    /// A family of `kind`, one metric per item of `values` (label values in the order of
    /// `labels`); none when `values` is empty, as the exposition has no empty families.
    fn family<V>(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        labels: &[&str],
        values: impl IntoIterator<Item = (Vec<String>, V)>,
        set: impl Fn(&mut Metric, V),
    ) {
        // Label pairs go out sorted by name, as Prometheus's own clients write them.
        let mut order: Vec<usize> = (0..labels.len()).collect();
        order.sort_by_key(|&i| labels[i]);
        let metrics: Vec<Metric> = values
            .into_iter()
            .map(|(label_values, value)| {
                debug_assert_eq!(label_values.len(), labels.len(), "{name}");
                let mut label_values: Vec<Option<String>> =
                    label_values.into_iter().map(Some).collect();
                let pairs = order
                    .iter()
                    .map(|&i| {
                        let mut pair = LabelPair::default();
                        pair.set_name(labels[i].to_string());
                        pair.set_value(label_values[i].take().unwrap_or_default());
                        pair
                    })
                    .collect();
                let mut metric = Metric::default();
                metric.set_label(pairs);
                set(&mut metric, value);
                metric
            })
            .collect();
        if metrics.is_empty() {
            return;
        }
        let mut family = MetricFamily::default();
        family.set_name(name.to_string());
        family.set_help(help.to_string());
        family.set_field_type(kind);
        family.set_metric(metrics);
        self.0.push(family);
    }
}

/// The exposition of one scrape.
pub(super) fn render(
    status: &StatusReport,
    vips: &[VipReport],
    servers: &[ServerReport],
) -> String {
    let mut scrape = Scrape(Vec::new());
    scrape.gauges(
        "weir_build_info",
        "The running daemon's version, as a label of a gauge that is 1",
        &["version"],
        [(vec![status.daemon.version.clone()], 1)],
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let started = now.saturating_sub(status.daemon.uptime_secs);
    scrape.gauges(
        "weir_start_time_seconds",
        "When the daemon started, in seconds since the Unix epoch",
        &[],
        [(vec![], started as i64)],
    );
    let reloads = &status.daemon.reloads;
    scrape.counters(
        "weir_config_reloads_total",
        "Config reloads asked for (weirctl reload, SIGHUP), by result",
        &["result"],
        [
            (vec!["success".to_string()], reloads.succeeded),
            (vec!["failure".to_string()], reloads.failed),
        ],
    );
    scrape.gauges(
        "weir_config_last_reload_successful",
        "1 unless the last reload was refused (the running config is then older than the file)",
        &[],
        [(vec![], i64::from(reloads.last_succeeded != Some(false)))],
    );
    scrape.gauges(
        "weir_config_last_reload_success_timestamp_seconds",
        "When the running config was applied (the last applied reload, or the start), Unix seconds",
        &[],
        [(
            vec![],
            reloads.last_success_unix_ms.map_or(started, |ms| ms / 1000) as i64,
        )],
    );
    let node = &status.daemon.node;
    scrape.gauges(
        "weir_node_drained",
        "1 while `weirctl node drain` keeps the node out of service (it announces no VIP)",
        &[],
        [(vec![], i64::from(node.drained))],
    );
    scrape.gauges(
        "weir_bgp_session_established",
        "1 for each of the BGP speaker's sessions that is established, 0 for the others",
        &["session"],
        node.sessions
            .iter()
            .map(|s| (vec![s.name.clone()], i64::from(s.info == "Established"))),
    );
    scrape.gauges(
        "weir_bgp_announced_vips",
        "VIP addresses the BGP speaker announces for this node (as it last confirmed)",
        &[],
        node.speaker
            .as_ref()
            .map(|_| (vec![], node.announced.len() as i64)),
    );
    scrape.counters(
        "weir_datapath_packets_total",
        "Packets the XDP and TC programs handled, by the reason for their verdict",
        &["reason"],
        status
            .counters
            .iter()
            .map(|c| (vec![c.reason.clone()], c.packets)),
    );
    scrape.counters(
        "weir_datapath_bytes_total",
        "Bytes the XDP and TC programs handled, by the reason for their verdict",
        &["reason"],
        status
            .counters
            .iter()
            .map(|c| (vec![c.reason.clone()], c.bytes)),
    );
    scrape.gauges(
        "weir_flows_embryonic",
        "Flows seen but not proven yet (a SYN without its ACK), within the embryonic timeout",
        &[],
        [(vec![], status.flows.embryonic as i64)],
    );
    scrape.gauges(
        "weir_flow_table_entries",
        "Entries in the flow table, idle and closing ones not yet evicted included",
        &[],
        status.flows.entries.map(|n| (vec![], n as i64)),
    );
    scrape.gauges(
        "weir_flow_table_capacity",
        "Entries the flow table holds at most (flow_table_size); past it the LRU evicts",
        &[],
        [(vec![], status.flows.capacity as i64)],
    );
    scrape.gauges(
        "weir_embryonic_table_capacity",
        "Entries the embryonic table holds at most (embryonic_table_size)",
        &[],
        [(vec![], status.flows.embryonic_capacity as i64)],
    );
    scrape.counters(
        "weir_flow_events_total",
        "Flows created embryonic, promoted to the flow table, or deferred by the flood guard",
        &["event"],
        status
            .flows
            .events
            .iter()
            .map(|e| (vec![e.event.clone()], e.count)),
    );
    let vip = |v: &VipReport| vec![v.name.clone()];
    scrape.counters(
        "weir_vip_packets_total",
        "Packets to an L4 VIP",
        &["vip"],
        vips.iter().map(|v| (vip(v), v.traffic.packets)),
    );
    scrape.counters(
        "weir_vip_bytes_total",
        "Bytes to an L4 VIP",
        &["vip"],
        vips.iter().map(|v| (vip(v), v.traffic.bytes)),
    );
    scrape.counters(
        "weir_vip_new_flows_total",
        "New flows to an L4 VIP (picked from its Maglev table)",
        &["vip"],
        vips.iter().map(|v| (vip(v), v.traffic.new_flows)),
    );
    scrape.gauges(
        "weir_vip_active_flows",
        "Established flows of an L4 VIP (neither closing nor idle past their timeout)",
        &["vip"],
        vips.iter().map(|v| (vip(v), v.active_flows as i64)),
    );
    scrape.gauges(
        "weir_vip_maglev_table_info",
        "1, with the digest of the VIP's Maglev table (as server addresses): equal on every node that balances it from the same pools",
        &["vip", "digest"],
        vips.iter()
            .map(|v| (vec![v.name.clone(), v.table_digest.clone()], 1)),
    );
    scrape.gauges(
        "weir_vip_servers_ready",
        "Servers of an L4 VIP taking new flows (admin-ready)",
        &["vip"],
        vips.iter().map(|v| (vip(v), v.ready as i64)),
    );
    let (l4, l7): (Vec<&ServerReport>, Vec<&ServerReport>) =
        servers.iter().partition(|s| s.l7.is_none());
    let server = |s: &ServerReport| vec![s.vip.clone(), s.address.to_string()];
    scrape.counters(
        "weir_server_packets_total",
        "Packets the datapath sent an L4 server",
        &["vip", "server"],
        l4.iter().map(|s| (server(s), s.traffic.packets)),
    );
    scrape.counters(
        "weir_server_bytes_total",
        "Bytes the datapath sent an L4 server",
        &["vip", "server"],
        l4.iter().map(|s| (server(s), s.traffic.bytes)),
    );
    scrape.counters(
        "weir_server_new_flows_total",
        "New flows that picked an L4 server",
        &["vip", "server"],
        l4.iter().map(|s| (server(s), s.traffic.new_flows)),
    );
    scrape.gauges(
        "weir_server_active_flows",
        "Established flows pinned to an L4 server",
        &["vip", "server"],
        l4.iter().map(|s| (server(s), s.active_flows as i64)),
    );
    let l7_traffic = |s: &ServerReport| s.l7.unwrap_or_default();
    scrape.counters(
        "weir_vhost_server_requests_total",
        "Requests the L7 proxy sent a server",
        &["vhost", "server"],
        l7.iter().map(|s| (server(s), l7_traffic(s).requests)),
    );
    scrape.counters(
        "weir_vhost_server_responses_total",
        "Responses from a server, by status class",
        &["vhost", "server", "code"],
        l7.iter().flat_map(|s| {
            ["1xx", "2xx", "3xx", "4xx", "5xx"]
                .into_iter()
                .zip(l7_traffic(s).responses)
                .map(move |(code, n)| {
                    (
                        vec![s.vip.clone(), s.address.to_string(), code.to_string()],
                        n,
                    )
                })
        }),
    );
    scrape.counters(
        "weir_vhost_server_failures_total",
        "Connect failures, resets and timeouts of a server",
        &["vhost", "server"],
        l7.iter().map(|s| (server(s), l7_traffic(s).failures)),
    );
    scrape.counters(
        "weir_vhost_server_connections_total",
        "Connections the L7 proxy opened to a server",
        &["vhost", "server"],
        l7.iter().map(|s| (server(s), l7_traffic(s).connections)),
    );
    scrape.gauges(
        "weir_vhost_server_open_connections",
        "Connections to a server open now, in use or idle for reuse",
        &["vhost", "server"],
        l7.iter()
            .map(|s| (server(s), l7_traffic(s).open_connections as i64)),
    );
    scrape.counters(
        "weir_vhost_server_connect_failures_total",
        "Connections to a server that failed or timed out (also in failures_total)",
        &["vhost", "server"],
        l7.iter()
            .map(|s| (server(s), l7_traffic(s).connect_failures)),
    );
    scrape.counters(
        "weir_vhost_server_retries_total",
        "Requests sent again (to the same or another server) after failing on a server",
        &["vhost", "server"],
        l7.iter().map(|s| (server(s), l7_traffic(s).retries)),
    );
    scrape.counters(
        "weir_vhost_server_request_bytes_total",
        "Bytes written to a server: request heads as rewritten, and bodies",
        &["vhost", "server"],
        l7.iter().map(|s| (server(s), l7_traffic(s).request_bytes)),
    );
    scrape.counters(
        "weir_vhost_server_response_bytes_total",
        "Bytes of a server's responses relayed to clients: heads as rewritten, and bodies",
        &["vhost", "server"],
        l7.iter().map(|s| (server(s), l7_traffic(s).response_bytes)),
    );
    scrape.histograms(
        "weir_vhost_server_response_seconds",
        "Time from choosing a server to its response head, connecting included",
        &["vhost", "server"],
        l7.iter().map(|s| {
            let traffic = l7_traffic(s);
            (
                server(s),
                (traffic.response_time_buckets, traffic.response_time_sum_us),
            )
        }),
    );
    scrape.gauges(
        "weir_vhost_server_in_flight",
        "Requests in flight on a server",
        &["vhost", "server"],
        l7.iter()
            .map(|s| (server(s), l7_traffic(s).in_flight as i64)),
    );
    scrape.gauges(
        "weir_server_up",
        "1 unless health checks found the server down (L4 and L7 pools alike)",
        &["pool", "server"],
        servers
            .iter()
            .map(|s| (server(s), i64::from(s.health != HealthState::Unhealthy))),
    );
    scrape.counters(
        "weir_server_health_transitions_total",
        "Times health checks changed a server's health (since it was added or the daemon started)",
        &["pool", "server"],
        servers.iter().map(|s| (server(s), s.health_transitions)),
    );
    scrape.gauges(
        "weir_server_admin_state",
        "1 for a server's admin state (ready, draining, disabled)",
        &["pool", "server", "state"],
        servers.iter().map(|s| {
            (
                vec![
                    s.vip.clone(),
                    s.address.to_string(),
                    s.admin.name().to_string(),
                ],
                1,
            )
        }),
    );
    let listener = |l: &weir_config::control::ListenerStatus| vec![l.address.to_string()];
    scrape.counters(
        "weir_l7_connections_total",
        "Client connections an L7 listener accepted",
        &["listener"],
        status
            .listeners
            .iter()
            .map(|l| (listener(l), l.connections)),
    );
    scrape.gauges(
        "weir_l7_open_connections",
        "Client connections open on an L7 listener now",
        &["listener"],
        status
            .listeners
            .iter()
            .map(|l| (listener(l), l.open_connections as i64)),
    );
    scrape.counters(
        "weir_l7_requests_total",
        "Requests read on an L7 listener",
        &["listener"],
        status.listeners.iter().map(|l| (listener(l), l.requests)),
    );
    scrape.counters(
        "weir_l7_refusals_total",
        "Requests an L7 listener refused because of the client, by status code and reason",
        &["listener", "code", "reason"],
        status.listeners.iter().flat_map(|l| {
            l.refusals.iter().map(|r| {
                (
                    vec![
                        l.address.to_string(),
                        r.status.to_string(),
                        r.reason.clone(),
                    ],
                    r.count,
                )
            })
        }),
    );
    let handshakes = || {
        status
            .listeners
            .iter()
            .filter_map(|l| Some((l.address.to_string(), l.tls.as_ref()?)))
    };
    scrape.counters(
        "weir_l7_tls_handshakes_total",
        "TLS handshakes an L7 listener completed, full or resumed, or ClientHellos it passed through",
        &["listener", "kind"],
        handshakes().flat_map(|(listener, tls)| {
            [
                (vec![listener.clone(), "full".to_string()], tls.full),
                (vec![listener.clone(), "resumed".to_string()], tls.resumed),
                (vec![listener, "passthrough".to_string()], tls.passed_through),
            ]
        }),
    );
    scrape.counters(
        "weir_l7_tls_handshake_failures_total",
        "TLS handshakes an L7 listener gave up, by reason",
        &["listener", "reason"],
        handshakes().flat_map(|(listener, tls)| {
            tls.failures
                .iter()
                .map(move |(reason, count)| (vec![listener.clone(), reason.clone()], *count))
        }),
    );
    scrape.gauges(
        "weir_tls_certificate_expiry_timestamp_seconds",
        "When a TLS vhost's certificate stops being valid (Unix time)",
        &["vhost"],
        status
            .certificates
            .iter()
            .map(|c| (vec![c.vhost.clone()], c.not_after_unix)),
    );
    let mut out = String::new();
    TextEncoder::new()
        .encode_utf8(&scrape.0, &mut out)
        .expect("every family has a name and a metric");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = r#"{
      "daemon": { "pid": 1, "version": "0.1.0", "config": "weir.toml", "uptime_secs": 60,
                  "state_file": "state.json", "bpf_dir": "/sys/fs/bpf/weir", "adopted_datapath": false,
                  "reloads": { "succeeded": 2, "failed": 1, "last_unix_ms": 1700000000000,
                               "last_succeeded": false, "last_success_unix_ms": 1690000000000 },
                  "node": { "drained": true, "speaker": "/run/bird/bird.ctl",
                            "announced": ["198.18.100.10", "198.18.100.20"],
                            "sessions": [ { "name": "uplink", "state": "up", "info": "Established" },
                                          { "name": "backup", "state": "start", "info": "Active" } ] } },
      "xdp": [],
      "counters": [ { "reason": "forward_nat", "packets": 10, "bytes": 1000 },
                    { "reason": "drop_bad_tcp_flags", "packets": 2, "bytes": 120 } ],
      "flows": { "embryonic": 3, "events": [ { "event": "embryonic_created", "count": 7 } ],
                 "entries": 12, "capacity": 1048576, "embryonic_capacity": 65536 },
      "listeners": [ { "address": "198.18.100.11:80", "workers": 2, "connections": 5, "open_connections": 4, "requests": 9,
                       "refusals": [ { "status": 400, "reason": "missing Host header", "count": 2 } ] },
                     { "address": "198.18.100.11:443", "workers": 2, "connections": 6, "requests": 3,
                       "tls": { "full": 4, "resumed": 1, "failures": [ ["timeout", 2] ] } } ],
      "certificates": [ { "vhost": "shop", "path": "/etc/weir/shop.pem", "not_after_unix": 1800000000 } ]
    }"#;
    const VIPS: &str = r#"[ { "name": "web", "address": "198.18.100.10:80", "protocol": "tcp",
      "mode": "nat", "hash": "five_tuple", "table_size": 65537, "table_digest": "00112233aabbccdd", "servers": 1, "ready": 1,
      "active_flows": 2, "traffic": { "packets": 10, "bytes": 1000, "new_flows": 4 } } ]"#;
    const SERVERS: &str = r#"[
      { "vip": "web", "address": "198.18.11.2:8080", "weight": 100, "admin": "ready",
        "health": "healthy", "active_flows": 2, "traffic": { "packets": 10, "bytes": 1000, "new_flows": 4 } },
      { "vip": "site", "address": "127.0.0.1:8081", "weight": 100, "admin": "draining",
        "health": "unhealthy", "health_transitions": 3, "active_flows": 0,
        "traffic": { "packets": 0, "bytes": 0, "new_flows": 0 },
        "l7": { "requests": 9, "in_flight": 0, "responses": [0, 8, 0, 1, 0], "failures": 1,
                "connections": 3, "open_connections": 2, "connect_failures": 1, "retries": 1,
                "request_bytes": 500, "response_bytes": 7000, "ejected_ms": 0,
                "response_time_buckets": [0, 0, 2, 5, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
                "response_time_sum_us": 90000 } } ]"#;

    fn exposition() -> String {
        render(
            &serde_json::from_str(STATUS).unwrap(),
            &serde_json::from_str::<Vec<VipReport>>(VIPS).unwrap(),
            &serde_json::from_str::<Vec<ServerReport>>(SERVERS).unwrap(),
        )
    }

    #[test]
    fn the_exposition_names_every_series_by_convention() {
        let text = exposition();
        for line in [
            "weir_datapath_packets_total{reason=\"drop_bad_tcp_flags\"} 2",
            "weir_vip_new_flows_total{vip=\"web\"} 4",
            "weir_server_packets_total{server=\"198.18.11.2:8080\",vip=\"web\"} 10",
            "weir_vhost_server_responses_total{code=\"2xx\",server=\"127.0.0.1:8081\",vhost=\"site\"} 8",
            "weir_server_up{pool=\"site\",server=\"127.0.0.1:8081\"} 0",
            "weir_server_admin_state{pool=\"site\",server=\"127.0.0.1:8081\",state=\"draining\"} 1",
            "weir_flows_embryonic 3",
            "weir_flow_table_entries 12",
            "weir_node_drained 1",
            "weir_bgp_session_established{session=\"uplink\"} 1",
            "weir_bgp_session_established{session=\"backup\"} 0",
            "weir_bgp_announced_vips 2",
            "weir_vip_maglev_table_info{digest=\"00112233aabbccdd\",vip=\"web\"} 1",
            "weir_flow_table_capacity 1048576",
            "weir_embryonic_table_capacity 65536",
            "weir_flow_events_total{event=\"embryonic_created\"} 7",
            "weir_build_info{version=\"0.1.0\"} 1",
            "weir_config_reloads_total{result=\"failure\"} 1",
            "weir_vhost_server_response_seconds_bucket{server=\"127.0.0.1:8081\",vhost=\"site\",le=\"0.005\"} 2",
            "weir_vhost_server_response_seconds_bucket{server=\"127.0.0.1:8081\",vhost=\"site\",le=\"0.01\"} 7",
            "weir_vhost_server_response_seconds_bucket{server=\"127.0.0.1:8081\",vhost=\"site\",le=\"+Inf\"} 9",
            "weir_vhost_server_response_seconds_sum{server=\"127.0.0.1:8081\",vhost=\"site\"} 0.09",
            "weir_vhost_server_response_seconds_count{server=\"127.0.0.1:8081\",vhost=\"site\"} 9",
            "weir_config_last_reload_successful 0",
            "weir_server_health_transitions_total{pool=\"site\",server=\"127.0.0.1:8081\"} 3",
            "weir_l7_refusals_total{code=\"400\",listener=\"198.18.100.11:80\",reason=\"missing Host header\"} 2",
            "weir_vhost_server_open_connections{server=\"127.0.0.1:8081\",vhost=\"site\"} 2",
            "weir_vhost_server_connect_failures_total{server=\"127.0.0.1:8081\",vhost=\"site\"} 1",
            "weir_vhost_server_retries_total{server=\"127.0.0.1:8081\",vhost=\"site\"} 1",
            "weir_vhost_server_request_bytes_total{server=\"127.0.0.1:8081\",vhost=\"site\"} 500",
            "weir_vhost_server_response_bytes_total{server=\"127.0.0.1:8081\",vhost=\"site\"} 7000",
            "weir_l7_open_connections{listener=\"198.18.100.11:80\"} 4",
            "weir_l7_tls_handshakes_total{kind=\"full\",listener=\"198.18.100.11:443\"} 4",
            "weir_l7_tls_handshakes_total{kind=\"resumed\",listener=\"198.18.100.11:443\"} 1",
            "weir_l7_tls_handshake_failures_total{listener=\"198.18.100.11:443\",reason=\"timeout\"} 2",
            "weir_tls_certificate_expiry_timestamp_seconds{vhost=\"shop\"} 1800000000",
        ] {
            assert!(text.contains(line), "no `{line}` in:\n{text}");
        }
    }

    /// Prometheus's own checker, when the machine has it (`cargo xtask setup` installs it).
    #[test]
    fn promtool_accepts_the_exposition() {
        let Ok(mut child) = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        else {
            eprintln!("SKIPPED: promtool is not installed (cargo xtask setup installs it)");
            return;
        };
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(exposition().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
