//! Issue 16: a relay run as replicas that share one identity behind one DNS name (in
//! Kubernetes a Deployment whose pods mount one identity Secret, named by a headless Service
//! with one A record per ready pod). Three `tokengo relay` processes listen on 127.0.0.1,
//! 127.0.0.2 and 127.0.0.3 on the same UDP port, reading their identity from one read-only
//! key directory (`--keys-dir`) with an empty data directory each. The exit runs in this
//! process, given the name, which `resolve::FixedTable` (a stand-in for the DNS server: the
//! system resolver cannot be made to answer three addresses for one loopback name) resolves
//! to the three addresses; its keys come from a read-only key directory too.
//!
//! The clients are spread over the replicas as a Service spreads UDP flows: client `i` talks
//! to replica `i`. (The client keeps one link per relay identity, so three addresses of one
//! relay given to one client would be one link: a real client reaches the replicas through
//! the Service's one address, and the Service, not the client, picks the replica. That part,
//! moving a terminating pod's flows elsewhere, is kube-proxy's and is not reproduced: the
//! client of a stopped replica stops sending new requests when it is stopped, and what is
//! asserted is the node's part.)
//!
//! Asserted: the exit registers with all three replicas; a name that stops resolving drops
//! no tunnel; a replica stopped as Kubernetes
//! deletes a pod (SIGTERM, graceful drain; its address leaves the name at the same time)
//! costs no request, neither those in flight through it nor any other; the exit drops that
//! member and adds it again when a replica is back at that address. Measured and printed,
//! never asserted: what a SIGKILL of one replica costs.
// Its helpers are plain functions, outside what clippy counts as tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr, UdpSocket},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::Process;
use tokengo::{
    exit::Exit, identity, keyring, keys::KeySource, resolve::FixedTable, status::ExitStatus,
    transport::RelayAddr,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long a condition may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(30);
/// The name the replicas are known by.
const NAME: &str = "edge-relay-pods.test";
/// Concurrent requests each client keeps going.
const WORKERS: usize = 3;
/// How long the backend takes per request: long enough that requests are in flight when a
/// replica is stopped.
const BACKEND_DELAY: Duration = Duration::from_millis(150);

/// The replicas' addresses.
fn replica_ips() -> [IpAddr; 3] {
    ["127.0.0.1", "127.0.0.2", "127.0.0.3"].map(|ip| ip.parse().unwrap())
}

/// A UDP port free on all three addresses.
fn shared_free_port() -> u16 {
    for _ in 0..100 {
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if replica_ips()
            .iter()
            .all(|ip| UdpSocket::bind(SocketAddr::new(*ip, port)).is_ok())
        {
            return port;
        }
    }
    panic!("no UDP port free on 127.0.0.1-3");
}

/// A `tokengo relay` replica at `ip:port`, its identity read from `keys`, its data directory
/// new and empty (a pod's emptyDir). Returns the process, the address it printed and the data
/// directory.
async fn start_replica(
    keys: &Path,
    ip: IpAddr,
    port: u16,
) -> (Process, RelayAddr, tempfile::TempDir) {
    let data = tempfile::tempdir().unwrap();
    let listen = SocketAddr::new(ip, port).to_string();
    let mut process = Process::start(&[
        "relay",
        "--listen",
        &listen,
        "--keys-dir",
        &keys.display().to_string(),
        "--data-dir",
        &data.path().display().to_string(),
        "--worker-threads",
        "1",
    ]);
    let addr = process.line_after("relay listening on ").await;
    (process, addr.trim().parse().unwrap(), data)
}

/// Sends `signal` (`TERM`, `KILL`) to a child by its PID.
fn signal(process: &Process, signal: &str) {
    let pid = process.child.id().expect("the process runs");
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// The file names in `dir`.
fn listing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// What the clients' requests came to, per client.
#[derive(Debug, Default)]
struct Outcomes {
    ok: [AtomicUsize; 3],
    failed: Mutex<Vec<(usize, u16, String)>>,
    in_flight: [AtomicUsize; 3],
}

impl Outcomes {
    fn ok(&self, client: usize) -> usize {
        self.ok[client].load(Ordering::SeqCst)
    }

    fn failed(&self) -> Vec<(usize, u16, String)> {
        self.failed.lock().unwrap().clone()
    }

    fn failed_of(&self, client: usize) -> usize {
        self.failed().iter().filter(|f| f.0 == client).count()
    }
}

/// Keeps [`WORKERS`] requests of client `index` going until `stop`; while `paused` is true
/// it starts none (requests in flight go on).
fn drive(
    index: usize,
    url: String,
    outcomes: Arc<Outcomes>,
    paused: watch::Receiver<bool>,
    stop: CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(90))
        .build()
        .unwrap();
    (0..WORKERS)
        .map(|worker| {
            let (http, url, outcomes, mut paused, stop) = (
                http.clone(),
                url.clone(),
                Arc::clone(&outcomes),
                paused.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut n = 0;
                loop {
                    // Counted before the pause is read: once the test has paused the client,
                    // every request still to be sent is counted, or never sent.
                    outcomes.in_flight[index].fetch_add(1, Ordering::SeqCst);
                    if *paused.borrow() || stop.is_cancelled() {
                        outcomes.in_flight[index].fetch_sub(1, Ordering::SeqCst);
                        tokio::select! {
                            () = stop.cancelled() => return,
                            ready = paused.wait_for(|p| !p) => if ready.is_err() { return },
                        }
                        continue;
                    }
                    n += 1;
                    let sent = http
                        .post(format!(
                            "{url}/v1/chat/completions?c={index}&w={worker}&n={n}"
                        ))
                        .json(&serde_json::json!({
                            "model": "test",
                            "messages": [{"role": "user", "content": "hello"}],
                        }))
                        .send()
                        .await;
                    let (status, body) = match sent {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            (status, response.text().await.unwrap_or_default())
                        }
                        Err(error) => (0, error.to_string()),
                    };
                    outcomes.in_flight[index].fetch_sub(1, Ordering::SeqCst);
                    if status == 200 {
                        outcomes.ok[index].fetch_add(1, Ordering::SeqCst);
                    } else {
                        outcomes.failed.lock().unwrap().push((index, status, body));
                    }
                }
            })
        })
        .collect()
}

/// Polls `check` until it holds; fails the test after [`DEADLINE`] naming `what`.
async fn until(what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

/// The addresses the exit's tunnels to the name resolved to, and whether each is registered.
fn members(status: &ExitStatus) -> Vec<(String, bool)> {
    let mut found: Vec<(String, bool)> = status
        .relays
        .iter()
        .map(|r| (r.resolved.clone().unwrap_or_default(), r.registered))
        .collect();
    found.sort();
    found
}

/// `(address, true)` for each of `ips` at `port`.
fn registered_at(ips: &[IpAddr], port: u16) -> Vec<(String, bool)> {
    let mut want: Vec<(String, bool)> = ips
        .iter()
        .map(|ip| (SocketAddr::new(*ip, port).to_string(), true))
        .collect();
    want.sort();
    want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_keeps_a_tunnel_to_every_replica_of_a_named_relay_and_a_drained_one_costs_nothing()
{
    common::init();
    let ips = replica_ips();
    let port = shared_free_port();

    // One identity for every replica, in a key directory they only read.
    let relay_keys = tempfile::tempdir().unwrap();
    let relay_identity = libp2p_identity::Keypair::generate_ed25519();
    identity::write_new(
        &relay_keys
            .path()
            .join(tokengo_proto::data_dir::RELAY_IDENTITY_FILE),
        &relay_identity,
    )
    .unwrap();
    let relay_peer = relay_identity.public().to_peer_id();
    let keys_before = listing(relay_keys.path());
    let mut replicas = Vec::new();
    for ip in ips {
        let (process, addr, data) = start_replica(relay_keys.path(), ip, port).await;
        assert_eq!(addr, RelayAddr::new(SocketAddr::new(ip, port), relay_peer));
        replicas.push((Some(process), addr, data));
    }
    for (_, _, data) in &replicas {
        assert_eq!(listing(data.path()), BTreeSet::new(), "nothing to write");
    }

    // The exit, given the name, with its keys in a read-only key directory.
    let table = Arc::new(FixedTable::new());
    table.set(NAME, &ips);
    let exit_keys = tempfile::tempdir().unwrap();
    identity::write_new(
        &exit_keys
            .path()
            .join(tokengo_proto::data_dir::EXIT_IDENTITY_FILE),
        &libp2p_identity::Keypair::generate_ed25519(),
    )
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    keyring::save_new(
        &keyring::Keyring::generate(1, now).unwrap(),
        &exit_keys
            .path()
            .join(tokengo_proto::data_dir::EXIT_KEYRING_FILE),
    )
    .unwrap();
    let exit_keys_before = listing(exit_keys.path());
    let backend = common::start_recording_backend(BACKEND_DELAY).await;
    let limits = common::limits();
    let mut exit = Exit::load_from(
        &KeySource::ReadOnly(exit_keys.path().to_path_buf()),
        &common::backend_config(&backend.url, Duration::from_secs(30)),
        limits.clone(),
    )
    .unwrap();
    // Resolved again often, so a replica that is back is found within the test's patience.
    exit.set_resolver(
        Arc::clone(&table) as Arc<dyn tokengo::resolve::Resolve>,
        Duration::from_millis(300),
    );
    let name: RelayAddr = format!("/dns4/{NAME}/udp/{port}/quic-v1/p2p/{relay_peer}")
        .parse()
        .unwrap();
    let (registered_tx, registered) = watch::channel(false);
    let probe = exit.probe_all(registered_tx.subscribe());
    let stop_exit = CancellationToken::new();
    let exit_task = tokio::spawn(exit.run(name.clone(), registered_tx, stop_exit.clone()));
    let status = || probe.status(None);
    let took = until("the exit registers with all three replicas", || {
        members(&status()) == registered_at(&ips, port)
    })
    .await;
    let listed = status();
    assert!(listed.registered && *registered.borrow());
    assert_eq!(listed.relay, name.to_string(), "the name, once");
    assert!(
        listed.relays.iter().all(|r| r.address == name.to_string()),
        "each tunnel is listed with the name: {:?}",
        listed.relays
    );
    println!(
        "exit registered with 3 replicas behind {NAME} in {:.0} ms",
        took.as_secs_f64() * 1e3
    );

    // Clients spread over the replicas, each with continuous requests.
    let outcomes = Arc::new(Outcomes::default());
    let stop_traffic = CancellationToken::new();
    let mut clients = Vec::new();
    let mut pauses = Vec::new();
    let mut workers = Vec::new();
    for (index, (_, addr, _)) in replicas.iter().enumerate() {
        let client = common::start_client(addr, &limits).await;
        let (pause, paused) = watch::channel(false);
        workers.extend(drive(
            index,
            client.url.clone(),
            Arc::clone(&outcomes),
            paused,
            stop_traffic.clone(),
        ));
        clients.push(client);
        pauses.push(pause);
    }
    until("every client has answers", || {
        (0..3).all(|c| outcomes.ok(c) >= 10)
    })
    .await;
    assert_eq!(outcomes.failed(), Vec::new(), "before any replica stops");

    // The name stops resolving (a DNS outage): three failed resolutions later, every tunnel
    // is still there and nothing failed.
    let lookups = table.lookups();
    table.set(NAME, &[]);
    until("the exit tries to resolve the name three times", || {
        table.lookups() >= lookups + 3
    })
    .await;
    assert_eq!(members(&status()), registered_at(&ips, port));
    table.set(NAME, &ips);
    let served: Vec<usize> = (0..3).map(|c| outcomes.ok(c)).collect();
    until("every client is still served", || {
        (0..3).all(|c| outcomes.ok(c) > served[c])
    })
    .await;
    assert_eq!(outcomes.failed(), Vec::new(), "during the DNS outage");

    // Kubernetes deletes the pod of replica 1: SIGTERM, and its address leaves the name.
    // Its client's flows would go elsewhere: it starts no new request; those in flight go on.
    let victim = 1;
    pauses[victim].send_replace(true);
    // "In flight through it" means forwarded by it: wait until every request the paused
    // client started has reached the backend. A request still on its way to the replica when
    // it stops taking connections is a flow kube-proxy would send to another pod, which this
    // test does not model (without this wait, one such request failed once in CI with
    // `relay_unreachable`).
    let reached = |c: usize| {
        let tag = format!("c={c}&");
        backend
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|seen| seen.target.contains(&tag))
            .count()
    };
    until(
        "every request the paused client started has reached the backend",
        || {
            reached(victim)
                == outcomes.ok(victim) + outcomes.in_flight[victim].load(Ordering::SeqCst)
        },
    )
    .await;
    let in_flight = outcomes.in_flight[victim].load(Ordering::SeqCst);
    let ok_before = outcomes.ok(victim);
    let term = Instant::now();
    signal(replicas[victim].0.as_ref().unwrap(), "TERM");
    let mut others: Vec<IpAddr> = ips.to_vec();
    others.remove(victim);
    table.set(NAME, &others);
    let mut drained = replicas[victim].0.take().unwrap();
    tokio::time::timeout(DEADLINE, drained.child.wait())
        .await
        .expect("the replica drains and exits")
        .unwrap();
    let drain = term.elapsed();
    let dropped = until("the exit drops the stopped replica", || {
        members(&status()) == registered_at(&others, port)
    })
    .await;
    assert!(status().registered, "registered while any tunnel is");
    let base: Vec<usize> = (0..3).map(|c| outcomes.ok(c)).collect();
    until("the other replicas keep serving", || {
        [0, 2].iter().all(|&c| outcomes.ok(c) >= base[c] + 10)
    })
    .await;
    assert_eq!(
        outcomes.failed(),
        Vec::new(),
        "a drained replica costs no request"
    );
    // Every request in flight through the drained replica ended, and none failed: answered.
    assert_eq!(outcomes.in_flight[victim].load(Ordering::SeqCst), 0);
    let answered = outcomes.ok(victim) - ok_before;
    println!(
        "replica SIGTERM: {in_flight} requests in flight through it, {answered} answered after the signal; it drained and exited in {:.0} ms; the exit dropped it {:.0} ms after that; 0 failed requests",
        drain.as_secs_f64() * 1e3,
        dropped.as_secs_f64() * 1e3
    );

    // A new pod at the same address: the name lists it again, the exit registers there, and
    // its client is served through it.
    let (process, _, data) = start_replica(relay_keys.path(), ips[victim], port).await;
    replicas[victim] = (Some(process), replicas[victim].1.clone(), data);
    let back = Instant::now();
    table.set(NAME, &ips);
    until("the exit registers with the replica that is back", || {
        members(&status()) == registered_at(&ips, port)
    })
    .await;
    let readded = back.elapsed();
    let ok_back = outcomes.ok(victim);
    pauses[victim].send_replace(false);
    until("the client of the replica that is back is served", || {
        outcomes.ok(victim) >= ok_back + 10
    })
    .await;
    assert_eq!(outcomes.failed(), Vec::new(), "after the replica came back");
    println!(
        "replica back at {}: the exit registered with it {:.0} ms after the name listed it again",
        ips[victim],
        readded.as_secs_f64() * 1e3
    );

    // Measured only: a replica killed (SIGKILL) while its client's requests are in flight.
    pauses[victim].send_replace(true);
    // "In flight through it" means forwarded by it: wait until every request the paused
    // client started has reached the backend. A request still on its way to the replica when
    // it stops taking connections is a flow kube-proxy would send to another pod, which this
    // test does not model (without this wait, one such request failed once in CI with
    // `relay_unreachable`).
    let reached = |c: usize| {
        let tag = format!("c={c}&");
        backend
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|seen| seen.target.contains(&tag))
            .count()
    };
    until(
        "every request the paused client started has reached the backend",
        || {
            reached(victim)
                == outcomes.ok(victim) + outcomes.in_flight[victim].load(Ordering::SeqCst)
        },
    )
    .await;
    let in_flight = outcomes.in_flight[victim].load(Ordering::SeqCst);
    let failed_before = outcomes.failed_of(victim);
    let killed = Instant::now();
    signal(replicas[victim].0.as_ref().unwrap(), "KILL");
    table.set(NAME, &others);
    let mut dead = replicas[victim].0.take().unwrap();
    dead.child.wait().await.unwrap();
    until("the exit drops the killed replica", || {
        members(&status()) == registered_at(&others, port)
    })
    .await;
    let noticed = killed.elapsed();
    let (process, _, data) = start_replica(relay_keys.path(), ips[victim], port).await;
    replicas[victim] = (Some(process), replicas[victim].1.clone(), data);
    let restarted = Instant::now();
    table.set(NAME, &ips);
    until("the exit registers with the restarted replica", || {
        members(&status()) == registered_at(&ips, port)
    })
    .await;
    let reregistered = restarted.elapsed();
    until("the requests in flight at the kill have ended", || {
        outcomes.in_flight[victim].load(Ordering::SeqCst) == 0
    })
    .await;
    let lost = outcomes.failed_of(victim) - failed_before;
    let ok_now = outcomes.ok(victim);
    pauses[victim].send_replace(false);
    until("the client of the restarted replica is served", || {
        outcomes.ok(victim) > ok_now
    })
    .await;
    let served = restarted.elapsed();
    let others_failed: Vec<_> = outcomes
        .failed()
        .into_iter()
        .filter(|f| f.0 != victim)
        .collect();
    assert_eq!(
        others_failed,
        Vec::new(),
        "a killed replica costs the other replicas' clients nothing"
    );
    println!(
        "replica SIGKILL: {lost} of {in_flight} requests in flight through it failed ({:?}); the exit dropped it {:.0} ms after the kill (tunnel liveness {:?}); after a restart at the same address the exit was registered there in {:.0} ms and its client served in {:.0} ms",
        outcomes
            .failed()
            .iter()
            .filter(|f| f.0 == victim)
            .map(|f| {
                let code = serde_json::from_str::<serde_json::Value>(&f.2)
                    .ok()
                    .and_then(|body| body["error"]["code"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| f.2.clone());
                format!("{} {code}", f.1)
            })
            .collect::<Vec<_>>(),
        noticed.as_secs_f64() * 1e3,
        limits.tunnel_liveness,
        reregistered.as_secs_f64() * 1e3,
        served.as_secs_f64() * 1e3
    );

    // Nothing was written where the keys are.
    assert_eq!(listing(relay_keys.path()), keys_before);
    assert_eq!(listing(exit_keys.path()), exit_keys_before);

    stop_traffic.cancel();
    for worker in workers {
        worker.await.unwrap();
    }
    stop_exit.cancel();
    exit_task.await.unwrap().unwrap();
    backend.stop.cancel();
}
