//! The node's ed25519 identity: created on first start, kept in a 0600 file,
//! never logged. The libp2p peer id derives from the same key.

use std::io::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail};
use protocol::Keypair;

/// File name of the secret key inside the data directory.
pub const KEY_FILE: &str = "node.key";

/// Loads the node key from `data_dir`, creating it (and the directory) on
/// first use.
pub fn load_or_create(data_dir: &Path) -> Result<Keypair> {
    let path = data_dir.join(KEY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let secret: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                anyhow::anyhow!(
                    "{} holds {} bytes, expected a 32-byte ed25519 secret",
                    path.display(),
                    bytes.len()
                )
            })?;
            check_permissions(&path)?;
            Ok(Keypair::from_secret(secret))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir)
                .with_context(|| format!("creating data directory {}", data_dir.display()))?;
            let generated = libp2p::identity::ed25519::Keypair::generate();
            let secret: [u8; 32] = generated
                .secret()
                .as_ref()
                .try_into()
                .context("libp2p returned an ed25519 secret of the wrong length")?;
            write_private(&path, &secret)?;
            tracing::info!(path = %path.display(), "created a new node key");
            Ok(Keypair::from_secret(secret))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The libp2p key pair of a node key (the same ed25519 key).
pub fn libp2p_keypair(key: &Keypair) -> Result<libp2p::identity::Keypair> {
    let mut secret = key.secret();
    let kp =
        libp2p::identity::Keypair::ed25519_from_bytes(&mut secret).context("converting the node key for libp2p")?;
    Ok(kp)
}

/// The libp2p peer id of a public key.
pub fn peer_id(key: &protocol::PublicKey) -> Result<libp2p::PeerId> {
    let pk =
        libp2p::identity::ed25519::PublicKey::try_from_bytes(key.as_bytes()).context("not an ed25519 public key")?;
    Ok(libp2p::identity::PublicKey::from(pk).to_peer_id())
}

/// The tern public key of a libp2p peer id, when the id embeds an ed25519 key.
pub fn public_key(peer: &libp2p::PeerId) -> Option<protocol::PublicKey> {
    let mh = peer.as_ref();
    // Identity multihash of a protobuf-encoded public key: 0x08 0x01 (ed25519) 0x12 0x20 <32 bytes>.
    if mh.code() != 0 {
        return None;
    }
    let pk = libp2p::identity::PublicKey::try_decode_protobuf(mh.digest()).ok()?;
    let ed = pk.try_into_ed25519().ok()?;
    protocol::PublicKey::from_bytes(&ed.to_bytes()).ok()
}

/// Writes a file only its owner can read (mode 0600 from creation, so its
/// bytes are never readable by others): temporary file, fsync, rename.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn check_permissions(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            bail!(
                "{} is readable by others (mode {mode:o}); run `chmod 600 {}`",
                path.display(),
                path.display()
            );
        }
    }
    let _ = path;
    Ok(())
}

/// The peer id in a multiaddress's `/p2p/` suffix.
pub fn peer_of(addr: &libp2p::Multiaddr) -> Option<libp2p::PeerId> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

/// Seals a payload with `key`, valid from now for `ttl`, under a fresh
/// random nonce.
pub fn seal(key: &Keypair, payload: &protocol::Payload, ttl: std::time::Duration) -> Vec<u8> {
    use crate::clock::{now_ms, random_u64};
    protocol::seal(
        key,
        payload,
        protocol::Validity::new(random_u64(), now_ms(), ttl.as_millis() as u64),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_created_once_with_0600_and_matches_the_peer_id() {
        let dir = tempdir();
        let a = load_or_create(&dir).unwrap();
        let b = load_or_create(&dir).unwrap();
        assert_eq!(a.public(), b.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.join(KEY_FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let from_libp2p = libp2p_keypair(&a).unwrap().public().to_peer_id();
        assert_eq!(peer_id(&a.public()).unwrap(), from_libp2p);
        assert_eq!(public_key(&from_libp2p), Some(a.public()));
    }

    #[test]
    fn a_key_readable_by_others_or_of_the_wrong_length_is_refused() {
        let dir = tempdir();
        std::fs::write(dir.join(KEY_FILE), [1u8; 31]).unwrap();
        assert!(load_or_create(&dir).unwrap_err().to_string().contains("31 bytes"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::write(dir.join(KEY_FILE), [1u8; 32]).unwrap();
            std::fs::set_permissions(dir.join(KEY_FILE), std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(load_or_create(&dir).unwrap_err().to_string().contains("chmod 600"));
        }
    }

    fn tempdir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("tern-id-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }
}
