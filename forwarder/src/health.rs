//! Active health checks. One task per checked server, on a thread and runtime of their own
//! (never on the data-plane workers, nor on the control runtime a slow map write could
//! stall), reports each transition — up after `rise` successes, down after `fall` failures —
//! to the daemon, which applies it like any other change (maps, L7 snapshot, events).
//!
//! Checks are spread: each wait is the interval ± `jitter_percent`, drawn per check, so a
//! thousand servers added at once do not probe in lockstep.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, SystemTime},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{mpsc, watch},
    task::JoinHandle,
};
use weir_config::{CheckKind, HealthCheck, control::HealthState};

/// A server to check, with the health the model gives it now.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub pool: String,
    pub address: SocketAddr,
    pub check: HealthCheck,
    pub health: HealthState,
}

/// A server's health changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub pool: String,
    pub address: SocketAddr,
    pub health: HealthState,
    /// The result of the check that decided it.
    pub reason: String,
}

/// The last check of a server, for `weirctl server list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastCheck {
    pub ok: bool,
    pub result: String,
    pub at: SystemTime,
}

/// Last checks by (pool, server).
pub type LastChecks = Arc<Mutex<HashMap<(String, SocketAddr), LastCheck>>>;

/// Consecutive results → health, with hysteresis.
#[derive(Debug, Clone)]
pub struct Verdicts {
    health: HealthState,
    successes: u32,
    failures: u32,
    rise: u32,
    fall: u32,
}

impl Verdicts {
    pub fn new(health: HealthState, rise: u32, fall: u32) -> Verdicts {
        let health = if health == HealthState::Unhealthy {
            HealthState::Unhealthy
        } else {
            HealthState::Healthy
        };
        Verdicts {
            health,
            successes: 0,
            failures: 0,
            rise,
            fall,
        }
    }

    /// Takes one result; returns the new health when it changes.
    pub fn observe(&mut self, ok: bool) -> Option<HealthState> {
        if ok {
            self.failures = 0;
            self.successes += 1;
            if self.health == HealthState::Unhealthy && self.successes >= self.rise {
                self.health = HealthState::Healthy;
                return Some(self.health);
            }
        } else {
            self.successes = 0;
            self.failures += 1;
            if self.health == HealthState::Healthy && self.failures >= self.fall {
                self.health = HealthState::Unhealthy;
                return Some(self.health);
            }
        }
        None
    }
}

/// The running checks: hand it the wanted targets after every change.
pub struct HealthChecker {
    targets: watch::Sender<Vec<Target>>,
    pub last_checks: LastChecks,
}

impl HealthChecker {
    /// Starts the checking thread; transitions arrive on `transitions`.
    pub fn start(transitions: mpsc::UnboundedSender<Transition>) -> std::io::Result<HealthChecker> {
        let (targets, wanted) = watch::channel(Vec::new());
        let last_checks = LastChecks::default();
        let checks = Arc::clone(&last_checks);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        thread::Builder::new()
            .name("weir-health".to_string())
            .spawn(move || runtime.block_on(reconcile(wanted, transitions, checks)))?;
        Ok(HealthChecker {
            targets,
            last_checks,
        })
    }

    /// Checks exactly `targets` from now on: new ones start, gone or changed ones stop.
    pub fn set_targets(&self, targets: Vec<Target>) {
        self.targets.send_if_modified(|current| {
            let changed = *current != targets;
            *current = targets;
            changed
        });
    }
}

/// Keeps one task per wanted target until the daemon goes away.
async fn reconcile(
    mut wanted: watch::Receiver<Vec<Target>>,
    transitions: mpsc::UnboundedSender<Transition>,
    last_checks: LastChecks,
) {
    let mut running: HashMap<(String, SocketAddr), (HealthCheck, JoinHandle<()>)> = HashMap::new();
    loop {
        let targets = wanted.borrow_and_update().clone();
        let keys: Vec<(String, SocketAddr)> = targets
            .iter()
            .map(|t| (t.pool.clone(), t.address))
            .collect();
        running.retain(|key, (check, task)| {
            let keep = targets
                .iter()
                .any(|t| (&t.pool, t.address) == (&key.0, key.1) && t.check == *check);
            if !keep {
                task.abort();
                last_checks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(key);
            }
            keep
        });
        for (target, key) in targets.into_iter().zip(keys) {
            if running.contains_key(&key) {
                continue;
            }
            let check = target.check.clone();
            let task = tokio::spawn(check_loop(
                target,
                transitions.clone(),
                Arc::clone(&last_checks),
            ));
            running.insert(key, (check, task));
        }
        if wanted.changed().await.is_err() {
            return;
        }
    }
}

async fn check_loop(
    target: Target,
    transitions: mpsc::UnboundedSender<Transition>,
    last_checks: LastChecks,
) {
    let check = &target.check;
    let mut verdicts = Verdicts::new(target.health, check.rise, check.fall);
    loop {
        tokio::time::sleep(jittered(check)).await;
        let result = probe(target.address, check).await;
        let (ok, text) = match &result {
            Ok(text) => (true, text.clone()),
            Err(text) => (false, text.clone()),
        };
        last_checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                (target.pool.clone(), target.address),
                LastCheck {
                    ok,
                    result: text.clone(),
                    at: SystemTime::now(),
                },
            );
        if let Some(health) = verdicts.observe(ok) {
            let reason = match health {
                HealthState::Unhealthy => {
                    format!("{} failed checks in a row, last: {text}", check.fall)
                }
                _ => format!("{} good checks in a row, last: {text}", check.rise),
            };
            let transition = Transition {
                pool: target.pool.clone(),
                address: target.address,
                health,
                reason,
            };
            if transitions.send(transition).is_err() {
                return;
            }
        }
    }
}

/// The interval ± jitter, drawn afresh each time.
fn jittered(check: &HealthCheck) -> Duration {
    let interval = check.interval_ms as f64;
    let spread = interval * f64::from(check.jitter_percent) / 100.0;
    let offset = if spread > 0.0 {
        (fastrand::f64() * 2.0 - 1.0) * spread
    } else {
        0.0
    };
    Duration::from_micros(((interval + offset) * 1000.0).max(1000.0) as u64)
}

/// One check of `address`: `Ok(what was seen)` or `Err(why it failed)`.
pub async fn probe(address: SocketAddr, check: &HealthCheck) -> Result<String, String> {
    let timeout = Duration::from_millis(check.timeout_ms);
    match tokio::time::timeout(timeout, probe_inner(address, check)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {} ms", check.timeout_ms)),
    }
}

async fn probe_inner(address: SocketAddr, check: &HealthCheck) -> Result<String, String> {
    let mut stream = TcpStream::connect(address)
        .await
        .map_err(|err| format!("connect: {err}"))?;
    if check.kind == CheckKind::Tcp {
        return Ok("connected".to_string());
    }
    let host = check.host.clone().unwrap_or_else(|| address.to_string());
    let request = format!(
        "{} {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: weir-health-check\r\nConnection: close\r\n\r\n",
        check.method, check.path
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|err| format!("send: {err}"))?;
    // Read the head and up to 64 KiB of body (or to the end, if shorter).
    let mut response = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    while response.len() < 64 * 1024 {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|err| format!("receive: {err}"))?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&chunk[..n]);
        if check.body_contains.is_none() && response.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(&response) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err("not an HTTP response".to_string()),
    };
    let status = parsed.code.unwrap_or_default();
    let (low, high) = check.expect_status;
    if !(low..=high).contains(&status) {
        return Err(format!("status {status}, expected {low}-{high}"));
    }
    if let Some(wanted) = &check.body_contains {
        let body = String::from_utf8_lossy(&response[head_len..]);
        if !body.contains(wanted.as_str()) {
            return Err(format!("status {status}, body without `{wanted}`"));
        }
    }
    Ok(format!("status {status}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_changes_only_after_rise_or_fall_results_in_a_row() {
        let mut v = Verdicts::new(HealthState::Healthy, 2, 3);
        // Failures interrupted by a success never add up.
        for ok in [false, false, true, false, false, true] {
            assert_eq!(v.observe(ok), None);
        }
        assert_eq!(v.observe(false), None);
        assert_eq!(v.observe(false), None);
        assert_eq!(v.observe(false), Some(HealthState::Unhealthy));
        assert_eq!(v.observe(false), None);
        assert_eq!(v.observe(true), None);
        assert_eq!(v.observe(false), None);
        assert_eq!(v.observe(true), None);
        assert_eq!(v.observe(true), Some(HealthState::Healthy));
        assert_eq!(v.observe(true), None);
    }

    #[test]
    fn jitter_stays_within_its_share_of_the_interval() {
        let check = HealthCheck {
            interval_ms: 1000,
            jitter_percent: 10,
            ..HealthCheck::default()
        };
        for _ in 0..1000 {
            let wait = jittered(&check).as_millis();
            assert!((900..=1100).contains(&wait), "{wait}");
        }
    }

    #[tokio::test]
    async fn probes_tell_up_from_down_by_connect_status_and_body() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let head = String::from_utf8_lossy(&buf[..n]).to_string();
                    let answer = if head.starts_with("GET /down ") {
                        "HTTP/1.1 503 Unavailable\r\nContent-Length: 4\r\n\r\ndown"
                    } else {
                        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nready"
                    };
                    let _ = s.write_all(answer.as_bytes()).await;
                });
            }
        });
        let http = |path: &str, body: Option<&str>| HealthCheck {
            kind: CheckKind::Http,
            path: path.to_string(),
            body_contains: body.map(str::to_string),
            ..HealthCheck::default()
        };
        assert_eq!(
            probe(address, &HealthCheck::default()).await,
            Ok("connected".into())
        );
        assert_eq!(
            probe(address, &http("/", None)).await,
            Ok("status 200".into())
        );
        assert_eq!(
            probe(address, &http("/", Some("ready"))).await,
            Ok("status 200".into())
        );
        assert!(
            probe(address, &http("/", Some("nope")))
                .await
                .unwrap_err()
                .contains("body without")
        );
        assert!(
            probe(address, &http("/down", None))
                .await
                .unwrap_err()
                .contains("status 503")
        );
        // Nothing listens there any more.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(
            probe(closed, &HealthCheck::default())
                .await
                .unwrap_err()
                .starts_with("connect:")
        );
    }
}
