//! `cargo xtask run`: the development lab in one command.
//!
//! Builds everything, creates the namespaces of [`weir_tests::topology`] (client, balancer,
//! three servers), starts a demo backend per server and `weir` in the balancer namespace with
//! the lab config, then prints what to try. Ctrl-C (or `cargo xtask run --down` from another
//! shell) removes everything; a `run` after a crash removes the leftovers first.

use std::{
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Result, bail};
use nix::sys::signal::{SigHandler, Signal, signal};
use weir_tests::{
    lab::Lab,
    netns,
    topology::{self, L7_VIP},
    workspace_bin,
};

use crate::setup::{self, run_cmd};

/// Every lab namespace starts with this; `--down` removes them by it.
const LAB_PREFIX: &str = "weir-lab-";
/// Config, control socket and daemon log of the lab.
const LAB_DIR: &str = "/run/weir-lab";
const SERVERS: usize = 3;

#[derive(clap::Args)]
pub struct RunArgs {
    /// Remove a running or crashed lab and exit.
    #[arg(long)]
    down: bool,
    /// Attach XDP in generic mode instead of native.
    #[arg(long)]
    generic: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_: std::ffi::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

pub fn run(args: RunArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the lab creates network namespaces and attaches XDP: run it as root");
    }
    let removed = down();
    if args.down {
        println!("lab removed ({} namespaces)", removed);
        return Ok(());
    }
    if removed > 0 {
        println!("removed a previous lab's leftovers ({removed} namespaces)");
    }
    let toolchain = setup::run()?;
    run_cmd(toolchain.cargo().args(["build", "--bins"]))?;

    // Ctrl-C and SIGTERM end the wait below; everything is then dropped in order.
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        signal(Signal::SIGINT, SigHandler::Handler(request_stop))?;
        signal(Signal::SIGTERM, SigHandler::Handler(request_stop))?;
    }
    let mode = if args.generic { "generic" } else { "native" };
    let lab = Lab::start(LAB_PREFIX, SERVERS, Path::new(LAB_DIR), mode)?;
    print_guide(&lab);
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("\nstopping the lab...");
    drop(lab);
    down();
    println!("lab removed");
    Ok(())
}

/// Removes every lab namespace (with its processes) and the lab directory.
fn down() -> usize {
    let removed = netns::remove_all_with_prefix(LAB_PREFIX).len();
    weir_tests::lab::unmount_bpffs(&Path::new(LAB_DIR).join("bpf"));
    let _ = std::fs::remove_dir_all(LAB_DIR);
    removed
}

fn print_guide(lab: &Lab) {
    let client = lab.topology.client.name();
    let weirctl = workspace_bin("weirctl");
    let socket = lab.socket();
    println!(
        r#"
weir lab is up: client, balancer ({lb}) and {SERVERS} servers in network namespaces.

  client 198.18.0.1 ── eth0 198.18.0.2 [XDP] balancer s1..s3 [XDP] ── srv1..3 198.18.11-13.2:{port}
  L4 VIP {l4}:80 (NAT, balanced in XDP)   L7 VIP {L7_VIP}:80

Try:
  # a demo backend, reached through the balancer (XDP counts the packets, the kernel routes them)
  ip netns exec {client} curl -s http://{srv1}/
  # the L4 VIP: XDP picks a server by Maglev and NATs both ways (run it a few times)
  ip netns exec {client} curl -s http://{l4}/
  # the L7 proxy on the L7 VIP (Host demo.weir.test → the same three backends)
  ip netns exec {client} curl -s -H 'Host: demo.weir.test' http://{L7_VIP}/
  # where XDP is attached, its counters, the L7 listener
  {weirctl} --socket {socket} status
  {weirctl} --socket {socket} status --json
  # the pools; take srv2 out of the L4 VIP (drain, wait for its flows, remove), put it back
  {weirctl} --socket {socket} server list
  {weirctl} --socket {socket} server remove demo-l4 {srv2} --wait
  {weirctl} --socket {socket} server add demo-l4 {srv2}

Daemon log: {log}
Ctrl-C here (or `cargo xtask run --down` elsewhere) removes the lab."#,
        lb = lab.topology.balancer.name(),
        port = topology::SERVER_PORT,
        l4 = topology::L4_VIP,
        srv1 = topology::server_socket(1),
        srv2 = topology::server_socket(2),
        weirctl = weirctl.display(),
        socket = socket.display(),
        log = lab.dir.join("weir.log").display(),
    );
}
