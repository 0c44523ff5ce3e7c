//! `weir-demo-backend`: the lab's demo server, answering with its name over HTTP, TCP echo and
//! UDP (see `weir_tests::origin`).

use std::net::{SocketAddr, TcpListener, UdpSocket};

use anyhow::Context;
use clap::Parser;

#[derive(Parser)]
#[command(about = "Demo server that answers every request with its name")]
struct Args {
    /// Name to answer with.
    #[arg(long)]
    name: String,
    /// HTTP listen address (repeatable).
    #[arg(long)]
    listen: Vec<SocketAddr>,
    /// TCP echo listen address (repeatable).
    #[arg(long)]
    echo: Vec<SocketAddr>,
    /// UDP listen address (repeatable).
    #[arg(long)]
    udp: Vec<SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bind = |addr: &SocketAddr| TcpListener::bind(addr).with_context(|| format!("bind {addr}"));
    for addr in &args.listen {
        weir_tests::origin::serve(bind(addr)?, args.name.clone());
    }
    for addr in &args.echo {
        weir_tests::origin::serve_echo(bind(addr)?, args.name.clone());
    }
    for addr in &args.udp {
        let socket = UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}"))?;
        weir_tests::origin::serve_udp(socket, args.name.clone());
    }
    eprintln!("{} up", args.name);
    loop {
        std::thread::park();
    }
}
