//! The `tokengo` binary's own behaviour: key generation and configuration errors, as an
//! operator meets them.
// Its helpers are plain functions, outside what clippy counts as tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn tokengo(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tokengo"))
        .args(args)
        .output()
        .unwrap()
}

#[cfg(unix)]
#[test]
fn keygen_writes_private_files_and_prints_public_parts() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let identity = dir.path().join("id.key");
    let out = tokengo(&[
        "keygen",
        "--type",
        "identity",
        "--output",
        identity.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let peer_id = String::from_utf8(out.stdout).unwrap();
    assert!(peer_id.trim().starts_with("12D3Koo"), "{peer_id}");
    assert_eq!(
        std::fs::metadata(&identity).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let ohttp = dir.path().join("ohttp.json");
    let out = tokengo(&[
        "keygen",
        "--type",
        "ohttp",
        "--key-id",
        "9",
        "--output",
        ohttp.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hex_list = String::from_utf8(out.stdout).unwrap();
    let configs =
        tokengo_proto::key_config::KeyConfig::decode_list(&hex::decode(hex_list.trim()).unwrap())
            .unwrap();
    assert_eq!(configs.len(), 1);
    assert_eq!(configs[0].key_id, 9);
    assert_eq!(
        std::fs::metadata(&ohttp).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Never overwrites an existing key.
    let before = std::fs::read(&identity).unwrap();
    let out = tokengo(&[
        "keygen",
        "--type",
        "identity",
        "--output",
        identity.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"));
    assert_eq!(std::fs::read(&identity).unwrap(), before);
}

#[test]
fn broken_configs_fail_before_starting_and_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("exit.yaml");
    std::fs::write(
        &config,
        "relay: /ip4/127.0.0.1/udp/4433/quic-v1\nbackend: http://localhost:11434\n",
    )
    .unwrap();
    let out = tokengo(&[
        "exit",
        "-c",
        config.to_str().unwrap(),
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`relay`") && stderr.contains("/p2p/"),
        "{stderr}"
    );

    std::fs::write(&config, "listen: [not, an, address]\n").unwrap();
    let out = tokengo(&[
        "relay",
        "-c",
        config.to_str().unwrap(),
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen"));

    // A key the role does not take (here an exit's) is refused, naming it and the command.
    std::fs::write(
        &config,
        "listen: 0.0.0.0:4433\nbackend: http://localhost:11434\n",
    )
    .unwrap();
    let out = tokengo(&[
        "relay",
        "-c",
        config.to_str().unwrap(),
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown key `backend` for `tokengo relay`")
            && stderr.contains("exit.yaml"),
        "{stderr}"
    );

    // The environment fills in what flags do not give, and flags win over it.
    let out = Command::new(env!("CARGO_BIN_EXE_tokengo"))
        .args([
            "client",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--relay",
            "not-a-multiaddr",
        ])
        .env("TOKENGO_RELAY", "/ip4/127.0.0.1/udp/1/quic-v1")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not-a-multiaddr"));
}

#[test]
fn a_keys_dir_is_only_read_and_a_missing_key_is_named() {
    let keys = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let run = |role: &str, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tokengo"))
            .arg(role)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path())
            .args(extra)
            .env("TOKENGO_KEYS_DIR", keys.path())
            .output()
            .unwrap()
    };
    // An empty key directory: the relay names the file it needs and creates nothing.
    let out = run("relay", &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let wanted = keys.path().join("relay_identity.key");
    assert!(
        stderr.contains(&format!("{} does not exist", wanted.display()))
            && stderr.contains("keygen --type identity"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(keys.path()).unwrap().count(), 0);

    // An exit that would rotate its own keys cannot save them there: refused before starting.
    let relay = format!(
        "/ip4/127.0.0.1/udp/4433/quic-v1/p2p/{}",
        libp2p_identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    );
    let exit = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tokengo"))
            .args(["exit", "--relay", &relay, "--data-dir"])
            .arg(data.path())
            .args(extra)
            .env("TOKENGO_KEYS_DIR", keys.path())
            .output()
            .unwrap()
    };
    let out = exit(&[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid `keys_dir`") && stderr.contains("--key-rotation-hours 0"),
        "{stderr}"
    );
    // With rotation off it starts loading, and names the missing key.
    let out = exit(&["--key-rotation-hours", "0"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("exit_identity.key does not exist"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(keys.path()).unwrap().count(), 0);
}

#[test]
fn version_is_printed() {
    let out = tokengo(&["--version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("tokengo "));
}

/// The role's tasks run on exactly the configured number of runtime threads, from the flag or
/// from the environment.
#[cfg(target_os = "linux")]
#[test]
fn roles_run_on_the_configured_worker_threads() {
    use std::io::BufRead as _;

    let dir = tempfile::tempdir().unwrap();
    for (flag, env, expected) in [(Some("3"), None, 3), (None, Some("1"), 1)] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tokengo"));
        command
            .args(["relay", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        if let Some(n) = flag {
            command.args(["--worker-threads", n]);
        }
        if let Some(n) = env {
            command.env("TOKENGO_WORKER_THREADS", n);
        }
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        let ready = lines.any(|line| line.unwrap().starts_with("relay listening on"));
        let workers = std::fs::read_dir(format!("/proc/{}/task", child.id()))
            .unwrap()
            .filter(|task| {
                let comm = task.as_ref().unwrap().path().join("comm");
                std::fs::read_to_string(comm).unwrap().trim() == "tokio-rt-worker"
            })
            .count();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(ready, "the relay never printed its address");
        assert_eq!(workers, expected, "flag {flag:?}, env {env:?}");
    }
}
