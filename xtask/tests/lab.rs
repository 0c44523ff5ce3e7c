//! `cargo xtask run` as a user drives it: the lab comes up, the lines it prints work as printed,
//! and Ctrl-C leaves no namespace, process or file behind.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::Duration,
};

const LAB_DIR: &str = "/run/weir-lab";

fn sh(line: &str) -> String {
    let out = Command::new("sh").args(["-c", line]).output().unwrap();
    assert!(
        out.status.success(),
        "`{line}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn lab_namespaces() -> Vec<String> {
    sh("ip netns list")
        .lines()
        .filter(|line| line.starts_with("weir-lab-"))
        .map(str::to_string)
        .collect()
}

/// The `cargo xtask run` process; stopped with Ctrl-C (SIGINT) when dropped, so a failing
/// assertion does not leave the lab up.
struct RunningLab(Child);

impl RunningLab {
    fn interrupt(&mut self) -> ExitStatus {
        if let Ok(None) = self.0.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
        }
        self.0.wait().unwrap()
    }
}

impl Drop for RunningLab {
    fn drop(&mut self) {
        self.interrupt();
    }
}

#[test]
#[ignore = "needs root: cargo xtask run creates namespaces and attaches XDP"]
fn lab_answers_its_printed_lines_and_ctrl_c_removes_everything() {
    assert!(
        !Path::new(LAB_DIR).exists() && lab_namespaces().is_empty(),
        "a lab is already running here: stop it first (cargo xtask run --down)"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut xtask = RunningLab(
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .arg("run")
            .current_dir(root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel();
    let stdout = xtask.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut printed = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(180))
            .expect("the lab printed its guide");
        let done = line.contains("Ctrl-C here");
        printed.push(line);
        if done {
            break;
        }
    }
    let command = |needle: &str| {
        printed
            .iter()
            .map(|line| line.trim())
            .find(|line| line.contains(needle) && !line.starts_with('#'))
            .unwrap_or_else(|| panic!("no `{needle}` line in:\n{}", printed.join("\n")))
            .to_string()
    };

    assert_eq!(sh(&command("curl -s http://198.18.11.2")), "srv1\n");
    let via_vip = sh(&command("curl -s http://198.18.100.10/"));
    assert!(
        ["srv1\n", "srv2\n", "srv3\n"].contains(&via_vip.as_str()),
        "{via_vip:?}"
    );
    let via_l7 = sh(&command("curl -s -H"));
    assert!(
        ["srv1\n", "srv2\n", "srv3\n"].contains(&via_l7.as_str()),
        "{via_l7:?}"
    );
    let status = sh(&command("status --json"));
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let not_vip = status["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["reason"] == "pass_not_vip")
        .unwrap()["packets"]
        .as_u64()
        .unwrap();
    assert!(not_vip > 0, "counters did not move: {status}");
    let table = sh(&command("weir.sock status"));
    assert!(table.contains("pass_not_vip"), "{table}");
    // The maintenance lines: srv2 leaves the L4 VIP once drained, and comes back.
    assert!(sh(&command("server list")).contains("198.18.12.2:8080"));
    assert_eq!(
        sh(&command("--wait")),
        "vip demo-l4: server 198.18.12.2:8080 removed\n"
    );
    assert_eq!(
        sh(&command("server add")),
        "vip demo-l4: server 198.18.12.2:8080 added (weight 100, ready)\n"
    );

    let exit = xtask.interrupt();
    assert!(exit.success(), "xtask run exited with {exit}");
    assert!(lab_namespaces().is_empty(), "{:?} left", lab_namespaces());
    assert!(!Path::new(LAB_DIR).exists(), "{LAB_DIR} left");
    let weir = Command::new("pgrep")
        .args(["-f", "/run/weir-lab/weir.toml"])
        .output()
        .unwrap();
    assert!(weir.stdout.is_empty(), "weir still running");
}
