//! The control socket's server side: permissions, framing, and refusal of bad requests, driven
//! by a real Unix socket and the same client `weirctl` uses.

use std::{
    io::{BufRead, BufReader, Write},
    os::{
        fd::OwnedFd,
        unix::{fs::PermissionsExt, net::UnixStream},
    },
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use weir_config::control::{self, ControlError, ControlErrorKind, Request, Response, StatusReport};
use weir_control::{Client, HandOver, bind, serve, take_over};

/// The sockets the test server hands over.
static LISTENERS: std::sync::LazyLock<Vec<std::net::TcpListener>> =
    std::sync::LazyLock::new(|| {
        (0..2)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect()
    });

/// Serves the socket at `path` on a background runtime with a handler that counts calls.
fn start_server(path: &Path) -> Arc<AtomicUsize> {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let handed = Arc::clone(&calls);
    let path = path.to_path_buf();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = bind(&path).unwrap();
            ready_tx.send(()).unwrap();
            serve(
                listener,
                Arc::new(move |request: Request| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    match request {
                        Request::Status => Response::Status(StatusReport {
                            daemon: control::DaemonStatus {
                                pid: 1,
                                version: "test".into(),
                                config: "test.toml".into(),
                                uptime_secs: 0,
                                state_file: "state.json".into(),
                                bpf_dir: "/sys/fs/bpf/test".into(),
                                adopted_datapath: false,
                                reloads: Default::default(),
                                node: Default::default(),
                            },
                            xdp: vec![],
                            counters: vec![],
                            flows: Default::default(),
                            listeners: vec![],
                            certificates: vec![],
                        }),
                        _ => Response::Changed(vec![]),
                    }
                }),
                Arc::new(HandOver {
                    // Two real listening sockets, as the L7 workers would hand over.
                    sockets: Box::new(move || {
                        LISTENERS
                            .iter()
                            .map(|l| l.try_clone().map(OwnedFd::from))
                            .collect()
                    }),
                    sent: Box::new(move || {
                        handed.fetch_add(1, Ordering::SeqCst);
                    }),
                }),
            )
            .await;
        });
    });
    ready_rx.recv().unwrap();
    calls
}

fn raw_exchange(path: &Path, line: &[u8]) -> String {
    let mut stream = UnixStream::connect(path).unwrap();
    stream.write_all(line).unwrap();
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).unwrap();
    answer
}

fn refusal(answer: &str) -> ControlError {
    let envelope: control::ResponseEnvelope = serde_json::from_str(answer).unwrap();
    match envelope.result {
        Response::Error(err) => err,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn socket_is_private_and_serves_the_weirctl_client() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/weir.sock");
    let calls = start_server(&path);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let dir_mode = std::fs::metadata(path.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);

    let mut client = Client::connect(&path).unwrap();
    for _ in 0..3 {
        assert!(matches!(
            client.request(Request::Status).unwrap(),
            Response::Status(_)
        ));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[test]
fn malformed_unknown_and_oversized_requests_are_refused_without_reaching_the_handler() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weir.sock");
    let calls = start_server(&path);

    let err = refusal(&raw_exchange(&path, b"{\"version\":1,\"request\":\n"));
    assert_eq!(err.kind, ControlErrorKind::BadRequest);
    let err = refusal(&raw_exchange(
        &path,
        b"{\"version\":1,\"request\":{\"command\":\"self_destruct\"}}\n",
    ));
    assert_eq!(err.kind, ControlErrorKind::BadRequest);
    assert!(err.message.contains("self_destruct"), "{}", err.message);
    let err = refusal(&raw_exchange(
        &path,
        b"{\"version\":2,\"request\":{\"command\":\"status\"}}\n",
    ));
    assert_eq!(err.kind, ControlErrorKind::UnsupportedVersion);
    let mut huge = vec![b'x'; control::MAX_REQUEST_BYTES + 10];
    huge.push(b'\n');
    let err = refusal(&raw_exchange(&path, &huge));
    assert_eq!(err.kind, ControlErrorKind::BadRequest);
    assert!(err.message.contains("longer than"), "{}", err.message);

    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[test]
fn a_second_daemon_does_not_steal_a_live_socket_but_replaces_a_stale_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weir.sock");
    let _calls = start_server(&path);
    let err = bind(&path).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);

    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async { bind(&stale).expect("stale socket replaced") });
}

#[test]
fn a_hand_over_passes_the_listening_sockets_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weir.sock");
    let calls = start_server(&path);
    let sockets = take_over(&path).expect("the server hands over");
    assert_eq!(sockets.len(), 2);
    for (fd, original) in sockets.into_iter().zip(LISTENERS.iter()) {
        let received = std::net::TcpListener::from(fd);
        // The same socket: same address, and a connection to it is accepted through the copy.
        assert_eq!(
            received.local_addr().unwrap(),
            original.local_addr().unwrap()
        );
        let _client = std::net::TcpStream::connect(original.local_addr().unwrap()).unwrap();
        received.set_nonblocking(false).unwrap();
        let (_accepted, _) = received
            .accept()
            .expect("accepted through the handed-over socket");
    }
    // The server says so right after sending; give its thread a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while calls.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the daemon was told the sockets went"
    );
}
