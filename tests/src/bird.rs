//! BIRD 2, the BGP speaker weir drives (decision 0018), as the tests run it: one daemon per
//! namespace with its own config, control socket and pid file in the test's directory, stopped
//! when dropped. The same daemon plays the routers the nodes peer with.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::Result;

use crate::netns::{Netns, Process};

/// Timers that make a lost session and a restarted speaker show within seconds, not minutes:
/// a 3 s hold time, connection retries every second.
pub const FAST_TIMERS: &str = "hold time 3; connect retry time 1; error wait time 1, 2;";

/// A running BIRD.
pub struct Bird {
    pub process: Process,
    /// Its control socket, for `birdc -s` (and for weir's `[bgp] bird_socket`).
    pub socket: PathBuf,
}

impl Bird {
    /// Starts BIRD in `netns` with `config`, its files named `bird-<name>.*` in `dir`.
    pub fn start(netns: &Netns, dir: &Path, name: &str, config: &str) -> Result<Bird> {
        let conf = dir.join(format!("bird-{name}.conf"));
        let socket = dir.join(format!("bird-{name}.ctl"));
        std::fs::write(&conf, config)?;
        let mut command = netns.command("bird");
        command
            .args(["-f", "-c"])
            .arg(&conf)
            .arg("-s")
            .arg(&socket)
            .arg("-P")
            .arg(dir.join(format!("bird-{name}.pid")))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let process = Process::spawn(&format!("bird ({name})"), &mut command)?;
        Ok(Bird { process, socket })
    }

    /// What `birdc ARGS` prints (empty when BIRD does not answer).
    pub fn birdc(&self, args: &[&str]) -> String {
        birdc(&self.socket, args)
    }
}

/// What `birdc ARGS` prints for the BIRD on `socket` (empty when it does not answer).
pub fn birdc(socket: &Path, args: &[&str]) -> String {
    Command::new("birdc")
        .arg("-s")
        .arg(socket)
        .args(args)
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
}
