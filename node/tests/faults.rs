//! Faults on real processes (issue 14): an exit killed by SIGKILL, a relay killed and restarted
//! on its identity and port, an exit killed while its backend holds a request. Exits and
//! relays run as `tokengo` processes on loopback and are killed by PID; the client runs in
//! this process. Outcomes and counts are asserted (which exit served a request, how often each
//! backend saw it); conditions are awaited with deadlines, and the times measured are printed,
//! never asserted.
// Its helpers are plain functions, outside what clippy counts as tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    net::UdpSocket,
    time::{Duration, Instant},
};

use common::{Backend, Process};
use tokengo::transport::RelayAddr;

/// How long a condition may take before the test fails. On main these faults cost 30 s (the
/// QUIC idle timeout); the fixed node needs about a second.
const DEADLINE: Duration = Duration::from_secs(12);

/// A `tokengo exit` process registered with `relay`, calling `backend`.
struct ExitProcess {
    process: Process,
    peer_id: String,
    _dir: tempfile::TempDir,
}

async fn start_exit_process(relay: &RelayAddr, backend: &Backend) -> ExitProcess {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().display().to_string();
    let relay = relay.to_string();
    let mut process = Process::start(&[
        "exit",
        "--relay",
        &relay,
        "--backend",
        &backend.url,
        "--data-dir",
        &data_dir,
        "--worker-threads",
        "1",
    ]);
    let line = process.line_after("exit ").await;
    let peer_id = line
        .split_whitespace()
        .next()
        .expect("exit printed its PeerId")
        .to_owned();
    ExitProcess {
        process,
        peer_id,
        _dir: dir,
    }
}

/// Kills a child by its PID with SIGKILL (no chance to say goodbye) and waits until it is gone.
async fn kill(process: &mut Process) {
    let pid = process.child.id().expect("the process runs");
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -KILL {pid}");
    process.child.wait().await.unwrap();
}

/// A free UDP port on loopback (for a relay that must come back on the same one).
fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `tokengo relay` process on `port` with its identity in `dir`.
async fn start_relay_process(dir: &std::path::Path, port: u16) -> (Process, RelayAddr) {
    let listen = format!("127.0.0.1:{port}");
    let data_dir = dir.display().to_string();
    let mut process = Process::start(&[
        "relay",
        "--listen",
        &listen,
        "--data-dir",
        &data_dir,
        "--worker-threads",
        "1",
    ]);
    let addr = process.line_after("relay listening on ").await;
    (process, addr.trim().parse().unwrap())
}

/// POSTs chat completion number `n` (its number in the query, so each backend's record says
/// which requests reached it) and returns the status and JSON body.
async fn chat(http: &reqwest::Client, url: &str, n: usize) -> (u16, serde_json::Value) {
    let sent = http
        .post(format!("{url}/v1/chat/completions?n={n}"))
        .json(&serde_json::json!({
            "model": "test",
            "messages": [{"role": "user", "content": "hello"}],
        }))
        .send()
        .await;
    match sent {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.json().await.unwrap_or_default())
        }
        Err(error) => (
            0,
            serde_json::json!({ "transport_error": error.to_string() }),
        ),
    }
}

/// How often request `n` reached `backend`.
fn seen(backend: &Backend, n: usize) -> usize {
    let target = format!("/v1/chat/completions?n={n}");
    backend
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.target == target)
        .count()
}

/// An HTTP client whose requests give up after [`DEADLINE`]: a request that hangs fails the
/// test instead of holding it.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(DEADLINE)
        .build()
        .unwrap()
}

/// Waits until `relay` lists `count` exits.
async fn wait_for_exits(relay: &common::RelayHandle, count: usize) {
    let mut exits = relay.registry.subscribe();
    tokio::time::timeout(DEADLINE, exits.wait_for(|n| *n == count))
        .await
        .expect("exits registered")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_killed_mid_traffic_is_dropped_and_the_next_request_succeeds_on_the_other() {
    common::init();
    let limits = common::limits();
    let relay = common::start_relay(&limits, None).await;
    let backends = [
        common::start_recording_backend(Duration::ZERO).await,
        common::start_recording_backend(Duration::ZERO).await,
    ];
    let mut exits = [
        start_exit_process(&relay.addr, &backends[0]).await,
        start_exit_process(&relay.addr, &backends[1]).await,
    ];
    wait_for_exits(&relay, 2).await;
    let client = common::start_client(&relay.addr, &limits).await;
    let http = http();

    // Traffic until a request lands on each exit; the last one's exit is killed.
    let mut n = 0;
    let victim = loop {
        n += 1;
        let (status, body) = chat(&http, &client.url, n).await;
        assert_eq!(status, 200, "before the kill: {body}");
        let served: Vec<usize> = (0..2).filter(|&i| seen(&backends[i], n) == 1).collect();
        assert_eq!(served.len(), 1, "request {n} reached exactly one backend");
        let used = |i: usize| (1..=n).any(|m| seen(&backends[i], m) > 0);
        if n >= 4 && used(0) && used(1) {
            break served[0];
        }
        assert!(n < 200, "the client never used both exits");
    };
    let survivor = 1 - victim;
    kill(&mut exits[victim].process).await;
    let killed = Instant::now();

    // The next request succeeds, on the other exit; so do the ones after it.
    n += 1;
    let first_after = n;
    let (status, body) = chat(&http, &client.url, n).await;
    let first_answer = killed.elapsed();
    assert_eq!(status, 200, "the request after the kill: {body}");
    assert_eq!(seen(&backends[survivor], n), 1);
    for _ in 0..20 {
        n += 1;
        let (status, body) = chat(&http, &client.url, n).await;
        assert_eq!(status, 200, "request {n} after the kill: {body}");
        assert_eq!(seen(&backends[survivor], n), 1);
    }
    // The relay drops the dead exit.
    let mut count = relay.registry.subscribe();
    tokio::time::timeout(DEADLINE, count.wait_for(|n| *n == 1))
        .await
        .expect("the relay dropped the dead exit")
        .unwrap();
    let dropped = killed.elapsed();
    assert!(
        !relay
            .registry
            .contains(&exits[victim].peer_id.parse().unwrap())
    );

    // Every request reached a backend exactly once.
    for m in 1..=n {
        assert_eq!(
            seen(&backends[0], m) + seen(&backends[1], m),
            1,
            "request {m} reached the backends once"
        );
    }
    println!(
        "exit SIGKILL: first request after the kill (#{first_after}) answered {:.0} ms after the kill; relay dropped the exit after {:.0} ms",
        first_answer.as_secs_f64() * 1e3,
        dropped.as_secs_f64() * 1e3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restarted_on_its_identity_and_port_serves_again_within_seconds() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    let (mut relay, addr) = start_relay_process(dir.path(), port).await;
    let backend = common::start_recording_backend(Duration::ZERO).await;
    let _exit = start_exit_process(&addr, &backend).await;
    let client = common::start_client(&addr, &common::limits()).await;
    let http = http();
    let mut n = 1;
    let (status, body) = chat(&http, &client.url, n).await;
    assert_eq!(status, 200, "before the restart: {body}");

    kill(&mut relay).await;
    let (_relay, again) = start_relay_process(dir.path(), port).await;
    assert_eq!(again, addr, "same identity, same port");
    let restarted = Instant::now();

    // Requests until one succeeds: the exit and the client must notice the new relay.
    let mut failures = 0;
    let recovered = loop {
        n += 1;
        let (status, _) = chat(&http, &client.url, n).await;
        if status == 200 {
            break restarted.elapsed();
        }
        failures += 1;
        assert!(
            restarted.elapsed() < DEADLINE,
            "no request succeeded within {DEADLINE:?} of the relay's restart"
        );
        tokio::task::yield_now().await;
    };
    for _ in 0..5 {
        n += 1;
        let (status, body) = chat(&http, &client.url, n).await;
        assert_eq!(status, 200, "after recovery: {body}");
    }
    // No request reached the backend twice; every success reached it once.
    for m in 1..=n {
        assert!(
            seen(&backend, m) <= 1,
            "request {m} reached the backend twice"
        );
    }
    println!(
        "relay SIGKILL + restart: service back {:.0} ms after the relay was up again ({failures} requests failed meanwhile)",
        recovered.as_secs_f64() * 1e3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_exit_accepted_is_never_sent_again_and_the_user_is_told_why() {
    common::init();
    let limits = common::limits();
    let relay = common::start_relay(&limits, None).await;
    // Backends that hold every request: the exit has surely passed it on when it dies.
    let backends = [
        common::start_recording_backend(Duration::from_secs(600)).await,
        common::start_recording_backend(Duration::from_secs(600)).await,
    ];
    let mut exits = [
        start_exit_process(&relay.addr, &backends[0]).await,
        start_exit_process(&relay.addr, &backends[1]).await,
    ];
    wait_for_exits(&relay, 2).await;
    let client = common::start_client(&relay.addr, &limits).await;
    let http = http();
    let url = client.url.clone();
    let request = tokio::spawn(async move { chat(&http, &url, 1).await });
    // Wait until a backend holds the request, then kill its exit.
    let holder = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Some(i) = (0..2).find(|&i| seen(&backends[i], 1) == 1) {
                return i;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("a backend got the request");
    kill(&mut exits[holder].process).await;
    let (status, body) = request.await.unwrap();
    assert_eq!(status, 502, "{body}");
    assert_eq!(
        body["error"]["code"], "exit_failed_after_accepting",
        "{body}"
    );
    assert_eq!(seen(&backends[holder], 1), 1);
    assert_eq!(
        seen(&backends[1 - holder], 1),
        0,
        "a request that may have reached a backend is not sent to another"
    );
}
