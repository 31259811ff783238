//! The client's view of the exits behind its relay: fetched from the relay, every descriptor's
//! signature checked against the exit's own identity (so a relay cannot substitute keys), and
//! a choice of exit per request by model served and measured latency.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use libp2p_identity::PeerId;
use tokengo_proto::{
    descriptor::SignedDescriptor,
    frame::{self, ClientRequest, Status},
    key_config::KeyConfig,
};

use super::relay_link::RelayLink;
use crate::{api_error::ApiError, clock::unix_now, stream::StreamReader};

/// How long a fetched exit list is used before it is fetched again.
const FRESH_FOR: Duration = Duration::from_secs(60);
/// Largest exit list accepted from a relay.
const MAX_LIST_BYTES: usize = 4 << 20;
/// Most exits accepted from one relay.
const MAX_EXITS: usize = 1024;

/// An exit whose descriptor verified.
#[derive(Debug, Clone)]
pub struct ExitInfo {
    /// Its identity.
    pub peer_id: PeerId,
    /// Its current OHTTP key (the first listed).
    pub key_config: KeyConfig,
    /// Models its backend serves (may be empty: unknown).
    pub models: Vec<String>,
}

/// Known exits.
#[derive(Debug)]
pub struct Directory {
    exits: RwLock<(Arc<Vec<ExitInfo>>, Option<Instant>)>,
    latency: Mutex<HashMap<PeerId, Duration>>,
    refreshing: tokio::sync::Mutex<()>,
}

impl Default for Directory {
    fn default() -> Self {
        Self {
            exits: RwLock::new((Arc::new(Vec::new()), None)),
            latency: Mutex::default(),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }
}

impl Directory {
    /// The exits, fetched from the relay if the list is empty or stale.
    pub async fn exits(&self, link: &RelayLink) -> Result<Arc<Vec<ExitInfo>>, ApiError> {
        {
            let guard = self
                .exits
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !guard.0.is_empty() && guard.1.is_some_and(|at| at.elapsed() < FRESH_FOR) {
                return Ok(Arc::clone(&guard.0));
            }
        }
        self.refresh(link).await
    }

    /// Fetches and verifies the exit list now (one fetch at a time; concurrent callers share it).
    pub async fn refresh(&self, link: &RelayLink) -> Result<Arc<Vec<ExitInfo>>, ApiError> {
        let before = self.fetched_at();
        let _turn = self.refreshing.lock().await;
        if self.fetched_at() != before {
            // Someone refreshed while we waited.
            return Ok(self.current());
        }
        let exits = Arc::new(fetch(link).await?);
        *self
            .exits
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            (Arc::clone(&exits), Some(Instant::now()));
        Ok(exits)
    }

    /// The exits of the last fetch (empty before the first).
    #[must_use]
    pub fn current(&self) -> Arc<Vec<ExitInfo>> {
        Arc::clone(
            &self
                .exits
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0,
        )
    }

    fn fetched_at(&self) -> Option<Instant> {
        self.exits
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
    }

    /// Picks an exit for `model`: among exits not in `exclude`, those that list the model (or
    /// list nothing) first, then the lowest measured latency; unmeasured exits count as fast
    /// so each gets tried.
    #[must_use]
    pub fn choose(
        &self,
        exits: &[ExitInfo],
        model: Option<&str>,
        exclude: &[PeerId],
    ) -> Option<ExitInfo> {
        let latency = self
            .latency
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        exits
            .iter()
            .filter(|e| !exclude.contains(&e.peer_id))
            .min_by_key(|e| {
                let serves = match model {
                    Some(m) if !e.models.is_empty() => e.models.iter().any(|x| x == m),
                    _ => true,
                };
                (
                    !serves,
                    latency.get(&e.peer_id).copied().unwrap_or_default(),
                )
            })
            .cloned()
    }

    /// Records how long an exit took to start answering (exponentially weighted).
    pub fn record_latency(&self, peer: PeerId, sample: Duration) {
        let mut latency = self
            .latency
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = latency.entry(peer).or_insert(sample);
        *entry = (*entry * 7 + sample) / 8;
    }
}

async fn fetch(link: &RelayLink) -> Result<Vec<ExitInfo>, ApiError> {
    let (mut send, recv) = link.open().await?;
    let mut header = Vec::new();
    ClientRequest::ListExits.encode(&mut header);
    send.write_all(&header)
        .await
        .map_err(|e| ApiError::RelayUnreachable(e.to_string()))?;
    let _ = send.finish();
    let mut reader = StreamReader::new(recv);
    let answer = tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(MAX_LIST_BYTES))
        .await
        .map_err(|_| {
            ApiError::RelayUnreachable("relay did not answer the exit list request".into())
        })?
        .map_err(|e| ApiError::RelayUnreachable(format!("exit list: {e}")))?;
    let (status, list) = answer
        .split_first()
        .ok_or_else(|| ApiError::RelayUnreachable("empty answer to exit list request".into()))?;
    if Status::try_from(*status).ok() != Some(Status::Ok) {
        return Err(ApiError::RelayUnreachable(format!(
            "relay refused the exit list request ({status:#04x})"
        )));
    }
    let descriptors = frame::decode_exit_list(list, MAX_EXITS)
        .map_err(|e| ApiError::RelayUnreachable(format!("malformed exit list: {e}")))?;
    let now = unix_now();
    let exits: Vec<ExitInfo> = descriptors
        .iter()
        .filter_map(|bytes| match SignedDescriptor::verify(bytes, now) {
            Ok(d) => Some(ExitInfo {
                peer_id: d.peer_id,
                key_config: *d.key_configs.first()?,
                models: d.models,
            }),
            Err(error) => {
                tracing::warn!(%error, "relay listed an exit whose descriptor does not verify; ignoring it");
                None
            }
        })
        .collect();
    tracing::debug!(exits = exits.len(), "exit list fetched");
    Ok(exits)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn exit(models: &[&str]) -> ExitInfo {
        ExitInfo {
            peer_id: libp2p_identity::Keypair::generate_ed25519()
                .public()
                .to_peer_id(),
            key_config: KeyConfig {
                key_id: 1,
                public_key: [0; 32],
            },
            models: models.iter().map(|m| (*m).to_owned()).collect(),
        }
    }

    #[test]
    fn prefers_model_then_latency() {
        let directory = Directory::default();
        let a = exit(&["llama"]);
        let b = exit(&["gemma"]);
        let c = exit(&["gemma"]);
        directory.record_latency(b.peer_id, Duration::from_millis(50));
        directory.record_latency(c.peer_id, Duration::from_millis(5));
        let all = vec![a.clone(), b.clone(), c.clone()];
        assert_eq!(
            directory.choose(&all, Some("gemma"), &[]).unwrap().peer_id,
            c.peer_id
        );
        assert_eq!(
            directory
                .choose(&all, Some("gemma"), &[c.peer_id])
                .unwrap()
                .peer_id,
            b.peer_id
        );
        assert_eq!(
            directory.choose(&all, Some("llama"), &[]).unwrap().peer_id,
            a.peer_id
        );
        // Unknown model: any exit rather than none.
        assert!(directory.choose(&all, Some("other"), &[]).is_some());
        assert!(
            directory
                .choose(&all, None, &[a.peer_id, b.peer_id, c.peer_id])
                .is_none()
        );
    }
}
