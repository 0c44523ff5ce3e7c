//! A running lab: the [`Topology`], a demo backend in every server namespace and the `weir`
//! daemon in the balancer namespace. Used by the e2e tests and by `cargo xtask run`; dropping
//! it stops the processes, unpins the datapath and removes the namespaces.
//!
//! The daemon pins its datapath in a bpffs the lab mounts in its own directory rather than in
//! `/sys/fs/bpf`: `ip netns exec` gives the daemon a fresh `/sys`, where a bpffs would die
//! with the daemon's mount namespace — and restarts are exactly what the pins are for.
//! Unmounting it at the end frees every pinned map and link at once.

use std::{
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use weir_config::control::StatusReport;

use crate::{
    netns::{Netns, Process, wait_until},
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
        Lab::start_in(Topology::new(prefix, servers)?, dir, xdp_mode, |config| {
            config
        })
    }

    /// Like [`Lab::start`] on a topology the caller built (and may have added to), with the
    /// lab's config passed through `edit` before `weir` first reads it.
    pub fn start_in(
        topology: Topology,
        dir: &Path,
        xdp_mode: &str,
        edit: impl FnOnce(String) -> String,
    ) -> Result<Lab> {
        let servers = topology.servers.len();
        fs::create_dir_all(dir)?;
        mount_bpffs(&dir.join("bpf"))?;
        let mut backends = Vec::with_capacity(servers);
        for i in 1..=servers {
            backends.push(spawn_backend(&topology, i)?);
        }
        fs::write(
            dir.join("weir.toml"),
            edit(topology::weir_config(&topology, dir, xdp_mode)),
        )?;
        let weir = spawn_weir(&topology.balancer, dir, &[], None)?;
        let mut lab = Lab {
            weir,
            backends,
            topology,
            dir: dir.to_path_buf(),
        };
        lab.wait_for_weir()?;
        for (i, server) in lab.topology.servers.iter().enumerate() {
            server.wait_for_listener(topology::server_socket(i + 1), Duration::from_secs(5))?;
        }
        Ok(lab)
    }

    /// Runs `weirctl ARGS` against the lab's daemon and fails the test unless it succeeds;
    /// returns what it printed.
    pub fn weirctl_ok(&self, args: &[&str]) -> String {
        weirctl_ok(&self.socket(), args)
    }

    /// Stops demo backend `i` (1-based), as a crashed server would: its sockets close.
    pub fn stop_backend(&mut self, i: usize) {
        self.backends[i - 1].kill();
    }

    /// Starts demo backend `i` again; returns once it accepts connections.
    pub fn start_backend(&mut self, i: usize) -> Result<()> {
        self.backends[i - 1] = spawn_backend(&self.topology, i)?;
        self.topology.servers[i - 1]
            .wait_for_listener(topology::server_socket(i), Duration::from_secs(5))
    }

    /// Kills `weir` with SIGKILL (no clean-up of any kind) and waits until it is gone.
    pub fn kill_weir(&mut self) {
        self.weir.kill();
    }

    /// Starts `weir` again with the same config; returns once it answers. A daemon still
    /// running is killed first (see [`Lab::replace_weir`]).
    pub fn restart_weir(&mut self) -> Result<()> {
        self.restart_weir_with_env(&[])
    }

    /// Like [`Lab::restart_weir`], with extra environment variables for the daemon.
    pub fn restart_weir_with_env(&mut self, env: &[(&str, &Path)]) -> Result<()> {
        self.replace_weir(|lab| spawn_weir(&lab.topology.balancer, &lab.dir, env, None))
    }

    /// Starts weir again with its open-descriptor limit (soft, hard) set to `limit`, as a
    /// service manager would.
    pub fn restart_weir_with_descriptor_limit(&mut self, limit: (u64, u64)) -> Result<()> {
        self.replace_weir(|lab| spawn_weir(&lab.topology.balancer, &lab.dir, &[], Some(limit)))
    }

    /// Kills the running daemon (SIGKILL, as a crash would) and waits until it is gone, then
    /// starts the next with `spawn` and returns once it answers. The old one must be gone
    /// first: the next would otherwise find it holding the state file's lock and refuse to run.
    fn replace_weir(&mut self, spawn: impl FnOnce(&Lab) -> Result<Process>) -> Result<()> {
        self.weir.kill();
        self.weir = spawn(self)?;
        self.wait_for_weir()
    }

    /// Stops `weir` as a service manager does — SIGTERM, then waits for it to exit (its L7
    /// connections finish first) — and says how it exited.
    pub fn terminate_weir(&mut self) -> Result<std::process::ExitStatus> {
        self.weir.terminate()
    }

    /// Starts `weir` from `command` (the whole command line: see
    /// [`crate::supervisor::Supervisor::command`]), its output appended to the lab's log;
    /// returns once it answers. A daemon still running is killed first (see
    /// [`Lab::replace_weir`]).
    pub fn start_weir_from(&mut self, mut command: Command) -> Result<()> {
        log_output_to(&mut command, &self.dir)?;
        self.replace_weir(|_| Process::spawn("weir", &mut command))
    }

    /// Starts `command` — a `weir upgrade` — and waits for the daemon it takes over from to
    /// stop by itself; returns that one's exit status once the new one answers.
    pub fn take_over_weir(&mut self, mut command: Command) -> Result<std::process::ExitStatus> {
        log_output_to(&mut command, &self.dir)?;
        let next = Process::spawn("weir", &mut command)?;
        let mut previous = std::mem::replace(&mut self.weir, next);
        let status = previous.wait_exit(Duration::from_secs(60))?;
        self.wait_for_weir()?;
        Ok(status)
    }

    /// The running daemon's process id.
    pub fn weir_pid(&self) -> u32 {
        self.weir.pid()
    }

    fn wait_for_weir(&mut self) -> Result<()> {
        wait_for_weir(&mut self.weir, &self.dir)
    }

    pub fn config(&self) -> PathBuf {
        self.dir.join("weir.toml")
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("weir.sock")
    }

    /// `weirctl status --json`, parsed.
    pub fn status(&self) -> Result<StatusReport> {
        status(&self.socket())
    }

    /// A `weirctl` command aimed at this lab's daemon.
    pub fn weirctl(&self) -> Command {
        weirctl(&self.socket())
    }

    /// The daemon's log so far (for failure messages).
    pub fn log(&self) -> String {
        log(&self.dir)
    }
}

// A daemon's files, for the lab and for every node of a [`crate::fleet::Fleet`]: its config
// `weir.toml`, control socket `weir.sock` and log `weir.log`, all in one directory.

/// A `weirctl` command aimed at the daemon listening on `socket`.
pub fn weirctl(socket: &Path) -> Command {
    let mut cmd = Command::new(workspace_bin("weirctl"));
    cmd.arg("--socket").arg(socket);
    cmd
}

/// Runs `weirctl ARGS` against the daemon on `socket` and fails the test unless it succeeds;
/// returns what it printed.
pub fn weirctl_ok(socket: &Path, args: &[&str]) -> String {
    let out = weirctl(socket).args(args).output().expect("weirctl runs");
    assert!(
        out.status.success(),
        "weirctl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `weirctl status --json` from the daemon on `socket`, parsed.
pub fn status(socket: &Path) -> Result<StatusReport> {
    let out = weirctl(socket)
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

/// The log so far of the daemon whose files are in `dir` (for failure messages).
pub fn log(dir: &Path) -> String {
    fs::read_to_string(dir.join("weir.log")).unwrap_or_default()
}

/// Waits until `weir`, whose files are in `dir`, answers on its socket; fails with its log if
/// it exits or does not answer in time.
pub fn wait_for_weir(weir: &mut Process, dir: &Path) -> Result<()> {
    let socket = dir.join("weir.sock");
    let ready = wait_until(
        "weir to answer on its socket",
        Duration::from_secs(15),
        || weir.check_running().is_err() || status(&socket).is_ok(),
    );
    if let Err(err) = weir.check_running().and(ready) {
        bail!("{err}; weir.log:\n{}", log(dir));
    }
    Ok(())
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.weir.kill();
        unmount_bpffs(&self.dir.join("bpf"));
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Sends `command`'s output (stdout and stderr) to the end of the daemon's log in `dir`.
fn log_output_to(command: &mut Command, dir: &Path) -> Result<()> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("weir.log"))?;
    command.stdout(log.try_clone()?).stderr(log);
    Ok(())
}

/// Starts `weir` in `netns` with the config in `dir`, appending to its log there.
pub fn spawn_weir(
    netns: &Netns,
    dir: &Path,
    env: &[(&str, &Path)],
    descriptor_limit: Option<(u64, u64)>,
) -> Result<Process> {
    let mut command = netns.command(workspace_bin("weir"));
    command
        .arg("--config")
        .arg(dir.join("weir.toml"))
        .envs(env.iter().copied());
    log_output_to(&mut command, dir)?;
    if let Some((soft, hard)) = descriptor_limit {
        // SAFETY: only setrlimit, async-signal-safe, between fork and exec.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    Process::spawn("weir", &mut command)
}

/// Demo backend `i` (1-based) in its server namespace.
fn spawn_backend(topology: &Topology, i: usize) -> Result<Process> {
    let name = format!("srv{i}");
    Process::spawn(
        &name,
        topology.servers[i - 1]
            .command(workspace_bin("weir-demo-backend"))
            .args(topology::backend_args(&name))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

pub fn mount_bpffs(dir: &Path) -> Result<()> {
    unmount_bpffs(dir);
    fs::create_dir_all(dir)?;
    nix::mount::mount(
        Some("bpf"),
        dir,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mount bpffs on {}", dir.display()))
}

/// Unmounts the bpffs on `dir`, which unpins (and so detaches and frees) all it holds.
pub fn unmount_bpffs(dir: &Path) {
    while nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH).is_ok() {}
}
