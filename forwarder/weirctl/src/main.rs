//! `weirctl`: the operator's CLI, a client of the daemon's control socket.
//!
//! A change returns once the daemon has it in the datapath and in its state file. Output is a
//! table for people, or JSON with `--json` for scripts.
//!
//! Exit codes: 0 done; 1 the daemon refused the request (invalid, or refused now — e.g. a
//! server that still has flows) or `config check` found errors; 2 usage error; 3 the daemon
//! could not be reached; 4 no such VIP or server; 5 `server remove --wait` timed out.

use std::{
    io,
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

mod top;

use clap::{CommandFactory, Parser, Subcommand};
use weir_config::{
    Config, DEFAULT_CONTROL_SOCKET, MAX_WEIGHT,
    control::{
        AdminState, ControlError, ControlErrorKind, Event, Request, Response, ServerReport,
        StatsReport, StatusReport, VipReport, utc_date,
    },
};
use weir_control::{Client, ClientError};

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
    /// L4 VIPs.
    #[command(subcommand)]
    Vip(VipCommand),
    /// Servers of the pools: L4 VIPs and vhosts, each named as in the config.
    #[command(subcommand)]
    Server(ServerCommand),
    /// Datapath counters by reason and traffic per VIP.
    Stats,
    /// Config files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Re-read the daemon's config file and apply all of it or none of it.
    Reload,
    /// The access log.
    #[command(subcommand)]
    Log(LogCommand),
    /// This node's service: drained, it withdraws its VIPs from BGP.
    #[command(subcommand)]
    Node(NodeCommand),
    /// State changes of servers (admin and health, with reasons), oldest first.
    Events {
        /// Keep printing new events as they happen (Ctrl-C to stop).
        #[arg(long)]
        follow: bool,
    },
    /// A live view of every server, busiest first, refreshed each second (q quits).
    Top,
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Take the node out of service: its VIPs are withdrawn from BGP (kept across restarts).
    Drain,
    /// Put the node back in service: its VIPs are announced again.
    Undrain,
}

#[derive(Subcommand)]
enum LogCommand {
    /// Open the access log file again at its path, after logrotate moved it away.
    Reopen,
}

#[derive(Subcommand)]
enum VipCommand {
    /// Every VIP with its pool size, active flows and traffic.
    List,
    /// One L4 VIP and its servers (a vhost's servers: `weirctl server list VHOST`).
    Show {
        /// The VIP's name, as in the config (`weirctl vip list`).
        #[arg(value_name = "VIP")]
        vip: String,
    },
}

/// A pool and one of its servers: what every server verb acts on.
#[derive(clap::Args)]
struct Target {
    /// The pool: an L4 VIP's or a vhost's name, as in the config (`weirctl vip list`,
    /// `weirctl server list`).
    #[arg(value_name = "POOL")]
    pool: String,
    /// The server, as ADDRESS:PORT (an IPv6 address in brackets: [fd00::2]:80).
    #[arg(value_name = "ADDRESS:PORT")]
    address: SocketAddr,
}

/// A weight, refused before anything is sent unless it is in range.
fn weight_arg() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=i64::from(MAX_WEIGHT))
}

#[derive(Subcommand)]
enum ServerCommand {
    /// Servers with admin state, health, weight, active flows and traffic.
    List {
        /// Only this pool's servers (an L4 VIP's or a vhost's name).
        #[arg(value_name = "POOL")]
        pool: Option<String>,
    },
    /// Add a server, ready for new flows.
    Add {
        #[command(flatten)]
        target: Target,
        /// Its share of new flows or requests against the others' (1 to 10000, default 100).
        #[arg(long, value_parser = weight_arg(), allow_negative_numbers = true)]
        weight: Option<u32>,
    },
    /// Remove a server. Refused while it has active flows or is the pool's last server.
    Remove {
        #[command(flatten)]
        target: Target,
        /// Remove even if flows are still on it (they move to other servers and break).
        #[arg(long, conflicts_with = "wait")]
        force: bool,
        /// Drain the server if it is ready, wait until its flows end, then remove it.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 300, requires = "wait")]
        timeout: u64,
    },
    /// Stop new flows to a server; its established flows finish.
    Drain {
        #[command(flatten)]
        target: Target,
    },
    /// Take a server out for maintenance: no new flows.
    Disable {
        #[command(flatten)]
        target: Target,
    },
    /// Make a server ready for new flows again.
    Enable {
        #[command(flatten)]
        target: Target,
    },
    /// Set a server's weight.
    Weight {
        #[command(flatten)]
        target: Target,
        /// Its share of new flows or requests against the others' (1 to 10000).
        #[arg(value_parser = weight_arg(), allow_negative_numbers = true)]
        weight: u32,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file without applying it (no daemon needed).
    Check { file: PathBuf },
}

const EXIT_REFUSED: u8 = 1;
const EXIT_UNREACHABLE: u8 = 3;
const EXIT_NOT_FOUND: u8 = 4;
const EXIT_TIMEOUT: u8 = 5;

/// How a command ended, when not with success.
enum Failure {
    Unreachable(ClientError),
    Refused(ControlError),
    Timeout(String),
    ConfigInvalid(String),
    /// The terminal could not be drawn on or read (`weirctl top`).
    Terminal(std::io::Error),
}

fn main() -> ExitCode {
    // A CLI whose output goes into `head` or `grep -q` must end quietly when the pipe closes,
    // not panic on the failed write: the default disposition of SIGPIPE ends it.
    // SAFETY: called before any thread exists; SIG_DFL is a valid disposition.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let (message, code) = match failure {
                Failure::Unreachable(err) => {
                    if args.json {
                        // Scripts get JSON for every failure, this one included.
                        print_json(&ControlError::new(
                            ControlErrorKind::Unreachable,
                            err.to_string(),
                        ));
                    }
                    (err.to_string(), EXIT_UNREACHABLE)
                }
                Failure::Refused(err) => {
                    let code = match err.kind {
                        ControlErrorKind::NotFound => EXIT_NOT_FOUND,
                        _ => EXIT_REFUSED,
                    };
                    if args.json {
                        print_json(&err);
                    }
                    (err.message, code)
                }
                Failure::Timeout(message) => (message, EXIT_TIMEOUT),
                Failure::ConfigInvalid(message) => (message, EXIT_REFUSED),
                Failure::Terminal(err) => (format!("terminal: {err}"), EXIT_REFUSED),
            };
            eprintln!("weirctl: {message}");
            ExitCode::from(code)
        }
    }
}

fn run(args: &Args) -> Result<(), Failure> {
    let server_change = |target: &Target, state| Request::ServerSetState {
        vip: target.pool.clone(),
        address: target.address,
        state,
    };
    let request = match &args.command {
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Args::command(), "weirctl", &mut io::stdout());
            return Ok(());
        }
        Command::Config(ConfigCommand::Check { file }) => return check_config(file, args.json),
        Command::Vip(VipCommand::Show { vip }) => return show_vip(args, vip),
        Command::Events { follow } => return events(args, *follow),
        Command::Top => return top::run(&mut connect(args)?),
        Command::Server(ServerCommand::Remove {
            target,
            wait: true,
            timeout,
            ..
        }) => {
            let timeout = Duration::from_secs(*timeout);
            return remove_when_drained(args, &target.pool, target.address, timeout);
        }
        Command::Status => Request::Status,
        Command::Vip(VipCommand::List) => Request::VipList,
        Command::Stats => Request::Stats,
        Command::Reload => Request::Reload,
        Command::Log(LogCommand::Reopen) => Request::ReopenLogs,
        Command::Node(NodeCommand::Drain) => Request::NodeDrain,
        Command::Node(NodeCommand::Undrain) => Request::NodeUndrain,
        Command::Server(command) => match command {
            ServerCommand::List { pool } => Request::ServerList { vip: pool.clone() },
            ServerCommand::Add { target, weight } => Request::ServerAdd {
                vip: target.pool.clone(),
                address: target.address,
                weight: *weight,
            },
            ServerCommand::Remove { target, force, .. } => Request::ServerRemove {
                vip: target.pool.clone(),
                address: target.address,
                force: *force,
            },
            ServerCommand::Drain { target } => server_change(target, AdminState::Draining),
            ServerCommand::Disable { target } => server_change(target, AdminState::Disabled),
            ServerCommand::Enable { target } => server_change(target, AdminState::Ready),
            ServerCommand::Weight { target, weight } => Request::ServerWeight {
                vip: target.pool.clone(),
                address: target.address,
                weight: *weight,
            },
        },
    };
    let response = ask(&mut connect(args)?, request)?;
    print_response(&response, args.json);
    Ok(())
}

fn connect(args: &Args) -> Result<Client, Failure> {
    Client::connect(&args.socket).map_err(Failure::Unreachable)
}

/// Sends `request`; a refusal becomes a [`Failure`].
fn ask(client: &mut Client, request: Request) -> Result<Response, Failure> {
    match client.request(request).map_err(Failure::Unreachable)? {
        Response::Error(err) => Err(Failure::Refused(err)),
        response => Ok(response),
    }
}

fn check_config(file: &std::path::Path, json: bool) -> Result<(), Failure> {
    match Config::load(file) {
        Ok(config) => {
            if json {
                print_json(
                    &serde_json::json!({ "valid": true, "l4_vips": config.l4_vips.len(), "vhosts": config.vhosts.len() }),
                );
            } else {
                println!(
                    "{}: valid ({}, {})",
                    file.display(),
                    count(config.l4_vips.len(), "L4 VIP", "L4 VIPs"),
                    count(config.vhosts.len(), "virtual host", "virtual hosts")
                );
            }
            Ok(())
        }
        Err(err) => {
            if json {
                print_json(&serde_json::json!({ "valid": false, "errors": err.to_string() }));
            }
            Err(Failure::ConfigInvalid(err.to_string()))
        }
    }
}

fn show_vip(args: &Args, vip: &str) -> Result<(), Failure> {
    let mut client = connect(args)?;
    let servers = servers_of(&mut client, vip)?;
    let Response::Vips(vips) = ask(&mut client, Request::VipList)? else {
        return Err(unexpected());
    };
    let Some(report) = vips.into_iter().find(|v| v.name == vip) else {
        // The name resolved (the daemon listed its servers) but is no L4 VIP: a vhost.
        return Err(Failure::Refused(ControlError::new(
            ControlErrorKind::NotFound,
            format!(
                "`{vip}` is a vhost, not an L4 VIP: `weirctl server list {vip}` shows its servers"
            ),
        )));
    };
    if !args.json {
        println!(
            "Maglev table {} slots, digest {}\n",
            report.table_size, report.table_digest
        );
    }
    if args.json {
        /// The shape of `vip show --json`: fields in this order, as every answer keeps them.
        #[derive(serde::Serialize)]
        struct VipShow<'a> {
            vip: &'a VipReport,
            servers: &'a [ServerReport],
        }
        print_json(&VipShow {
            vip: &report,
            servers: &servers,
        });
    } else {
        print_vips(std::slice::from_ref(&report));
        println!();
        print_servers(&servers);
    }
    Ok(())
}

/// `server remove --wait`: drain (if ready), wait for the server's flows to end, remove.
fn remove_when_drained(
    args: &Args,
    vip: &str,
    address: SocketAddr,
    timeout: Duration,
) -> Result<(), Failure> {
    let mut client = connect(args)?;
    let deadline = Instant::now() + timeout;
    let mut announced = false;
    loop {
        let servers = servers_of(&mut client, vip)?;
        let Some(server) = servers.iter().find(|s| s.address == address) else {
            return Err(Failure::Refused(ControlError::new(
                ControlErrorKind::NotFound,
                format!("pool `{vip}` has no server {address}"),
            )));
        };
        if server.admin == AdminState::Ready {
            ask(
                &mut client,
                Request::ServerSetState {
                    vip: vip.to_string(),
                    address,
                    state: AdminState::Draining,
                },
            )?;
            eprintln!("weirctl: {address} is draining");
            continue;
        }
        if server.active_flows == 0 {
            break;
        }
        if Instant::now() >= deadline {
            // The server stays draining, as asked: putting it back would send new flows to a
            // server its operator is taking out. The message says so and what to do next.
            return Err(Failure::Timeout(format!(
                "{address} still has {} active flows after {}s: nothing removed, and it stays \
                 draining (no new flows). Wait again with the same command, cut them with \
                 `--force`, or put it back with `server enable`",
                server.active_flows,
                timeout.as_secs()
            )));
        }
        if !announced {
            eprintln!(
                "weirctl: waiting for {} active flows on {address} to end",
                server.active_flows
            );
            announced = true;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let response = ask(
        &mut client,
        Request::ServerRemove {
            vip: vip.to_string(),
            address,
            force: false,
        },
    )?;
    print_response(&response, args.json);
    Ok(())
}

/// The servers of VIP `vip`.
fn servers_of(client: &mut Client, vip: &str) -> Result<Vec<ServerReport>, Failure> {
    match ask(
        client,
        Request::ServerList {
            vip: Some(vip.to_string()),
        },
    )? {
        Response::Servers(servers) => Ok(servers),
        _ => Err(unexpected()),
    }
}

fn unexpected() -> Failure {
    Failure::Refused(ControlError::new(
        ControlErrorKind::Internal,
        "the daemon answered with an unexpected response",
    ))
}

fn print_response(response: &Response, json: bool) {
    match response {
        Response::Status(report) if json => print_json(report),
        Response::Status(report) => print_status(report),
        Response::Vips(vips) if json => print_json(vips),
        Response::Vips(vips) => print_vips(vips),
        Response::Servers(servers) if json => print_json(servers),
        Response::Servers(servers) => print_servers(servers),
        Response::Stats(stats) if json => print_json(stats),
        Response::Stats(stats) => print_stats(stats),
        Response::Changed(changes) if json => {
            print_json(&serde_json::json!({ "changes": changes }))
        }
        Response::Changed(changes) if changes.is_empty() => println!("no change"),
        Response::Changed(changes) => changes.iter().for_each(|line| println!("{line}")),
        Response::Events(events) if json => print_json(events),
        Response::Events(events) => events.iter().for_each(print_event),
        // weirctl never asks for a hand-over (`weir upgrade` does).
        Response::HandedOver { sockets } => println!("handed over {sockets} sockets"),
        Response::Error(err) => print_json(err),
    }
}

fn print_event(event: &Event) {
    let at = UNIX_EPOCH + Duration::from_millis(event.unix_ms);
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    println!(
        "{h:02}:{m:02}:{s:02}.{:03} UTC  {}",
        event.unix_ms % 1000,
        event.text
    );
}

/// `weirctl events [--follow]`: the recorded events, then (with --follow) new ones as they
/// come, asking for those after the last one seen.
fn events(args: &Args, follow: bool) -> Result<(), Failure> {
    let mut client = connect(args)?;
    let mut after = 0;
    loop {
        let Response::Events(events) = ask(&mut client, Request::Events { after })? else {
            return Err(unexpected());
        };
        for event in &events {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string(event).expect("events serialize")
                );
            } else {
                print_event(event);
            }
            after = event.seq;
        }
        if !follow {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("control types serialize")
    );
}

/// `n` and the noun in the right number: "1 virtual host", "2 virtual hosts".
fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn lower(value: &impl std::fmt::Debug) -> String {
    format!("{value:?}").to_lowercase()
}

fn print_status(report: &StatusReport) {
    let d = &report.daemon;
    println!(
        "weir {} (pid {}), up {}s, config {}",
        d.version, d.pid, d.uptime_secs, d.config
    );
    println!(
        "state {}, pinned in {}{}",
        d.state_file,
        d.bpf_dir,
        if d.adopted_datapath {
            " (adopted from the previous daemon)"
        } else {
            ""
        }
    );
    let r = &d.reloads;
    if let (Some(at), Some(ok)) = (r.last_unix_ms, r.last_succeeded) {
        let applied = match r.last_success_unix_ms {
            Some(success) if !ok => format!(
                " (the last applied at {})",
                utc_date((success / 1000) as i64)
            ),
            _ => String::new(),
        };
        println!(
            "reloads: {} applied, {} refused; the last {} at {}{applied}",
            r.succeeded,
            r.failed,
            if ok { "applied" } else { "refused" },
            utc_date((at / 1000) as i64),
        );
    }
    let node = &d.node;
    println!(
        "node {}",
        if node.drained {
            "drained: announces no VIP"
        } else {
            "in service"
        }
    );
    if let Some(speaker) = &node.speaker {
        let announced: Vec<String> = node.announced.iter().map(|a| a.to_string()).collect();
        println!(
            "bgp: BIRD at {speaker}, announcing {}",
            if announced.is_empty() {
                "nothing".to_string()
            } else {
                announced.join(" ")
            }
        );
        for session in &node.sessions {
            println!(
                "  session {}: {} {}",
                session.name, session.state, session.info
            );
        }
        if let Some(err) = &node.speaker_error {
            println!("  speaker error: {err}");
        }
    }
    println!("\nDATAPATH");
    println!(
        "  {:<16} {:>7}  {:<9} {:>9} {:>9}",
        "INTERFACE", "IFINDEX", "XDP MODE", "XDP PROG", "TC PROG"
    );
    for x in &report.xdp {
        // A server interface has the NAT return program only.
        let (mode, program) = match x.program_id {
            Some(id) => (lower(&x.mode), id.to_string()),
            None => ("-".to_string(), "-".to_string()),
        };
        println!(
            "  {:<16} {:>7}  {:<9} {:>9} {:>9}",
            x.interface, x.ifindex, mode, program, x.tc_program_id
        );
    }
    print_counters(&report.counters);
    print_flow_events(&report.flows);
    println!("\nL7 LISTENERS");
    println!(
        "  {:<24} {:>7} {:>12} {:>10} {:>8}",
        "ADDRESS", "WORKERS", "CONNECTIONS", "REQUESTS", "REFUSED"
    );
    for l in &report.listeners {
        println!(
            "  {:<24} {:>7} {:>12} {:>10} {:>8}",
            l.address.to_string(),
            l.workers,
            l.connections,
            l.requests,
            l.refusals.iter().map(|r| r.count).sum::<u64>()
        );
    }
    let refusals: Vec<_> = report
        .listeners
        .iter()
        .flat_map(|l| l.refusals.iter().map(move |r| (l.address, r)))
        .collect();
    if !refusals.is_empty() {
        println!("\nL7 REFUSALS");
        println!(
            "  {:<24} {:>6} {:>8}  REASON",
            "LISTENER", "STATUS", "COUNT"
        );
        for (address, r) in refusals {
            println!(
                "  {:<24} {:>6} {:>8}  {}",
                address.to_string(),
                r.status,
                r.count,
                r.reason
            );
        }
    }
    print_tls(report);
}

/// TLS handshakes per listener, and the certificates with their expiry (when there are).
fn print_tls(report: &StatusReport) {
    let listeners: Vec<_> = report
        .listeners
        .iter()
        .filter_map(|l| Some((l.address, l.tls.as_ref()?)))
        .collect();
    if !listeners.is_empty() {
        println!("\nTLS HANDSHAKES");
        println!(
            "  {:<24} {:>8} {:>8} {:>8}  FAILED BY REASON",
            "LISTENER", "FULL", "RESUMED", "FAILED"
        );
        for (address, tls) in listeners {
            let reasons: Vec<String> = tls
                .failures
                .iter()
                .map(|(reason, count)| format!("{reason} {count}"))
                .collect();
            println!(
                "  {:<24} {:>8} {:>8} {:>8}  {}",
                address.to_string(),
                tls.full,
                tls.resumed,
                tls.failures.iter().map(|(_, n)| n).sum::<u64>(),
                reasons.join(", ")
            );
        }
    }
    if !report.certificates.is_empty() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        println!("\nCERTIFICATES");
        println!("  {:<16} {:<32} PATH", "VHOST", "VALID UNTIL");
        for c in &report.certificates {
            let until = utc_date(c.not_after_unix);
            let expired = if c.not_after_unix <= now {
                " EXPIRED"
            } else {
                ""
            };
            println!("  {:<16} {:<32} {}", c.vhost, until + expired, c.path);
        }
    }
}

fn print_counters(counters: &[weir_config::control::DatapathCounter]) {
    // As wide as the longest reason, so every row lines up with the header.
    let width = counters
        .iter()
        .map(|c| c.reason.len())
        .max()
        .unwrap_or(0)
        .max(6);
    println!("\nDATAPATH COUNTERS (all CPUs)");
    println!("  {:<width$} {:>12} {:>14}", "REASON", "PACKETS", "BYTES");
    for c in counters {
        println!("  {:<width$} {:>12} {:>14}", c.reason, c.packets, c.bytes);
    }
}

fn print_flow_events(flows: &weir_config::control::FlowTableReport) {
    println!("\nFLOW TABLES (all CPUs)");
    println!("  {:<20} {:>12}", "embryonic now", flows.embryonic);
    for e in &flows.events {
        println!("  {:<20} {:>12}", e.event, e.count);
    }
}

fn print_vips(vips: &[VipReport]) {
    println!(
        "{:<16} {:<28} {:<5} {:<5} {:>7} {:>7} {:>8} {:>12} {:>10}",
        "VIP", "ADDRESS", "PROTO", "MODE", "READY", "SERVERS", "FLOWS", "PACKETS", "NEW FLOWS"
    );
    for v in vips {
        println!(
            "{:<16} {:<28} {:<5} {:<5} {:>7} {:>7} {:>8} {:>12} {:>10}",
            v.name,
            v.address.to_string(),
            lower(&v.protocol),
            lower(&v.mode),
            v.ready,
            v.servers,
            v.active_flows,
            v.traffic.packets,
            v.traffic.new_flows
        );
    }
}

/// One table for L4 and L7 pools: for an L7 server FLOWS counts requests in flight, PACKETS
/// is `-` and NEW is requests; for an L4 server NEW is new flows.
fn print_servers(servers: &[ServerReport]) {
    println!(
        "{:<16} {:<28} {:<9} {:<10} {:>6} {:>8} {:>12} {:>10}",
        "POOL", "SERVER", "ADMIN", "HEALTH", "WEIGHT", "FLOWS", "PACKETS", "NEW"
    );
    for s in servers {
        let (packets, new) = match &s.l7 {
            Some(l7) => ("-".to_string(), l7.requests),
            None => (s.traffic.packets.to_string(), s.traffic.new_flows),
        };
        println!(
            "{:<16} {:<28} {:<9} {:<10} {:>6} {:>8} {:>12} {:>10}",
            s.vip,
            s.address.to_string(),
            s.admin.name(),
            lower(&s.health),
            s.weight,
            s.active_flows,
            packets,
            new
        );
        if let Some(check) = &s.last_check {
            println!("    last check {check}");
        }
        if let Some(reason) = &s.health_reason {
            println!("    {} because {reason}", lower(&s.health));
        }
        if let Some(l7) = s.l7.filter(|l7| l7.ejected_ms > 0) {
            println!(
                "    ejected by outlier detection for {:.1} s more",
                l7.ejected_ms as f64 / 1000.0
            );
        }
    }
}

fn print_stats(stats: &StatsReport) {
    print_vips(&stats.vips);
    print_counters(&stats.counters);
    print_flow_events(&stats.flows);
}
