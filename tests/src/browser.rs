//! A headless Chromium (Debian's `chromium`) in a test namespace, driven over the DevTools
//! protocol: load a page, evaluate JavaScript in it, take a screenshot. What the dashboard
//! test needs to check the page a person would see, live, without reloading it.
//!
//! Chromium and its helpers run in a process group of their own, killed as a whole when the
//! [`Browser`] drops, so a failing test leaves no browser behind.

use std::{
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use base64::Engine;
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket, stream::MaybeTlsStream};

use crate::netns::{Netns, Process};

/// Where the DevTools endpoint listens, on the namespace's own loopback.
const DEVTOOLS: &str = "127.0.0.1:9222";
/// How long one DevTools call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Browser {
    page: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    process: Process,
}

impl Browser {
    /// Starts Chromium in `netns` with its profile in `profile` (created), a 1400×1000
    /// window, and connects to its blank page.
    pub fn launch(netns: &Netns, profile: &Path) -> Result<Browser> {
        std::fs::create_dir_all(profile)?;
        let log = std::fs::File::create(profile.join("chromium.log"))?;
        let mut command = netns.command("chromium");
        command
            .args([
                "--headless=new",
                // As root, Chromium runs only without its sandbox; the page is our own.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                "--window-size=1400,1000",
                "--remote-debugging-port=9222",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            // Its singleton socket goes in a directory of the temporary directory, removed
            // only by a clean exit; killed, it would leave one in /tmp per run. In the
            // profile it goes with the test's own directory.
            .env("TMPDIR", profile)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0);
        let process = Process::spawn("chromium", &mut command)?;
        let devtools: SocketAddr = DEVTOOLS.parse()?;
        netns
            .wait_for_listener(devtools, Duration::from_secs(30))
            .context("Chromium's DevTools endpoint")?;
        // Chromium's DevTools HTTP endpoint answers HTTP/1.1 only: asked with curl.
        let list = netns
            .command("curl")
            .args(["-sf", &format!("http://{DEVTOOLS}/json/list")])
            .output()?;
        anyhow::ensure!(list.status.success(), "curl /json/list: {}", list.status);
        let targets: Value = serde_json::from_slice(&list.stdout)?;
        let page = netns.run(|| -> Result<_> {
            let url = targets
                .as_array()
                .and_then(|t| t.iter().find(|t| t["type"] == "page"))
                .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                .context("no page target in /json/list")?
                .to_string();
            let (socket, _) = tungstenite::connect(url)?;
            if let MaybeTlsStream::Plain(stream) = socket.get_ref() {
                stream.set_read_timeout(Some(CALL_TIMEOUT))?;
            }
            Ok(socket)
        })??;
        Ok(Browser {
            page,
            next_id: 0,
            process,
        })
    }

    /// Calls a DevTools method on the page and returns its result.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let request = json!({ "id": id, "method": method, "params": params });
        self.page.send(Message::text(request.to_string()))?;
        let deadline = Instant::now() + CALL_TIMEOUT;
        while Instant::now() < deadline {
            let Message::Text(text) = self.page.read()? else {
                continue;
            };
            let message: Value = serde_json::from_str(&text)?;
            // Events (no id) and answers to earlier calls are not ours.
            if message["id"] != id {
                continue;
            }
            if let Some(error) = message.get("error") {
                bail!("{method}: {error}");
            }
            return Ok(message["result"].clone());
        }
        bail!("{method}: no answer within {CALL_TIMEOUT:?}")
    }

    pub fn navigate(&mut self, url: &str) -> Result<()> {
        self.call("Page.navigate", json!({ "url": url }))?;
        Ok(())
    }

    /// The value of `expression` in the page (JSON-serializable values only).
    pub fn eval(&mut self, expression: &str) -> Result<Value> {
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
        )?;
        if let Some(exception) = result.get("exceptionDetails") {
            bail!("{expression}: {exception}");
        }
        Ok(result["result"]["value"].clone())
    }

    /// Evaluates `expression` until `done` accepts its value, for up to `timeout`. An
    /// expression that throws (the page is still loading) is tried again.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        expression: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.eval(expression) {
                Ok(value) if done(&value) => return Ok(value),
                Ok(value) => value.to_string(),
                Err(err) => err.to_string(),
            };
            if Instant::now() >= deadline {
                bail!("timed out after {timeout:?} waiting for {what}; last: {last}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A PNG of the whole page, written to `path`.
    pub fn screenshot(&mut self, path: &Path) -> Result<()> {
        let result = self.call(
            "Page.captureScreenshot",
            json!({ "format": "png", "captureBeyondViewport": true }),
        )?;
        let data = result["data"].as_str().context("no screenshot data")?;
        let png = base64::engine::general_purpose::STANDARD.decode(data)?;
        std::fs::write(path, png)?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Asked to stop, Chromium ends and reaps its helpers (zygote, renderer, GPU); any
        // that outlive it are in its process group.
        let group = nix::unistd::Pid::from_raw(self.process.pid() as i32);
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGTERM);
        let _ = self.process.wait_exit(Duration::from_secs(5));
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    }
}
