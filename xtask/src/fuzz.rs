//! `cargo xtask fuzz`: every fuzz target for a bounded time.
//!
//! The parsers and builders run under cargo-fuzz (libFuzzer, nightly, AddressSanitizer) from
//! `fuzz/`; each starts from its corpus in `fuzz/corpus/<target>` (kept in the repository,
//! read-only here) and writes what it discovers to `target/fuzz-corpus/<target>`, so a run
//! never changes the repository. A crash stops the run with the input libFuzzer saved under
//! `fuzz/artifacts/<target>/`; its fix comes with a regression test.
//!
//! The XDP program is fuzzed through `BPF_PROG_TEST_RUN` by a test of its own
//! (`xdp_packets::mutated_frames_keep_the_datapath_invariants`, root), given the same time.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Result, bail};

use crate::setup::{self, Toolchain, run_cmd};

/// The cargo-fuzz targets, as `fuzz/Cargo.toml` names them.
pub const TARGETS: &[&str] = &[
    "request_head",
    "response_head",
    "chunked",
    "config",
    "control",
    "maglev",
];

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// How long each target runs.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Only these targets (default: all, and the XDP program).
    targets: Vec<String>,
}

pub fn run(args: FuzzArgs) -> Result<()> {
    let toolchain = setup::run()?;
    fuzz(&toolchain, args.seconds, &args.targets)
}

/// Runs `only` (or every target, and the XDP program's fuzz test) for `seconds` each.
pub fn fuzz(toolchain: &Toolchain, seconds: u64, only: &[String]) -> Result<()> {
    for target in only {
        if !TARGETS.contains(&target.as_str()) && target != "xdp" {
            bail!(
                "no fuzz target `{target}` (targets: {}, xdp)",
                TARGETS.join(", ")
            );
        }
    }
    let chosen = |t: &str| only.is_empty() || only.iter().any(|o| o == t);
    ensure_cargo_fuzz(toolchain)?;
    for target in TARGETS.iter().filter(|t| chosen(t)) {
        println!("\n==> fuzz {target} ({seconds} s)");
        let scratch = root().join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&scratch)?;
        run_cmd(
            cargo_fuzz(toolchain)
                .args(["run", target])
                .arg(&scratch)
                .arg(root().join("fuzz/corpus").join(target))
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .arg("-rss_limit_mb=4096")
                .arg("-print_final_stats=1"),
        )?;
    }
    if chosen("xdp") {
        println!("\n==> fuzz xdp ({seconds} s, BPF_PROG_TEST_RUN)");
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED (needs root: loads the XDP program)");
            return Ok(());
        }
        run_cmd(
            toolchain
                .cargo()
                .current_dir(root())
                .args(["test", "-p", "weir-tests", "--test", "xdp_packets"])
                .args(["mutated_frames", "--", "--include-ignored", "--nocapture"])
                .env("WEIR_XDP_FUZZ_SECONDS", seconds.to_string()),
        )?;
    }
    Ok(())
}

/// The repository's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the repository")
        .to_path_buf()
}

/// `cargo +nightly fuzz` in `fuzz/`.
fn cargo_fuzz(toolchain: &Toolchain) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.env("PATH", &toolchain.path)
        .env_remove("RUSTUP_TOOLCHAIN")
        .current_dir(root().join("fuzz"))
        .args(["+nightly", "fuzz"]);
    cmd
}

/// Installs cargo-fuzz from crates.io when it is missing.
fn ensure_cargo_fuzz(toolchain: &Toolchain) -> Result<()> {
    let present = cargo_fuzz(toolchain)
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    if present {
        println!("  ok   cargo-fuzz");
        return Ok(());
    }
    println!("  get  cargo-fuzz (cargo install)");
    run_cmd(
        toolchain
            .cargo()
            .args(["install", "cargo-fuzz", "--locked", "--version", "0.13.2"]),
    )
}
