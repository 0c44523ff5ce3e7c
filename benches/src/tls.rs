//! HTTPS: weir's TLS termination against HAProxy in http mode and nginx, the same
//! certificates, one worker each, in front of the L7 comparison's nginx upstream (plain HTTP,
//! keep-alive). Cases, each with an ECDSA P-256 and an RSA 2048 certificate:
//! - keep-alive: wrk over HTTPS, 5-byte responses, many requests per TLS connection; and
//!   the same with 64 KiB responses, where sealing records is most of the work (one
//!   certificate: after the handshake the key plays no part);
//! - new connections, full handshakes: `openssl s_time -new`, one connection at a time, each
//!   fetching the 5-byte page;
//! - new connections, resumed sessions: `openssl s_time -reuse` (a ticket with TLS 1.3).
//!
//! The headline is each proxy process's own CPU time per request (per connection in the
//! `s_time` cases), as the L7 comparison has it: the load generator and the upstream share
//! the CPUs, so rates mostly show the box. Systems run interleaved within each repetition.

use std::{fs, path::Path, process::Stdio, time::Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use weir_tests::{
    netns::{Netns, Process},
    tls::{IssuedFiles, KeyKind, TestCa},
};

use crate::{
    l7::{
        PROXY, UPSTREAM, cpu_seconds, spawn_haproxy, spawn_nginx, start_upstream, stop_proxy,
        wait_for, write_nginx_proxy_config,
    },
    stats::Sample,
    wrk,
};

/// What the client does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TlsLoad {
    KeepAlive,
    /// Keep-alive, 64 KiB responses.
    KeepAliveLarge,
    NewFull,
    NewResumed,
}

/// One measured case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TlsCase {
    pub load: TlsLoad,
    pub rsa: bool,
}

impl TlsCase {
    pub fn name(&self) -> String {
        let load = match self.load {
            TlsLoad::KeepAlive => "keep-alive requests",
            TlsLoad::KeepAliveLarge => "keep-alive requests, 64 KiB responses",
            TlsLoad::NewFull => "new connections, full handshakes",
            TlsLoad::NewResumed => "new connections, resumed sessions",
        };
        let key = if self.rsa { "RSA 2048" } else { "ECDSA P-256" };
        format!("HTTPS, {load}, {key}")
    }
}

/// Who terminates TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TlsSystem {
    Weir,
    Haproxy,
    Nginx,
}

impl TlsSystem {
    pub const ALL: [TlsSystem; 3] = [TlsSystem::Weir, TlsSystem::Haproxy, TlsSystem::Nginx];

    pub fn name(&self) -> &'static str {
        match self {
            TlsSystem::Weir => "weir L7",
            TlsSystem::Haproxy => "HAProxy",
            TlsSystem::Nginx => "nginx",
        }
    }
}

/// One system in one case over the repetitions.
#[derive(Debug, Clone, Serialize)]
pub struct TlsResult {
    pub case: TlsCase,
    pub system: TlsSystem,
    /// Requests (keep-alive) or connections per second.
    pub per_sec: Sample,
    /// wrk's 99th percentile (keep-alive only), µs.
    pub p99_us: Option<Sample>,
    /// The proxy's CPU time per request or connection, µs.
    pub cpu_us: Sample,
    pub errors: u64,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct TlsBench {
    pub cases: Vec<TlsCase>,
    pub repetitions: usize,
    pub seconds: u32,
    /// wrk's connections in the keep-alive case.
    pub connections: u32,
    /// The `weir` binary.
    pub weir: std::path::PathBuf,
}

/// One run's figures: rate, p99 if any, CPU per unit, errors.
type Run = (f64, Option<f64>, f64, u64);

impl TlsBench {
    pub fn run(&self, tag: &str, dir: &Path) -> Result<Vec<TlsResult>> {
        fs::create_dir_all(dir)?;
        let ca = TestCa::new(&dir.join("ca"));
        let ecdsa = ca.issue(
            &dir.join("ca"),
            "ecdsa",
            &["bench.test"],
            KeyKind::EcdsaP256,
        );
        let rsa = ca.issue(&dir.join("ca"), "rsa", &["bench.test"], KeyKind::Rsa2048);
        let ns = Netns::new(&format!("{tag}tls"))?;
        let _upstream = start_upstream(&ns, &dir.join("upstream"))?;
        let mut runs: Vec<Vec<Run>> = vec![Vec::new(); self.cases.len() * TlsSystem::ALL.len()];
        for repetition in 0..self.repetitions {
            for (c, case) in self.cases.iter().enumerate() {
                let files = if case.rsa { &rsa } else { &ecdsa };
                for (s, system) in TlsSystem::ALL.iter().enumerate() {
                    let proxy = self.start(&ns, *system, files, tag, dir)?;
                    let run = self
                        .load(&ns, *case, &proxy, &ca.path)
                        .with_context(|| format!("{} × {}", system.name(), case.name()))?;
                    eprintln!(
                        "  [{}/{}] {:<55} {:<8} {:>9.0} /s  cpu {:>7.1} µs  errors {}",
                        repetition + 1,
                        self.repetitions,
                        case.name(),
                        system.name(),
                        run.0,
                        run.2,
                        run.3
                    );
                    runs[c * TlsSystem::ALL.len() + s].push(run);
                    stop_proxy(&ns, proxy)?;
                }
            }
        }
        let mut results = Vec::new();
        for (c, case) in self.cases.iter().enumerate() {
            for (s, system) in TlsSystem::ALL.iter().enumerate() {
                let runs = &runs[c * TlsSystem::ALL.len() + s];
                let p99: Vec<f64> = runs.iter().filter_map(|r| r.1).collect();
                results.push(TlsResult {
                    case: *case,
                    system: *system,
                    per_sec: Sample::new(runs.iter().map(|r| r.0).collect()),
                    p99_us: (!p99.is_empty()).then(|| Sample::new(p99)),
                    cpu_us: Sample::new(runs.iter().map(|r| r.2).collect()),
                    errors: runs.iter().map(|r| r.3).sum(),
                });
            }
        }
        Ok(results)
    }

    /// Runs the client of `case` against `proxy`: rate, p99, proxy CPU per unit, errors.
    fn load(&self, ns: &Netns, case: TlsCase, proxy: &Process, ca: &Path) -> Result<Run> {
        let before = cpu_seconds(proxy.pid())?;
        let (done, per_sec, p99, errors) = match case.load {
            TlsLoad::KeepAlive | TlsLoad::KeepAliveLarge => {
                let path = if case.load == TlsLoad::KeepAlive {
                    "small"
                } else {
                    "64k"
                };
                let args = wrk::args(
                    &format!("https://{PROXY}/{path}"),
                    self.connections,
                    self.seconds,
                    false,
                );
                let report = wrk::run(wrk::command(Some(ns.name())).args(&args))?;
                (
                    report.requests,
                    report.requests_per_sec,
                    Some(report.p99_us),
                    report.errors,
                )
            }
            TlsLoad::NewFull | TlsLoad::NewResumed => {
                let started = Instant::now();
                let out = ns
                    .command("openssl")
                    .args(["s_time", "-connect", PROXY, "-www", "/small", "-CAfile"])
                    .arg(ca)
                    .arg(if case.load == TlsLoad::NewFull {
                        "-new"
                    } else {
                        "-reuse"
                    })
                    .args(["-time", &self.seconds.to_string()])
                    .stdin(Stdio::null())
                    .output()?;
                let elapsed = started.elapsed().as_secs_f64();
                let text = String::from_utf8_lossy(&out.stdout);
                let connections =
                    s_time_connections(&text).with_context(|| format!("s_time printed: {text}"))?;
                (connections, connections as f64 / elapsed, None, 0)
            }
        };
        let cpu = (cpu_seconds(proxy.pid())? - before) * 1e6 / done.max(1) as f64;
        Ok((per_sec, p99, cpu, errors))
    }

    fn start(
        &self,
        ns: &Netns,
        system: TlsSystem,
        files: &IssuedFiles,
        tag: &str,
        dir: &Path,
    ) -> Result<Process> {
        let process = match system {
            TlsSystem::Weir => {
                let dir = dir.join("weir");
                fs::create_dir_all(&dir)?;
                let conf = dir.join("weir.toml");
                fs::write(
                    &conf,
                    format!(
                        "[daemon]\ncontrol_socket = \"{d}/weir.sock\"\nstate_file = \"{d}/state.json\"\nbpf_dir = \"/sys/fs/bpf/{tag}weir\"\n\n[l7]\nworkers = 1\nmax_connections_per_worker = 4096\n\n[[vhost]]\nname = \"bench\"\nlisten = \"{PROXY}\"\ndefault = true\ntls = {{ certificate = \"{}\", key = \"{}\" }}\nservers = [{{ address = \"{UPSTREAM}\" }}]\n",
                        files.certificate.display(),
                        files.key.display(),
                        d = dir.display()
                    ),
                )?;
                let _ = fs::remove_file(dir.join("state.json"));
                Process::spawn(
                    "weir",
                    ns.command(&self.weir)
                        .arg("--config")
                        .arg(&conf)
                        .env("RUST_LOG", "warn")
                        .stdout(Stdio::null()),
                )?
            }
            TlsSystem::Haproxy => {
                let dir = dir.join("haproxy");
                fs::create_dir_all(&dir)?;
                // HAProxy reads the chain and the key from one file.
                let combined = dir.join("crt.pem");
                fs::write(
                    &combined,
                    fs::read_to_string(&files.certificate)? + &fs::read_to_string(&files.key)?,
                )?;
                let conf = dir.join("haproxy.cfg");
                fs::write(
                    &conf,
                    format!(
                        "global\n  nbthread 1\n  maxconn 4096\ndefaults\n  mode http\n  option http-keep-alive\n  option forwardfor\n  http-reuse safe\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\nfrontend web\n  bind {PROXY} ssl crt {} alpn http/1.1\n  default_backend app\nbackend app\n  server srv1 {UPSTREAM}\n",
                        combined.display()
                    ),
                )?;
                spawn_haproxy(ns, &conf)?
            }
            TlsSystem::Nginx => {
                let dir = dir.join("nginx");
                fs::create_dir_all(&dir)?;
                let tls = format!(
                    "ssl_certificate {}; ssl_certificate_key {}; ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:SSL:10m; ssl_session_tickets on;",
                    files.certificate.display(),
                    files.key.display()
                );
                let conf = write_nginx_proxy_config(&dir, 1, &tls)?;
                spawn_nginx(ns, &conf)?
            }
        };
        wait_for(ns, PROXY)?;
        Ok(process)
    }
}

/// The connections `openssl s_time` completed, from its `N connections in …s;` line.
fn s_time_connections(text: &str) -> Result<u64> {
    for line in text.lines() {
        if let Some((count, rest)) = line.split_once(" connections in ")
            && rest.contains("s;")
        {
            return Ok(count.trim().parse()?);
        }
    }
    bail!("no `connections in` line")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s_time_counts_are_read_from_the_timing_line() {
        let text = "Collecting connection statistics for 5 seconds\ntttt\n\n1520 connections in 1.42s; 1070.42 connections/user sec, bytes read 255360\n1520 connections in 6 real seconds, 168 bytes read per connection\n";
        assert_eq!(s_time_connections(text).unwrap(), 1520);
        assert!(s_time_connections("ERROR\n").is_err());
    }
}
