//! A running node's status: the JSON document the admin listener serves at `/status`, and
//! `tokengo status`, which fetches it and prints a short summary for a person.
//!
//! The document holds the node's own facts (identities, relay addresses, key ids, counters,
//! latency percentiles), never anything about a user.

use std::{fmt::Write as _, time::Duration};

use serde::{Deserialize, Serialize};

use crate::ops::metrics::HistogramSnapshot;

/// What `/status` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The node's version.
    pub version: String,
    /// `relay`, `exit`, `client` or `serve`.
    pub role: String,
    /// Seconds since the process started.
    pub uptime_secs: u64,
    /// Whether `/readyz` would answer 200.
    pub ready: bool,
    /// Why not, when not ready.
    #[serde(default)]
    pub not_ready: Vec<String>,
    /// The relay role, if this node runs one.
    #[serde(default)]
    pub relay: Option<RelayStatus>,
    /// The exit role, if this node runs one.
    #[serde(default)]
    pub exit: Option<ExitStatus>,
    /// The client role, if this node runs one.
    #[serde(default)]
    pub client: Option<ClientStatus>,
}

/// A relay's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayStatus {
    /// The relay's PeerId.
    pub peer_id: String,
    /// The multiaddr clients and exits dial.
    pub address: String,
    /// Whether it accepts connections.
    pub accepting: bool,
    /// Exits registered now.
    pub exits_registered: u64,
    /// Open client connections.
    pub client_connections: i64,
    /// Streams being forwarded now.
    pub streams_in_flight: i64,
    /// Requests forwarded since start.
    pub requests_total: u64,
    /// Forwarded requests per second over the last minute.
    pub requests_per_sec: Option<f64>,
    /// Failed streams since start.
    pub errors_total: u64,
    /// Time from a forwarded request to the exit's first answer byte.
    pub exit_first_byte: Percentiles,
    /// Announcement on the DHT; absent when the relay does not announce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dht: Option<DhtStatus>,
}

/// Where a relay's or an exit's DHT announcement stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DhtState {
    /// Started; the provider record is not published yet.
    Starting,
    /// No confirmed external address: the relay would be invisible, so it is not announced.
    NoExternalAddress,
    /// The provider record is published (and republished every 10 minutes).
    Announced,
    /// Publishing failed; it is retried.
    PublishFailed,
}

/// A relay's DHT state in `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhtStatus {
    /// Where the announcement stands.
    pub state: DhtState,
    /// The DHT protocol name (e.g. `/ipfs/kad/1.0.0`).
    pub protocol: String,
    /// Addresses the libp2p swarm listens on.
    pub listen_addrs: Vec<String>,
    /// Confirmed external addresses put in the provider record.
    pub external_addrs: Vec<String>,
    /// Whether a fresh identity got the record back with addresses that reach this node.
    #[serde(default)]
    pub verification: Verification,
}

/// The self-check after publishing: a throwaway DHT node looks the record up and must reach
/// this node through the addresses the DHT returns (as a stranger would).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Verification {
    /// Nothing published yet.
    #[default]
    NotYet,
    /// The check runs.
    Checking,
    /// The DHT returned this node's PeerId with addresses, and a fresh identity reached it
    /// there.
    Verified,
    /// Published, but a fresh identity could not find or reach it.
    Unverified {
        /// Why, and what to check.
        reason: String,
    },
}

/// An exit's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// The exit's PeerId.
    pub peer_id: String,
    /// Whether its operator opened it to the public (`--public`).
    #[serde(default)]
    pub public: bool,
    /// Whether requests must carry an access token.
    #[serde(default)]
    pub access_token_required: bool,
    /// The relays it registers with, space-separated.
    pub relay: String,
    /// Whether it is registered now (with at least one relay).
    pub registered: bool,
    /// Each relay it keeps a tunnel to, and whether that tunnel is registered now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relays: Vec<ExitRelayStatus>,
    /// Whether the backend answered the last probe.
    pub backend_up: bool,
    /// The OHTTP keys it holds, current first.
    pub keys: Vec<KeyStatus>,
    /// When the last registered descriptor expires (Unix seconds).
    pub descriptor_expires_at: Option<u64>,
    /// Requests served since start.
    pub requests_total: u64,
    /// Requests per second over the last minute.
    pub requests_per_sec: Option<f64>,
    /// Failed requests since start.
    pub errors_total: u64,
    /// Requests being served now.
    pub streams_in_flight: i64,
    /// Time spent beyond the backend's own time.
    pub gateway_overhead: Percentiles,
    /// The backend's own time.
    pub backend_latency: Percentiles,
    /// Announcement on the DHT; absent when the exit does not announce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dht: Option<DhtStatus>,
}

/// One of an exit's relays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRelayStatus {
    /// The relay's multiaddr as given (for a relay given by DNS name, the name: each address
    /// it resolves to has a tunnel of its own, listed once each).
    pub address: String,
    /// The address this tunnel dials, for a relay given by DNS name (`IP:PORT`); absent for
    /// a relay given by IP or discovered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<String>,
    /// Whether the exit's tunnel to it is registered now.
    pub registered: bool,
}

/// One of an exit's OHTTP keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStatus {
    /// Key id.
    pub key_id: u8,
    /// `current` or `previous`.
    pub slot: String,
    /// Creation time (Unix seconds).
    pub created_at: u64,
}

/// A client's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientStatus {
    /// The relays it sends requests through, comma-separated.
    pub relay: String,
    /// Whether a connection to a relay is up.
    pub relay_connected: bool,
    /// Each relay and whether its connection is up.
    #[serde(default)]
    pub relays: Vec<RelaySummary>,
    /// The exits requests are restricted to (empty: not pinned).
    #[serde(default)]
    pub pinned_exits: Vec<String>,
    /// Exits requests may go to now: verified, with consistent keys, pinned when pinning.
    pub exits: Vec<ExitSummary>,
    /// Exits not used because sources disagree on their keys, as `PEERID: source (reason)`.
    #[serde(default)]
    pub held_exits: Vec<String>,
    /// Requests since start.
    pub requests_total: u64,
    /// Requests per second over the last minute.
    pub requests_per_sec: Option<f64>,
    /// Failed requests since start.
    pub errors_total: u64,
    /// Requests being served now.
    pub requests_in_flight: i64,
    /// Time the private path added beyond the backend's own time.
    pub gateway_overhead: Percentiles,
    /// The backend's own time as exits report it.
    pub backend_latency: Percentiles,
}

/// An exit as the client knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitSummary {
    /// Its PeerId.
    pub peer_id: String,
    /// The id of the key the client encrypts to.
    pub key_id: u8,
    /// The sources that list it (relays, the DHT).
    #[serde(default)]
    pub vouched_by: Vec<String>,
    /// Whether it requires an access token (its signed descriptor says so).
    #[serde(default)]
    pub access_token_required: bool,
    /// Whether the client has a token for it (`--exit-token`, or `--exit PEERID=TOKEN`).
    #[serde(default)]
    pub token_configured: bool,
}

/// One of a client's relays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelaySummary {
    /// Its multiaddr.
    pub address: String,
    /// Whether the connection to it is up.
    pub connected: bool,
}

/// Percentiles of a latency histogram, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Observations.
    pub count: u64,
    /// Median.
    pub p50_ms: Option<f64>,
    /// 90th percentile.
    pub p90_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
}

impl From<&HistogramSnapshot> for Percentiles {
    fn from(snapshot: &HistogramSnapshot) -> Self {
        let ms = |q| snapshot.quantile(q).map(|s| s * 1000.0);
        Self {
            count: snapshot.count,
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
        }
    }
}

/// Why `tokengo status` could not get a report.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The admin URL is not usable.
    #[error("`{0}` is not an http:// URL of an admin listener, e.g. http://127.0.0.1:9090")]
    BadUrl(String),
    /// Nothing answered.
    #[error(
        "no admin listener answers at {url} ({reason}); start the node with --admin-listen {hint}"
    )]
    Unreachable {
        /// The URL asked.
        url: String,
        /// The transport's explanation.
        reason: String,
        /// The address to pass.
        hint: String,
    },
    /// Something answered, but not with a status report.
    #[error("{url} did not answer with a TokenGo status report: {reason}")]
    NotAStatus {
        /// The URL asked.
        url: String,
        /// What was wrong.
        reason: String,
    },
}

/// How long `tokengo status` waits for an answer.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Fetches `/status` from the admin listener at `admin` (its base URL).
pub async fn fetch(admin: &str) -> Result<StatusReport, StatusError> {
    let base = reqwest::Url::parse(admin.trim()).map_err(|_| StatusError::BadUrl(admin.into()))?;
    if !matches!(base.scheme(), "http" | "https") || base.host().is_none() {
        return Err(StatusError::BadUrl(admin.into()));
    }
    let url = base
        .join("/status")
        .map_err(|_| StatusError::BadUrl(admin.into()))?;
    let client = reqwest::Client::builder()
        .timeout(FETCH_TIMEOUT)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| StatusError::Unreachable {
            url: url.to_string(),
            reason: e.to_string(),
            hint: hint(&base),
        })?;
    let response = client
        .get(url.clone())
        .send()
        .await
        .map_err(|e| StatusError::Unreachable {
            url: url.to_string(),
            reason: if e.is_connect() {
                "connection refused".into()
            } else {
                e.to_string()
            },
            hint: hint(&base),
        })?;
    if !response.status().is_success() {
        return Err(StatusError::NotAStatus {
            url: url.to_string(),
            reason: format!("HTTP {}", response.status()),
        });
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| StatusError::NotAStatus {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
    serde_json::from_slice(&body).map_err(|e| StatusError::NotAStatus {
        url: url.to_string(),
        reason: e.to_string(),
    })
}

fn hint(base: &reqwest::Url) -> String {
    match (base.host_str(), base.port_or_known_default()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        _ => "127.0.0.1:9090".into(),
    }
}

/// The report as a few lines for a person.
#[must_use]
pub fn summary(report: &StatusReport) -> String {
    let mut out = String::new();
    let ready = if report.ready {
        "ready".to_owned()
    } else {
        format!("NOT READY ({})", report.not_ready.join("; "))
    };
    let _ = writeln!(
        out,
        "tokengo {} {} — {ready}, up {}",
        report.version,
        report.role,
        duration(report.uptime_secs)
    );
    if let Some(relay) = &report.relay {
        let _ = writeln!(out, "relay   {}", relay.address);
        let _ = writeln!(
            out,
            "        {} exits registered, {} client connections, {} streams in flight{}",
            relay.exits_registered,
            relay.client_connections,
            relay.streams_in_flight,
            if relay.accepting {
                ""
            } else {
                ", NOT accepting"
            }
        );
        let _ = writeln!(
            out,
            "        {} requests forwarded ({}), {} errors; exit first byte {}",
            relay.requests_total,
            rate(relay.requests_per_sec),
            relay.errors_total,
            percentiles(&relay.exit_first_byte)
        );
        if let Some(dht) = &relay.dht {
            dht_line(&mut out, dht);
        }
    }
    if let Some(exit) = &report.exit {
        let _ = writeln!(out, "exit    {}", exit.peer_id);
        let _ = writeln!(
            out,
            "        {}; {}",
            if exit.public {
                "PUBLIC: anyone who finds it can use it"
            } else {
                "private: serves only through the relay it was given"
            },
            if exit.access_token_required {
                "access token required"
            } else {
                "no access token required"
            }
        );
        let registered = |yes: bool| if yes { "registered" } else { "NOT registered" };
        if exit.relays.len() > 1 {
            let _ = writeln!(
                out,
                "        backend {}",
                if exit.backend_up { "up" } else { "DOWN" }
            );
            for relay in &exit.relays {
                let at = relay
                    .resolved
                    .as_ref()
                    .map(|at| format!(" at {at}"))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "        relay {}{at} ({})",
                    relay.address,
                    registered(relay.registered)
                );
            }
        } else {
            let _ = writeln!(
                out,
                "        relay {} ({}), backend {}",
                exit.relay,
                registered(exit.registered),
                if exit.backend_up { "up" } else { "DOWN" }
            );
        }
        let keys: Vec<String> = exit
            .keys
            .iter()
            .map(|k| format!("{} ({}, created {})", k.key_id, k.slot, ago(k.created_at)))
            .collect();
        let expiry = exit
            .descriptor_expires_at
            .map_or_else(|| "none registered".to_owned(), until);
        let _ = writeln!(
            out,
            "        keys {}; descriptor expires {expiry}",
            keys.join(", ")
        );
        let _ = writeln!(
            out,
            "        {} requests ({}), {} errors, {} in flight",
            exit.requests_total,
            rate(exit.requests_per_sec),
            exit.errors_total,
            exit.streams_in_flight
        );
        let _ = writeln!(
            out,
            "        overhead {}; backend {}",
            percentiles(&exit.gateway_overhead),
            percentiles(&exit.backend_latency)
        );
        if let Some(dht) = &exit.dht {
            dht_line(&mut out, dht);
        }
    }
    if let Some(client) = &report.client {
        let _ = writeln!(
            out,
            "client  relay {} ({})",
            client.relay,
            if client.relay_connected {
                "connected"
            } else {
                "not connected"
            }
        );
        if !client.pinned_exits.is_empty() {
            let _ = writeln!(
                out,
                "        pinned exits (no other is used): {}",
                client.pinned_exits.join(", ")
            );
        }
        let exits: Vec<String> = client
            .exits
            .iter()
            .map(|e| {
                format!(
                    "{} (key {}, listed by {}{})",
                    e.peer_id,
                    e.key_id,
                    e.vouched_by.len(),
                    match (e.access_token_required, e.token_configured) {
                        (false, _) => "",
                        (true, true) => ", access token required: configured",
                        (true, false) => {
                            ", access token required: NONE configured, requests get 401"
                        }
                    }
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "        {} exits usable{}{}",
            client.exits.len(),
            if exits.is_empty() { "" } else { ": " },
            exits.join(", ")
        );
        for held in &client.held_exits {
            let _ = writeln!(out, "        held (sources disagree on keys): {held}");
        }
        let _ = writeln!(
            out,
            "        {} requests ({}), {} errors, {} in flight",
            client.requests_total,
            rate(client.requests_per_sec),
            client.errors_total,
            client.requests_in_flight
        );
        let _ = writeln!(
            out,
            "        overhead {}; backend {}",
            percentiles(&client.gateway_overhead),
            percentiles(&client.backend_latency)
        );
    }
    out
}

/// One line on a DHT announcement (relay or exit).
fn dht_line(out: &mut String, dht: &DhtStatus) {
    let state = dht_state(dht);
    let _ = writeln!(out, "        DHT {}: {state}", dht.protocol);
    if let (DhtState::Announced, Verification::Unverified { reason }) =
        (dht.state, &dht.verification)
    {
        let _ = writeln!(out, "          {reason}");
    }
}

/// Where an announcement stands, in words: "announced and verified", "announced,
/// unverified", or why it is not announced.
#[must_use]
pub fn dht_state(dht: &DhtStatus) -> &'static str {
    match dht.state {
        DhtState::Starting => "starting",
        DhtState::NoExternalAddress => "NOT announced: no confirmed external address",
        DhtState::Announced => match &dht.verification {
            Verification::Verified => "announced and verified",
            Verification::Unverified { .. } => "announced, unverified",
            Verification::NotYet | Verification::Checking => "announced, verifying",
        },
        DhtState::PublishFailed => "announcement failed, retrying",
    }
}

fn rate(per_sec: Option<f64>) -> String {
    per_sec.map_or_else(
        || "rate not known yet".to_owned(),
        |r| format!("{r:.2}/s over the last minute"),
    )
}

fn percentiles(p: &Percentiles) -> String {
    match (p.p50_ms, p.p90_ms, p.p99_ms) {
        (Some(p50), Some(p90), Some(p99)) => {
            format!(
                "p50 {} p90 {} p99 {} (n={})",
                ms(p50),
                ms(p90),
                ms(p99),
                p.count
            )
        }
        _ => "no samples yet".to_owned(),
    }
}

fn ms(value: f64) -> String {
    if value < 10.0 {
        format!("{value:.2} ms")
    } else {
        format!("{value:.0} ms")
    }
}

fn duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86_400 => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
        _ => format!("{}d{:02}h", secs / 86_400, (secs % 86_400) / 3600),
    }
}

fn ago(at: u64) -> String {
    format!(
        "{} ago",
        duration(crate::clock::unix_now().saturating_sub(at))
    )
}

fn until(at: u64) -> String {
    let now = crate::clock::unix_now();
    if at <= now {
        "already".to_owned()
    } else {
        format!("in {}", duration(at - now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn percent(count: u64) -> Percentiles {
        Percentiles {
            count,
            p50_ms: (count > 0).then_some(1.25),
            p90_ms: (count > 0).then_some(4.0),
            p99_ms: (count > 0).then_some(31.0),
        }
    }

    #[test]
    fn summary_names_every_role_and_what_is_wrong() {
        let report = StatusReport {
            version: "0.1.0".into(),
            role: "serve".into(),
            uptime_secs: 125,
            ready: false,
            not_ready: vec!["exit: backend unreachable".into()],
            relay: Some(RelayStatus {
                peer_id: "12D3KooRelay".into(),
                address: "/ip4/127.0.0.1/udp/1/quic-v1/p2p/12D3KooRelay".into(),
                accepting: true,
                exits_registered: 1,
                client_connections: 1,
                streams_in_flight: 0,
                requests_total: 7,
                requests_per_sec: Some(0.12),
                errors_total: 0,
                exit_first_byte: percent(7),
                dht: Some(DhtStatus {
                    state: DhtState::NoExternalAddress,
                    protocol: "/ipfs/kad/1.0.0".into(),
                    listen_addrs: vec!["/ip4/0.0.0.0/udp/4001/quic-v1".into()],
                    external_addrs: vec![],
                    verification: Verification::NotYet,
                }),
            }),
            exit: Some(ExitStatus {
                peer_id: "12D3KooExit".into(),
                public: false,
                access_token_required: true,
                relay: "/dns4/relays.test/udp/1/quic-v1/p2p/12D3KooRelay".into(),
                registered: true,
                relays: ["10.0.0.1:1", "10.0.0.2:1"]
                    .iter()
                    .enumerate()
                    .map(|(i, at)| ExitRelayStatus {
                        address: "/dns4/relays.test/udp/1/quic-v1/p2p/12D3KooRelay".into(),
                        resolved: Some((*at).into()),
                        registered: i == 0,
                    })
                    .collect(),
                backend_up: false,
                keys: vec![KeyStatus {
                    key_id: 1,
                    slot: "current".into(),
                    created_at: crate::clock::unix_now() - 3600,
                }],
                descriptor_expires_at: Some(crate::clock::unix_now() + 7200),
                requests_total: 7,
                requests_per_sec: None,
                errors_total: 2,
                streams_in_flight: 0,
                gateway_overhead: percent(5),
                backend_latency: percent(0),
                dht: Some(DhtStatus {
                    state: DhtState::Announced,
                    protocol: "/mynet/kad/1.0.0".into(),
                    listen_addrs: vec!["/ip4/0.0.0.0/udp/4002/quic-v1".into()],
                    external_addrs: vec!["/ip4/203.0.113.9/udp/4002/quic-v1".into()],
                    verification: Verification::Unverified {
                        reason: "no answer on UDP 4002".into(),
                    },
                }),
            }),
            client: Some(ClientStatus {
                relay: "/ip4/127.0.0.1/udp/1/quic-v1/p2p/12D3KooRelay".into(),
                relay_connected: true,
                relays: vec![RelaySummary {
                    address: "/ip4/127.0.0.1/udp/1/quic-v1/p2p/12D3KooRelay".into(),
                    connected: true,
                }],
                pinned_exits: vec!["12D3KooExit".into()],
                exits: vec![
                    ExitSummary {
                        peer_id: "12D3KooExit".into(),
                        key_id: 1,
                        vouched_by: vec!["relay 12D3KooRelay".into()],
                        access_token_required: false,
                        token_configured: false,
                    },
                    ExitSummary {
                        peer_id: "12D3KooGated".into(),
                        key_id: 2,
                        vouched_by: vec!["relay 12D3KooRelay".into()],
                        access_token_required: true,
                        token_configured: true,
                    },
                    ExitSummary {
                        peer_id: "12D3KooLocked".into(),
                        key_id: 3,
                        vouched_by: vec!["relay 12D3KooRelay".into()],
                        access_token_required: true,
                        token_configured: false,
                    },
                ],
                held_exits: vec!["12D3KooOther: relay 12D3KooRelay (rollback)".into()],
                requests_total: 7,
                requests_per_sec: Some(0.1),
                errors_total: 2,
                requests_in_flight: 0,
                gateway_overhead: percent(5),
                backend_latency: percent(5),
            }),
        };
        let text = summary(&report);
        for needle in [
            "serve",
            "NOT READY (exit: backend unreachable)",
            "up 2m05s",
            "1 exits registered",
            "12D3KooExit",
            "backend DOWN",
            "relay /dns4/relays.test/udp/1/quic-v1/p2p/12D3KooRelay at 10.0.0.1:1 (registered)",
            "relay /dns4/relays.test/udp/1/quic-v1/p2p/12D3KooRelay at 10.0.0.2:1 (NOT registered)",
            "private: serves only through the relay it was given; access token required",
            "keys 1 (current, created 1h00m ago)",
            "descriptor expires in 2h00m",
            "p50 1.25 ms p90 4.00 ms p99 31 ms (n=5)",
            "rate not known yet",
            "0.12/s over the last minute",
            "3 exits usable: 12D3KooExit (key 1, listed by 1), ",
            "12D3KooGated (key 2, listed by 1, access token required: configured)",
            "12D3KooLocked (key 3, listed by 1, access token required: NONE configured, requests get 401)",
            "pinned exits (no other is used): 12D3KooExit",
            "held (sources disagree on keys): 12D3KooOther",
            "no samples yet",
            "DHT /ipfs/kad/1.0.0: NOT announced: no confirmed external address",
            "DHT /mynet/kad/1.0.0: announced, unverified",
            "no answer on UDP 4002",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(serde_json::from_str::<StatusReport>(&json).unwrap(), report);
    }
}
