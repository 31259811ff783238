//! Who a connection comes from, as the relay's fairness and admission rules count it.

use std::net::{IpAddr, SocketAddr};

/// Who a request or connection comes from, for fairness: an IPv4 address, or an IPv6 /64
/// (what one subscriber usually gets, so an attacker cannot pick a fresh address per
/// connection). IPv4-mapped IPv6 addresses count as their IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Source(IpAddr);

impl Source {
    /// The source `addr` belongs to.
    pub(crate) fn of(addr: SocketAddr) -> Self {
        match addr.ip() {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Self(IpAddr::V6(prefix.into()))
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn source(ip: &str) -> Source {
        Source::of(SocketAddr::new(
            ip.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            1,
        ))
    }

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_slash_64s() {
        assert_eq!(source("192.0.2.1"), source("::ffff:192.0.2.1"));
        assert_ne!(source("192.0.2.1"), source("192.0.2.2"));
        assert_eq!(source("2001:db8::1"), source("2001:db8::ffff:1"));
        assert_ne!(source("2001:db8::1"), source("2001:db8:0:1::1"));
        assert_eq!(
            Source::of(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 9)),
            source("::")
        );
    }
}
