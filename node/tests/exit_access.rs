//! Exits are private unless their operator says otherwise, and may require a group access
//! token (issue 18). Real `tokengo exit` and `tokengo client` processes on loopback, relays
//! over real QUIC, one recording backend per exit to count what reached it.
// Its helpers are plain functions, outside what clippy counts as tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{process::Stdio, sync::Arc, time::Duration};

use common::{
    ClientProcess, Process, Recorder, backend_config, contains, limits, start_exit, start_relay,
};
use libp2p_identity::PeerId;
use tokengo::transport::RelayAddr;
use tokio::io::AsyncBufReadExt as _;

const CHAT: &str = "/v1/chat/completions";
const TOKEN: &str = "group-token-Zm9yIHRoZSByZXNlYXJjaCB0ZWFt";
const WRONG: &str = "wrong-token-bm90IHRoZSBncm91cCdzIHRva2Vu";

/// A `tokengo exit` process registered with `relay`; `args` are added to the command line.
struct ExitProcess {
    peer_id: PeerId,
    process: Process,
    _dir: tempfile::TempDir,
}

async fn start_exit_process(relay: &RelayAddr, backend: &str, args: &[&str]) -> ExitProcess {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().display().to_string();
    let relay = relay.to_string();
    let mut all = vec![
        "exit",
        "--relay",
        &relay,
        "--backend",
        backend,
        "--worker-threads",
        "1",
        "--data-dir",
        &data_dir,
    ];
    all.extend_from_slice(args);
    let mut process = Process::start(&all);
    let registered = process.line_after("exit ").await;
    let peer_id = registered
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    ExitProcess {
        peer_id,
        process,
        _dir: dir,
    }
}

async fn start_client(relay: &RelayAddr, args: &[String]) -> ClientProcess {
    common::start_client_process(&[relay], args).await
}

/// The exits `client` may use, after it fetched the relays' lists now.
async fn usable_exits(client: &ClientProcess) -> Vec<String> {
    let report = client.refreshed_status().await;
    report
        .client
        .unwrap()
        .exits
        .into_iter()
        .map(|e| e.peer_id)
        .collect()
}

fn token_file(tokens: &[&str]) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        format!("# the research group\n{}\n", tokens.join("\n")),
    )
    .unwrap();
    file
}

#[tokio::test]
async fn an_exit_without_public_or_relay_refuses_to_start_and_says_what_to_pass() {
    let dir = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokengo"))
        .args(["exit", "--backend", "http://127.0.0.1:9", "--data-dir"])
        .arg(dir.path())
        .env_remove("TOKENGO_RELAY")
        .env_remove("TOKENGO_PUBLIC")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stderr}");
    assert!(!output.status.success());
    assert!(
        stderr.contains("--relay MULTIADDR") && stderr.contains("--public"),
        "{stderr}"
    );
    assert!(stderr.contains("private by default"), "{stderr}");
    // Nothing was created: the exit refused before touching its data directory.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_exit_with_credentials_warns_and_shows_it_is_public() {
    common::init();
    let relay = start_relay(&limits(), None).await;
    let backend = common::start_recording_backend(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokengo"))
        .args(["exit", "--public", "--relay"])
        .arg(relay.addr.to_string())
        .args([
            "--backend",
            &backend.url,
            "--api-key",
            "sk-the-operators-own-key",
        ])
        .args(["--admin-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("TOKENGO_LOG_FORMAT", "text")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let warning = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            if line.contains("PUBLIC") {
                return line;
            }
        }
        panic!("the exit ended without warning");
    })
    .await
    .expect("no warning within a minute");
    println!("{warning}");
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains("ANYONE"), "{warning}");
    assert!(warning.contains("--access-token-file"), "{warning}");
    assert!(!warning.contains("sk-the-operators-own-key"), "{warning}");

    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let admin = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            if let Some(url) = line.strip_prefix("admin endpoint on ") {
                return url.to_owned();
            }
        }
        panic!("the exit ended before its admin endpoint started");
    })
    .await
    .unwrap();
    let status: tokengo::status::StatusReport = reqwest::get(format!("{admin}/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let exit = status.exit.unwrap();
    assert!(exit.public);
    assert!(!exit.access_token_required);
    let summary = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokengo"))
        .args(["status", "--admin", &admin])
        .output()
        .await
        .unwrap();
    let summary = String::from_utf8_lossy(&summary.stdout);
    println!("{summary}");
    assert!(
        summary.contains("PUBLIC: anyone who finds it can use it"),
        "{summary}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_protected_exit_serves_only_its_group_and_the_relay_never_sees_the_token() {
    common::init();
    let recorder = Arc::new(Recorder::default());
    let relay = start_relay(&limits(), Some(recorder.clone())).await;
    let backend = common::start_recording_backend(Duration::ZERO).await;
    let tokens = token_file(&[TOKEN, "another-group-dG9rZW4tbnVtYmVyLXR3bw"]);
    let exit = start_exit_process(
        &relay.addr,
        &backend.url,
        &["--access-token-file", tokens.path().to_str().unwrap()],
    )
    .await;
    let pinned = exit.peer_id.to_string();

    // Pinned without a token, and with a wrong one: 401 from the exit, the backend untouched,
    // in both OHTTP modes.
    let without = start_client(&relay.addr, &["--exit".into(), pinned.clone()]).await;
    let wrong = start_client(&relay.addr, &["--exit".into(), format!("{pinned}={WRONG}")]).await;
    for (client, code) in [
        (&without, "exit_token_missing"),
        (&wrong, "exit_token_invalid"),
    ] {
        for stream in [false, true] {
            let (status, body) = client.chat(stream).await;
            println!("{code} (stream {stream}): {status} {body}");
            assert_eq!(status, 401, "{body}");
            assert_eq!(body["error"]["code"], code, "{body}");
            assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        }
    }
    assert_eq!(backend.hits(CHAT), 0, "the backend recorded nothing");
    // The pinned client without a token shows why: the exit requires one it does not have.
    let exits = without.refreshed_status().await.client.unwrap().exits;
    assert_eq!(exits.len(), 1);
    assert_eq!(exits[0].peer_id, pinned);
    assert!(exits[0].access_token_required && !exits[0].token_configured);
    let text = tokengo::status::summary(&without.refreshed_status().await);
    assert!(
        text.contains("access token required: NONE configured"),
        "{text}"
    );

    // The group's token, for any exit: served, and the token never reaches the backend.
    let member = start_client(&relay.addr, &["--exit-token".into(), TOKEN.into()]).await;
    let (status, echoed) = member.chat(false).await;
    assert_eq!(status, 200, "{echoed}");
    assert_eq!(backend.hits(CHAT), 1);
    let headers = echoed["headers"].as_object().unwrap();
    assert!(!headers.contains_key("tokengo-exit-token"), "{echoed}");
    assert!(!echoed.to_string().contains(TOKEN), "{echoed}");
    let response = reqwest::Client::new()
        .post(format!("{}{CHAT}", member.url))
        .json(&serde_json::json!({"model": "test", "stream": true, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(!response.text().await.unwrap().contains(TOKEN));
    assert_eq!(backend.hits(CHAT), 2);

    // Every byte the relay forwarded, both ways: no token, right or wrong.
    let to_exit = recorder.to_exit.lock().unwrap().clone();
    let to_client = recorder.to_client.lock().unwrap().clone();
    println!(
        "relay forwarded {} bytes to the exit, {} to clients",
        to_exit.len(),
        to_client.len()
    );
    assert!(!to_exit.is_empty());
    for secret in [TOKEN, WRONG] {
        assert!(!contains(&to_exit, secret.as_bytes()));
        assert!(!contains(&to_client, secret.as_bytes()));
    }
    drop(exit.process);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpinned_client_skips_exits_that_require_a_token_it_does_not_have() {
    common::init();
    let relay = start_relay(&limits(), None).await;
    let gated_backend = common::start_recording_backend(Duration::ZERO).await;
    let tokens = token_file(&[TOKEN]);
    let gated = start_exit_process(
        &relay.addr,
        &gated_backend.url,
        &["--access-token-file", tokens.path().to_str().unwrap()],
    )
    .await;
    let open_backend = common::start_recording_backend(Duration::ZERO).await;
    let open = start_exit(
        &relay.addr,
        backend_config(&open_backend.url, Duration::from_secs(30)),
        &limits(),
    )
    .await;

    let client = start_client(&relay.addr, &[]).await;
    assert_eq!(usable_exits(&client).await, vec![open.peer_id.to_string()]);
    let total = 20;
    for _ in 0..total {
        let (status, body) = client.chat(false).await;
        assert_eq!(status, 200, "{body}");
    }
    println!(
        "client without a token: open exit {} requests, token exit {}",
        open_backend.hits(CHAT),
        gated_backend.hits(CHAT)
    );
    assert_eq!(open_backend.hits(CHAT), total);
    assert_eq!(gated_backend.hits(CHAT), 0);

    // With the token, both exits are usable.
    let member = start_client(&relay.addr, &["--exit-token".into(), TOKEN.into()]).await;
    let mut usable = usable_exits(&member).await;
    usable.sort();
    let mut both = vec![gated.peer_id.to_string(), open.peer_id.to_string()];
    both.sort();
    assert_eq!(usable, both);
    // Its status says which of them requires a token, and that it has one.
    let report = member.refreshed_status().await;
    let mut flags: Vec<_> = report
        .client
        .unwrap()
        .exits
        .into_iter()
        .map(|e| (e.peer_id, e.access_token_required, e.token_configured))
        .collect();
    flags.sort();
    let mut expected = vec![
        (gated.peer_id.to_string(), true, true),
        (open.peer_id.to_string(), false, true),
    ];
    expected.sort();
    assert_eq!(flags, expected);
}
