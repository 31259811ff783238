//! `tokengo keygen`: creates a key file (mode 0600, never overwriting) and prints its public
//! part: the key configuration of an OHTTP key, the PeerId of an identity.

use anyhow::Context as _;
use tokengo_proto::key_config::KeyConfig;

use crate::{
    cli::{KeyType, KeygenArgs},
    clock::unix_now,
    store::identity,
    store::keyring::{self, Keyring},
};

/// Writes the key and prints its public part on stdout.
pub fn run(args: &KeygenArgs) -> anyhow::Result<()> {
    match args.key_type {
        KeyType::Identity => {
            let key = libp2p_identity::Keypair::generate_ed25519();
            identity::write_new(&args.output, &key)
                .with_context(|| format!("writing {}", args.output.display()))?;
            println!("{}", identity::peer_id(&key));
        }
        KeyType::Ohttp => {
            let ring = Keyring::generate(args.key_id, unix_now())?;
            keyring::save_new(&ring, &args.output)
                .with_context(|| format!("writing {}", args.output.display()))?;
            // application/ohttp-keys, hex: what a client needs to encrypt to this key.
            println!("{}", hex::encode(KeyConfig::encode_list(&ring.configs())));
        }
    }
    Ok(())
}
