//! The L7 runtime choice (issue 5, decision 0007): the same minimal proxy loop
//! (`l7-runtime-proxy`) on tokio-uring and on compio, at 1 and 2 workers, in front of one
//! nginx, all on loopback; `wrk` with keep-alive. Interleaved repetitions.

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use serde::Serialize;
use weir_tests::netns::{Process, wait_until};

use crate::{stats::Sample, wrk};

const UPSTREAM: &str = "127.0.0.1:18181";
const PROXY: &str = "127.0.0.1:18190";

/// One runtime at one worker count.
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeResult {
    pub runtime: String,
    pub workers: usize,
    pub requests_per_sec: Sample,
    pub p50_us: Sample,
    pub p99_us: Sample,
    pub errors: u64,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RuntimeBench {
    pub repetitions: usize,
    pub seconds: u32,
    pub connections: u32,
}

impl RuntimeBench {
    /// `proxy` is the `l7-runtime-proxy` binary; `dir` holds nginx's files.
    pub fn run(&self, proxy: &Path, dir: &Path) -> Result<Vec<RuntimeResult>> {
        fs::create_dir_all(dir)?;
        let _nginx = start_nginx(dir)?;
        let configurations: Vec<(&str, usize)> = ["tokio-uring", "compio"]
            .into_iter()
            .flat_map(|runtime| [1, 2].map(|workers| (runtime, workers)))
            .collect();
        let mut reports: Vec<Vec<wrk::LoadReport>> = vec![Vec::new(); configurations.len()];
        for repetition in 0..self.repetitions {
            for (i, (runtime, workers)) in configurations.iter().enumerate() {
                let _proxy = Process::spawn(
                    "l7-runtime-proxy",
                    Command::new(proxy)
                        .args(["--runtime", runtime, "--workers", &workers.to_string()])
                        .args(["--listen", PROXY, "--upstream", UPSTREAM])
                        .stdout(Stdio::null()),
                )?;
                wait_for(PROXY)?;
                let args = wrk::args(
                    &format!("http://{PROXY}/"),
                    self.connections,
                    self.seconds,
                    false,
                );
                let report = wrk::run(wrk::command(None).args(&args))
                    .with_context(|| format!("{runtime} × {workers}"))?;
                eprintln!(
                    "  [{}/{}] {runtime:<12} {workers} worker(s) {:>10.0} req/s  p99 {:>7.0} µs  errors {} {}",
                    repetition + 1,
                    self.repetitions,
                    report.requests_per_sec,
                    report.p99_us,
                    report.errors,
                    report.error_kinds
                );
                reports[i].push(report);
                // The killed proxy's listening sockets outlive it for a moment: a pending
                // accept in its io_uring holds them until the kernel tears the ring down,
                // after the process is gone. Until then they are still in the port's
                // SO_REUSEPORT group, and connections the next run makes that land on them
                // are reset when they close — the socket errors this benchmark used to show
                // after its first configuration (decision 0007). Wait until nothing listens.
                drop(_proxy);
                wait_until(
                    "the killed proxy's listeners to close",
                    Duration::from_secs(5),
                    || TcpStream::connect(PROXY).is_err(),
                )?;
            }
        }
        Ok(configurations
            .into_iter()
            .zip(reports)
            .map(|((runtime, workers), reports)| RuntimeResult {
                runtime: runtime.to_string(),
                workers,
                requests_per_sec: Sample::new(reports.iter().map(|r| r.requests_per_sec).collect()),
                p50_us: Sample::new(reports.iter().map(|r| r.p50_us).collect()),
                p99_us: Sample::new(reports.iter().map(|r| r.p99_us).collect()),
                errors: reports.iter().map(|r| r.errors).sum(),
            })
            .collect())
    }
}

fn wait_for(address: &str) -> Result<()> {
    let address: SocketAddr = address.parse()?;
    wait_until(&format!("{address}"), Duration::from_secs(5), || {
        TcpStream::connect(address).is_ok()
    })
}

/// nginx on loopback: the upstream.
fn start_nginx(dir: &Path) -> Result<Process> {
    let nginx = crate::nginx::start(Command::new("nginx"), &[UPSTREAM.to_string()], dir)?;
    wait_for(UPSTREAM)?;
    Ok(nginx)
}
