//! Counters shown by `tern status`: kept by the daemon's gossip and
//! request handlers and by the task executor, which share one [`Stats`].

/// Counters shown by `tern status`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Stats {
    pub adverts_accepted: u64,
    /// Bytes of the adverts gossip delivered (each message once, before
    /// any check): what the swarm's adverts cost this node, less the
    /// duplicates and control messages gossip spends on them.
    pub advert_bytes: u64,
    pub adverts_refused: u64,
    /// Adverts not newer than the one held from their signer (replays).
    pub adverts_stale: u64,
    /// Adverts dropped unread because their forwarder passed its rate.
    pub adverts_dropped: u64,
    /// Valid adverts not taken because the node's own accept rate was spent.
    pub adverts_over_accept_rate: u64,
    /// Peers cut off for sending past twice their rate.
    pub peers_banned: u64,
    /// Task requests dropped unread because their sender passed its rate.
    pub tasks_dropped: u64,
    pub tasks_done: u64,
    pub tasks_refused: u64,
    pub tasks_failed: u64,
    pub blob_requests_served: u64,
    /// OpenAI API requests generated on this node, and those whose
    /// generation stopped before its end because nothing read on (the
    /// client went away, or a stop sequence ended the answer).
    pub api_local: u64,
    pub api_stopped_early: u64,
    /// OpenAI API requests computed by a peer and verified here.
    pub api_remote: u64,
}
