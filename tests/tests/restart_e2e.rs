//! End-to-end: restarts and an upgrade of the daemon under load refuse nothing, on either plane.
//!
//! The daemon runs under the tests' own service manager (`weir_tests::supervisor`), which
//! restarts it as `systemctl restart` would: SIGTERM, wait for the exit, start again with the
//! listening sockets the stopping daemon left in the descriptor store. Meanwhile HTTP clients
//! (kept-alive and one connection per request) go through the L7 vhost and long-lived
//! connections exchange verified data through an L4 VIP; every client-side error is counted.
//! A daemon killed outright is started again as `Restart=on-failure` would, and the
//! connections made while none ran are served by the next one.

use std::{
    fs,
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use weir_tests::{
    client::EchoConnection,
    lab::Lab,
    load::HttpLoad,
    supervisor::Supervisor,
    topology::{ECHO_PORT, L4_VIP, L7_VIP},
    workspace_bin,
};

const RESTARTS: usize = 10;
const LONG_LIVED: usize = 6;

/// Long-lived echo connections through the L4 VIP, each checking every exchange.
struct LongLived {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl LongLived {
    fn start(netns: &str) -> LongLived {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..LONG_LIVED)
            .map(|_| {
                let (stop, rounds, errors) = (stop.clone(), rounds.clone(), errors.clone());
                let netns = format!("/run/netns/{netns}");
                thread::spawn(move || {
                    let file = fs::File::open(&netns).expect("client netns");
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                    let echo = SocketAddr::new(L4_VIP.into(), ECHO_PORT);
                    let mut connection = match EchoConnection::open(echo) {
                        Ok(c) => c,
                        Err(err) => return errors.lock().unwrap().push(format!("open: {err}")),
                    };
                    while !stop.load(Ordering::Relaxed) {
                        if let Err(err) = connection.exchange() {
                            return errors.lock().unwrap().push(format!(
                                "long-lived connection to {} broke in round {}: {err}",
                                connection.server, connection.round
                            ));
                        }
                        rounds.fetch_add(1, Ordering::Relaxed);
                        thread::sleep(Duration::from_millis(50));
                    }
                })
            })
            .collect();
        LongLived {
            stop,
            rounds,
            errors,
            threads,
        }
    }

    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().expect("long-lived thread");
        }
        let errors = std::mem::take(&mut *self.errors.lock().unwrap());
        (self.rounds.load(Ordering::Relaxed), errors)
    }
}

/// Pins a map under the name of one an earlier version pinned and this one retired
/// (`names::RETIRED_MAPS`), in the lab's pin directory under `dir`; returns its path.
fn pin_a_retired_map(dir: &Path) -> PathBuf {
    let name = weir_common::names::RETIRED_MAPS[0];
    let path = dir.join("bpf/weir/maps").join(name);
    let map = aya::maps::Array::<aya::maps::MapData, u64>::create(1, 0).expect("a map");
    map.pin(&path)
        .expect("pinned where the daemon pins its maps");
    path
}

/// Waits (bounded) until `load` has served `n` more responses.
fn served_more(load: &HttpLoad, n: u64, what: &str) {
    let target = load.served() + n;
    let deadline = Instant::now() + Duration::from_secs(20);
    while load.served() < target {
        assert!(Instant::now() < deadline, "no traffic served {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// The load's and the long-lived connections' verdict: no request failed, none broke.
fn nothing_failed(served: u64, errors: &[String], broken: &[String]) {
    assert!(
        errors.is_empty(),
        "{} of {} HTTP requests failed, first: {:?}",
        errors.len(),
        served as usize + errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(broken.is_empty(), "{broken:?}");
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn restarts_and_an_upgrade_under_load_refuse_nothing() {
    let tag = format!("weirt-{}-restart", std::process::id());
    // From now on the daemon is the supervisor's service.
    let (mut lab, mut supervisor) = supervised_lab(&tag);
    let dir = lab.dir.clone();
    let weir = workspace_bin("weir");
    start_supervised(&mut lab, &mut supervisor, &weir, "the first start");

    let client = lab.topology.client.name().to_string();
    let l7 = SocketAddr::new(L7_VIP.into(), 80);
    let load = HttpLoad::start(l7, "demo.weir.test", 4, Some(&client));
    let long_lived = LongLived::start(&client);
    served_more(&load, 200, "before the first restart");

    // A binary other than the running one, for the upgrade.
    let upgraded = dir.join("weir-upgraded");
    fs::copy(&weir, &upgraded).unwrap();
    fs::set_permissions(&upgraded, fs::Permissions::from_mode(0o755)).unwrap();
    let mut retired = None;
    for round in 0..=RESTARTS {
        let binary = if round == RESTARTS { &upgraded } else { &weir };
        let status = lab.terminate_weir().expect("SIGTERM");
        if round == RESTARTS {
            // The upgrade comes from a version that pinned a map this one no longer has.
            retired = Some(pin_a_retired_map(&dir));
        }
        assert!(status.success(), "round {round}: weir exited {status}");
        supervisor.collect().expect("notifications");
        assert_eq!(
            supervisor.stored(),
            2,
            "round {round}: the L7 sockets (2 workers × 1 address) are in the store"
        );
        start_supervised(&mut lab, &mut supervisor, binary, &format!("round {round}"));
        served_more(&load, 100, &format!("after restart {round}"));
    }
    let status = lab.status().expect("status");
    assert!(status.daemon.adopted_datapath);
    let retired = retired.expect("the upgrade round ran");
    assert!(
        !retired.exists(),
        "the upgraded daemon left {} pinned",
        retired.display()
    );

    let (served, errors) = load.finish();
    let (rounds, broken) = long_lived.finish();
    let log = lab.log();
    nothing_failed(served, &errors, &broken);
    assert!(
        rounds > (LONG_LIVED * 20) as u64,
        "only {rounds} long-lived rounds"
    );
    assert_eq!(
        log.matches("L7 listening sockets taken over").count(),
        RESTARTS + 1,
        "every start took the sockets over:\n{log}"
    );
    eprintln!(
        "{served} requests and {rounds} long-lived rounds over {} restarts",
        RESTARTS + 1
    );
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn upgrades_by_hand_under_load_refuse_nothing() {
    let tag = format!("weirt-{}-upgrade", std::process::id());
    let dir = std::env::temp_dir().join(&tag);
    let mut lab = Lab::start(&format!("{tag}-"), 2, &dir, "native").expect("lab starts");
    let config = lab.config();
    let config = config.to_str().unwrap().to_string();
    let client = lab.topology.client.name().to_string();
    let load = HttpLoad::start(
        SocketAddr::new(L7_VIP.into(), 80),
        "demo.weir.test",
        4,
        Some(&client),
    );
    let long_lived = LongLived::start(&client);
    served_more(&load, 200, "before the first upgrade");

    let weir = workspace_bin("weir");
    let upgraded = dir.join("weir-upgraded");
    fs::copy(&weir, &upgraded).unwrap();
    fs::set_permissions(&upgraded, fs::Permissions::from_mode(0o755)).unwrap();
    for round in 0..3 {
        let binary = if round % 2 == 0 { &upgraded } else { &weir };
        let previous = lab.weir_pid();
        let mut command = lab.topology.balancer.command(binary);
        command.args(["upgrade", "--config", &config]);
        let status = lab
            .take_over_weir(command)
            .unwrap_or_else(|err| panic!("round {round}: weir upgrade: {err}\n{}", lab.log()));
        assert!(
            status.success(),
            "round {round}: the previous daemon exited {status}"
        );
        let now = lab.status().expect("status").daemon.pid;
        assert_ne!(now, previous, "round {round}: a new daemon answers");
        served_more(&load, 100, &format!("after upgrade {round}"));
    }

    let (served, errors) = load.finish();
    let (rounds, broken) = long_lived.finish();
    nothing_failed(served, &errors, &broken);
    let log = lab.log();
    assert_eq!(
        log.matches("handed over to the next daemon").count(),
        3,
        "each previous daemon handed over:\n{log}"
    );
    eprintln!("{served} requests and {rounds} long-lived rounds over 3 upgrades by hand");
}

/// How long the supervisor waits before starting a daemon that died (the unit's `RestartSec=`).
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// Connections opened while no daemon runs, each with its request sent.
const WHILE_DOWN: usize = 8;

/// A lab whose daemon is to run under the tests' service manager: the lab's own first
/// daemon is stopped, and [`start_supervised`] starts the next.
fn supervised_lab(tag: &str) -> (Lab, Supervisor) {
    let dir = std::env::temp_dir().join(tag);
    let mut lab = Lab::start(&format!("{tag}-"), 2, &dir, "native").expect("lab starts");
    let supervisor = Supervisor::new(&dir.join("notify.sock")).expect("supervisor");
    lab.terminate_weir().expect("the first daemon stops");
    (lab, supervisor)
}

/// Starts `binary` (a `weir`) as the supervisor's service, with the descriptors in its store.
fn start_supervised(lab: &mut Lab, supervisor: &mut Supervisor, binary: &Path, what: &str) {
    supervisor.collect().expect("notifications");
    let config = lab.config();
    let command = supervisor.command(
        &lab.topology.balancer,
        binary,
        &["--config", config.to_str().unwrap()],
    );
    lab.start_weir_from(command)
        .unwrap_or_else(|err| panic!("{what}: weir starts: {err}\n{}", lab.log()));
    supervisor.collect().expect("notifications");
}

/// Opens a connection to `address` from the lab's client and sends a request on it that
/// asks the server to close; the connection is returned unread.
fn request_unanswered(lab: &Lab, address: SocketAddr) -> io::Result<TcpStream> {
    lab.topology
        .client
        .run(|| {
            let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
            stream.write_all(
                b"GET / HTTP/1.1\r\nHost: demo.weir.test\r\nConnection: close\r\n\r\n",
            )?;
            Ok(stream)
        })
        .expect("the client's namespace")
}

/// The status line of the response waiting on `stream`.
fn status_line(mut stream: TcpStream) -> io::Result<String> {
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.lines().next().unwrap_or("").to_string())
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn a_crash_under_a_service_manager_refuses_nothing() {
    let tag = format!("weirt-{}-crash", std::process::id());
    let (mut lab, mut supervisor) = supervised_lab(&tag);
    start_supervised(
        &mut lab,
        &mut supervisor,
        &workspace_bin("weir"),
        "the first start",
    );
    assert_eq!(
        supervisor.stored(),
        2,
        "the L7 sockets (2 workers × 1 address) are in the store while the daemon runs"
    );
    let l7 = SocketAddr::new(L7_VIP.into(), 80);
    let load = HttpLoad::start(l7, "demo.weir.test", 2, Some(lab.topology.client.name()));
    served_more(&load, 100, "before the crash");
    // Requests under way when the daemon dies die with it; these are not counted.
    let (served_before, _) = load.finish();

    lab.kill_weir();
    // No daemon runs: the store's sockets take these connections into their backlogs.
    let waiting: Vec<TcpStream> = (0..WHILE_DOWN)
        .map(|i| {
            request_unanswered(&lab, l7).unwrap_or_else(|err| {
                panic!("connection {i} while no daemon runs: {err}\n{}", lab.log())
            })
        })
        .collect();
    std::thread::sleep(RESTART_DELAY);
    start_supervised(
        &mut lab,
        &mut supervisor,
        &workspace_bin("weir"),
        "the start after the crash",
    );
    for (i, stream) in waiting.into_iter().enumerate() {
        let status = status_line(stream)
            .unwrap_or_else(|err| panic!("connection {i} made while down: {err}\n{}", lab.log()));
        assert_eq!(
            status, "HTTP/1.1 200 OK",
            "connection {i} made while no daemon ran"
        );
    }
    let load = HttpLoad::start(l7, "demo.weir.test", 2, Some(lab.topology.client.name()));
    served_more(&load, 100, "after the crash");
    let (served_after, errors) = load.finish();
    nothing_failed(served_after, &errors, &[]);
    let log = lab.log();
    assert_eq!(
        log.matches("L7 listening sockets taken over").count(),
        1,
        "the start after the crash took the sockets over:\n{log}"
    );
    eprintln!(
        "{served_before} requests before the crash, {WHILE_DOWN} made while down and served, \
         {served_after} after"
    );
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn a_listener_dropped_from_the_config_leaves_the_store() {
    let tag = format!("weirt-{}-dropped", std::process::id());
    let (mut lab, mut supervisor) = supervised_lab(&tag);
    let config = fs::read_to_string(lab.config()).expect("the lab's config");
    let vhost = "[[vhost]]\nname = \"demo-l7\"\n";
    assert!(config.contains(vhost), "the lab's config has its vhost");
    let second = format!(
        "[[vhost]]\nname = \"second\"\nlisten = \"{L7_VIP}:8080\"\nhosts = [\"second.weir.test\"]\n\
         servers = [{{ address = \"{}\" }}]\n\n{vhost}",
        weir_tests::topology::server_socket(1)
    );
    fs::write(lab.config(), config.replace(vhost, &second)).expect("config with two listeners");
    start_supervised(
        &mut lab,
        &mut supervisor,
        &workspace_bin("weir"),
        "with two listeners",
    );
    assert_eq!(
        supervisor.stored(),
        4,
        "2 workers × 2 addresses in the store"
    );
    let second = SocketAddr::new(L7_VIP.into(), 8080);
    request_unanswered(&lab, second).expect("the second listener answers");

    fs::write(lab.config(), &config).expect("config without the second listener");
    let status = lab.terminate_weir().expect("SIGTERM");
    assert!(status.success(), "weir exited {status}");
    start_supervised(
        &mut lab,
        &mut supervisor,
        &workspace_bin("weir"),
        "with one listener",
    );
    assert_eq!(
        supervisor.stored(),
        2,
        "only the configured address's sockets stay in the store"
    );
    let refused = request_unanswered(&lab, second);
    assert_eq!(
        refused.as_ref().map_err(io::Error::kind).err(),
        Some(io::ErrorKind::ConnectionRefused),
        "a connection to the dropped listener is refused, not left waiting: {refused:?}"
    );
    let served = request_unanswered(&lab, SocketAddr::new(L7_VIP.into(), 80))
        .and_then(status_line)
        .expect("the remaining listener answers");
    assert_eq!(served, "HTTP/1.1 200 OK");
    let log = lab.log();
    assert!(
        log.contains("an inherited listening socket is no longer configured: closed"),
        "{log}"
    );
}
