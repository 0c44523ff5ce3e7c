//! `weir-bench`: the measurements behind `cargo xtask bench` (which builds, installs the
//! peers and runs this as root). Prints progress on stderr, the Markdown report on stdout, and
//! writes `report.md` and `report.json` into `--out`.

use std::{fs, path::PathBuf};

use anyhow::{Result, bail};
use clap::{Parser, ValueEnum};
use weir_benches::{
    l4::{L4Bench, L4Case},
    l7::{L7Bench, L7Case},
    l7_runtime::RuntimeBench,
    report::Report,
    scrape::ScrapeBench,
    tls::{TlsBench, TlsCase, TlsLoad},
    xdp::XdpBench,
};

#[derive(Parser)]
#[command(name = "weir-bench", about = "weir's benchmarks against the peers")]
struct Args {
    /// Fewer and shorter runs (about a minute).
    #[arg(long)]
    quick: bool,
    /// Where report.md and report.json go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Runs only the L7 and HTTPS cases whose name contains this text (as the report names
    /// them: "keep-alive, 64 KiB", "2 workers", "resumed"), and not the L7 change under
    /// load: one case at a time, to profile it.
    #[arg(long)]
    only: Option<String>,
    /// What to run (default: all).
    scenarios: Vec<Scenario>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// ns/packet of the XDP program through BPF_PROG_TEST_RUN.
    Xdp,
    /// End to end through an L4 VIP vs direct and nftables DNAT.
    L4,
    /// The L7 proxy vs HAProxy http mode and nginx, keep-alive and new connections.
    L7,
    /// The L7 runtime choice: one minimal proxy on tokio-uring and on compio.
    L7Runtime,
    /// A Prometheus scrape of `/metrics` with 1 000 servers, and forwarding while scraped.
    Scrape,
    /// HTTPS termination vs HAProxy and nginx: keep-alive, full and resumed handshakes.
    Tls,
    /// rustls's crypto providers, ring and aws-lc-rs: handshakes and record throughput.
    TlsProviders,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmarks create namespaces and load XDP programs: run them as root");
    }
    let all = args.scenarios.is_empty();
    let wanted = |s| all || args.scenarios.contains(&s);
    let only = args.only.as_deref();
    let kept = |name: String| only.is_none_or(|only| name.contains(only));
    let tag = format!("weirb-{}-", std::process::id());
    let mut report = Report {
        machine: machine(),
        quick: args.quick,
        xdp: Vec::new(),
        table_switch: None,
        l4: Vec::new(),
        l7_runtime: Vec::new(),
        l7: Vec::new(),
        l7_churn: None,
        scrape: None,
        tls: Vec::new(),
        tls_providers: Vec::new(),
    };
    // Each scenario's scratch directory (configs, certificates, logs), removed once the
    // report is written; a run that fails keeps them, for their logs.
    let mut scratch = Vec::new();
    let mut scratch_dir = |name: &str| {
        let dir = std::env::temp_dir().join(format!("{tag}{name}"));
        scratch.push(dir.clone());
        dir
    };
    if wanted(Scenario::Xdp) {
        eprintln!("xdp: BPF_PROG_TEST_RUN");
        let bench = XdpBench {
            runs: if args.quick { 20_000 } else { 200_000 },
            repetitions: if args.quick { 3 } else { 7 },
        };
        (report.xdp, report.table_switch) = bench
            .run(&format!("{tag}bed"))
            .map(|(packets, switch)| (packets, Some(switch)))?;
    }
    if wanted(Scenario::L4) {
        eprintln!("l4: wrk and UDP load through the VIP, direct and nftables DNAT, interleaved");
        let families: &[bool] = if args.quick { &[false] } else { &[false, true] };
        let tcp = families.iter().flat_map(|&ipv6| {
            [false, true].into_iter().flat_map(move |close| {
                [false, true].map(|large| L4Case {
                    ipv6,
                    close,
                    large,
                    udp: false,
                })
            })
        });
        let udp = families.iter().flat_map(|&ipv6| {
            [false, true].map(|close| L4Case {
                ipv6,
                close,
                large: false,
                udp: true,
            })
        });
        let cases = tcp.chain(udp).collect();
        let bench = L4Bench {
            cases,
            repetitions: if args.quick { 1 } else { 3 },
            seconds: if args.quick { 2 } else { 4 },
            connections: 32,
        };
        report.l4 = bench.run(&tag, &scratch_dir("l4"))?;
    }
    if wanted(Scenario::L7) {
        eprintln!("l7: wrk through weir, HAProxy and nginx proxies and direct, interleaved");
        // Every case with one worker each; the small-response ones again with two (on this
        // box's two CPUs, how each proxy scales).
        let one = [false, true].into_iter().flat_map(|close| {
            [false, true].map(|large| L7Case {
                close,
                large,
                workers: 1,
            })
        });
        let two = [false, true].map(|close| L7Case {
            close,
            large: false,
            workers: 2,
        });
        let cases = one.chain(two).filter(|case| kept(case.name())).collect();
        let bench = L7Bench {
            cases,
            repetitions: if args.quick { 1 } else { 3 },
            seconds: if args.quick { 2 } else { 5 },
            connections: 64,
            weir: std::env::current_exe()?.with_file_name("weir"),
            weirctl: std::env::current_exe()?.with_file_name("weirctl"),
        };
        report.l7 = bench.run(&tag, &scratch_dir("l7"))?;
        if only.is_none() {
            eprintln!("l7: change under load, steady and with a pool change every second");
            report.l7_churn = Some(bench.change_under_load(&tag, &scratch_dir("l7c"))?);
        }
    }
    if wanted(Scenario::L7Runtime) {
        eprintln!("l7-runtime: the same proxy loop on tokio-uring and compio, interleaved");
        let proxy = std::env::current_exe()?.with_file_name("l7-runtime-proxy");
        let bench = RuntimeBench {
            repetitions: if args.quick { 1 } else { 3 },
            seconds: if args.quick { 3 } else { 5 },
            connections: 64,
        };
        report.l7_runtime = bench.run(&proxy, &scratch_dir("l7rt"))?;
    }
    if wanted(Scenario::Tls) {
        eprintln!("tls: HTTPS through weir, HAProxy and nginx, interleaved");
        let loads = [TlsLoad::KeepAlive, TlsLoad::NewFull, TlsLoad::NewResumed];
        let mut cases: Vec<TlsCase> = loads
            .into_iter()
            .flat_map(|load| [false, true].map(|rsa| TlsCase { load, rsa }))
            .collect();
        cases.insert(
            2,
            TlsCase {
                load: TlsLoad::KeepAliveLarge,
                rsa: false,
            },
        );
        cases.retain(|case| kept(case.name()));
        let bench = TlsBench {
            cases,
            repetitions: if args.quick { 1 } else { 3 },
            seconds: if args.quick { 2 } else { 5 },
            connections: 64,
            weir: std::env::current_exe()?.with_file_name("weir"),
        };
        report.tls = bench.run(&tag, &scratch_dir("tls"))?;
    }
    if wanted(Scenario::TlsProviders) {
        eprintln!("tls-providers: rustls on ring and on aws-lc-rs, in memory");
        report.tls_providers = weir_benches::tls_providers::run(
            &scratch_dir("tlsp"),
            3,
            if args.quick { 200 } else { 1000 },
            if args.quick { 2000 } else { 10_000 },
        )?;
    }
    if wanted(Scenario::Scrape) {
        eprintln!("scrape: /metrics with 1000 servers, and L4 forwarding with and without it");
        let bench = ScrapeBench {
            servers: 1000,
            scrapes: if args.quick { 20 } else { 100 },
            repetitions: 3,
            seconds: if args.quick { 2 } else { 4 },
            connections: 32,
        };
        report.scrape = Some(bench.run(&tag, &scratch_dir("scrape"))?);
    }
    fs::create_dir_all(&args.out)?;
    let markdown = report.markdown();
    fs::write(args.out.join("report.md"), &markdown)?;
    fs::write(
        args.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let charts = report.write_charts(&args.out)?;
    println!("{markdown}");
    eprintln!("written: {}/report.md, report.json", args.out.display());
    for dir in scratch {
        let _ = fs::remove_dir_all(dir);
    }
    for chart in charts {
        eprintln!("written: {}", chart.display());
    }
    Ok(())
}

/// CPUs, memory and kernel of this machine, for the report.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let memory_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib / (1024 * 1024));
    format!("{cpus} × {model}, {memory_gib} GiB, Linux {kernel}")
}
