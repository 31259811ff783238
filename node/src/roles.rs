//! The commands a node runs: each role's tasks and its checked configuration. Roles use the
//! layers below them (`net`, `store`, `ops`, `web`) and never the wiring in `app` above them.

pub mod access;
pub mod bootstrap;
pub mod client;
pub mod exit;
pub mod relay;
pub mod serve;
