//! Name resolution of relay addresses given by DNS name: every address a name resolves to, not
//! only the first. A Kubernetes headless Service name resolves to one A record per ready relay
//! pod, and an exit keeps a tunnel to each (`roles::exit::relay_set`).
//!
//! [`Resolve`] is the seam: production uses [`SystemResolver`] (the system's `getaddrinfo`,
//! which is what a pod's DNS configuration feeds); tests that need one name with several
//! addresses use `FixedTable` (only with the `test-support` feature), since a loopback test
//! cannot make the system resolver answer three addresses for one name.

use std::net::SocketAddr;

use futures_util::future::BoxFuture;

/// Why a name gave no address.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The resolver failed (no such name, no DNS server answering, ...).
    #[error("cannot resolve {name}: {source}")]
    Lookup {
        /// The name.
        name: String,
        /// The resolver's explanation.
        source: std::io::Error,
    },
    /// The name exists but has no address.
    #[error("{name} resolves to no address")]
    NoAddress {
        /// The name.
        name: String,
    },
}

/// Resolves a host name to socket addresses (all of them, with `port`).
pub trait Resolve: Send + Sync + std::fmt::Debug {
    /// Every address `name` resolves to, each with `port`: sorted, without duplicates, never
    /// empty (no address is [`ResolveError::NoAddress`]).
    fn lookup<'a>(
        &'a self,
        name: &'a str,
        port: u16,
    ) -> BoxFuture<'a, Result<Vec<SocketAddr>, ResolveError>>;
}

/// The system resolver (`getaddrinfo` through tokio's blocking pool): what `/etc/resolv.conf`
/// and `/etc/hosts` say, and in Kubernetes the cluster DNS.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn lookup<'a>(
        &'a self,
        name: &'a str,
        port: u16,
    ) -> BoxFuture<'a, Result<Vec<SocketAddr>, ResolveError>> {
        Box::pin(async move {
            let found = tokio::net::lookup_host((name, port))
                .await
                .map_err(|source| ResolveError::Lookup {
                    name: name.to_owned(),
                    source,
                })?;
            normalise(name, found.collect())
        })
    }
}

/// Sorted, de-duplicated, and an error when empty (getaddrinfo lists an address once per
/// socket type unless told otherwise).
fn normalise(name: &str, mut addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, ResolveError> {
    addrs.sort_unstable();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(ResolveError::NoAddress {
            name: name.to_owned(),
        });
    }
    Ok(addrs)
}

#[cfg(any(test, feature = "test-support"))]
pub use fixed::FixedTable;

#[cfg(any(test, feature = "test-support"))]
mod fixed {
    //! A stand-in for a DNS server that answers several A records for one name (a Kubernetes
    //! headless Service): loopback tests cannot make the system resolver do that.

    use std::{
        collections::HashMap,
        net::{IpAddr, SocketAddr},
        sync::{
            Mutex,
            atomic::{AtomicUsize, Ordering},
        },
    };

    use futures_util::future::BoxFuture;

    use super::{Resolve, ResolveError, normalise};

    /// A fixed table of names and their addresses, changed by the test as a DNS server's
    /// records would change (a pod that became ready or left). A name not in the table fails
    /// as an unknown name does.
    #[derive(Debug, Default)]
    pub struct FixedTable {
        names: Mutex<HashMap<String, Vec<IpAddr>>>,
        /// Lookups answered (or failed) so far: lets a test wait for resolutions to happen.
        lookups: AtomicUsize,
    }

    impl FixedTable {
        /// An empty table.
        #[must_use]
        pub fn new() -> Self {
            Self::default()
        }

        /// Makes `name` resolve to `addrs` (none: the name is unknown).
        pub fn set(&self, name: &str, addrs: &[IpAddr]) {
            let mut names = self.lock();
            if addrs.is_empty() {
                names.remove(name);
            } else {
                names.insert(name.to_owned(), addrs.to_vec());
            }
        }

        /// How many lookups the table has answered, failed ones included.
        #[must_use]
        pub fn lookups(&self) -> usize {
            self.lookups.load(Ordering::SeqCst)
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<IpAddr>>> {
            // One insert or remove at a time: a poisoned lock still holds a whole table.
            self.names
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        }
    }

    impl Resolve for FixedTable {
        fn lookup<'a>(
            &'a self,
            name: &'a str,
            port: u16,
        ) -> BoxFuture<'a, Result<Vec<SocketAddr>, ResolveError>> {
            let found = self.lock().get(name).cloned();
            self.lookups.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                let ips = found.ok_or_else(|| ResolveError::Lookup {
                    name: name.to_owned(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "not in the test's fixed table",
                    ),
                })?;
                normalise(
                    name,
                    ips.into_iter()
                        .map(|ip| SocketAddr::new(ip, port))
                        .collect(),
                )
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_fixed_table_answers_every_address_sorted_and_once() {
        let table = FixedTable::new();
        let ips: Vec<std::net::IpAddr> = ["127.0.0.3", "127.0.0.1", "127.0.0.2", "127.0.0.1"]
            .iter()
            .map(|ip| ip.parse().unwrap())
            .collect();
        table.set("relay.test", &ips);
        let found = table.lookup("relay.test", 4433).await.unwrap();
        let expected: Vec<SocketAddr> = ["127.0.0.1:4433", "127.0.0.2:4433", "127.0.0.3:4433"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(found, expected);
        table.set("relay.test", &[]);
        let error = table.lookup("relay.test", 4433).await.unwrap_err();
        assert!(error.to_string().contains("relay.test"), "{error}");
    }

    #[tokio::test]
    async fn the_system_resolver_answers_localhost_with_the_port() {
        // `localhost` comes from /etc/hosts: no DNS server is asked (the tests have none).
        let found = SystemResolver.lookup("localhost", 4433).await.unwrap();
        assert!(!found.is_empty());
        assert!(
            found
                .iter()
                .all(|a| a.port() == 4433 && a.ip().is_loopback())
        );
    }

    #[test]
    fn no_address_is_an_error() {
        assert!(matches!(
            normalise("x", Vec::new()),
            Err(ResolveError::NoAddress { .. })
        ));
    }
}
