//! The cryptographic floor of one proxied request (`cargo bench -p tokengo-proto`): what no
//! implementation of the protocol can avoid for a small, non-streamed chat request. That is
//! the HPKE setup on both sides (the client's encapsulation: an ephemeral X25519 key pair
//! and one DH; the exit's decapsulation: one DH; the key schedules), the AEAD seal and open of
//! the request, the response key derivation and the seal and open of the response. `bench/run`
//! divides the CPU time the client, relay and exit processes spend per request by
//! `floor/ohttp_roundtrip`.
//!
//! The messages have the padded sizes the client and exit produce for the benchmark's small
//! chat request and nginx's fixed JSON answer (both land in the 512-byte bucket); AES-GCM on
//! them costs well under a microsecond, so the floor is dominated by the three X25519
//! operations either way.
#![allow(clippy::expect_used, missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tokengo_proto::{hpke, key_config::KeyPair, ohttp};

/// Padded inner request and response sizes (BHTTP, `padding::bucket`).
const REQUEST_LEN: usize = 512;
const RESPONSE_LEN: usize = 512;

fn floor(c: &mut Criterion) {
    let key = KeyPair::from_seed(1, &[42; 32]);
    let config = key.config();
    let gateway = ohttp::Gateway::new(vec![key]);
    let request = vec![0x61; REQUEST_LEN];
    let response = vec![0x62; RESPONSE_LEN];

    c.bench_function("floor/ohttp_roundtrip", |b| {
        b.iter(|| {
            let (enc_request, opener) =
                ohttp::encapsulate_request(&config, black_box(&request)).expect("encapsulate");
            let (plain, sealer) = gateway.decapsulate(&enc_request).expect("decapsulate");
            black_box(&plain);
            let enc_response = sealer.seal(black_box(&response)).expect("seal");
            black_box(opener.open(&enc_response).expect("open"))
        });
    });

    // The parts, to see where the floor goes.
    let recipient = hpke::derive_key_pair(b"bench recipient");
    let public = *recipient.public_key();
    c.bench_function("part/hpke_setup_sender", |b| {
        b.iter(|| black_box(hpke::setup_sender(black_box(&public), b"info").expect("setup")));
    });
    let (enc, _) = hpke::setup_sender(&public, b"info").expect("setup");
    c.bench_function("part/hpke_setup_receiver", |b| {
        b.iter(|| {
            black_box(hpke::setup_receiver(&recipient, black_box(&enc), b"info").expect("setup"))
        });
    });
    let (_, mut sender) = hpke::setup_sender(&public, b"info").expect("setup");
    c.bench_function("part/aead_seal_512", |b| {
        b.iter(|| black_box(sender.seal(b"", black_box(&request)).expect("seal")));
    });
}

criterion_group!(benches, floor);
criterion_main!(benches);
