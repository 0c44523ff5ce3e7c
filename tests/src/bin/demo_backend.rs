//! `weir-demo-backend`: the lab's demo HTTP server, answering with its name.

use std::net::{SocketAddr, TcpListener};

use anyhow::Context;
use clap::Parser;

#[derive(Parser)]
#[command(about = "HTTP server that answers every request with its name")]
struct Args {
    /// Name to answer with (body and X-Served-By header).
    #[arg(long)]
    name: String,
    #[arg(long)]
    listen: SocketAddr,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener =
        TcpListener::bind(args.listen).with_context(|| format!("bind {}", args.listen))?;
    eprintln!("{} listening on {}", args.name, args.listen);
    weir_tests::origin::serve(listener, args.name);
    loop {
        std::thread::park();
    }
}
