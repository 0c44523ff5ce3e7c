//! Announcing the L4 VIPs to routers through BIRD 2, so that several weir nodes can share them
//! behind ECMP (decision 0018). weir decides *what* a node announces; BIRD speaks BGP.
//!
//! The daemon computes the set of VIP addresses this node should announce after every change
//! (`daemon`: in service, and at least one server of a VIP at the address ready and not
//! unhealthy). When the set differs from what BIRD was last told, the routes file is rewritten
//! atomically — one `route <vip>/32 blackhole;` (or `/128`) line per address — and BIRD is
//! asked to `configure`: its static protocol, which includes the file, then announces or
//! withdraws through whatever BGP sessions export it. The blackhole next hop never carries a
//! packet: BGP sends the node's own address as next hop, and the routes must not be exported
//! to the kernel (the operator's bird.conf decides; `docs/operations.md` shows one).
//!
//! A speaker that cannot be reached is not an error for the daemon: the set is kept, retried
//! every second, and the session state shows in `weirctl status`.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
};

use weir_config::{BgpConfig, control::BgpSession};

/// Why BIRD could not be told, or asked.
#[derive(Debug, thiserror::Error)]
pub enum BgpError {
    #[error("cannot write the routes file {path}: {source}")]
    RoutesFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot run birdc: {0}")]
    Birdc(std::io::Error),
    #[error("BIRD ({socket}) refused `{command}`: {output}")]
    Refused {
        socket: PathBuf,
        command: &'static str,
        output: String,
    },
}

/// What this node told BIRD, and how to tell it again.
pub struct Announcer {
    socket: PathBuf,
    routes_file: PathBuf,
    /// The addresses BIRD announces now (`None`: not told yet, or the last attempt failed).
    announced: Option<BTreeSet<IpAddr>>,
    /// The sessions as last asked, and when: every status asks (each `/metrics` scrape and
    /// dashboard poll), and one `birdc` a second is plenty.
    sessions: std::sync::Mutex<Option<(std::time::Instant, SessionsAnswer)>>,
}

/// What `birdc show protocols` gave: the sessions, or why there are none to show.
type SessionsAnswer = Result<Vec<BgpSession>, String>;

/// How long an answer of `birdc show protocols` serves.
const SESSIONS_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

impl Announcer {
    /// The announcer `config` asks for, if any.
    pub fn new(config: &BgpConfig) -> Option<Announcer> {
        Some(Announcer {
            socket: config.bird_socket.clone()?,
            routes_file: config.routes_file.clone(),
            announced: None,
            sessions: Default::default(),
        })
    }

    /// Makes BIRD announce exactly `addresses`; nothing happens if it already does. Returns
    /// what changed, one line per address.
    pub fn announce(&mut self, addresses: &BTreeSet<IpAddr>) -> Result<Vec<String>, BgpError> {
        if self.announced.as_ref() == Some(addresses) {
            return Ok(Vec::new());
        }
        write_routes(&self.routes_file, addresses)?;
        // Until BIRD confirms, what it announces is unknown: the next call tries again.
        let before = self.announced.take().unwrap_or_default();
        birdc(&self.socket, "configure")?;
        let mut changes: Vec<String> = addresses
            .difference(&before)
            .map(|a| format!("bgp: announcing {a}"))
            .collect();
        changes.extend(
            before
                .difference(addresses)
                .map(|a| format!("bgp: withdrawing {a}")),
        );
        self.announced = Some(addresses.clone());
        Ok(changes)
    }

    /// The addresses BIRD was last told to announce, if it confirmed.
    pub fn announced(&self) -> Option<&BTreeSet<IpAddr>> {
        self.announced.as_ref()
    }

    /// BIRD's BGP sessions and their states (asked at most every [`SESSIONS_MAX_AGE`]), or
    /// why they could not be asked.
    pub fn sessions(&self) -> SessionsAnswer {
        let mut cached = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, answer)) = cached.as_ref()
            && at.elapsed() < SESSIONS_MAX_AGE
        {
            return answer.clone();
        }
        let answer = birdc(&self.socket, "show protocols")
            .map(|output| parse_protocols(&output))
            .map_err(|err| err.to_string());
        *cached = Some((std::time::Instant::now(), answer.clone()));
        answer
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

/// Writes the routes file atomically (a reader sees the old file or the new, never half).
fn write_routes(path: &Path, addresses: &BTreeSet<IpAddr>) -> Result<(), BgpError> {
    let mut text = String::from("# Written by weir: the VIPs this node announces. Do not edit.\n");
    for address in addresses {
        let length = if address.is_ipv4() { 32 } else { 128 };
        text.push_str(&format!("route {address}/{length} blackhole;\n"));
    }
    let failed = |source| BgpError::RoutesFile {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, text).map_err(failed)?;
    std::fs::rename(&temp, path).map_err(failed)
}

/// Runs `birdc -s socket <command>`; its output, or why it failed.
fn birdc(socket: &Path, command: &'static str) -> Result<String, BgpError> {
    let output = Command::new("birdc")
        .arg("-s")
        .arg(socket)
        .args(command.split(' '))
        .output()
        .map_err(BgpError::Birdc)?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(BgpError::Refused {
            socket: socket.to_path_buf(),
            command,
            output: text.trim().lines().last().unwrap_or_default().to_string(),
        });
    }
    Ok(text)
}

/// The BGP rows of `birdc show protocols`: name, state and info (`Established`, or why not).
fn parse_protocols(output: &str) -> Vec<BgpSession> {
    output
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Name Proto Table State Since [Info…]
            match fields.as_slice() {
                [name, "BGP", _table, state, _since, info @ ..] => Some(BgpSession {
                    name: name.to_string(),
                    state: state.to_string(),
                    info: info.join(" "),
                }),
                [name, "BGP", _table, state] => Some(BgpSession {
                    name: name.to_string(),
                    state: state.to_string(),
                    info: String::new(),
                }),
                _ => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bgp_rows_of_show_protocols_are_read() {
        let output = "BIRD 2.0.12 ready.\n\
            Name       Proto      Table      State  Since         Info\n\
            device1    Device     ---        up     04:00:21.907  \n\
            router     BGP        ---        up     04:00:23.120  Established   \n\
            backup     BGP        ---        start  04:00:21.907  Active        Socket: Connection refused\n";
        assert_eq!(
            parse_protocols(output),
            [
                BgpSession {
                    name: "router".into(),
                    state: "up".into(),
                    info: "Established".into()
                },
                BgpSession {
                    name: "backup".into(),
                    state: "start".into(),
                    info: "Active Socket: Connection refused".into()
                },
            ]
        );
    }

    #[test]
    fn the_routes_file_holds_one_blackhole_route_per_address() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/vips.conf");
        let addresses: BTreeSet<IpAddr> = ["198.18.100.10", "fd00:100::10"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        write_routes(&path, &addresses).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("route 198.18.100.10/32 blackhole;\n"),
            "{text}"
        );
        assert!(
            text.contains("route fd00:100::10/128 blackhole;\n"),
            "{text}"
        );
        assert!(!path.with_extension("tmp").exists());
    }
}
