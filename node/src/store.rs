//! What a node keeps on disk between starts: the data directory, identities and the exit's
//! OHTTP keyring, and the `keygen` command that creates key files.

pub mod data_dir;
pub mod identity;
pub mod keygen;
pub mod keyring;
