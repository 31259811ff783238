//! TokenGo node: the client, relay, exit and serve roles of a private AI API gateway.
//!
//! Every request is encrypted end to end with Oblivious HTTP from the local client to an exit,
//! through a relay that only ever sees ciphertext. The wire formats live in `tokengo-proto`;
//! this crate holds the async shells that drive them over QUIC and HTTP.

mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod net;
pub mod ops;
pub mod roles;
pub mod store;
pub mod web;

pub use net::{discovery, stream, transport};
pub use ops::{admin, logging, metrics, shutdown, status, telemetry};
pub use roles::{bootstrap, client, exit, relay, serve};
pub use store::{data_dir, identity, keygen, keyring};
pub use web::http_message;

pub use app::{RoleProbe, run};
