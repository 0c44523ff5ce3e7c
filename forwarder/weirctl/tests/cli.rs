//! Bad input at `weirctl`'s edge: each gets one clear line and a non-zero exit, and nothing
//! is sent to a daemon that a usage error would have to guess at.

use std::process::{Command, Output};

fn one_line_stderr(out: &Output) -> String {
    let stderr = String::from_utf8(out.stderr.clone()).unwrap();
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr:?}"
    );
    stderr.trim_end().to_string()
}

#[test]
fn weirctl_without_a_daemon_names_the_socket_and_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("weir.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_weirctl"))
        .args(["--socket", socket.to_str().unwrap(), "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let line = one_line_stderr(&out);
    assert_eq!(
        line,
        format!(
            "weirctl: the weir daemon is not running (nothing listens on {})",
            socket.display()
        )
    );
}

fn weirctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weirctl"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn config_check_validates_a_file_without_a_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[[l4_vip]]\nname = \"web\"\naddress = \"198.18.100.10\"\nport = 80\nprotocol = \"tcp\"\nservers = [{ address = \"198.18.11.2:80\" }]\n",
    )
    .unwrap();
    let out = weirctl(&["config", "check", good.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{}: valid (1 L4 VIP, 0 virtual hosts)", good.display())
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[l4_vip]]\nname = \"web\"\naddress = \"198.18.100.10\"\nport = 80\nprotocol = \"tcp\"\nservers = [{ address = \"198.18.11.2:80\", weight = 0 }]\n",
    )
    .unwrap();
    let out = weirctl(&["config", "check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:6:", bad.display())) && stderr.contains("weight"),
        "{stderr}"
    );
}

#[test]
fn weirctl_refuses_a_bad_address_before_asking_the_daemon() {
    let out = weirctl(&[
        "--socket",
        "/nonexistent/weir.sock",
        "server",
        "add",
        "web",
        "198.18.11.2",
    ]);
    // Usage error (2), not "daemon unreachable" (3): nothing was sent.
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid socket address"));
}

#[test]
fn weirctl_prints_shell_completions() {
    let out = weirctl(&["completions", "bash"]);
    assert!(out.status.success());
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(
        script.contains("_weirctl") && script.contains("drain"),
        "{script}"
    );
}

#[test]
fn weights_out_of_range_are_refused_before_anything_is_sent() {
    for args in [
        &["server", "weight", "web", "198.18.11.2:80", "0"][..],
        &["server", "weight", "web", "198.18.11.2:80", "10001"],
        &["server", "add", "web", "198.18.11.2:80", "--weight", "-1"],
        &["server", "add", "web", "198.18.11.2:80", "--weight=-1"],
    ] {
        let mut all = vec!["--socket", "/nonexistent/weir.sock"];
        all.extend_from_slice(args);
        let out = weirctl(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Usage error (2): the range is the real one, and no daemon was asked.
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("is not in 1..=10000"), "{args:?}: {stderr}");
    }
}

#[test]
fn a_closed_output_pipe_ends_weirctl_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weirctl"))
        .args(["completions", "bash"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The reader is gone before weirctl writes, as `| head -1` is once it has its line.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(
        out.status.code(),
        Some(101),
        "a panic's exit code: {stderr}"
    );
}

#[test]
fn help_names_what_a_pool_and_a_server_are() {
    let out = weirctl(&["server", "drain", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("<POOL>") && help.contains("an L4 VIP's or a vhost's name"),
        "{help}"
    );
    assert!(help.contains("<ADDRESS:PORT>"), "{help}");
    let out = weirctl(&["server", "--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("L4 VIPs and vhosts"));
}
