//! What a Prometheus scrape of `/metrics` costs with many servers, and whether it slows
//! forwarding.
//!
//! The lab's daemon gets an extra L4 VIP and an extra vhost with `servers` servers between
//! them (no health checks: the scrape is what is measured, not the checks). Per repetition:
//! wrk through the L4 VIP without scraping, then the same with a scraper asking every second
//! (Prometheus's usual interval is 15 s: this is 15 times harsher), then `scrapes` scrapes back
//! to back, timed one by one, with the daemon's own CPU time (`/proc/<pid>/stat`) over them.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use weir_tests::{
    http_client::get_body,
    lab::Lab,
    topology::{L4_VIP, L7_VIP, Topology},
};

use crate::{stats::Sample, wrk};

/// Where the bench's daemon serves `/metrics` (in the balancer's namespace).
const METRICS: &str = "127.0.0.1:9111";

pub struct ScrapeBench {
    /// Servers added to the lab's pools, half on an L4 VIP, half on a vhost.
    pub servers: usize,
    /// Back-to-back scrapes timed per repetition.
    pub scrapes: usize,
    pub repetitions: usize,
    /// Length of each wrk run.
    pub seconds: u32,
    pub connections: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScrapeResult {
    /// Servers in the daemon's pools, the lab's own included.
    pub servers: usize,
    pub exposition_bytes: usize,
    /// Series (sample lines) in one exposition.
    pub series: usize,
    /// Per repetition: the median scrape, wall-clock ms as the scraper sees it.
    pub scrape_ms: Sample,
    /// Per repetition: the slowest scrape.
    pub scrape_max_ms: Sample,
    /// Per repetition: the daemon's CPU time per scrape, ms.
    pub daemon_cpu_ms: Sample,
    /// Requests/s through the L4 VIP without and with a scrape every second.
    pub rps_without_scrapes: Sample,
    pub rps_with_scrapes: Sample,
}

impl ScrapeBench {
    pub fn run(&self, prefix: &str, dir: &Path) -> Result<ScrapeResult> {
        let topology = Topology::new(prefix, 2)?;
        let extra = self.extra_pools();
        let lab = Lab::start_in(topology, dir, "native", |config| config + &extra)?;
        let pid = lab.weir_pid();
        let balancer = &lab.topology.balancer;
        let first = balancer.run(scrape)??;
        let series = first
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .count();
        let servers = lab.weirctl_ok(&["server", "list", "--json"]);
        let servers = serde_json::from_str::<Vec<serde_json::Value>>(&servers)?.len();
        if servers < self.servers {
            bail!(
                "the daemon has {servers} servers, not the {} added",
                self.servers
            );
        }

        let url = format!("http://{L4_VIP}:80/");
        let client = lab.topology.client.name().to_string();
        let load = || {
            wrk::run(wrk::command(Some(&client)).args(wrk::args(
                &url,
                self.connections,
                self.seconds,
                false,
            )))
        };
        let (mut median, mut max, mut cpu, mut without, mut with) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..self.repetitions {
            without.push(load()?.requests_per_sec);

            let stop = Arc::new(AtomicBool::new(false));
            let scraper = {
                let stop = Arc::clone(&stop);
                let deadline = Instant::now() + Duration::from_secs(u64::from(self.seconds) + 30);
                let netns = std::fs::File::open(format!("/run/netns/{}", balancer.name()))?;
                std::thread::spawn(move || {
                    nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .expect("enter the balancer's namespace");
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let _ = scrape();
                        std::thread::sleep(Duration::from_secs(1));
                    }
                })
            };
            let report = load();
            stop.store(true, Ordering::Relaxed);
            let _ = scraper.join();
            with.push(report?.requests_per_sec);

            let cpu_before = process_cpu_seconds(pid)?;
            let mut times = balancer.run(|| -> Result<Vec<f64>> {
                (0..self.scrapes)
                    .map(|_| {
                        let started = Instant::now();
                        scrape()?;
                        Ok(started.elapsed().as_secs_f64() * 1e3)
                    })
                    .collect()
            })??;
            cpu.push((process_cpu_seconds(pid)? - cpu_before) * 1e3 / self.scrapes as f64);
            times.sort_by(f64::total_cmp);
            median.push(times[times.len() / 2]);
            max.push(times[times.len() - 1]);
        }
        Ok(ScrapeResult {
            servers,
            exposition_bytes: first.len(),
            series,
            scrape_ms: Sample::new(median),
            scrape_max_ms: Sample::new(max),
            daemon_cpu_ms: Sample::new(cpu),
            rps_without_scrapes: Sample::new(without),
            rps_with_scrapes: Sample::new(with),
        })
    }

    /// The config added to the lab's: `[metrics]`, and the pools with the extra servers (on
    /// 198.18.128.0/17, which nothing in the lab uses).
    fn extra_pools(&self) -> String {
        let address = |i: usize| format!("198.18.{}.{}", 128 + i / 250, 1 + i % 250);
        let l4 = self.servers / 2;
        let pool = |range: std::ops::Range<usize>| {
            range
                .map(|i| format!("{{ address = \"{}:80\" }}", address(i)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "\n[metrics]\nlisten = \"{METRICS}\"\n\n\
             [[l4_vip]]\nname = \"many\"\naddress = \"{L4_VIP}\"\nport = 8000\n\
             protocol = \"tcp\"\nmode = \"nat\"\nservers = [{}]\n\n\
             [[vhost]]\nname = \"many-l7\"\nlisten = \"{L7_VIP}:8000\"\n\
             hosts = [\"many.weir.test\"]\nservers = [{}]\n",
            pool(0..l4),
            pool(l4..self.servers),
        )
    }
}

/// One scrape (`GET /metrics`, a connection per scrape as Prometheus does); the exposition.
fn scrape() -> Result<String> {
    Ok(get_body(METRICS, "/metrics")?)
}

/// CPU time (user + system) process `pid` has used, in seconds.
fn process_cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may hold spaces): utime and
    // stime are the 12th and 13th of those.
    let after_name = stat.rsplit_once(") ").map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields
            .get(i)
            .context("short /proc/<pid>/stat")?
            .parse::<f64>()?)
    };
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11)? + ticks(12)?) / per_second)
}

/// The section of the report.
pub fn table(result: &ScrapeResult) -> String {
    format!(
        "\n### Prometheus scrape with {} servers\n\n\
         One exposition: {} series, {} KiB.\n\n\
         | measure | median (min–max) over repetitions |\n|---|---:|\n\
         | scrape, median ms | {} |\n| scrape, slowest ms | {} |\n\
         | daemon CPU per scrape, ms | {} |\n\
         | L4 req/s, no scrapes | {} |\n| L4 req/s, a scrape every second | {} |\n",
        result.servers,
        result.series,
        result.exposition_bytes / 1024,
        result.scrape_ms.display(2),
        result.scrape_max_ms.display(2),
        result.daemon_cpu_ms.display(2),
        result.rps_without_scrapes.display(0),
        result.rps_with_scrapes.display(0),
    )
}
