//! End-to-end: several weir nodes behind a BGP ECMP router (the lab of `weir_tests::fleet`:
//! a router running BIRD with multipath and 5-tuple hashing, three nodes each with weir and its
//! own BIRD, three servers on a shared LAN, direct server return). Thirty long-lived
//! connections exchange verified data the whole time, while:
//! - two nodes serve: the router has the VIP via both, and both carry traffic;
//! - a third node joins: the router re-hashes, some connections now arrive at the new node,
//!   which has no flow entry for them, and Maglev sends each to the server it already had;
//! - a node is drained with `weirctl node drain`: its route is withdrawn, its connections go on
//!   through the others;
//! - a node is lost outright (weir and BIRD killed, its link down): the router drops it after
//!   the BGP hold time, and its connections go on the same way;
//! - the drained node is put back with `weirctl node undrain`.
//!
//! Not one connection may break, and every node reports the same Maglev table digest. The
//! convergence times it prints are the ones `docs/operations.md` quotes.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use weir_tests::{
    client::EchoConnection,
    fleet::{Fleet, VIP},
    netns::wait_until,
};

/// Connections kept open through every change.
const CONNECTIONS: usize = 30;
/// How long one exchange may wait: longer than a lost node's hold time (3 s) plus the TCP
/// retransmission that follows the withdrawal.
const PATIENCE: Duration = Duration::from_secs(20);

/// The long-lived connections, each exchanging on its own thread until stopped.
struct Exchanges {
    stop: Arc<AtomicBool>,
    rounds: Arc<Vec<AtomicU64>>,
    threads: Vec<JoinHandle<Result<(), String>>>,
}

impl Exchanges {
    fn start(connections: Vec<EchoConnection>) -> Exchanges {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds: Arc<Vec<AtomicU64>> =
            Arc::new((0..connections.len()).map(|_| AtomicU64::new(0)).collect());
        let threads = connections
            .into_iter()
            .enumerate()
            .map(|(i, mut connection)| {
                let (stop, rounds) = (stop.clone(), rounds.clone());
                std::thread::spawn(move || {
                    connection
                        .set_timeout(PATIENCE)
                        .map_err(|e| e.to_string())?;
                    while !stop.load(Ordering::Relaxed) {
                        connection.exchange().map_err(|err| {
                            format!(
                                "connection {i} (server {}) broke after {} exchanges: {err}",
                                connection.server, connection.round
                            )
                        })?;
                        rounds[i].fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Ok(())
                })
            })
            .collect();
        Exchanges {
            stop,
            rounds,
            threads,
        }
    }

    /// Waits until every connection has completed another exchange since this call; fails
    /// naming the connections that broke.
    fn all_progress(&mut self, when: &str) {
        let before: Vec<u64> = self
            .rounds
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .collect();
        let progressed = wait_until(when, PATIENCE + Duration::from_secs(5), || {
            self.rounds
                .iter()
                .zip(&before)
                .all(|(now, before)| now.load(Ordering::Relaxed) > *before)
        });
        if let Err(err) = progressed {
            let now: Vec<u64> = self
                .rounds
                .iter()
                .map(|r| r.load(Ordering::Relaxed))
                .collect();
            eprintln!("rounds before {before:?}\nrounds now    {now:?}");
            self.stop.store(true, Ordering::Relaxed);
            let broken: Vec<String> = std::mem::take(&mut self.threads)
                .into_iter()
                .filter_map(|t| t.join().expect("exchange thread").err())
                .collect();
            panic!("{err}: {broken:#?}");
        }
    }

    /// Stops every connection; the exchanges they completed.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let broken: Vec<String> = std::mem::take(&mut self.threads)
            .into_iter()
            .filter_map(|t| t.join().expect("exchange thread").err())
            .collect();
        assert!(broken.is_empty(), "{broken:#?}");
        self.rounds.iter().map(|r| r.load(Ordering::Relaxed)).sum()
    }
}

/// Waits until the router forwards the VIP to exactly `nodes`; how long that took.
fn until_next_hops(fleet: &Fleet, nodes: &[usize], what: &str) -> Duration {
    let started = Instant::now();
    wait_until(what, Duration::from_secs(20), || {
        fleet.router_next_hops().ok().as_deref() == Some(nodes)
    })
    .unwrap_or_else(|err| {
        panic!(
            "{err}: next hops {:?}\nrouter protocols:\n{}",
            fleet.router_next_hops(),
            fleet.router_bird.birdc(&["show", "protocols"])
        )
    });
    started.elapsed()
}

/// Packets node `k` forwarded to the VIP's servers so far.
fn packets(fleet: &Fleet, k: usize) -> u64 {
    fleet.nodes[k - 1].vip()["traffic"]["packets"]
        .as_u64()
        .expect("traffic.packets")
}

/// The Maglev table digest node `k` reports for the VIP.
fn digest(fleet: &Fleet, k: usize) -> String {
    fleet.nodes[k - 1].vip()["table_digest"]
        .as_str()
        .expect("table_digest")
        .to_string()
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP, runs weir and BIRD"]
fn dsr_connections_survive_nodes_joining_drained_and_lost() {
    let tag = format!("weirt-{}-fleet", std::process::id());
    let dir = std::env::temp_dir().join(&tag);
    let mut fleet = Fleet::new(&format!("{tag}-"), &dir, 3, 3).expect("fleet");
    for k in [1, 2] {
        let node = &mut fleet.nodes[k - 1];
        node.start()
            .unwrap_or_else(|err| panic!("node {k}: {err:#}"));
    }
    let took = until_next_hops(&fleet, &[1, 2], "the VIP via nodes 1 and 2");
    println!("two nodes announced {took:?} after their speakers started");
    assert_eq!(digest(&fleet, 1), digest(&fleet, 2), "the nodes' tables");

    let connections = fleet.from_client(|| {
        (0..CONNECTIONS)
            .map(|_| EchoConnection::open(VIP))
            .collect::<std::io::Result<Vec<_>>>()
    });
    let connections = connections.unwrap_or_else(|err| {
        panic!(
            "{err}\nnode 1:\n{}\nnode 2:\n{}",
            fleet.nodes[0].log(),
            fleet.nodes[1].log()
        )
    });
    let servers: std::collections::BTreeSet<&str> =
        connections.iter().map(|c| c.server.as_str()).collect();
    println!("{CONNECTIONS} connections over servers {servers:?}");
    let mut exchanges = Exchanges::start(connections);
    exchanges.all_progress("every connection exchanging through two nodes");
    for k in [1, 2] {
        assert!(packets(&fleet, k) > 0, "node {k} carries some of the flows");
    }

    // A third node joins: the connections the router moves to it keep their servers.
    let started = Instant::now();
    fleet.nodes[2].start().expect("node 3 starts");
    until_next_hops(&fleet, &[1, 2, 3], "the VIP via three nodes");
    println!(
        "node 3 in the router's route {:?} after it started",
        started.elapsed()
    );
    exchanges.all_progress("every connection exchanging after node 3 joined");
    exchanges.all_progress("every connection exchanging after node 3 joined");
    assert!(
        packets(&fleet, 3) > 0,
        "some established connections now arrive through node 3"
    );
    let tables: Vec<String> = (1..=3).map(|k| digest(&fleet, k)).collect();
    assert!(tables.iter().all(|t| *t == tables[0]), "{tables:?}");

    // Node 1 drained: withdrawn, and its connections go on through nodes 2 and 3.
    let started = Instant::now();
    fleet.nodes[0].weirctl_ok(&["node", "drain"]);
    until_next_hops(&fleet, &[2, 3], "node 1's route withdrawn after node drain");
    let drain_took = started.elapsed();
    println!("node 1 out of the router's route {drain_took:?} after `weirctl node drain`");
    assert!(drain_took < Duration::from_secs(5), "{drain_took:?}");
    exchanges.all_progress("every connection exchanging after node 1 drained");
    let node1 = packets(&fleet, 1);
    exchanges.all_progress("every connection exchanging again");
    assert_eq!(
        packets(&fleet, 1),
        node1,
        "nothing arrives through a drained node"
    );

    // Node 2 lost: weir and BIRD killed, its link down. The router notices by itself.
    let started = Instant::now();
    // The link first, so not even the kernel's FIN of BIRD's session gets out.
    fleet.nodes[1]
        .netns
        .ip(&["link", "set", "eth0", "down"])
        .expect("node 2's link down");
    fleet.nodes[1].kill();
    until_next_hops(&fleet, &[3], "node 2's route gone after it was lost");
    let loss_took = started.elapsed();
    println!("node 2 out of the router's route {loss_took:?} after it was lost");
    exchanges.all_progress("every connection exchanging through node 3 alone");
    exchanges.all_progress("every connection exchanging through node 3 alone");

    // Node 1 back in service.
    fleet.nodes[0].weirctl_ok(&["node", "undrain"]);
    let took = until_next_hops(&fleet, &[1, 3], "node 1's route back after undrain");
    println!("node 1 back in the router's route {took:?} after `weirctl node undrain`");
    exchanges.all_progress("every connection exchanging through nodes 1 and 3");

    let rounds = exchanges.stop();
    println!("{rounds} exchanges, 0 connections broken");
}
