//! nginx in the benchmarks: one process (no master, so stopping it stops all of it), one
//! worker, keep-alive without a request limit, no logs. As a server it answers a fixed
//! 5-byte body (and a 64 KiB file at `/64k`); [`config`] also serves the L7 comparison's
//! upstream and its nginx proxy.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::Result;
use weir_tests::netns::Process;

/// Writes `dir/nginx.conf`: the settings every benchmark nginx shares, around `server`
/// (the `http` block's server and upstream blocks).
pub fn config(dir: &Path, server: &str) -> Result<PathBuf> {
    config_with_workers(dir, server, 1)
}

/// [`config`] with `workers` worker processes: more than one needs nginx's master process,
/// whose workers are its children (their CPU time counts with it).
pub fn config_with_workers(dir: &Path, server: &str, workers: usize) -> Result<PathBuf> {
    let processes = if workers > 1 {
        format!("master_process on;\nworker_processes {workers};")
    } else {
        "master_process off;\nworker_processes 1;".to_string()
    };
    let temp = dir.join("nginx-temp");
    fs::create_dir_all(&temp)?;
    let conf = dir.join("nginx.conf");
    fs::write(
        &conf,
        format!(
            r#"daemon off;
{processes}
pid {dir}/nginx.pid;
error_log stderr crit;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  keepalive_requests 1000000;
  client_body_temp_path {temp}; proxy_temp_path {temp}; fastcgi_temp_path {temp};
  uwsgi_temp_path {temp}; scgi_temp_path {temp};
  {server}
}}
"#,
            dir = dir.display(),
            temp = temp.display()
        ),
    )?;
    Ok(conf)
}

/// Starts nginx with `command` (`nginx`, possibly in a namespace) as the benchmarks' server,
/// listening on `listen` (nginx `listen` arguments); its files go in `dir`.
pub fn start(mut command: Command, listen: &[String], dir: &Path) -> Result<Process> {
    let www = dir.join("www");
    fs::create_dir_all(&www)?;
    fs::write(www.join("64k"), vec![b'x'; 64 * 1024])?;
    let listen: String = listen.iter().map(|l| format!("listen {l}; ")).collect();
    let conf = config(
        dir,
        &format!(
            r#"server {{ {listen}location / {{ return 200 "srv1\n"; }} location = /64k {{ root {}; }} }}"#,
            www.display()
        ),
    )?;
    Process::spawn("nginx", command.arg("-c").arg(&conf).stdout(Stdio::null()))
}
