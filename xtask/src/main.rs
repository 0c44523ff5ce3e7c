//! `cargo xtask`: the project's own commands. Every command that builds first runs `setup`, so
//! a fresh machine needs nothing but the README's one line.

mod bench;
mod fuzz;
mod lab;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "weir's development commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Installs what building and testing need (idempotent; says what it checked).
    Setup,
    /// Builds everything and brings up the development lab in network namespaces.
    Run(lab::RunArgs),
    /// Runs every check: fmt, clippy, unit, eBPF and namespace tests.
    Test(test::TestArgs),
    /// Measures weir against the peers (needs root): XDP ns/packet, L4 end to end.
    Bench(bench::BenchArgs),
    /// Runs every fuzz target for a bounded time (parsers under cargo-fuzz, XDP as root).
    Fuzz(fuzz::FuzzArgs),
    /// Soaks the lab (needs root): load, pool changes, health flaps and reloads for N minutes,
    /// with the daemon's memory, descriptors and flow table sampled.
    Soak(bench::SoakArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run().map(|_| ()),
        Command::Run(args) => lab::run(args),
        Command::Test(args) => test::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Fuzz(args) => fuzz::run(args),
        Command::Soak(args) => bench::soak(args),
    }
}
