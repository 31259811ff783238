//! Looks the relay (or exit) key up on a DHT from a fresh identity and prints what the peers
//! storing it return: every answer's providers and the addresses each came with. Part of the
//! opt-in public smoke check (`scripts/dht-smoke`, never run in CI); it can also be pointed at
//! a private DHT with `--bootstrap`.
//!
//! ```text
//! cargo run -p tokengo --example dht_smoke_lookup -- [--bootstrap MULTIADDR]... \
//!     [--dht-protocol /ipfs/kad/1.0.0] [--key relay|exit] [--expect PEERID] [--timeout SECS]
//! ```
//! Exits 0 when `--expect` was returned with at least one address (or without `--expect`
//! when any provider was), 1 otherwise.

use std::{collections::HashMap, time::Duration};

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use libp2p::{
    Multiaddr, PeerId, StreamProtocol,
    core::Endpoint,
    kad,
    multiaddr::Protocol,
    swarm::{ConnectionId, NetworkBehaviour as _, SwarmEvent},
};
use tokengo::discovery::{DEFAULT_DHT_PROTOCOL, MAX_KAD_PACKET, PUBLIC_BOOTSTRAP};
use tokengo_proto::{exit_info, relay_info};

struct Args {
    bootstrap: Vec<Multiaddr>,
    protocol: String,
    key: Vec<u8>,
    expect: Option<PeerId>,
    timeout: Duration,
}

fn args() -> anyhow::Result<Args> {
    let mut parsed = Args {
        bootstrap: Vec::new(),
        protocol: DEFAULT_DHT_PROTOCOL.to_owned(),
        key: relay_info::provider_key(relay_info::RELAY_NAMESPACE),
        expect: None,
        timeout: Duration::from_secs(120),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--bootstrap" => parsed
                .bootstrap
                .push(value.parse().context("--bootstrap: not a multiaddr")?),
            "--dht-protocol" => parsed.protocol = value,
            "--key" => {
                parsed.key = match value.as_str() {
                    "relay" => relay_info::provider_key(relay_info::RELAY_NAMESPACE),
                    "exit" => exit_info::provider_key(),
                    other => bail!("--key {other}: use relay or exit"),
                }
            }
            "--expect" => parsed.expect = Some(value.parse().context("--expect: not a PeerId")?),
            "--timeout" => {
                parsed.timeout = Duration::from_secs(value.parse().context("--timeout: seconds")?);
            }
            other => bail!("unknown flag {other}"),
        }
    }
    if parsed.bootstrap.is_empty() {
        parsed.bootstrap = PUBLIC_BOOTSTRAP
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
    }
    Ok(parsed)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let protocol = StreamProtocol::try_from_owned(args.protocol.clone())?;
    let timeout = args.timeout;
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_quic()
        .with_dns()?
        .with_behaviour(|key| {
            let peer = key.public().to_peer_id();
            let mut config = kad::Config::new(protocol);
            config.set_query_timeout(timeout);
            config.set_max_packet_size(MAX_KAD_PACKET);
            let mut kad =
                kad::Behaviour::with_config(peer, kad::store::MemoryStore::new(peer), config);
            kad.set_mode(Some(kad::Mode::Client));
            kad
        })?
        .build();
    for addr in &args.bootstrap {
        let mut base = addr.clone();
        let Some(Protocol::P2p(peer)) = base.pop() else {
            bail!("{addr}: no /p2p/PEERID");
        };
        swarm.behaviour_mut().add_address(&peer, base);
    }
    println!(
        "looking up {} on {} from {} (timeout {:?})",
        hex(&args.key),
        args.protocol,
        swarm.local_peer_id(),
        args.timeout
    );
    let query = swarm
        .behaviour_mut()
        .get_providers(kad::RecordKey::new(&args.key));
    let mut answers = 0usize;
    // Provider -> (answers naming it, most addresses seen with it).
    let mut seen: HashMap<PeerId, (usize, Vec<Multiaddr>)> = HashMap::new();
    loop {
        let event = swarm.select_next_some().await;
        let SwarmEvent::Behaviour(kad::Event::OutboundQueryProgressed {
            id, result, step, ..
        }) = event
        else {
            continue;
        };
        if id != query {
            continue;
        }
        match result {
            kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
                providers,
                ..
            })) => {
                answers += 1;
                println!("answer {answers}: {} provider(s)", providers.len());
                for peer in providers {
                    // Where kad would dial it: the addresses the answer came with (and its
                    // routing table entry, if any).
                    let addrs = swarm
                        .behaviour_mut()
                        .handle_pending_outbound_connection(
                            ConnectionId::new_unchecked(0),
                            Some(peer),
                            &[],
                            Endpoint::Dialer,
                        )
                        .unwrap_or_default();
                    let mark = if Some(peer) == args.expect {
                        " <- expected"
                    } else {
                        ""
                    };
                    println!("  {peer} with {} address(es){mark}", addrs.len());
                    for addr in addrs.iter().take(8) {
                        println!("    {addr}");
                    }
                    let entry = seen.entry(peer).or_default();
                    entry.0 += 1;
                    if addrs.len() > entry.1.len() {
                        entry.1 = addrs;
                    }
                }
            }
            kad::QueryResult::GetProviders(Ok(_)) => {}
            kad::QueryResult::GetProviders(Err(error)) => println!("lookup ended: {error}"),
            _ => continue,
        }
        if step.last {
            break;
        }
    }
    println!(
        "{answers} answer(s), {} distinct provider(s), {} of them with addresses",
        seen.len(),
        seen.values().filter(|(_, a)| !a.is_empty()).count()
    );
    let ok = match args.expect {
        Some(peer) => match seen.get(&peer) {
            Some((n, addrs)) if !addrs.is_empty() => {
                println!("PASS: {peer} returned by {n} answer(s), with addresses");
                true
            }
            Some((n, _)) => {
                println!("FAIL: {peer} returned by {n} answer(s), but never with an address");
                false
            }
            None => {
                println!("FAIL: {peer} was not returned");
                false
            }
        },
        None => !seen.is_empty(),
    };
    std::process::exit(if ok { 0 } else { 1 });
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
