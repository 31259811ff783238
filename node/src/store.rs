//! What a node keeps on disk between starts: the data directory, identities and the exit's
//! OHTTP keyring, where the keys are read from (`keys`: the data directory, or a read-only
//! `--keys-dir`), and the `keygen` command that creates key files.

pub mod data_dir;
pub mod identity;
pub mod keygen;
pub mod keyring;
pub mod keys;
