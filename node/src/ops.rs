//! Operating a node: the admin endpoint and its probes, metrics, the `/status` document, logs,
//! trace export and the shutdown signal.

pub mod admin;
pub mod logging;
pub mod metrics;
pub mod shutdown;
pub mod status;
pub mod telemetry;
