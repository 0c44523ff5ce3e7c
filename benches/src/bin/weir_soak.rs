//! `weir-soak`: the soak (`benches/src/soak.rs`), run by `cargo xtask soak`. Writes
//! `report.md`, `report.json` and `soak.svg` to `--out`; exits non-zero if a client saw an
//! error.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Parser;
use weir_benches::{chart, soak::Soak};

#[derive(Parser)]
struct Args {
    /// How long the load runs.
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// HTTP clients per plane (L4 VIP, L7 vhost).
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Where the report goes.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let tag = format!("weirb-{}-", std::process::id());
    let dir = std::env::temp_dir().join(format!("{tag}soak"));
    eprintln!(
        "soak: {} minutes of L4 and L7 load, a pool change every second, a health flap and a reload every minute",
        args.minutes
    );
    let report = Soak {
        minutes: args.minutes,
        clients: args.clients,
    }
    .run(&tag, &dir)?;
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("report.md"), report.markdown())?;
    chart::soak(&args.out.join("soak.svg"), &report.samples)?;
    println!("{}", report.markdown());
    if !report.errors.is_empty() {
        bail!("{} client-side errors", report.errors.len());
    }
    Ok(())
}
