//! The soak: the lab under steady L4 and L7 load for `minutes`, with a pool change every
//! second, a health flap and a reload every minute, while the daemon's memory, descriptors and
//! flow table are sampled. What it shows is what a short test cannot: that nothing leaks or
//! drifts, and that none of the churn costs a client a request.
//!
//! - Load: HTTP clients through the L4 NAT VIP and through the L7 vhost, from the client
//!   namespace (half keep their connection, half open one per request); every response is
//!   checked and every failure kept.
//! - Every second, one pool change, alternating between the L4 pool and the vhost: a server is
//!   drained, and enabled again at the next change of that pool.
//! - Every minute: a health flap (server 3's health checks are dropped by a firewall rule in
//!   its namespace for 5 s, so the vhost takes it out and back; client traffic is untouched),
//!   and a reload that changes a setting back and forth.
//! - Every 5 s: the daemon's resident memory and open descriptors (`/proc`), and the flow
//!   table's entries (`/metrics`).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde::Serialize;
use weir_tests::{
    http_client::{exposition_value, get_body},
    lab::Lab,
    load::HttpLoad,
    topology::{L4_VIP, L7_VIP, Topology, server_socket},
};

/// Where the soak's daemon serves `/metrics` (in the balancer's namespace).
const METRICS: &str = "127.0.0.1:9112";
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
const FLAP_FOR: Duration = Duration::from_secs(5);

pub struct Soak {
    pub minutes: u64,
    /// HTTP clients per plane.
    pub clients: usize,
}

/// One sample of the daemon.
#[derive(Debug, Clone, Serialize)]
pub struct SoakSample {
    pub seconds: f64,
    pub rss_kib: u64,
    pub descriptors: u64,
    pub flow_entries: u64,
    /// Requests served so far, both planes.
    pub served: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub minutes: u64,
    pub samples: Vec<SoakSample>,
    pub pool_changes: u64,
    pub health_flaps: u64,
    pub reloads: u64,
    /// Health transitions the daemon recorded (each flap is two), and their events.
    pub health_transitions: u64,
    pub health_events: Vec<String>,
    pub served_l4: u64,
    pub served_l7: u64,
    /// Every client-side failure, as the client saw it.
    pub errors: Vec<String>,
    /// Least-squares slopes over the second half of the run (after warm-up), per minute.
    pub rss_kib_per_minute: f64,
    pub descriptors_per_minute: f64,
}

impl Soak {
    pub fn run(&self, tag: &str, dir: &Path) -> Result<SoakReport> {
        let topology = Topology::new(tag, 3)?;
        let lab = Lab::start_in(topology, dir, "native", |config| {
            config
                + "\n[vhost.health]\nkind = \"http\"\npath = \"/\"\ninterval_ms = 500\ntimeout_ms = 400\nrise = 2\nfall = 2\n"
                + &format!("\n[metrics]\nlisten = \"{METRICS}\"\n")
        })?;
        let client = lab.topology.client.name().to_string();
        let l4 = HttpLoad::start(
            std::net::SocketAddr::new(L4_VIP.into(), 80),
            "soak.test",
            self.clients,
            Some(&client),
        );
        let l7 = HttpLoad::start(
            std::net::SocketAddr::new(L7_VIP.into(), 80),
            "demo.weir.test",
            self.clients,
            Some(&client),
        );
        let pid = lab.weir_pid();
        let started = Instant::now();
        let end = started + Duration::from_secs(self.minutes * 60);
        let mut samples = Vec::new();
        let (mut pool_changes, mut flaps, mut reloads) = (0u64, 0u64, 0u64);
        let mut drained: [Option<usize>; 2] = [None, None];
        let mut next_change = started + Duration::from_secs(1);
        let mut next_sample = started;
        let mut next_minute = started + Duration::from_secs(30);
        let mut flap_ends: Option<Instant> = None;
        let original = std::fs::read_to_string(lab.config())?;
        while Instant::now() < end {
            let now = Instant::now();
            if now >= next_sample {
                samples.push(SoakSample {
                    seconds: started.elapsed().as_secs_f64(),
                    rss_kib: rss_kib(pid)?,
                    descriptors: std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64,
                    flow_entries: lab
                        .topology
                        .balancer
                        .run(|| get_body(METRICS, "/metrics"))?
                        .ok()
                        .and_then(|text| exposition_value(&text, "weir_flow_table_entries"))
                        .map_or(0, |v| v as u64),
                    served: l4.served() + l7.served(),
                });
                next_sample += SAMPLE_EVERY;
            }
            if now >= next_change {
                // Alternate the pools; in each, drain one server, enable it at the next turn
                // and drain the next one.
                let plane = (pool_changes % 2) as usize;
                let pool = ["demo-l4", "demo-l7"][plane];
                let verb_and_server = match drained[plane] {
                    Some(i) => {
                        drained[plane] = None;
                        ("enable", i)
                    }
                    None => {
                        let i = (pool_changes / 2 % 3) as usize + 1;
                        drained[plane] = Some(i);
                        ("drain", i)
                    }
                };
                let server = server_socket(verb_and_server.1).to_string();
                lab.weirctl_ok(&["server", verb_and_server.0, pool, &server]);
                pool_changes += 1;
                next_change += Duration::from_secs(1);
            }
            if now >= next_minute {
                flap(&lab, true)?;
                flap_ends = Some(now + FLAP_FOR);
                flaps += 1;
                // A reload that changes something: a setting toggled each minute.
                let edited = if reloads % 2 == 0 {
                    original.replace("[l7]\n", "[l7]\nupstream_max_idle_per_server = 32\n")
                } else {
                    original.clone()
                };
                std::fs::write(lab.config(), edited)?;
                lab.weirctl_ok(&["reload"]);
                reloads += 1;
                next_minute += Duration::from_secs(60);
            }
            if flap_ends.is_some_and(|at| now >= at) {
                flap(&lab, false)?;
                flap_ends = None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if flap_ends.is_some() {
            flap(&lab, false)?;
        }
        let (served_l4, mut errors) = l4.finish();
        let (served_l7, l7_errors) = l7.finish();
        errors.extend(l7_errors.into_iter().map(|e| format!("L7: {e}")));
        // The health changes the daemon recorded, from its event feed.
        let health_events: Vec<String> = lab
            .weirctl_ok(&["events"])
            .lines()
            .filter(|l| l.contains("healthy ->") || l.contains("unhealthy ->"))
            .map(str::to_string)
            .collect();
        let half = &samples[samples.len() / 2..];
        Ok(SoakReport {
            minutes: self.minutes,
            rss_kib_per_minute: slope(half, |s| s.rss_kib as f64) * 60.0,
            descriptors_per_minute: slope(half, |s| s.descriptors as f64) * 60.0,
            samples,
            pool_changes,
            health_flaps: flaps,
            reloads,
            health_transitions: health_events.len() as u64,
            health_events,
            served_l4,
            served_l7,
            errors,
        })
    }
}

/// Drops (`down`) or lets through again server 3's health checks: packets to its HTTP port
/// from the balancer's address on its link, which is where checks (and the L7 proxy's own
/// connections) come from; clients through the L4 VIP keep their own source address.
fn flap(lab: &Lab, down: bool) -> Result<()> {
    let ns = &lab.topology.servers[2];
    let rules: &[&str] = if down {
        &[
            "add table inet weirsoak",
            "add chain inet weirsoak input { type filter hook input priority 0; }",
            "add rule inet weirsoak input ip saddr 198.18.13.1 tcp dport 8080 drop",
        ]
    } else {
        &["delete table inet weirsoak"]
    };
    for rule in rules {
        let status = ns
            .command("nft")
            .args(rule.split(' '))
            .status()
            .with_context(|| format!("nft {rule}"))?;
        anyhow::ensure!(status.success(), "nft {rule}: {status}");
    }
    Ok(())
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// The least-squares slope of `value` over the samples' time, per second.
pub fn slope(samples: &[SoakSample], value: impl Fn(&SoakSample) -> f64) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mean_t = samples.iter().map(|s| s.seconds).sum::<f64>() / n;
    let mean_v = samples.iter().map(&value).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for s in samples {
        num += (s.seconds - mean_t) * (value(s) - mean_v);
        den += (s.seconds - mean_t).powi(2);
    }
    if den == 0.0 { 0.0 } else { num / den }
}

impl SoakReport {
    pub fn markdown(&self) -> String {
        let first = self.samples.first();
        let last = self.samples.last();
        let at = |s: Option<&SoakSample>, f: fn(&SoakSample) -> u64| s.map_or(0, f);
        format!(
            "## Soak: {} minutes\n\n\
             | | |\n|---|---|\n\
             | requests served, L4 VIP / L7 vhost | {} / {} |\n\
             | client-side errors | {} |\n\
             | pool changes / health flaps / reloads | {} / {} / {} |\n\
             | health transitions recorded (vhost) | {} |\n\
             | daemon RSS, first → last sample | {} → {} KiB |\n\
             | RSS slope, second half | {:+.1} KiB/min |\n\
             | open descriptors, first → last | {} → {} |\n\
             | descriptor slope, second half | {:+.2} /min |\n\
             | flow-table entries, first → last | {} → {} |\n{}",
            self.minutes,
            self.served_l4,
            self.served_l7,
            self.errors.len(),
            self.pool_changes,
            self.health_flaps,
            self.reloads,
            self.health_transitions,
            at(first, |s| s.rss_kib),
            at(last, |s| s.rss_kib),
            self.rss_kib_per_minute,
            at(first, |s| s.descriptors),
            at(last, |s| s.descriptors),
            self.descriptors_per_minute,
            at(first, |s| s.flow_entries),
            at(last, |s| s.flow_entries),
            if self.errors.is_empty() {
                String::new()
            } else {
                format!(
                    "\nFirst errors:\n\n```text\n{}\n```\n",
                    self.errors
                        .iter()
                        .take(20)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("\n")
                )
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slope_of_a_line_is_its_gradient_and_of_a_flat_series_zero() {
        let line: Vec<SoakSample> = (0..10)
            .map(|i| SoakSample {
                seconds: i as f64 * 5.0,
                rss_kib: 1000 + 10 * i,
                descriptors: 40,
                flow_entries: 0,
                served: 0,
            })
            .collect();
        assert!((slope(&line, |s| s.rss_kib as f64) - 2.0).abs() < 1e-9);
        assert_eq!(slope(&line, |s| s.descriptors as f64), 0.0);
    }
}
