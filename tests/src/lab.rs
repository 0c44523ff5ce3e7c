//! A running lab: the [`Topology`], a demo backend in every server namespace and the `weir`
//! daemon in the balancer namespace. Used by the e2e tests and by `cargo xtask run`; dropping
//! it stops the processes and removes the namespaces.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use weir_config::control::StatusReport;

use crate::{
    netns::{Process, wait_until},
    topology::{self, Topology},
    workspace_bin,
};

pub struct Lab {
    // Field order is drop order: processes stop before their namespaces go.
    pub weir: Process,
    pub backends: Vec<Process>,
    pub topology: Topology,
    /// Holds the config, the control socket and the daemon's log.
    pub dir: PathBuf,
}

impl Lab {
    /// Builds the topology named by `prefix` with `servers` demo backends, writes the config
    /// into `dir` and starts `weir`; returns once `weirctl status` answers.
    pub fn start(prefix: &str, servers: usize, dir: &Path, xdp_mode: &str) -> Result<Lab> {
        let topology = Topology::new(prefix, servers)?;
        fs::create_dir_all(dir)?;
        let mut backends = Vec::with_capacity(servers);
        for (i, ns) in topology.servers.iter().enumerate() {
            let i = i + 1;
            let name = format!("srv{i}");
            backends.push(Process::spawn(
                &name,
                ns.command(workspace_bin("weir-demo-backend"))
                    .args(topology::backend_args(&name))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            )?);
        }
        let socket = dir.join("weir.sock");
        let config = dir.join("weir.toml");
        fs::write(&config, topology::weir_config(&topology, &socket, xdp_mode))?;
        let log = fs::File::create(dir.join("weir.log"))?;
        let weir = Process::spawn(
            "weir",
            topology
                .balancer
                .command(workspace_bin("weir"))
                .arg("--config")
                .arg(&config)
                .stdout(log.try_clone()?)
                .stderr(log),
        )?;
        let mut lab = Lab {
            weir,
            backends,
            topology,
            dir: dir.to_path_buf(),
        };
        let ready = wait_until(
            "weir to answer on its socket",
            Duration::from_secs(15),
            || lab.weir.check_running().is_err() || lab.status().is_ok(),
        );
        if let Err(err) = lab.weir.check_running().and(ready) {
            bail!("{err}; weir.log:\n{}", lab.log());
        }
        for (i, server) in lab.topology.servers.iter().enumerate() {
            let addr = topology::server_socket(i + 1);
            wait_until(&format!("backend {addr}"), Duration::from_secs(5), || {
                server
                    .run(|| std::net::TcpStream::connect(addr).is_ok())
                    .unwrap_or(false)
            })?;
        }
        Ok(lab)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("weir.sock")
    }

    /// `weirctl status --json`, parsed.
    pub fn status(&self) -> Result<StatusReport> {
        let out = self
            .weirctl()
            .args(["status", "--json"])
            .stderr(Stdio::piped())
            .output()?;
        if !out.status.success() {
            bail!(
                "weirctl status: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).context("weirctl status --json output")
    }

    /// A `weirctl` command aimed at this lab's daemon.
    pub fn weirctl(&self) -> Command {
        let mut cmd = Command::new(workspace_bin("weirctl"));
        cmd.arg("--socket").arg(self.socket());
        cmd
    }

    /// The daemon's log so far (for failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("weir.log")).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}
