//! QUIC application error codes (RFC 9000 §20.2) TokenGo puts on CONNECTION_CLOSE,
//! RESET_STREAM and STOP_SENDING between client, relay and exit. They cross the wire, so they
//! belong to the protocol rather than to one node role: the peer reads them to tell a
//! malformed exchange from a side that went away or gave up, and every version must keep the
//! same numbers.
//!
//! Plain `u32`s so this crate needs no QUIC library; `quinn::VarInt::from_u32` turns one into
//! a code in a `const`.

/// The peer sent something malformed (an unknown ALPN, a bad frame, a missing identity).
pub const PROTOCOL: u32 = 1;
/// The other side of a forwarded stream went away (or an exit's registration was replaced by
/// a newer connection of the same exit).
pub const PEER_GONE: u32 = 2;
/// The request or connection was abandoned: shutdown, timeout, a refused registration, a
/// backend failure mid-stream.
pub const ABANDONED: u32 = 3;

#[cfg(test)]
mod tests {
    use super::*;

    /// Peers of other versions read these numbers: they may never change or collide.
    #[test]
    fn codes_are_stable() {
        assert_eq!((PROTOCOL, PEER_GONE, ABANDONED), (1, 2, 3));
    }
}
