//! File names inside a node's data directory: the one definition the node (which reads and
//! writes them) and the operator (whose key Secrets are mounted as that directory, one Secret
//! key per file) share.
//!
//! The names are a compatibility contract, not a detail: a data directory written by one
//! version is read by the next, and a Secret the operator made long ago is mounted under the
//! same key names by every later node image. Renaming one silently gives a node a fresh
//! identity (a new PeerId, so every published relay address breaks) or new OHTTP keys.

/// A relay's Ed25519 identity key (libp2p protobuf encoding); also the relay of
/// `tokengo serve`. The operator's relay identity Secret holds it under this key.
pub const RELAY_IDENTITY_FILE: &str = "relay_identity.key";

/// An exit's Ed25519 identity key (libp2p protobuf encoding). The operator's exit key Secret
/// holds it under this key.
pub const EXIT_IDENTITY_FILE: &str = "exit_identity.key";

/// A bootstrap (DHT server) node's Ed25519 identity key, kept so its multiaddr stays valid
/// across restarts.
pub const BOOTSTRAP_IDENTITY_FILE: &str = "bootstrap_identity.key";

/// The exit's OHTTP keyring, in the [`crate::keyring`] format. The operator's exit key Secret
/// holds it under this key and replaces it on rotation.
pub const EXIT_KEYRING_FILE: &str = "ohttp_keys.json";

/// The cache of verified relays a discovering client or exit keeps between starts. Only the
/// node writes it, into the data directory (in the operator's pods an `emptyDir`, the keys
/// being read from `--keys-dir`); it is listed here so no key file can take its name.
pub const RELAY_CACHE_FILE: &str = "relays.json";

#[cfg(test)]
mod tests {
    use super::*;

    /// The names existing data directories and Secrets already use: changing one is a
    /// breaking change for every deployed node, so it must fail here first.
    #[test]
    fn names_are_the_ones_already_on_disk() {
        assert_eq!(RELAY_IDENTITY_FILE, "relay_identity.key");
        assert_eq!(EXIT_IDENTITY_FILE, "exit_identity.key");
        assert_eq!(BOOTSTRAP_IDENTITY_FILE, "bootstrap_identity.key");
        assert_eq!(EXIT_KEYRING_FILE, "ohttp_keys.json");
        assert_eq!(RELAY_CACHE_FILE, "relays.json");
    }

    #[test]
    fn names_are_distinct_plain_file_names() {
        let names = [
            RELAY_IDENTITY_FILE,
            EXIT_IDENTITY_FILE,
            BOOTSTRAP_IDENTITY_FILE,
            EXIT_KEYRING_FILE,
            RELAY_CACHE_FILE,
        ];
        for (i, name) in names.iter().enumerate() {
            // Each is a Kubernetes Secret key (`[-._a-zA-Z0-9]+`) and a file in one flat
            // directory (no hidden files: the Secret volume keeps its own there).
            let secret_key = name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
            assert!(secret_key && !name.starts_with('.'), "{name}");
            assert!(!names[..i].contains(name), "{name} used twice");
        }
    }
}
