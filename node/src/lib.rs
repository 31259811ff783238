//! TokenGo node: the client, relay, exit and serve roles of a private AI API gateway.
//!
//! Every request is encrypted end to end with Oblivious HTTP from the local client to an exit,
//! through a relay that only ever sees ciphertext. The wire formats live in `tokengo-proto`;
//! this crate holds the async shells that drive them over QUIC and HTTP.

// Without `test-support` the building blocks the tests reach are private, so their `pub`
// items are unreachable and some (test hooks, their re-exports) unused; the lints are checked with the feature
// on (clippy runs with every target, which turns it on through the dev-dependency).
#![cfg_attr(
    not(feature = "test-support"),
    allow(unreachable_pub, dead_code, unused_imports)
)]

// The layers, private: what other crates may use is chosen below.
mod app;
mod cli;
// Reached by the tests as they are (they are layers of their own, not re-exported).
#[cfg(feature = "test-support")]
pub mod clock;
#[cfg(not(feature = "test-support"))]
mod clock;
#[cfg(feature = "test-support")]
pub mod config;
#[cfg(not(feature = "test-support"))]
mod config;
mod net;
mod ops;
mod roles;
mod store;
mod web;

// What the `tokengo` binary needs.
pub use app::run;
pub use cli::Cli;

// What the integration tests and `tokengo-bench` drive directly: roles bound in-process,
// transports, decoders and status documents. Only with the `test-support` feature, so the
// library's own API stays the two items above.
#[cfg(feature = "test-support")]
pub use {
    app::RoleProbe,
    cli::{LogFormat, StatusArgs},
    net::{discovery, relay_link, resolve, stream, transport},
    ops::{admin, logging, metrics, shutdown, status, telemetry},
    roles::{access, bootstrap, client, exit, relay, serve},
    store::{data_dir, identity, keygen, keyring, keys},
    web::{api_error, http_message},
};
