//! What this client has caught workers doing, across jobs: a worker
//! convicted once (by the client's own re-run, with its signed result kept
//! as evidence) gets no task of any later job of this client.
//!
//! The record is `<data_dir>/reputation.json`, replaced atomically on every
//! conviction. It holds only this client's own verdicts: a peer's word
//! about a third party is not evidence, so nothing here is gossiped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use protocol::{ContentId, PublicKey};
use serde::{Deserialize, Serialize};

/// Most workers remembered; the oldest convictions are forgotten first.
/// Free keys make a longer list worthless: this bounds the file, and the
/// random choice of workers bounds what a fresh key can do.
pub const MAX_CONVICTED: usize = 65_536;

/// One conviction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conviction {
    pub at_ms: u64,
    pub job: ContentId,
    pub round: u32,
    pub shard: u32,
    pub why: String,
    /// Blobs of the signed result envelopes compared.
    pub evidence: Vec<ContentId>,
}

/// The workers this client has convicted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reputation {
    pub convicted: BTreeMap<PublicKey, Conviction>,
}

impl Reputation {
    /// The record's path in a data directory.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("reputation.json")
    }

    /// Reads the record (empty when there is none yet).
    pub fn load(data_dir: &Path) -> Result<Self> {
        let path = Self::path(data_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Whether `worker` was convicted before.
    pub fn convicted(&self, worker: &PublicKey) -> bool {
        self.convicted.contains_key(worker)
    }

    /// Records a conviction (the first one of a worker is kept) and saves
    /// the record atomically.
    pub fn record(&mut self, data_dir: &Path, worker: PublicKey, c: Conviction) -> Result<()> {
        self.convicted.entry(worker).or_insert(c);
        while self.convicted.len() > MAX_CONVICTED {
            let oldest = self.convicted.iter().min_by_key(|(_, c)| c.at_ms).map(|(k, _)| *k);
            match oldest {
                Some(k) => self.convicted.remove(&k),
                None => break,
            };
        }
        let path = Self::path(data_dir);
        let bytes = serde_json::to_vec_pretty(self)?;
        kernels::model::write_atomic(&path, |f| std::io::Write::write_all(f, &bytes))
            .with_context(|| format!("writing {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn convictions_persist_and_the_first_is_kept() {
        let dir = std::env::temp_dir().join(format!("tern-reputation-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let w = protocol::Keypair::from_secret([4; 32]).public();
        let c = |why: &str| Conviction {
            at_ms: 1,
            job: ContentId::of(b"job"),
            round: 0,
            shard: 1,
            why: why.into(),
            evidence: vec![ContentId::of(b"evidence")],
        };
        let mut r = Reputation::load(&dir).unwrap();
        assert!(!r.convicted(&w));
        r.record(&dir, w, c("first")).unwrap();
        r.record(&dir, w, c("second")).unwrap();
        let back = Reputation::load(&dir).unwrap();
        assert!(back.convicted(&w));
        assert_eq!(back.convicted[&w].why, "first");
        std::fs::write(Reputation::path(&dir), b"{not json").unwrap();
        assert!(
            Reputation::load(&dir).is_err(),
            "a corrupt record is an error, not a clean slate"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
