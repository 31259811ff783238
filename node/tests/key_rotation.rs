//! Key rotation in a running exit: the schedule rotates the OHTTP key while clients keep
//! sending, the previous key is still accepted for its overlap, every relay gets the new
//! descriptor, and a client holding a key the exit dropped refreshes that exit's keys and
//! retries it, so even a single exit rotates without a failed request. In-process roles on
//! loopback over real QUIC and real OHTTP.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokengo::{data_dir::DataDir, exit::Exit};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Longest any condition below is waited for.
const DEADLINE: Duration = Duration::from_secs(60);

/// Polls `done` until it holds or the deadline passes.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(DEADLINE, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "gave up waiting: {what}");
}

/// One request through the client: a streamed or a single answer, read to its end. `Err`
/// says what went wrong.
async fn request(http: &reqwest::Client, url: &str, stream: bool) -> Result<(), String> {
    let response = http
        .post(format!("{url}/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": "test",
            "stream": stream,
            "messages": [{"role": "user", "content": "still there after the rotation?"}],
        }))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response.text().await.map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{status}: {body}"));
    }
    if !body.contains("still there after the rotation?") {
        return Err(format!("not the echo of the request: {body}"));
    }
    Ok(())
}

/// Whether the relay's exit list, polled until the deadline, comes to show its one exit with
/// only the key `current` names (asked again at each poll: a rotation may fall between the
/// list and the question). `Err` says what went wrong with the relay.
async fn relay_lists_only(
    relay: &tokengo::transport::RelayAddr,
    current: impl Fn() -> u8,
) -> Result<bool, String> {
    let link = tokengo::relay_link::RelayLink::new(
        relay.clone(),
        tokengo::transport::TransportParams {
            idle_timeout: Duration::from_secs(30),
            max_incoming_streams: 0,
            keep_alive: false,
        },
    )
    .map_err(|e| e.to_string())?;
    let polled = tokio::time::timeout(DEADLINE, async {
        loop {
            let listed = tokengo::relay_link::list_exits(&link)
                .await
                .map_err(|e| e.to_string())?;
            if listed.len() != 1 {
                return Err(format!("the relay lists {} exits, not 1", listed.len()));
            }
            if listed[0]
                .key_configs
                .iter()
                .map(|k| k.key_id)
                .eq([current()])
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    match polled {
        Ok(result) => result.map(|()| true),
        Err(_) => Ok(false),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_single_exit_rotating_its_key_twice_under_load_fails_no_request() {
    common::init();
    let backend = common::start_backend().await;
    let limits = common::limits();
    let relay = common::start_relay(&limits, None).await;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = DataDir::resolve(Some(dir.path().to_path_buf())).unwrap();
    let mut exit = Exit::load(
        &data_dir,
        &common::backend_config(&backend.url, Duration::from_secs(10)),
        limits.clone(),
    )
    .unwrap();
    // Every 2 s, so the previous key's overlap is 2 s too: by the second rotation the key
    // the client fetched at start is gone, and its requests meet "key unknown".
    exit.set_key_rotation(Some(Duration::from_secs(2)));
    let (tx, mut registered) = watch::channel(false);
    let probe = exit.probe(relay.addr.clone(), tx.subscribe());
    let exit_stop = CancellationToken::new();
    let exit_task = tokio::spawn(exit.run(relay.addr.clone(), tx, exit_stop.clone()));
    tokio::time::timeout(DEADLINE, registered.wait_for(|r| *r))
        .await
        .expect("exit did not register")
        .unwrap();
    let client = common::start_client(&relay.addr, &limits).await;
    // The client fetched the exit's key at start; two rotations after that, the ring (current
    // and previous key) no longer holds it, and the client (which fetches lists only every
    // minute) meets "key unknown".
    let metrics = probe.metrics().clone();
    let fetched_at = metrics.key_rotations.get();
    let first_key = probe.status(None).keys[0].key_id;

    // Continuous load: four workers, each sending one request after another (every third
    // one streamed), until the exit has rotated twice and every worker sent more after it.
    let rotated_twice = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for worker in 0..4u64 {
        let (url, rotated_twice, sent) = (
            client.url.clone(),
            Arc::clone(&rotated_twice),
            Arc::clone(&sent),
        );
        workers.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut failures = Vec::new();
            let mut after = 0;
            let mut n = worker;
            while after < 20 {
                if let Err(error) = request(&http, &url, n % 3 == 0).await {
                    failures.push(error);
                }
                sent.fetch_add(1, Ordering::Relaxed);
                if rotated_twice.load(Ordering::Relaxed) {
                    after += 1;
                }
                n += 1;
            }
            failures
        }));
    }
    wait_until("two key rotations", || {
        metrics.key_rotations.get() >= fetched_at + 2
    })
    .await;
    rotated_twice.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for worker in workers {
        failures.extend(worker.await.unwrap());
    }
    let sent = sent.load(Ordering::Relaxed);
    let status = probe.status(None);
    let refreshes = client.probe.metrics().key_refreshes.get();
    println!(
        "{sent} requests during {} rotations, {} failed, {refreshes} key refreshes at the client",
        metrics.key_rotations.get(),
        failures.len()
    );
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(metrics.key_rotations.get() >= fetched_at + 2);
    assert_ne!(status.keys[0].key_id, first_key, "the current key changed");
    assert!(
        refreshes >= 1,
        "the client met a dropped key and refreshed (else this test did not test the retry)"
    );
    // The relay lists the exit's newest key: its descriptor was registered again.
    assert!(
        relay_lists_only(&relay.addr, || probe.status(None).keys[0].key_id)
            .await
            .unwrap(),
        "the relay never listed the exit's current key alone"
    );

    client.stop.cancel();
    exit_stop.cancel();
    exit_task.await.unwrap().unwrap();
    relay.stop.cancel();
    backend.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_is_saved_before_use_and_a_restart_keeps_the_new_key() {
    common::init();
    let backend = common::start_backend().await;
    let limits = common::limits();
    let relay = common::start_relay(&limits, None).await;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = DataDir::resolve(Some(dir.path().to_path_buf())).unwrap();
    let backend_config = common::backend_config(&backend.url, Duration::from_secs(10));
    let mut exit = Exit::load(&data_dir, &backend_config, limits.clone()).unwrap();
    exit.set_key_rotation(Some(Duration::from_secs(1)));
    let (tx, _registered) = watch::channel(false);
    let probe = exit.probe(relay.addr.clone(), tx.subscribe());
    let stop = CancellationToken::new();
    let task = tokio::spawn(exit.run(relay.addr.clone(), tx, stop.clone()));
    let metrics = probe.metrics().clone();
    wait_until("a key rotation", || metrics.key_rotations.get() >= 1).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let held = probe.status(None).keys;
    let again = Exit::load(&data_dir, &backend_config, limits).unwrap();
    let (tx, _registered) = watch::channel(false);
    let reloaded = again
        .probe(relay.addr.clone(), tx.subscribe())
        .status(None)
        .keys;
    assert_eq!(
        reloaded[0].key_id, held[0].key_id,
        "a restarted exit starts with the key it rotated to"
    );
    relay.stop.cancel();
    backend.shut_down().await;
}

/// Replaces `path` the way the kubelet updates a Secret volume: the new bytes are written
/// beside it, then swapped in by one rename, so a reader sees the old file or the new one.
fn swap_in(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let next = path.with_extension("next");
    std::fs::write(&next, bytes)?;
    std::fs::rename(&next, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_exit_on_a_read_only_key_directory_serves_a_rotation_made_there_without_a_restart() {
    use tokengo::keys::KeySource;
    use tokengo_proto::{data_dir::EXIT_KEYRING_FILE, keyring::Keyring};

    common::init();
    let backend = common::start_backend().await;
    let limits = common::limits();
    let relay = common::start_relay(&limits, None).await;
    // The keys are written by someone else (in Kubernetes the operator, into a Secret); the
    // exit only reads them.
    let dir = tempfile::tempdir().unwrap();
    let data_dir = DataDir::resolve(Some(dir.path().to_path_buf())).unwrap();
    let writer = KeySource::of(&data_dir, None);
    writer
        .identity(tokengo_proto::data_dir::EXIT_IDENTITY_FILE)
        .unwrap();
    writer.keyring(100).unwrap();
    let keys = KeySource::of(&data_dir, Some(dir.path()));
    let mut exit = Exit::load_from(
        &keys,
        &common::backend_config(&backend.url, Duration::from_secs(10)),
        limits.clone(),
    )
    .unwrap();
    exit.set_key_follow_interval(Duration::from_millis(100));
    let (tx, mut registered) = watch::channel(false);
    let probe = exit.probe(relay.addr.clone(), tx.subscribe());
    let exit_stop = CancellationToken::new();
    let exit_task = tokio::spawn(exit.run(relay.addr.clone(), tx, exit_stop.clone()));
    tokio::time::timeout(DEADLINE, registered.wait_for(|r| *r))
        .await
        .expect("exit did not register")
        .unwrap();
    let client = common::start_client(&relay.addr, &limits).await;
    let first_key = probe.status(None).keys[0].key_id;
    let metrics = probe.metrics().clone();

    let done = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for worker in 0..3u64 {
        let (url, done, answered) = (client.url.clone(), Arc::clone(&done), Arc::clone(&answered));
        workers.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let (mut failures, mut sent) = (Vec::new(), 0u64);
            let mut n = worker;
            while !done.load(Ordering::Relaxed) {
                if let Err(error) = request(&http, &url, n % 3 == 0).await {
                    failures.push(error);
                }
                sent += 1;
                answered.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
            (sent, failures)
        }));
    }

    // The writer rotates: a new current key, the old one kept as previous.
    let path = dir.path().join(EXIT_KEYRING_FILE);
    let mut ring = Keyring::parse(&std::fs::read(&path).unwrap()).unwrap();
    ring.rotate(200).unwrap();
    swap_in(&path, &ring.encode()).unwrap();
    let new_key = ring.key_ids()[0].0;
    assert_ne!(new_key, first_key);
    wait_until("the exit serves the rotated key", || {
        probe.status(None).keys[0].key_id == new_key
    })
    .await;
    assert_eq!(metrics.key_rotations.get(), 1, "one rotation, counted once");

    // The relay lists the rotated key: the exit registered its new descriptor over the same
    // tunnel (no restart: the task that serves it is the one started above).
    assert!(
        relay_lists_only(&relay.addr, || new_key).await.unwrap(),
        "the relay never listed the rotated key"
    );

    // A broken write changes nothing; the writer then retires the previous key (once the
    // relay lists the new one, as the operator does a rotation later): a client still holding
    // the old key meets "key unknown", fetches the list again and retries with the new key.
    swap_in(&path, b"{\"version\": 1, \"keys\": \"truncated").unwrap();
    ring.retire_previous();
    swap_in(&path, &ring.encode()).unwrap();
    wait_until("the previous key retired", || {
        probe.status(None).keys.len() == 1
    })
    .await;
    assert_eq!(probe.status(None).keys[0].key_id, new_key);
    let after_retiring = answered.load(Ordering::Relaxed);
    wait_until("requests after the retirement", || {
        answered.load(Ordering::Relaxed) >= after_retiring + 20
    })
    .await;
    assert!(!exit_task.is_finished(), "the exit kept running");

    done.store(true, Ordering::Relaxed);
    let (mut sent, mut failures) = (0, Vec::new());
    for worker in workers {
        let (n, f) = worker.await.unwrap();
        sent += n;
        failures.extend(f);
    }
    println!(
        "{sent} requests while the key directory was rotated, then broken, then retired: {} failed",
        failures.len()
    );
    assert!(sent > 0);
    assert!(failures.is_empty(), "failed requests: {failures:?}");

    client.stop.cancel();
    exit_stop.cancel();
    exit_task.await.unwrap().unwrap();
    relay.stop.cancel();
    backend.shut_down().await;
}
