//! nginx as the benchmarks' server: one process (no master, so stopping it stops all of it),
//! one worker, a fixed 5-byte answer (and a 64 KiB file at `/64k`), keep-alive without a
//! request limit, no logs.

use std::{fs, path::Path, process::Command, process::Stdio};

use anyhow::Result;
use weir_tests::netns::Process;

/// Starts nginx with `command` (`nginx`, possibly in a namespace) listening on `listen`
/// (nginx `listen` arguments); its files go in `dir`.
pub fn start(mut command: Command, listen: &[String], dir: &Path) -> Result<Process> {
    let conf = dir.join("nginx.conf");
    let temp = dir.join("nginx-temp");
    fs::create_dir_all(&temp)?;
    let www = dir.join("www");
    fs::create_dir_all(&www)?;
    fs::write(www.join("64k"), vec![b'x'; 64 * 1024])?;
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
  sendfile on;
  server {{ {listen}location / {{ return 200 "srv1\n"; }} location = /64k {{ root {www}; }} }}
}}
"#,
            dir = dir.display(),
            temp = temp.display(),
            www = www.display()
        ),
    )?;
    Process::spawn("nginx", command.arg("-c").arg(&conf).stdout(Stdio::null()))
}
