//! L7 end to end: weir's reverse proxy (the `weir` daemon, its L7 workers only) against
//! HAProxy in http mode and nginx as a reverse proxy, all in front of the same nginx upstream
//! (one process per CPU) on loopback, with direct-to-upstream as the ceiling. One worker thread
//! for every proxy (two in the cases that say so: weir `workers = 2`, HAProxy `nbthread 2`,
//! nginx two worker processes); keep-alive to the upstream on for all; access logs off; each adds
//! `X-Forwarded-For`. Cases: keep-alive and a new connection per request, × a 5-byte and a
//! 64 KiB response. Systems run interleaved within each repetition. CPU time per request is
//! the proxy process's user + system time (from /proc) over the requests wrk completed.
//!
//! Everything runs on the loopback of one namespace of its own (removed with every process
//! in it, even after an interrupted run). wrk, the upstream and the proxy share the CPUs, so
//! absolute figures are those of this box; the ratios between proxies are the result. weir
//! pins its (unused) datapath under the namespace's own `/sys/fs/bpf` mount, which goes away
//! with the process.

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, Result};
use serde::Serialize;
use weir_tests::netns::{Netns, Process, wait_until};

use crate::{stats::Sample, wrk};

/// Where the upstream nginx listens (first of its ports) and where each proxy listens.
pub(crate) const UPSTREAM: &str = "127.0.0.1:18281";
pub(crate) const PROXY: &str = "127.0.0.1:18290";
const LARGE_BYTES: usize = 64 * 1024;

/// What wrk asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct L7Case {
    /// `Connection: close`: a new connection per request.
    pub close: bool,
    /// 64 KiB responses instead of 5 bytes.
    pub large: bool,
    /// Worker threads (processes for nginx) of every proxy.
    pub workers: usize,
}

impl L7Case {
    pub fn name(&self) -> String {
        format!(
            "L7, {}, {} responses{}",
            if self.close {
                "new connection per request"
            } else {
                "keep-alive"
            },
            if self.large { "64 KiB" } else { "5-byte" },
            if self.workers > 1 {
                format!(", {} workers", self.workers)
            } else {
                String::new()
            }
        )
    }

    fn path(&self) -> &'static str {
        if self.large { "/64k" } else { "/small" }
    }
}

/// Who answers wrk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum L7System {
    Direct,
    Weir,
    Haproxy,
    Nginx,
}

impl L7System {
    pub const ALL: [L7System; 4] = [
        L7System::Direct,
        L7System::Weir,
        L7System::Haproxy,
        L7System::Nginx,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            L7System::Direct => "direct to upstream",
            L7System::Weir => "weir L7",
            L7System::Haproxy => "HAProxy http mode",
            L7System::Nginx => "nginx proxy",
        }
    }
}

/// One system in one case over the repetitions.
#[derive(Debug, Clone, Serialize)]
pub struct L7Result {
    pub case: L7Case,
    pub system: L7System,
    pub requests_per_sec: Sample,
    pub p50_us: Sample,
    pub p99_us: Sample,
    pub p999_us: Sample,
    /// Proxy CPU time per request, µs (none for direct).
    pub cpu_us_per_request: Option<Sample>,
    pub errors: u64,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct L7Bench {
    pub cases: Vec<L7Case>,
    pub repetitions: usize,
    pub seconds: u32,
    pub connections: u32,
    /// The `weir` binary.
    pub weir: PathBuf,
    /// The `weirctl` binary (for the change-under-load run).
    pub weirctl: PathBuf,
}

/// Servers the change-under-load run cycles through (ports of the upstream nginx).
const CHURN_SERVERS: [&str; 4] = [
    "127.0.0.1:18281",
    "127.0.0.1:18282",
    "127.0.0.1:18283",
    "127.0.0.1:18284",
];

/// The same load with and without a pool change every second.
#[derive(Debug, Clone, Serialize)]
pub struct ChurnResult {
    pub case: L7Case,
    pub steady_requests_per_sec: Sample,
    pub changing_requests_per_sec: Sample,
    pub steady_errors: u64,
    pub changing_errors: u64,
    /// Pool changes made during the measured runs (all succeeded).
    pub changes: usize,
}

impl ChurnResult {
    /// How much lower the median rate is while the pool changes (0.05 = 5% lower).
    pub fn dip(&self) -> f64 {
        1.0 - self.changing_requests_per_sec.median / self.steady_requests_per_sec.median
    }
}

impl L7Bench {
    /// Runs every case for every system; `tag` names the bpffs pin directory weir uses.
    pub fn run(&self, tag: &str, dir: &Path) -> Result<Vec<L7Result>> {
        fs::create_dir_all(dir)?;
        let ns = Netns::new(&format!("{tag}l7"))?;
        let _upstream = start_upstream(&ns, &dir.join("upstream"))?;
        let mut samples: Vec<Vec<(wrk::LoadReport, Option<f64>)>> =
            vec![Vec::new(); self.cases.len() * L7System::ALL.len()];
        for repetition in 0..self.repetitions {
            for (c, case) in self.cases.iter().enumerate() {
                for (s, system) in L7System::ALL.iter().enumerate() {
                    let proxy = self.start(&ns, *system, case.workers, tag, dir)?;
                    let target = if *system == L7System::Direct {
                        UPSTREAM
                    } else {
                        PROXY
                    };
                    let cpu_before = proxy.as_ref().map(|p| cpu_seconds(p.pid())).transpose()?;
                    let args = wrk::args(
                        &format!("http://{target}{}", case.path()),
                        self.connections,
                        self.seconds,
                        case.close,
                    );
                    let report = wrk::run(wrk::command(Some(ns.name())).args(&args))
                        .with_context(|| format!("{} × {}", system.name(), case.name()))?;
                    let cpu = match (&proxy, cpu_before) {
                        (Some(p), Some(before)) => Some(
                            (cpu_seconds(p.pid())? - before) * 1e6 / report.requests.max(1) as f64,
                        ),
                        _ => None,
                    };
                    eprintln!(
                        "  [{}/{}] {:<45} {:<20} {:>9.0} req/s  p99 {:>7.0} µs  cpu {:>6} µs/req  errors {}",
                        repetition + 1,
                        self.repetitions,
                        case.name(),
                        system.name(),
                        report.requests_per_sec,
                        report.p99_us,
                        cpu.map_or("–".to_string(), |c| format!("{c:.1}")),
                        report.errors
                    );
                    samples[c * L7System::ALL.len() + s].push((report, cpu));
                    self.stop(&ns, proxy)?;
                }
            }
        }
        let mut results = Vec::new();
        for (c, case) in self.cases.iter().enumerate() {
            for (s, system) in L7System::ALL.iter().enumerate() {
                let runs = &samples[c * L7System::ALL.len() + s];
                let cpu: Vec<f64> = runs.iter().filter_map(|(_, cpu)| *cpu).collect();
                results.push(L7Result {
                    case: *case,
                    system: *system,
                    requests_per_sec: Sample::new(
                        runs.iter().map(|(r, _)| r.requests_per_sec).collect(),
                    ),
                    p50_us: Sample::new(runs.iter().map(|(r, _)| r.p50_us).collect()),
                    p99_us: Sample::new(runs.iter().map(|(r, _)| r.p99_us).collect()),
                    p999_us: Sample::new(runs.iter().map(|(r, _)| r.p999_us).collect()),
                    cpu_us_per_request: (!cpu.is_empty()).then(|| Sample::new(cpu)),
                    errors: runs.iter().map(|(r, _)| r.errors).sum(),
                });
            }
        }
        Ok(results)
    }

    /// weir in front of three of `CHURN_SERVERS` under keep-alive load (5-byte
    /// responses), measured steady and while `weirctl` makes one pool change a second:
    /// insert a server, drain one, remove it once drained (`--wait`), put it back, in turn.
    pub fn change_under_load(&self, tag: &str, dir: &Path) -> Result<ChurnResult> {
        let case = L7Case {
            close: false,
            large: false,
            workers: 1,
        };
        fs::create_dir_all(dir)?;
        let ns = Netns::new(&format!("{tag}l7c"))?;
        let _upstream = start_upstream(&ns, &dir.join("upstream"))?;
        let servers = CHURN_SERVERS[..3]
            .iter()
            .map(|s| format!("{{ address = \"{s}\" }}"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = write_weir_config(tag, &dir.join("weir"), &servers, 1)?;
        let _weir = self.spawn_weir(&ns, &config)?;
        wait_for(&ns, PROXY)?;
        let socket = dir.join("weir").join("weir.sock");
        let args = wrk::args(
            &format!("http://{PROXY}{}", case.path()),
            self.connections,
            self.seconds,
            false,
        );
        let (mut steady, mut changing) = (Vec::new(), Vec::new());
        let mut changes = 0;
        // The cycle: (command, server index); server 3 starts outside the pool.
        let cycle: [(&[&str], usize); 6] = [
            (&["add"], 3),
            (&["drain"], 0),
            (&["remove", "--wait", "--timeout", "5"], 0),
            (&["add"], 0),
            (&["drain"], 3),
            (&["remove", "--wait", "--timeout", "5"], 3),
        ];
        let mut step = 0;
        for repetition in 0..self.repetitions {
            let report = wrk::run(wrk::command(Some(ns.name())).args(&args))?;
            eprintln!(
                "  [{}/{}] change under load, steady   {:>9.0} req/s  errors {}",
                repetition + 1,
                self.repetitions,
                report.requests_per_sec,
                report.errors
            );
            steady.push(report);
            let mut load = wrk::command(Some(ns.name()));
            load.args(&args);
            let running = std::thread::spawn(move || wrk::run(&mut load));
            let started = std::time::Instant::now();
            while started.elapsed() < Duration::from_secs(u64::from(self.seconds)) {
                std::thread::sleep(Duration::from_secs(1));
                let (verb, server) = cycle[step % cycle.len()];
                step += 1;
                let out = ns
                    .command(&self.weirctl)
                    .arg("--socket")
                    .arg(&socket)
                    .arg("server")
                    .arg(verb[0])
                    .arg("bench")
                    .arg(CHURN_SERVERS[server])
                    .args(&verb[1..])
                    .output()?;
                anyhow::ensure!(
                    out.status.success(),
                    "weirctl server {verb:?} {}: {}",
                    CHURN_SERVERS[server],
                    String::from_utf8_lossy(&out.stderr)
                );
                changes += 1;
            }
            let report = running
                .join()
                .map_err(|_| anyhow::anyhow!("wrk thread panicked"))??;
            eprintln!(
                "  [{}/{}] change under load, changing {:>9.0} req/s  errors {}",
                repetition + 1,
                self.repetitions,
                report.requests_per_sec,
                report.errors
            );
            changing.push(report);
        }
        let rate = |reports: &[wrk::LoadReport]| {
            Sample::new(reports.iter().map(|r| r.requests_per_sec).collect())
        };
        Ok(ChurnResult {
            case,
            steady_requests_per_sec: rate(&steady),
            changing_requests_per_sec: rate(&changing),
            steady_errors: steady.iter().map(|r| r.errors).sum(),
            changing_errors: changing.iter().map(|r| r.errors).sum(),
            changes,
        })
    }

    /// The `weir` daemon in `ns` with the config at `config`.
    fn spawn_weir(&self, ns: &Netns, config: &Path) -> Result<Process> {
        Process::spawn(
            "weir",
            ns.command(&self.weir)
                .arg("--config")
                .arg(config)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null()),
        )
    }

    fn start(
        &self,
        ns: &Netns,
        system: L7System,
        workers: usize,
        tag: &str,
        dir: &Path,
    ) -> Result<Option<Process>> {
        let process = match system {
            L7System::Direct => return Ok(None),
            L7System::Weir => {
                let config = write_weir_config(
                    tag,
                    &dir.join("weir"),
                    &format!("{{ address = \"{UPSTREAM}\" }}"),
                    workers,
                )?;
                self.spawn_weir(ns, &config)?
            }
            L7System::Haproxy => {
                spawn_haproxy(ns, &write_haproxy_config(&dir.join("haproxy"), workers)?)?
            }
            L7System::Nginx => spawn_nginx(
                ns,
                &write_nginx_proxy_config(&dir.join("nginx-proxy"), workers, "")?,
            )?,
        };
        wait_for(ns, PROXY)?;
        Ok(Some(process))
    }

    /// Stops a proxy and waits until its port is free for the next one.
    fn stop(&self, ns: &Netns, process: Option<Process>) -> Result<()> {
        match process {
            Some(process) => stop_proxy(ns, process),
            None => Ok(()),
        }
    }
}

/// HAProxy in `ns` with the config file `conf`, in the foreground.
pub(crate) fn spawn_haproxy(ns: &Netns, conf: &Path) -> Result<Process> {
    Process::spawn(
        "haproxy",
        ns.command("haproxy")
            .args(["-db", "-q", "-f"])
            .arg(conf)
            .stdout(Stdio::null()),
    )
}

/// nginx in `ns` with the config file `conf` (see [`crate::nginx::config`]).
pub(crate) fn spawn_nginx(ns: &Netns, conf: &Path) -> Result<Process> {
    Process::spawn(
        "nginx",
        ns.command("nginx")
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null()),
    )
}

/// Stops the proxy `process` and its children (nginx's workers, which outlive a killed
/// master) and waits until [`PROXY`] is free for the next one.
pub(crate) fn stop_proxy(ns: &Netns, process: Process) -> Result<()> {
    let children = children_of(process.pid());
    drop(process);
    for child in children {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    wait_until("the proxy port to close", Duration::from_secs(5), || {
        !ns.run(|| TcpStream::connect(PROXY).is_ok()).unwrap_or(true)
    })
}

/// User + system CPU seconds of process `pid` (all its threads) and of its living children
/// (nginx's workers under its master).
pub(crate) fn cpu_seconds(pid: u32) -> Result<f64> {
    let mut total = own_cpu_seconds(pid)?;
    for child in children_of(pid) {
        total += own_cpu_seconds(child).unwrap_or(0.0);
    }
    Ok(total)
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| {
            let parent = fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let (_, rest) = stat.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                });
            parent == Some(pid)
        })
        .collect()
}

/// User + system CPU seconds of process `pid` alone (all its threads).
fn own_cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = fields.get(11).zip(fields.get(12)).map_or(Ok(0), |(u, s)| {
        Ok::<_, std::num::ParseIntError>(u.parse::<u64>()? + s.parse::<u64>()?)
    })?;
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64);
    Ok(ticks as f64 / per_second)
}

pub(crate) fn wait_for(ns: &Netns, address: &str) -> Result<()> {
    let address: SocketAddr = address.parse()?;
    ns.wait_for_listener(address, Duration::from_secs(10))
}

/// The upstream: nginx serving a 5-byte and a 64 KiB file, keep-alive without a limit, one
/// single-process nginx per CPU sharing the ports (`SO_REUSEPORT`). An upstream is a fleet of
/// servers in production, never the bottleneck; one nginx process here was: it serialised
/// every proxy behind it, and hid the proxies' own differences (decision 0009).
pub(crate) fn start_upstream(ns: &Netns, dir: &Path) -> Result<Vec<Process>> {
    let www = dir.join("www");
    fs::create_dir_all(&www)?;
    fs::write(www.join("small"), "srv1\n")?;
    fs::write(www.join("64k"), vec![b'x'; LARGE_BYTES])?;
    let processes = std::thread::available_parallelism().map_or(1, usize::from);
    let mut upstream = Vec::with_capacity(processes);
    for i in 0..processes {
        let conf = crate::nginx::config(
            &dir.join(format!("nginx-{i}")),
            &format!(
                "server {{ {} location / {{ root {}; }} }}",
                CHURN_SERVERS
                    .map(|s| format!("listen {s} reuseport;"))
                    .join(" "),
                www.display()
            ),
        )?;
        upstream.push(Process::spawn(
            "nginx",
            ns.command("nginx")
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null()),
        )?);
    }
    wait_for(ns, UPSTREAM)?;
    Ok(upstream)
}

/// nginx as a reverse proxy: HTTP/1.1 and a keep-alive pool to the upstream; `tls` is what
/// the HTTPS comparison adds (`ssl` on the listen line and the `ssl_*` directives, each
/// ending in `;`), empty for plain HTTP.
pub(crate) fn write_nginx_proxy_config(dir: &Path, workers: usize, tls: &str) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let (listen, directives) = match tls {
        "" => ("", ""),
        tls => (" ssl", tls),
    };
    crate::nginx::config_with_workers(
        dir,
        &format!(
            r#"upstream app {{ server {UPSTREAM}; keepalive 64; }}
  server {{
    listen {PROXY}{listen};
    {directives}
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_buffering off;
    }}
  }}"#
        ),
        workers,
    )
}

/// HAProxy in http mode, `workers` threads, connection reuse to the upstream (its default `safe`),
/// and splicing bodies both ways as weir does (`option splice-request`/`splice-response`; off
/// by default in HAProxy, measured faster here with 64 KiB responses: decision 0012).
fn write_haproxy_config(dir: &Path, workers: usize) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let conf = dir.join("haproxy.cfg");
    fs::write(
        &conf,
        format!(
            r#"global
  nbthread {workers}
  maxconn 4096
defaults
  mode http
  option http-keep-alive
  option forwardfor
  http-reuse safe
  option splice-request
  option splice-response
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend web
  bind {PROXY}
  default_backend app
backend app
  server srv1 {UPSTREAM}
"#
        ),
    )?;
    Ok(conf)
}

/// weir with no XDP interface, `workers` L7 workers, one default vhost in front of the upstream.
fn write_weir_config(tag: &str, dir: &Path, servers: &str, workers: usize) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let conf = dir.join("weir.toml");
    fs::write(
        &conf,
        format!(
            r#"[daemon]
control_socket = "{dir}/weir.sock"
state_file = "{dir}/state.json"
bpf_dir = "/sys/fs/bpf/{tag}weir"

[l7]
workers = {workers}

[[vhost]]
name = "bench"
listen = "{PROXY}"
default = true
servers = [{servers}]
"#,
            dir = dir.display()
        ),
    )?;
    // A previous run's state would carry its pool over; start clean.
    let _ = fs::remove_file(dir.join("state.json"));
    Ok(conf)
}
