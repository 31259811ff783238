//! TokenGo operator: reconciles `TokenGoRelay` and `TokenGoExit` resources into Secrets (keys,
//! created once), Deployments (relays), StatefulSets (exits) and Services, with pure builders
//! for the desired objects (`manifest`) and async shells that apply them (`reconcile`).

pub mod admin;
pub mod keys;
pub mod lease;
pub mod manifest;
pub mod metrics;
pub mod reconcile;
pub mod resource;
pub mod startup;
