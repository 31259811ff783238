//! TokenGo's wire formats without I/O: OHTTP (RFC 9458 and chunked OHTTP), Binary HTTP
//! (RFC 9292), key configurations, the exit's OHTTP keyring file, the relay wire frames and QUIC
//! close codes, signed exit descriptors, the relay- and exit-discovery messages, and the file
//! names of a node's data directory (shared with the operator).
//!
//! Nothing in this crate performs I/O or depends on an async runtime: every decoder is a
//! push-style state machine fed from a `BytesMut`, so the node's async shells and the tests
//! drive exactly the same code.

pub mod bhttp;
pub mod chunked;
pub mod close_code;
pub mod data_dir;
pub mod descriptor;
pub mod exit_info;
pub mod frame;
pub mod hpke;
pub mod key_config;
pub mod keyring;
pub mod ohttp;
pub mod padding;
pub mod relay_info;
pub mod varint;
