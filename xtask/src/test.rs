//! `cargo xtask test`: every check the project has, in the order that fails fastest.
//!
//! fmt → clippy (host crates, then the eBPF crate for its real target) → build the binaries the
//! e2e tests run → `cargo test` (the XDP fuzz test among them, briefly) → each cargo-fuzz
//! target for [`FUZZ_SECONDS`] (`cargo xtask fuzz` runs them longer). Privileged tests are `#[ignore = "needs root: …"]`: as root they
//! are included, otherwise they are listed as SKIPPED with their reason and counted by libtest
//! as ignored, never silently passed.

use std::process::Command;

use anyhow::Result;

use crate::setup::{self, Toolchain, run_cmd};

/// How long each cargo-fuzz target runs in `cargo xtask test`: long enough to replay its
/// corpus and catch a regression in what it covers, short enough for every CI run.
const FUZZ_SECONDS: u64 = 10;

/// Namespaces of e2e tests start with this (see `tests/tests/*.rs`).
const TEST_NETNS_PREFIX: &str = "weirt-";

#[derive(clap::Args)]
pub struct TestArgs {
    /// Only run tests whose name contains this (passed to libtest).
    filter: Option<String>,
}

pub fn run(args: TestArgs) -> Result<()> {
    let toolchain = setup::run()?;
    let cargo = |args: &[&str]| {
        let mut cmd = toolchain.cargo();
        cmd.args(args);
        cmd
    };
    step("cargo fmt --check");
    run_cmd(&mut cargo(&["fmt", "--all", "--", "--check"]))?;
    step("cargo clippy (host crates)");
    run_cmd(&mut cargo(&[
        "clippy",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("cargo clippy (eBPF crate, bpfel-unknown-none)");
    run_cmd(&mut ebpf_clippy(&toolchain))?;
    step("weirctl builds with the stable toolchain alone (no nightly, no bpf-linker)");
    cli_builds_alone(&toolchain)?;
    step("cargo build --bins");
    run_cmd(&mut cargo(&["build", "--bins"]))?;

    let root = nix::unistd::geteuid().is_root();
    if root {
        let leftovers = weir_tests::netns::remove_all_with_prefix(TEST_NETNS_PREFIX);
        if !leftovers.is_empty() {
            println!("removed leftover test namespaces: {}", leftovers.join(" "));
        }
    }
    step(if root {
        "cargo test (as root: privileged tests included)"
    } else {
        "cargo test (not root: privileged tests skipped)"
    });
    let mut test = cargo(&["test", "--"]);
    if let Some(filter) = &args.filter {
        test.arg(filter);
    }
    if root {
        test.arg("--include-ignored");
    } else {
        print_skipped(&toolchain)?;
    }
    run_cmd(&mut test)?;
    if args.filter.is_none() {
        step("fuzz targets, briefly (cargo xtask fuzz runs them longer)");
        let targets: Vec<String> = crate::fuzz::TARGETS.iter().map(|t| t.to_string()).collect();
        crate::fuzz::fuzz(&toolchain, FUZZ_SECONDS, &targets)?;
    }
    Ok(())
}

/// The CLI package's build must not reach the eBPF build: its dependency tree holds neither
/// aya nor the daemon (whose `build.rs` builds the eBPF object with nightly and bpf-linker),
/// and it builds with a `bpf-linker` on `PATH` that fails if anything calls it.
fn cli_builds_alone(toolchain: &Toolchain) -> Result<()> {
    let tree = toolchain
        .cargo()
        .args([
            "tree",
            "-p",
            "weirctl",
            "-e",
            "normal,build",
            "--prefix",
            "none",
        ])
        .output()?;
    anyhow::ensure!(tree.status.success(), "cargo tree -p weirctl failed");
    let tree = String::from_utf8_lossy(&tree.stdout);
    let ebpf_crates: Vec<&str> = tree
        .lines()
        .filter(|l| {
            ["aya", "weir-ebpf", "weir-forwarder", "weir-common"]
                .iter()
                .any(|c| l.starts_with(c))
        })
        .collect();
    anyhow::ensure!(
        ebpf_crates.is_empty(),
        "weirctl depends on the eBPF build: {ebpf_crates:?}"
    );
    let trap = std::env::temp_dir().join(format!("weir-no-bpf-linker-{}", std::process::id()));
    std::fs::create_dir_all(&trap)?;
    let linker = trap.join("bpf-linker");
    std::fs::write(
        &linker,
        "#!/bin/sh\necho 'bpf-linker called while building weirctl' >&2\nexit 1\n",
    )?;
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&linker)?.permissions(),
        0o755,
    );
    std::fs::set_permissions(&linker, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let path = format!(
        "{}:{}",
        trap.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let built = run_cmd(
        toolchain
            .cargo()
            .args(["build", "-p", "weirctl"])
            .env("PATH", path),
    );
    let _ = std::fs::remove_dir_all(&trap);
    built
}

fn step(what: &str) {
    println!("\n==> {what}");
}

/// Clippy for the eBPF crate must run for the BPF target, as aya-build builds it.
fn ebpf_clippy(toolchain: &Toolchain) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.env("PATH", &toolchain.path)
        .env_remove("RUSTUP_TOOLCHAIN")
        .args(["+nightly", "clippy", "--package", "weir-ebpf"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--release", "--target-dir", "target/ebpf-clippy"])
        .args(["--", "-D", "warnings"]);
    cmd
}

/// Lists the privileged tests with their reasons, as `SKIPPED (needs root: …)`.
fn print_skipped(toolchain: &Toolchain) -> Result<()> {
    let out = toolchain
        .cargo()
        .args([
            "test",
            "--quiet",
            "--",
            "--list",
            "--ignored",
            "--format=terse",
        ])
        .output()?;
    let listed = String::from_utf8_lossy(&out.stdout);
    let tests: Vec<&str> = listed
        .lines()
        .filter_map(|line| line.strip_suffix(": test"))
        .collect();
    for test in &tests {
        println!("SKIPPED (needs root: {test})");
    }
    println!(
        "{} privileged tests skipped: run as root to include them",
        tests.len()
    );
    Ok(())
}
