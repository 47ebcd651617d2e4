//! The peer table as the node's parts share it: adverts go in (the
//! daemon's gossip handler), capable peers come out (jobs, fetches).

use parking_lot::{Mutex, MutexGuard};
use protocol::{PeerEntry, PeerTable, PublicKey};

use crate::clock::now_ms;

/// Peers known from verified adverts, bounded.
#[derive(Debug)]
pub struct Peers(Mutex<PeerTable>);

impl Peers {
    /// At most `capacity` signers.
    pub fn new(capacity: usize) -> Self {
        Self(Mutex::new(PeerTable::new(capacity)))
    }

    /// The table itself, locked.
    pub fn lock(&self) -> MutexGuard<'_, PeerTable> {
        self.0.lock()
    }

    /// The unexpired entries.
    pub fn entries(&self) -> Vec<(PublicKey, PeerEntry)> {
        let mut t = self.0.lock();
        t.expire(now_ms());
        t.entries().into_iter().map(|(k, e)| (k, e.clone())).collect()
    }
}
