//! The network layer the roles share: QUIC endpoints bound to node identities, framed stream
//! reading, relay names resolved to every address (`resolve`), and discovery on a Kademlia
//! DHT.

pub mod discovery;
pub mod relay_link;
pub mod resolve;
pub mod stream;
pub mod transport;
