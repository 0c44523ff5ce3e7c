//! `cargo xtask bench`: the benchmarks against the peers, in one command.
//!
//! Runs `setup`, installs the peers and load tools from Debian packages, builds the workspace
//! in release, then runs `weir-bench` (the harness in `benches/`) as root. Results go to
//! `target/bench/report.md` and `report.json`; `docs/benchmarks.md` quotes a full run.
//! Everything it creates (namespaces `weirb-<pid>-…`, processes, nftables tables) lives
//! inside namespaces that are removed when it ends, also on failure.

use anyhow::{Result, bail};

use crate::setup::{self, ensure_packages, run_cmd};

/// What the scenarios run besides weir.
const BENCH_PACKAGES: &[&str] = &["wrk", "nginx-light", "nftables", "haproxy"];

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Fewer and shorter runs (about a minute).
    #[arg(long)]
    quick: bool,
    /// Scenarios to run (`xdp`, `l4`, `l7-runtime`); all when none is given.
    scenarios: Vec<String>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmarks create namespaces and load XDP programs: run them as root");
    }
    let toolchain = setup::run()?;
    ensure_packages(BENCH_PACKAGES)?;
    run_cmd(
        toolchain
            .cargo()
            .args(["build", "--release", "-p", "weir-benches", "--bins"]),
    )?;
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .join("target");
    let mut bench = std::process::Command::new(target.join("release/weir-bench"));
    bench.arg("--out").arg(target.join("bench"));
    if args.quick {
        bench.arg("--quick");
    }
    bench.args(&args.scenarios);
    run_cmd(&mut bench)
}
