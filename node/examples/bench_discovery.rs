//! Discovery time from a cold start to the first usable (verified) relay, on a private DHT on
//! loopback: three DHT servers and two announcing relays, then `RUNS` cold discoveries, each
//! with a fresh libp2p identity, a fresh swarm and no cache. Prints every time and the median.
//!
//! `scripts/bench-discovery` runs it; nothing here touches the public network.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use libp2p::StreamProtocol;
use libp2p_identity::Keypair;
use tokengo::{
    config::Limits,
    discovery::{self, AddressPolicy, Announcer, DhtConfig, DhtServer, DialGuard, Seek},
    metrics::DhtMetrics,
    relay::Relay,
    status::DhtState,
    transport::TransportParams,
};
use tokio_util::sync::CancellationToken;

const RUNS: usize = 10;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tokengo::transport::install_crypto_provider();
    let stop = CancellationToken::new();
    let mut config = DhtConfig {
        bootstrap: Vec::new(),
        protocol: StreamProtocol::new("/tokengo-test/kad/1.0.0"),
        policy: AddressPolicy::Loopback,
        timeout: Duration::from_secs(30),
    };
    for _ in 0..3 {
        let server = DhtServer::start(
            &config,
            Keypair::generate_ed25519(),
            "127.0.0.1:0".parse()?,
            &[],
            DialGuard::default(),
        )
        .await?;
        config.bootstrap.extend(server.addrs().iter().cloned());
        tokio::spawn(server.run(stop.clone()));
    }
    for _ in 0..2 {
        let identity = Keypair::generate_ed25519();
        let relay = Relay::bind("127.0.0.1:0".parse()?, &identity, &Limits::default())?;
        let status = relay.dht_status();
        let mut announced = status.subscribe();
        let announcer = Announcer {
            identity,
            listen: "127.0.0.1:0".parse()?,
            external_ips: Vec::new(),
            info: discovery::Answer::Relay(tokengo::relay::relay_info_source(
                vec![relay.addr().clone()],
                relay.registry(),
            )),
            status,
            metrics: relay.metrics().dht.clone(),
            guard: DialGuard::default(),
        };
        tokio::spawn(relay.run(stop.clone()));
        let (config, stop) = (config.clone(), stop.clone());
        tokio::spawn(async move { discovery::announce(&config, announcer, stop).await });
        tokio::time::timeout(
            Duration::from_secs(30),
            announced.wait_for(|s| s.as_ref().is_some_and(|s| s.state == DhtState::Announced)),
        )
        .await??;
    }
    let refused = DialGuard::default();
    let mut times = Vec::with_capacity(RUNS);
    for run in 1..=RUNS {
        let seek = Seek {
            cache: None,
            want: 1,
            settle: Duration::ZERO,
            params: TransportParams {
                idle_timeout: Duration::from_secs(30),
                max_incoming_streams: 0,
                keep_alive: false,
            },
            guard: refused.clone(),
            metrics: DhtMetrics::default(),
        };
        let found = discovery::discover(&config, seek, &stop).await?;
        let ms = found.first_usable.as_secs_f64() * 1000.0;
        println!("run {run:2}: first usable relay after {ms:.1} ms");
        times.push(ms);
    }
    times.sort_by(f64::total_cmp);
    let median = (times[RUNS / 2 - 1] + times[RUNS / 2]) / 2.0;
    println!(
        "median over {RUNS} runs: {median:.1} ms (refused dials: {})",
        refused.refused.get()
    );
    stop.cancel();
    Ok(())
}
