//! `weirctl`: the operator's CLI, a client of the daemon's control socket.
//!
//! Exit codes: 0 done; 1 the daemon refused the request; 2 usage error (clap); 3 the daemon
//! could not be reached.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use weir_config::{
    DEFAULT_CONTROL_SOCKET,
    control::{Request, Response, StatusReport},
};
use weir_forwarder::control::Client;

#[derive(Parser)]
#[command(name = "weirctl", version, about = "Control a running weir daemon")]
struct Args {
    /// The daemon's control socket.
    #[arg(long, global = true, default_value = DEFAULT_CONTROL_SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of tables (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The daemon, where XDP is attached, datapath counters and L7 listeners.
    Status,
}

const EXIT_REFUSED: u8 = 1;
const EXIT_UNREACHABLE: u8 = 3;

fn main() -> ExitCode {
    let args = Args::parse();
    let request = match args.command {
        Command::Status => Request::Status,
    };
    let response = match Client::connect(&args.socket).and_then(|mut c| c.request(request)) {
        Ok(response) => response,
        Err(err) => {
            eprintln!("weirctl: {err}");
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    if args.json {
        match &response {
            Response::Status(report) => print_json(report),
            Response::Error(err) => print_json(err),
        }
    }
    match response {
        Response::Status(report) => {
            if !args.json {
                print_status(&report);
            }
            ExitCode::SUCCESS
        }
        Response::Error(err) => {
            eprintln!("weirctl: {}", err.message);
            ExitCode::from(EXIT_REFUSED)
        }
    }
}

fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("control types serialize")
    );
}

fn print_status(report: &StatusReport) {
    let d = &report.daemon;
    println!(
        "weir {} (pid {}), up {}s, config {}",
        d.version, d.pid, d.uptime_secs, d.config
    );
    println!("\nXDP");
    println!(
        "  {:<16} {:>7}  {:<8} {:>8}",
        "INTERFACE", "IFINDEX", "MODE", "PROGRAM"
    );
    for x in &report.xdp {
        println!(
            "  {:<16} {:>7}  {:<8} {:>8}",
            x.interface,
            x.ifindex,
            format!("{:?}", x.mode).to_lowercase(),
            x.program_id
        );
    }
    println!("\nDATAPATH COUNTERS (all CPUs)");
    println!("  {:<16} {:>12} {:>14}", "REASON", "PACKETS", "BYTES");
    for c in &report.counters {
        println!("  {:<16} {:>12} {:>14}", c.reason, c.packets, c.bytes);
    }
    println!("\nL7 LISTENERS");
    println!(
        "  {:<24} {:>7} {:>12} {:>10}",
        "ADDRESS", "WORKERS", "CONNECTIONS", "REQUESTS"
    );
    for l in &report.listeners {
        println!(
            "  {:<24} {:>7} {:>12} {:>10}",
            l.address.to_string(),
            l.workers,
            l.connections,
            l.requests
        );
    }
}
