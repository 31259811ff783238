//! Which addresses discovery may dial, enforced where every dial passes: a wrapper around the
//! libp2p transport. A DHT hands out whatever addresses peers claim, LAN and loopback ones
//! included; dialling those from a server scans its provider's network and earns abuse
//! reports, so on the public DHT only global addresses are dialled. Tests use `loopback`.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use libp2p::{
    Multiaddr,
    core::transport::{DialOpts, ListenerId, TransportError, TransportEvent},
    multiaddr::Protocol,
};
use prometheus_client::metrics::counter::Counter;

/// Which addresses may be dialled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AddressPolicy {
    /// Globally routable addresses only (the default; right for the public DHT).
    #[default]
    Public,
    /// Loopback only (tests and single-host private networks).
    Loopback,
    /// Anything (private networks on a LAN).
    Any,
}

impl std::str::FromStr for AddressPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "public" => Ok(Self::Public),
            "loopback" => Ok(Self::Loopback),
            "any" => Ok(Self::Any),
            other => Err(format!(
                "`{other}` is not an address policy; use public, loopback or any"
            )),
        }
    }
}

impl std::fmt::Display for AddressPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Public => "public",
            Self::Loopback => "loopback",
            Self::Any => "any",
        })
    }
}

impl AddressPolicy {
    /// Whether an IP address may be dialled.
    #[must_use]
    pub fn allows_ip(self, ip: IpAddr) -> bool {
        match self {
            Self::Any => !ip.is_unspecified() && !ip.is_multicast(),
            Self::Loopback => ip.is_loopback(),
            Self::Public => is_global(ip),
        }
    }

    /// Whether a multiaddr may be dialled: it must start with an IP address the policy allows.
    /// DNS names are refused here; the only names resolved are the configured bootstrap
    /// peers' ([`BootstrapNames`]), and what they resolve to is judged here as IP addresses.
    #[must_use]
    pub fn allows(self, addr: &Multiaddr) -> bool {
        match addr.iter().next() {
            Some(Protocol::Ip4(ip)) => self.allows_ip(ip.into()),
            Some(Protocol::Ip6(ip)) => self.allows_ip(ip.into()),
            _ => false,
        }
    }
}

fn is_global(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => is_global_v4(ip),
        IpAddr::V6(ip) => {
            if let Some(v4) = ip.to_ipv4_mapped() {
                return is_global_v4(v4);
            }
            let [first, second, ..] = ip.segments();
            let listed = !(ip.is_unspecified()
                || ip.is_loopback()
                || ip.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link local
                || (first == 0x2001 && second == 0x0db8) // documentation
                || (first == 0x0064 && second == 0xff9b && ip.segments()[2] == 0x0001) // local-use NAT64 (RFC 8215)
                || (first == 0x0100 && ip.segments()[1..4] == [0, 0, 0])); // discard-only (RFC 6666)
            // An address that carries an IPv4 address reaches that IPv4 address (through a
            // NAT64 gateway, a 6to4 or Teredo relay): it is global only if what it embeds is.
            listed && embedded_v4(ip).iter().all(|v4| is_global_v4(*v4))
        }
    }
}

/// The IPv4 addresses an IPv6 address embeds and leads to: NAT64's well-known prefix
/// `64:ff9b::/96` (RFC 6052), 6to4 `2002::/16` (RFC 3056), Teredo `2001::/32` (RFC 4380: the
/// server, and the client's address inverted) and the deprecated IPv4-compatible `::/96`.
fn embedded_v4(ip: Ipv6Addr) -> Vec<Ipv4Addr> {
    let s = ip.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    match s {
        [0x0064, 0xff9b, 0, 0, 0, 0, hi, lo] => vec![v4(hi, lo)],
        [0x2002, hi, lo, ..] => vec![v4(hi, lo)],
        [0x2001, 0x0000, server_hi, server_lo, _, _, hi, lo] => {
            vec![v4(server_hi, server_lo), v4(!hi, !lo)]
        }
        [0, 0, 0, 0, 0, 0, hi, lo] if (hi, lo) != (0, 0) && (hi, lo) != (0, 1) => {
            vec![v4(hi, lo)]
        }
        _ => Vec::new(),
    }
}

fn is_global_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || (a == 100 && (64..128).contains(&b)) // shared address space (carrier-grade NAT)
        || (a == 192 && b == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || a >= 240) // reserved
}

/// Sees every address discovery dials or refuses (tests assert on it).
pub type DialObserver = Arc<dyn Fn(&Multiaddr, bool) + Send + Sync>;

/// What the transport wrapper reports to.
#[derive(Clone, Default)]
pub struct DialGuard {
    /// Dials refused by the policy.
    pub refused: Counter,
    /// Called with every address and whether it was allowed.
    pub observer: Option<DialObserver>,
}

impl std::fmt::Debug for DialGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DialGuard")
            .field("refused", &self.refused.get())
            .finish_non_exhaustive()
    }
}

/// Which dials a [`GuardedDials`] lets through, and how a refusal is told.
pub trait DialRule {
    /// Whether allowed dials are reported to the observer too. Only the rule nearest the
    /// socket reports them, so each dial is seen once, as the IP address it goes to.
    const REPORTS_ALLOWED: bool;

    /// Whether `addr` may be dialled.
    fn permits(&self, addr: &Multiaddr) -> bool;

    /// Logs a refused dial.
    fn log_refusal(&self);
}

impl DialRule for AddressPolicy {
    const REPORTS_ALLOWED: bool = true;

    fn permits(&self, addr: &Multiaddr) -> bool {
        self.allows(addr)
    }

    fn log_refusal(&self) {
        tracing::debug!(policy = %self, "refusing to dial an address outside the policy");
    }
}

/// The host names of the configured bootstrap peers: the only names that may go to the
/// resolver. Any other `/dns*` address, such as one a DHT record or identify handed out, is
/// refused without a lookup, so nobody can make a node query names of their choice (a lookup
/// of an attacker's name tells the attacker's name server who is looking).
#[derive(Debug, Clone, Default)]
pub struct BootstrapNames(Vec<String>);

impl BootstrapNames {
    /// The names that `bootstrap` addresses start with.
    #[must_use]
    pub fn of(bootstrap: &[Multiaddr]) -> Self {
        Self(bootstrap.iter().filter_map(dns_name).collect())
    }
}

impl DialRule for BootstrapNames {
    // The resolver sits outside the address policy, which reports the resolved dials.
    const REPORTS_ALLOWED: bool = false;

    /// Whether `addr` may go to the resolver (or needs none).
    fn permits(&self, addr: &Multiaddr) -> bool {
        dns_name(addr).is_none_or(|name| self.0.contains(&name))
    }

    fn log_refusal(&self) {
        tracing::debug!("refusing to resolve a name that is no bootstrap peer's");
    }
}

/// The host name an address starts with, if it starts with one.
fn dns_name(addr: &Multiaddr) -> Option<String> {
    match addr.iter().next() {
        Some(Protocol::Dns(n) | Protocol::Dns4(n) | Protocol::Dns6(n) | Protocol::Dnsaddr(n)) => {
            Some(n.to_ascii_lowercase())
        }
        _ => None,
    }
}

/// A transport that refuses the dials its rule does not allow, counting each refusal in its
/// guard: around QUIC with the [`AddressPolicy`], around the DNS resolver with the
/// [`BootstrapNames`].
#[derive(Debug)]
pub struct GuardedDials<T, R> {
    inner: T,
    rule: R,
    guard: DialGuard,
}

impl<T, R> GuardedDials<T, R> {
    /// Wraps `inner`.
    pub fn new(inner: T, rule: R, guard: DialGuard) -> Self {
        Self { inner, rule, guard }
    }
}

impl<T, R> libp2p::core::Transport for GuardedDials<T, R>
where
    T: libp2p::core::Transport + Unpin,
    R: DialRule + Unpin,
{
    type Output = T::Output;
    type Error = T::Error;
    type ListenerUpgrade = T::ListenerUpgrade;
    type Dial = T::Dial;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        self.inner.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.inner.remove_listener(id)
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        let allowed = self.rule.permits(&addr);
        if let Some(observer) = &self.guard.observer
            && (R::REPORTS_ALLOWED || !allowed)
        {
            observer(&addr, allowed);
        }
        if !allowed {
            self.guard.refused.inc();
            self.rule.log_refusal();
            return Err(TransportError::MultiaddrNotSupported(addr));
        }
        self.inner.dial(addr, opts)
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        Pin::new(&mut self.inner).poll(cx)
    }
}

/// Records addresses for tests: every dial attempt, allowed or not.
#[derive(Debug, Default)]
pub struct DialRecord(pub Mutex<Vec<(Multiaddr, bool)>>);

impl DialRecord {
    /// An observer that appends to this record.
    #[must_use]
    pub fn observer(self: &Arc<Self>) -> DialObserver {
        let record = Arc::clone(self);
        Arc::new(move |addr, allowed| {
            record
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((addr.clone(), allowed));
        })
    }

    /// Every address recorded so far.
    #[must_use]
    pub fn addrs(&self) -> Vec<(Multiaddr, bool)> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The first IP of a multiaddr, if it starts with one.
#[must_use]
pub fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => Some(ip.into()),
        Some(Protocol::Ip6(ip)) => Some(ip.into()),
        _ => None,
    }
}

/// Loopback in the address family of `ip` (for printing unspecified listen addresses).
#[must_use]
pub fn loopback_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
        IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ma(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn public_refuses_private_loopback_and_dns() {
        let p = AddressPolicy::Public;
        assert!(p.allows(&ma("/ip4/104.131.131.82/udp/4001/quic-v1")));
        assert!(p.allows(&ma("/ip6/2604:a880:1:20::203:d001/udp/4001/quic-v1")));
        for no in [
            "/ip4/127.0.0.1/udp/4001/quic-v1",
            "/ip4/10.1.2.3/udp/4001/quic-v1",
            "/ip4/192.168.1.1/udp/4001/quic-v1",
            "/ip4/172.16.0.1/udp/4001/quic-v1",
            "/ip4/100.64.0.1/udp/4001/quic-v1",
            "/ip4/169.254.1.1/udp/4001/quic-v1",
            "/ip4/0.0.0.0/udp/4001/quic-v1",
            "/ip6/::1/udp/4001/quic-v1",
            "/ip6/fd00::1/udp/4001/quic-v1",
            "/ip6/fe80::1/udp/4001/quic-v1",
            "/ip6/::ffff:10.0.0.1/udp/4001/quic-v1",
            "/dns4/example.com/udp/4001/quic-v1",
        ] {
            assert!(!p.allows(&ma(no)), "{no}");
        }
    }

    #[test]
    fn public_refuses_ipv6_addresses_that_embed_private_ipv4() {
        let p = AddressPolicy::Public;
        for no in [
            // NAT64 (RFC 6052) of 10.0.0.1, 127.0.0.1, 192.168.1.1, 169.254.169.254
            "64:ff9b::a00:1",
            "64:ff9b::7f00:1",
            "64:ff9b::c0a8:101",
            "64:ff9b::a9fe:a9fe",
            // local-use NAT64 (RFC 8215), whatever it embeds
            "64:ff9b:1::6883:8352",
            // 6to4 of 10.1.2.3, 127.0.0.1, 172.16.0.1, 100.64.0.1
            "2002:a01:203::1",
            "2002:7f00:1::1",
            "2002:ac10:1::1",
            "2002:6440:1::1",
            // Teredo: server 10.0.0.1; client 192.168.0.1 (stored inverted: 3f57:fffe)
            "2001:0:a00:1::6883:8352",
            "2001:0:6883:8352::3f57:fffe",
            // IPv4-compatible ::10.0.0.1; discard-only
            "::a00:1",
            "100::1",
        ] {
            let addr = ma(&format!("/ip6/{no}/udp/4001/quic-v1"));
            assert!(!p.allows(&addr), "{no}");
        }
        for yes in [
            // NAT64 and 6to4 of the public 104.131.131.82 (0x6883:0x8352)
            "64:ff9b::6883:8352",
            "2002:6883:8352::1",
            // Teredo with public server 104.131.131.82 and public client 1.2.3.4 (inverted)
            "2001:0:6883:8352::fefd:fcfb",
        ] {
            let addr = ma(&format!("/ip6/{yes}/udp/4001/quic-v1"));
            assert!(p.allows(&addr), "{yes}");
        }
        // The other policies are not about the public internet: unchanged.
        assert!(AddressPolicy::Any.allows(&ma("/ip6/64:ff9b::a00:1/udp/1/quic-v1")));
    }

    #[test]
    fn loopback_allows_only_loopback_and_any_allows_lan() {
        let l = AddressPolicy::Loopback;
        assert!(l.allows(&ma("/ip4/127.0.0.1/udp/1/quic-v1")));
        assert!(l.allows(&ma("/ip6/::1/udp/1/quic-v1")));
        assert!(!l.allows(&ma("/ip4/10.0.0.1/udp/1/quic-v1")));
        assert!(!l.allows(&ma("/ip4/104.131.131.82/udp/1/quic-v1")));
        let a = AddressPolicy::Any;
        assert!(a.allows(&ma("/ip4/10.0.0.1/udp/1/quic-v1")));
        assert!(!a.allows(&ma("/ip4/0.0.0.0/udp/1/quic-v1")));
    }

    #[test]
    fn only_bootstrap_names_go_to_the_resolver() {
        let bootstrap = [ma(
            "/dnsaddr/Bootstrap.libp2p.io/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN",
        )];
        let named = BootstrapNames::of(&bootstrap);
        assert!(named.permits(&ma("/dnsaddr/bootstrap.libp2p.io")));
        assert!(named.permits(&ma("/ip4/104.131.131.82/udp/4001/quic-v1")));
        assert!(!named.permits(&ma("/dns4/attacker.example/udp/4001/quic-v1")));
        assert!(!named.permits(&ma("/dnsaddr/attacker.example")));
        let none = BootstrapNames::of(&[]);
        assert!(!none.permits(&ma("/dns/localhost/udp/1/quic-v1")));
    }

    #[test]
    fn policy_parses_and_prints() {
        for p in [
            AddressPolicy::Public,
            AddressPolicy::Loopback,
            AddressPolicy::Any,
        ] {
            assert_eq!(p.to_string().parse::<AddressPolicy>().unwrap(), p);
        }
        assert!(
            "lan"
                .parse::<AddressPolicy>()
                .unwrap_err()
                .contains("public")
        );
    }
}
