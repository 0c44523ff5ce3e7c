//! nginx as the benchmarks' server: one process (no master, so stopping it stops all of it),
//! one worker, a fixed 5-byte answer, keep-alive without a request limit, no logs.

use std::{fs, path::Path, process::Command, process::Stdio};

use anyhow::Result;
use weir_tests::netns::Process;

/// Starts nginx with `command` (`nginx`, possibly in a namespace) listening on `listen`
/// (nginx `listen` arguments); its files go in `dir`.
pub fn start(mut command: Command, listen: &[String], dir: &Path) -> Result<Process> {
    let conf = dir.join("nginx.conf");
    let temp = dir.join("nginx-temp");
    fs::create_dir_all(&temp)?;
    let listen: String = listen.iter().map(|l| format!("listen {l}; ")).collect();
    fs::write(
        &conf,
        format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log stderr crit;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {temp}; proxy_temp_path {temp}; fastcgi_temp_path {temp};
  uwsgi_temp_path {temp}; scgi_temp_path {temp};
  server {{ {listen}location / {{ return 200 "srv1\n"; }} }}
}}
"#,
            dir = dir.display(),
            temp = temp.display()
        ),
    )?;
    Process::spawn("nginx", command.arg("-c").arg(&conf).stdout(Stdio::null()))
}
