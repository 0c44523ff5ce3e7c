//! Continuous HTTP GET load for the tests that change pools or break servers under traffic:
//! half the clients keep their connection, half open one per request, every response is
//! checked, and every failure is kept with what it was.

use std::{
    fs,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use crate::http_client::{Body, HttpConn};

/// Running load; [`HttpLoad::finish`] stops it and returns the failures.
pub struct HttpLoad {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl HttpLoad {
    /// `clients` threads sending `GET /` for `host` to `address`, from network namespace
    /// `netns` (by name) or from this one.
    pub fn start(address: SocketAddr, host: &str, clients: usize, netns: Option<&str>) -> HttpLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|client| {
                let (stop, served, errors) = (stop.clone(), served.clone(), errors.clone());
                let (host, netns) = (host.to_string(), netns.map(|n| format!("/run/netns/{n}")));
                thread::spawn(move || {
                    if let Some(netns) = netns {
                        let file = fs::File::open(&netns).expect("client netns");
                        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                            .expect("setns");
                    }
                    let keep = client % 2 == 0;
                    let mut conn: Option<HttpConn> = None;
                    while !stop.load(Ordering::Relaxed) {
                        let result = conn
                            .take()
                            .map_or_else(|| HttpConn::connect(address), Ok)
                            .and_then(|mut c| {
                                let response = c.request("GET", "/", &host, "", Body::None)?;
                                Ok((c, response))
                            });
                        match result {
                            Ok((c, response)) if response.status == 200 => {
                                served.fetch_add(1, Ordering::Relaxed);
                                // A client keeps a connection only if the server does.
                                if keep && response.header("connection") != Some("close") {
                                    conn = Some(c);
                                }
                            }
                            Ok((_, response)) => errors.lock().unwrap().push(format!(
                                "status {}: {}",
                                response.status,
                                response.text()
                            )),
                            Err(err) => errors.lock().unwrap().push(err.to_string()),
                        }
                    }
                })
            })
            .collect();
        HttpLoad {
            stop,
            served,
            errors,
            threads,
        }
    }

    /// Responses served so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Waits until `n` more responses are served.
    pub fn wait_for(&self, n: u64) {
        let target = self.served() + n;
        while self.served() < target {
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops the load; returns (responses served, failures).
    pub fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().expect("load thread");
        }
        let errors = std::mem::take(&mut *self.errors.lock().unwrap());
        (self.served.load(Ordering::Relaxed), errors)
    }
}
