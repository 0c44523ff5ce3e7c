//! `cargo xtask bench`: the benchmarks against the peers, in one command.
//!
//! Runs `setup`, installs the peers and load tools from Debian packages, builds the workspace
//! in release, then runs `weir-bench` (the harness in `benches/`) as root. Results go to
//! `target/bench/report.md` and `report.json`; `docs/benchmarks.md` quotes a full run.
//! Everything it creates (namespaces `weirb-<pid>-…`, processes, nftables tables) lives
//! inside namespaces that are removed when it ends, also on failure; an interrupted run
//! (Ctrl-C reaches the whole process group) is cleaned up here, after the harness has died,
//! and leftovers of a killed run are removed before the next one starts.

use anyhow::{Result, bail};
use nix::sys::signal::{SigHandler, Signal, signal};
use weir_tests::netns;

use crate::setup::{self, ensure_packages, run_cmd};

/// What every namespace and temporary directory of the harness is named with.
pub const BENCH_PREFIX: &str = "weirb-";

/// What the scenarios run besides weir.
const BENCH_PACKAGES: &[&str] = &["wrk", "nginx-light", "nftables", "haproxy"];

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Fewer and shorter runs (about a minute).
    #[arg(long)]
    quick: bool,
    /// Only the L7 and HTTPS cases whose name contains this text ("64 KiB", "2 workers"),
    /// to profile one case.
    #[arg(long)]
    only: Option<String>,
    /// Scenarios to run (`xdp`, `l4`, `l7`, `l7-runtime`, `scrape`, `tls`, `tls-providers`); all when none is given.
    scenarios: Vec<String>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmarks create namespaces and load XDP programs: run them as root");
    }
    let toolchain = setup::run()?;
    ensure_packages(BENCH_PACKAGES)?;
    let target = build_release(&toolchain)?;
    clean_up();
    let mut bench = std::process::Command::new(target.join("release/weir-bench"));
    bench.arg("--out").arg(target.join("bench"));
    if args.quick {
        bench.arg("--quick");
    }
    if let Some(only) = &args.only {
        bench.arg("--only").arg(only);
    }
    bench.args(&args.scenarios);
    // Ctrl-C goes to the harness (same process group) and ends it; this process outlives it
    // to clean up.
    // SAFETY: ignoring a signal installs no handler code.
    unsafe {
        signal(Signal::SIGINT, SigHandler::SigIgn)?;
    }
    let result = run_cmd(&mut bench);
    let removed = clean_up();
    if removed > 0 {
        println!("bench: removed {removed} namespaces an interrupted run left");
    }
    result
}

/// Builds in release what the harnesses run — themselves, `weir` (the L7 comparison, the
/// soak) and the lab's demo backend — and returns the target directory.
fn build_release(toolchain: &setup::Toolchain) -> Result<std::path::PathBuf> {
    run_cmd(toolchain.cargo().args([
        "build",
        "--release",
        "-p",
        "weir-benches",
        "-p",
        "weir-forwarder",
        "-p",
        "weir-tests",
        "--bins",
    ]))?;
    Ok(std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .join("target"))
}

#[derive(clap::Args)]
pub struct SoakArgs {
    /// How long the load runs.
    #[arg(long, default_value_t = 10)]
    minutes: u64,
}

/// `cargo xtask soak`: builds in release and runs `weir-soak` as root; the report goes to
/// `target/soak/` (`report.md`, `report.json`, `soak.svg`).
pub fn soak(args: SoakArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the soak creates namespaces and loads XDP programs: run it as root");
    }
    let toolchain = setup::run()?;
    let target = build_release(&toolchain)?;
    clean_up();
    let mut soak = std::process::Command::new(target.join("release/weir-soak"));
    soak.arg("--out")
        .arg(target.join("soak"))
        .arg("--minutes")
        .arg(args.minutes.to_string());
    // SAFETY: ignoring a signal installs no handler code.
    unsafe {
        signal(Signal::SIGINT, SigHandler::SigIgn)?;
    }
    let result = run_cmd(&mut soak);
    clean_up();
    result
}

/// Removes every namespace (with the processes in it) and temporary directory of the
/// harness; returns how many namespaces there were.
pub fn clean_up() -> usize {
    let removed = netns::remove_all_with_prefix(BENCH_PREFIX).len();
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(BENCH_PREFIX)
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[ignore = "needs root: creates network namespaces"]
    fn clean_up_removes_what_an_interrupted_run_leaves() {
        let ns = format!("{BENCH_PREFIX}{}-left-lb", std::process::id());
        let dir = std::env::temp_dir().join(format!("{BENCH_PREFIX}{}-l4", std::process::id()));
        std::fs::create_dir_all(dir.join("nginx-temp")).unwrap();
        // A namespace as a killed run leaves it: created with `ip`, a process inside.
        run_cmd(std::process::Command::new("ip").args(["netns", "add", &ns])).unwrap();
        let mut sleeper = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "sleep", "60"])
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(clean_up() >= 1);
        assert!(!std::path::Path::new(&format!("/run/netns/{ns}")).exists());
        assert!(!dir.exists());
        let status = sleeper.wait().unwrap();
        assert!(
            !status.success(),
            "the process in the namespace was not killed"
        );
    }
}
