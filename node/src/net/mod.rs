//! The libp2p swarm, shaped like rust-libp2p's file-sharing example: a
//! cloneable [`Net`] handle sends [`Command`]s with `oneshot` replies over a
//! bounded channel to one event loop that owns the `Swarm`; what peers send
//! comes out as [`Inbound`] events on another bounded channel.
//!
//! Protocols: QUIC and TCP (noise + yamux), identify, ping, Kademlia
//! (`/tern/kad/1`), mDNS (optional), gossipsub (adverts on
//! [`advert_topic`], one topic a shard), request-response `/tern/blob/1`, `/tern/task/1` and `/tern/advert-sync/1`,
//! connection limits, the circuit relay client (listening through the
//! configured `relays`), and, when configured, a relay server and AutoNAT +
//! DCUtR.

pub mod budget;
pub mod fetch;
pub mod peers;
pub mod rate;

use std::collections::{HashMap, HashSet};
use std::io;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::{AsyncReadExt as _, AsyncWriteExt as _, StreamExt as _};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, allow_block_list, autonat, connection_limits, dcutr, gossipsub, identify,
    kad, mdns, noise, ping, relay, request_response, tcp, yamux,
};
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
pub use crate::identity::peer_of;

pub use protocol::shards::{ShardSet, topic as advert_topic};
/// Blob transfer protocol.
pub const BLOB_PROTOCOL: StreamProtocol = StreamProtocol::new("/tern/blob/1");
/// Task protocol: a signed task envelope in, a signed result envelope out.
pub const TASK_PROTOCOL: StreamProtocol = StreamProtocol::new("/tern/task/1");
/// Advert exchange between new neighbours: the shards the asker follows
/// in, the adverts the answerer holds in them out.
pub const SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/tern/advert-sync/1");
/// Largest advert-sync answer: 256 adverts of the largest size.
pub const MAX_SYNC_RESPONSE: usize = 256 * (protocol::limits::MAX_ADVERT_BYTES + 256);

/// Length-prefixed opaque messages with a size limit per direction.
#[derive(Debug, Clone)]
pub struct Codec {
    max_request: usize,
    max_response: usize,
}

/// Reads a frame's 4-byte length and refuses one over `max`.
async fn read_len<T: futures::AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<usize> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes is over the limit of {max}"),
        ));
    }
    Ok(len)
}

/// Reads the answer to a request of ours: its buffer is allocated at the
/// declared length at once (bounded by `max`, and by our own requests in
/// flight), so a 1 MiB blob group lands without a copy.
async fn read_frame<T: futures::AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let len = read_len(io, max).await?;
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

/// How long a peer has to send a whole request once its stream is open,
/// separate from the (long) wait for a task's answer: a peer that opens
/// streams and trickles bytes holds nothing for long.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads an unsolicited request: the buffer grows as bytes arrive (at most
/// 64 KiB ahead of them) instead of being allocated at the declared length,
/// and the whole frame must arrive within [`REQUEST_READ_TIMEOUT`].
async fn read_request_frame<T: futures::AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let read = async {
        let len = read_len(io, max).await?;
        let mut buf = Vec::with_capacity(len.min(64 * 1024));
        (&mut *io).take(len as u64).read_to_end(&mut buf).await?;
        if buf.len() != len {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the request ended early"));
        }
        Ok(buf)
    };
    tokio::time::timeout(REQUEST_READ_TIMEOUT, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the request did not arrive in time"))?
}

async fn write_frame<T: futures::AsyncWrite + Unpin + Send>(io: &mut T, bytes: &[u8], max: usize) -> io::Result<()> {
    if bytes.len() > max {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "message over the limit"));
    }
    io.write_all(&(bytes.len() as u32).to_be_bytes()).await?;
    io.write_all(bytes).await?;
    io.close().await
}

impl request_response::Codec for Codec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: futures::AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        read_request_frame(io, self.max_request).await
    }

    async fn read_response<T: futures::AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        read_frame(io, self.max_response).await
    }

    async fn write_request<T: futures::AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()> {
        write_frame(io, &req, self.max_request).await
    }

    async fn write_response<T: futures::AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()> {
        write_frame(io, &res, self.max_response).await
    }
}

/// Every protocol the node speaks.
#[derive(NetworkBehaviour)]
#[allow(missing_debug_implementations)] // the derived event type cannot be Debug-derived for every field
pub struct Behaviour {
    limits: connection_limits::Behaviour,
    banned: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    gossip: gossipsub::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    blob: request_response::Behaviour<Codec>,
    task: request_response::Behaviour<Codec>,
    sync: request_response::Behaviour<Codec>,
    relay: relay::client::Behaviour,
    relay_server: Toggle<relay::Behaviour>,
    dcutr: Toggle<dcutr::Behaviour>,
    autonat: Toggle<autonat::Behaviour>,
}

/// An inbound request waiting for its response.
pub type Responder = request_response::ResponseChannel<Vec<u8>>;

/// What peers send that the node must act on.
#[derive(Debug)]
pub enum Inbound {
    /// A gossip message on an advert topic, to validate and report;
    /// `shard` is the topic's (None for a topic that is not an advert
    /// shard's).
    Advert {
        source: PeerId,
        id: gossipsub::MessageId,
        shard: Option<u8>,
        data: Vec<u8>,
    },
    /// A new neighbour asks for the adverts held in the shards it follows.
    AdvertSync {
        peer: PeerId,
        request: Vec<u8>,
        channel: Responder,
    },
    /// A blob-protocol request.
    BlobRequest {
        peer: PeerId,
        request: Vec<u8>,
        channel: Responder,
    },
    /// A task envelope.
    Task {
        peer: PeerId,
        request: Vec<u8>,
        channel: Responder,
    },
    /// A connection was established with a peer.
    Connected { peer: PeerId },
}

/// Requests to the event loop.
#[derive(Debug)]
pub enum Command {
    Publish {
        shard: u8,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<()>>,
    },
    Follow {
        shards: ShardSet,
    },
    ShardPeers {
        reply: oneshot::Sender<[u16; protocol::shards::SHARDS as usize]>,
    },
    DialPeer {
        peer: PeerId,
    },
    Validation {
        source: PeerId,
        id: gossipsub::MessageId,
        accept: gossipsub::MessageAcceptance,
    },
    Request {
        peer: PeerId,
        protocol: StreamProtocol,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>>>,
    },
    Respond {
        protocol: StreamProtocol,
        channel: Responder,
        data: Vec<u8>,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<()>>,
    },
    AddAddress {
        peer: PeerId,
        addr: Multiaddr,
    },
    Provide {
        key: Vec<u8>,
    },
    Providers {
        key: Vec<u8>,
        reply: oneshot::Sender<HashSet<PeerId>>,
    },
    Info {
        reply: oneshot::Sender<NetInfo>,
    },
    Path {
        peer: PeerId,
        reply: oneshot::Sender<Path>,
    },
    DialDirect {
        peer: PeerId,
    },
    Ban {
        peer: PeerId,
    },
    Trust {
        peer: PeerId,
    },
}

/// A snapshot of the swarm.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NetInfo {
    pub peer_id: String,
    /// Where peers reach this node: its listeners (relay circuits included)
    /// and its external addresses.
    pub listen_addrs: Vec<String>,
    pub connected: Vec<String>,
    /// Every open connection, by peer and remote address.
    pub connections: Vec<ConnectionInfo>,
    /// Peers cut off now for flooding.
    pub banned: usize,
    /// Inbound connections from peers not known, and the most allowed
    /// (the rest of `max_connections` is kept for known peers).
    pub unknown_inbound: usize,
    pub max_unknown_inbound: usize,
    /// AutoNAT's verdict on this node's reachability: `public ADDR`,
    /// `private` (behind a NAT or firewall), `unknown` (not settled yet) or
    /// `off` (`nat_traversal = false`).
    pub nat: String,
    /// The configured relays and whether each holds a reservation for us.
    pub relays: Vec<RelayInfo>,
    /// Bytes received and sent over every connection since the node
    /// started (transport level: encryption and multiplexing included).
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The connection budget (`target_connections`; 0: none), and the
    /// connections it has closed since the start.
    #[serde(default)]
    pub target_connections: usize,
    #[serde(default)]
    pub trimmed: u64,
}

/// A configured relay.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RelayInfo {
    pub addr: String,
    /// The relay accepted our reservation: peers reach us through it.
    pub reserved: bool,
}

/// How this node is connected to a peer now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Path {
    /// At least one connection that runs through no relay.
    Direct,
    /// Only through relays; `punch` is why the last hole punch failed.
    Relayed { punch: Option<String> },
    /// Not connected.
    None,
}

/// A request that got no answer.
#[derive(Debug)]
pub struct RequestFailed {
    pub peer: PeerId,
    pub protocol: StreamProtocol,
    /// The connection broke or could not be made: the same request may
    /// succeed when sent again (after a wait).
    pub retryable: bool,
    pub error: String,
}

impl std::fmt::Display for RequestFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} request to {} failed: {}", self.protocol, self.peer, self.error)
    }
}

impl std::error::Error for RequestFailed {}

/// Whether an error is a request that may succeed when sent again.
pub fn is_retryable(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.downcast_ref::<RequestFailed>().is_some_and(|r| r.retryable))
}

/// Runs `attempt` until it succeeds, fails for good, or fails retryably
/// ([`is_retryable`]: a broken or unmade connection) after the last of
/// `waits`, sleeping each wait in turn between attempts.
pub async fn resending<T, F, Fut>(what: &str, waits: &[Duration], mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut waits = waits.iter();
    loop {
        match attempt().await {
            Err(e) if is_retryable(&e) => {
                let Some(wait) = waits.next() else { return Err(e) };
                tracing::info!("{e:#}; sending {what} again in {wait:?}");
                tokio::time::sleep(*wait).await;
            }
            r => return r,
        }
    }
}

/// One open connection.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ConnectionInfo {
    pub peer: String,
    pub addr: String,
    /// It runs through a relay (`/p2p-circuit`).
    pub relayed: bool,
}

/// A cloneable handle to the event loop.
#[derive(Debug, Clone)]
pub struct Net {
    tx: mpsc::Sender<Command>,
    local: PeerId,
}

impl Net {
    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    async fn call<T>(&self, f: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(f(tx))
            .await
            .map_err(|_| anyhow!("the network has stopped"))?;
        rx.await.map_err(|_| anyhow!("the network has stopped"))
    }

    /// Publishes on advert shard `shard`'s topic.
    pub async fn publish(&self, shard: u8, data: Vec<u8>) -> Result<()> {
        self.call(|reply| Command::Publish { shard, data, reply }).await?
    }

    /// How many connected peers subscribe to each advert shard's topic.
    pub async fn shard_peers(&self) -> Result<[u16; protocol::shards::SHARDS as usize]> {
        self.call(|reply| Command::ShardPeers { reply }).await
    }

    /// Dials a peer at the addresses the swarm knows for it (adverts,
    /// identify, Kademlia), unless connected.
    pub async fn dial_peer(&self, peer: PeerId) {
        let _ = self.tx.send(Command::DialPeer { peer }).await;
    }

    /// Follows (subscribes to) exactly the advert shards in `shards`.
    pub async fn follow(&self, shards: ShardSet) {
        let _ = self.tx.send(Command::Follow { shards }).await;
    }

    /// Reports a gossip message's validation result (forwarding it or not).
    pub async fn validation(&self, source: PeerId, id: gossipsub::MessageId, accept: gossipsub::MessageAcceptance) {
        let _ = self.tx.send(Command::Validation { source, id, accept }).await;
    }

    /// Sends a request and waits for the response.
    pub async fn request(&self, peer: PeerId, protocol: StreamProtocol, data: Vec<u8>) -> Result<Vec<u8>> {
        self.call(|reply| Command::Request {
            peer,
            protocol,
            data,
            reply,
        })
        .await?
    }

    /// Answers an inbound request.
    pub async fn respond(&self, protocol: StreamProtocol, channel: Responder, data: Vec<u8>) {
        let _ = self
            .tx
            .send(Command::Respond {
                protocol,
                channel,
                data,
            })
            .await;
    }

    /// Dials an address (with or without `/p2p/`).
    pub async fn dial(&self, addr: Multiaddr) -> Result<()> {
        self.call(|reply| Command::Dial { addr, reply }).await?
    }

    /// Tells the swarm where a peer can be reached.
    pub async fn add_address(&self, peer: PeerId, addr: Multiaddr) {
        let _ = self.tx.send(Command::AddAddress { peer, addr }).await;
    }

    /// Announces on Kademlia that this node provides `key`.
    pub async fn provide(&self, key: Vec<u8>) {
        let _ = self.tx.send(Command::Provide { key }).await;
    }

    /// Providers of `key` found on Kademlia.
    pub async fn providers(&self, key: Vec<u8>) -> Result<HashSet<PeerId>> {
        self.call(|reply| Command::Providers { key, reply }).await
    }

    /// Peer id, listen addresses and connected peers.
    pub async fn info(&self) -> Result<NetInfo> {
        self.call(|reply| Command::Info { reply }).await
    }

    /// Cuts a peer off for [`BAN`]: its connections are closed and none
    /// to or from it is let in until the ban ends. The remote addresses of
    /// its inbound connections each take a strike: an address (not
    /// loopback) that gathers [`IP_STRIKES`] within a ban's time has every
    /// inbound connection refused until then, so fresh keys from one host
    /// do not each get a fresh allowance.
    pub async fn ban(&self, peer: PeerId) {
        let _ = self.tx.send(Command::Ban { peer }).await;
    }

    /// How this node is connected to `peer` now.
    pub async fn path(&self, peer: PeerId) -> Result<Path> {
        self.call(|reply| Command::Path { peer, reply }).await
    }

    /// Waits up to `wait` for a connection to `peer` that runs through no
    /// relay (a hole punch, DCUtR, in progress, or a dial), for transfers
    /// a relay circuit cannot carry ([`RELAY_CIRCUIT_BYTES`]). A peer not
    /// connected at all is left to the request that follows to dial.
    pub async fn direct(&self, peer: PeerId, wait: Duration) -> Result<()> {
        let t0 = tokio::time::Instant::now();
        let mut dialled: Option<tokio::time::Instant> = None;
        loop {
            let path = self.path(peer).await?;
            if matches!(path, Path::Relayed { .. }) && dialled.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                // Dialling out works where the peer is reachable (a public
                // host, a port forward) and this node is the one behind a NAT.
                let _ = self.tx.send(Command::DialDirect { peer }).await;
                dialled = Some(tokio::time::Instant::now());
            }
            match path {
                Path::Direct | Path::None => return Ok(()),
                Path::Relayed { punch } if t0.elapsed() >= wait => {
                    let why = punch.unwrap_or_else(|| "no hole punch succeeded".into());
                    bail!(
                        "{peer} is reachable only through a relay, which carries at most {} KiB, and no direct \
                         connection came within {} s ({why}); a symmetric NAT or a firewall on either side \
                         stops hole punching: forward a port (external_addrs) or run on a reachable host",
                        RELAY_CIRCUIT_BYTES >> 10,
                        wait.as_secs()
                    )
                }
                Path::Relayed { .. } => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Counts a peer as known (it proved work, for one): its inbound
    /// connections use the slots kept for known peers, which a flood of
    /// fresh keys cannot take.
    pub async fn trust(&self, peer: PeerId) {
        let _ = self.tx.send(Command::Trust { peer }).await;
    }
}

/// Inbound connections from peers not known (not dialed by this node, not
/// a bootstrap peer or relay, not trusted by the daemon, not connected for
/// [`TENURE`] before) may hold at most this share of `max_connections`;
/// the rest is kept for known peers.
const UNKNOWN_SHARE: (usize, usize) = (3, 4);

/// A connection held this long makes its peer known.
pub const TENURE: Duration = Duration::from_secs(300);

/// Known peers remembered at most; the one seen longest ago goes first.
const MAX_KNOWN: usize = 4096;

/// How long a peer that flooded past its limits is cut off.
pub const BAN: Duration = Duration::from_secs(600);

/// Bans from one remote IP address, within [`BAN`], after which that
/// address is refused.
pub const IP_STRIKES: u32 = 4;

/// Peers banned at once, and addresses with strikes, at most: when full,
/// the ban that ends first is lifted early.
const MAX_BANS: usize = 4096;

/// The gossip message id: the hash of the message's bytes. Adverts are
/// signed envelopes with a nonce, so two distinct adverts never share one.
fn message_id(m: &gossipsub::Message) -> gossipsub::MessageId {
    gossipsub::MessageId::from(&blake3::hash(&m.data).as_bytes()[..20])
}

/// When `map` holds `cap` entries and not `key`, removes the entry with
/// the smallest time (the ban that ends first, the peer seen longest ago)
/// and returns its key.
pub(crate) fn make_room<V: Ord + Copy>(map: &mut HashMap<PeerId, V>, key: &PeerId, cap: usize) -> Option<PeerId> {
    if map.len() < cap || map.contains_key(key) {
        return None;
    }
    let first = map.iter().min_by_key(|(_, t)| **t).map(|(p, _)| *p)?;
    map.remove(&first);
    Some(first)
}

/// Inserts into a per-peer map held to [`MAX_KNOWN`] peers: a new peer
/// arriving at a full map starts it over (what it holds is advisory, and
/// comes again from the peers still around).
fn insert_bounded<V>(map: &mut HashMap<PeerId, V>, peer: PeerId, value: V) {
    if map.len() >= MAX_KNOWN && !map.contains_key(&peer) {
        map.clear();
    }
    map.insert(peer, value);
}

/// The IP address a multiaddress starts with, if any.
fn ip_of(addr: &Multiaddr) -> Option<std::net::IpAddr> {
    match addr.iter().next()? {
        libp2p::multiaddr::Protocol::Ip4(ip) => Some(ip.into()),
        libp2p::multiaddr::Protocol::Ip6(ip) => Some(ip.into()),
        _ => None,
    }
}

/// Whether one more inbound connection from `ip`, which holds `held`, is
/// over the cap. Loopback is exempt: it is this machine (and every test
/// swarm).
fn over_ip_cap(ip: std::net::IpAddr, held: usize, cap: usize) -> bool {
    !ip.is_loopback() && held >= cap
}

/// Gossipsub peer scoring: a peer that forwards adverts the daemon
/// rejects (bad signature, malformed, over the limits) loses score with the
/// square of the count, decaying over a minute or so, and is graylisted (its
/// messages dropped unread) after about nine. Mesh-delivery penalties are
/// off: adverts are sparse, so an honest quiet peer would pay them. Up to
/// 64 peers may share one IP address before the colocation penalty starts
/// (loopback swarms and home NATs put many honest nodes behind one).
fn gossip_score_params() -> gossipsub::PeerScoreParams {
    let topic = gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 100.0,
        first_message_deliveries_weight: 0.1,
        first_message_deliveries_decay: 0.9,
        first_message_deliveries_cap: 50.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -1.0,
        invalid_message_deliveries_decay: 0.97,
        ..Default::default()
    };
    let mut p = gossipsub::PeerScoreParams {
        ip_colocation_factor_threshold: 64.0,
        ..Default::default()
    };
    for s in 0..protocol::shards::SHARDS {
        p.topics
            .insert(gossipsub::IdentTopic::new(advert_topic(s)).hash(), topic.clone());
    }
    p
}

/// Builds the swarm, starts listening, and returns the handle, the inbound
/// events and the event loop to spawn.
pub fn start(config: &Config, key: libp2p::identity::Keypair) -> Result<(Net, mpsc::Receiver<Inbound>, EventLoop)> {
    let nat = config.nat_traversal;
    let relay_server = config.relay_server;
    let mdns_on = config.mdns;
    let max_conn = config.max_connections;
    let per_peer = config.max_connections_per_peer;
    let mut metrics = libp2p::metrics::Registry::default();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_quic()
        .with_dns()?
        .with_relay_client(noise::Config::new, yamux::Config::default)?
        .with_bandwidth_metrics(&mut metrics)
        .with_behaviour(|key, relay| {
            let peer = key.public().to_peer_id();
            // Anonymous: every advert is an envelope the daemon verifies
            // (ed25519, by its signer) after the forwarder's rate check, so
            // a libp2p author signature would only add a second signature
            // check of every copy that arrives, before any rate limit:
            // under a flood that check was most of the cost.
            let gossip_config = gossipsub::ConfigBuilder::default()
                .validation_mode(gossipsub::ValidationMode::Anonymous)
                .message_id_fn(message_id)
                .validate_messages()
                .max_transmit_size(protocol::limits::MAX_ENVELOPE_BYTES + 1024)
                .heartbeat_interval(Duration::from_millis(500))
                .build()?;
            let mut kad_config = kad::Config::new(StreamProtocol::new("/tern/kad/1"));
            kad_config.set_query_timeout(Duration::from_secs(20));
            let mut kad = kad::Behaviour::with_config(peer, kad::store::MemoryStore::new(peer), kad_config);
            kad.set_mode(Some(kad::Mode::Server));
            let rr = |p: StreamProtocol, max_request, max_response, timeout| {
                request_response::Behaviour::with_codec(
                    Codec {
                        max_request,
                        max_response,
                    },
                    [(p, request_response::ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(timeout)
                        .with_max_concurrent_streams(256),
                )
            };
            Ok(Behaviour {
                limits: connection_limits::Behaviour::new(
                    connection_limits::ConnectionLimits::default()
                        .with_max_established(Some(max_conn))
                        .with_max_established_per_peer(Some(per_peer))
                        .with_max_pending_incoming(Some(max_conn / 2 + 1)),
                ),
                identify: identify::Behaviour::new(identify::Config::new("/tern/1".into(), key.public())),
                ping: ping::Behaviour::default(),
                kad,
                banned: allow_block_list::Behaviour::default(),
                gossip: gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, gossip_config)?,
                mdns: Toggle::from(if mdns_on {
                    // Asked every 30 s rather than 5 minutes: a host that
                    // comes back on the LAN is found again soon.
                    let config = mdns::Config {
                        query_interval: Duration::from_secs(30),
                        ..mdns::Config::default()
                    };
                    Some(mdns::tokio::Behaviour::new(config, peer)?)
                } else {
                    None
                }),
                blob: rr(
                    BLOB_PROTOCOL,
                    4096,
                    protocol::limits::MAX_BLOB_MESSAGE,
                    Duration::from_secs(60),
                ),
                task: rr(
                    TASK_PROTOCOL,
                    protocol::limits::MAX_ENVELOPE_BYTES,
                    protocol::limits::MAX_ENVELOPE_BYTES,
                    TASK_REQUEST_TIMEOUT,
                ),
                sync: rr(SYNC_PROTOCOL, 64, MAX_SYNC_RESPONSE, Duration::from_secs(20)),
                relay,
                relay_server: Toggle::from(relay_server.then(|| {
                    relay::Behaviour::new(
                        peer,
                        relay::Config {
                            max_circuit_bytes: RELAY_CIRCUIT_BYTES,
                            max_circuit_duration: Duration::from_secs(120),
                            ..relay::Config::default()
                        },
                    )
                })),
                dcutr: Toggle::from(nat.then(|| dcutr::Behaviour::new(peer))),
                autonat: Toggle::from(nat.then(|| autonat::Behaviour::new(peer, autonat::Config::default()))),
            })
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    swarm
        .behaviour_mut()
        .gossip
        .with_peer_score(gossip_score_params(), gossipsub::PeerScoreThresholds::default())
        .map_err(|e| anyhow!("gossip peer scoring: {e}"))?;
    // Every shard to begin with: the daemon narrows it (`shards::FollowPlan`).
    for s in ShardSet::ALL.iter() {
        swarm
            .behaviour_mut()
            .gossip
            .subscribe(&gossipsub::IdentTopic::new(advert_topic(s)))
            .map_err(|e| anyhow!("subscribing to adverts: {e:?}"))?;
    }
    for addr in &config.listen {
        let a: Multiaddr = addr.parse().with_context(|| format!("listen address {addr:?}"))?;
        swarm.listen_on(a).with_context(|| format!("listening on {addr}"))?;
    }
    for addr in &config.external_addrs {
        let a: Multiaddr = addr.parse().with_context(|| format!("external address {addr:?}"))?;
        swarm.add_external_address(a);
    }
    let relays = config
        .relays
        .iter()
        .map(|r| r.parse().with_context(|| format!("relay address {r:?}")))
        .collect::<Result<Vec<Multiaddr>>>()?;
    let relay_peers: HashSet<PeerId> = relays.iter().filter_map(peer_of).collect();
    let mut bootstrap_peers = Vec::new();
    for addr in &config.bootstrap {
        let a: Multiaddr = addr.parse().with_context(|| format!("bootstrap address {addr:?}"))?;
        if let Some(peer) = peer_of(&a) {
            bootstrap_peers.push(peer);
            swarm.behaviour_mut().kad.add_address(&peer, a.clone());
            if relay_peers.contains(&peer) {
                // The reservation below dials it; a second dial racing
                // that one would make the relay client drop its request.
                continue;
            }
        }
        if let Err(e) = swarm.dial(a) {
            tracing::warn!("dialing bootstrap peer {addr}: {e}");
        }
    }
    let (tx, rx) = mpsc::channel(256);
    let (in_tx, in_rx) = mpsc::channel(256);
    let local = *swarm.local_peer_id();
    let mut event_loop = EventLoop {
        swarm,
        commands: rx,
        inbound: in_tx,
        pending: HashMap::new(),
        providers: HashMap::new(),
        connections: HashMap::new(),
        incoming_by_ip: HashMap::new(),
        max_incoming_per_ip: config.max_incoming_per_ip as usize,
        relay_server,
        relays: relays.into_iter().map(RelaySlot::new).collect(),
        bans: HashMap::new(),
        strikes: HashMap::new(),
        known: HashMap::new(),
        unknown_inbound: HashMap::new(),
        max_unknown_inbound: (max_conn as usize * UNKNOWN_SHARE.0 / UNKNOWN_SHARE.1).max(1),
        nat: if nat { "unknown" } else { "off" }.into(),
        punch: HashMap::new(),
        listen_addrs: HashMap::new(),
        metrics,
        redial: HashMap::new(),
        target_connections: config.target_connections as usize,
        used: HashMap::new(),
        busy: HashMap::new(),
        trimmed: HashMap::new(),
        trimmed_total: 0,
        relay_peers: relay_peers.clone(),
        idle_for: Duration::from_secs(config.connection_idle_secs),
        salt: {
            let mut salt = [0u8; 32];
            getrandom::fill(&mut salt).map_err(|e| anyhow::anyhow!("the OS random generator: {e}"))?;
            salt
        },
    };
    for peer in bootstrap_peers.into_iter().chain(relay_peers) {
        event_loop.know(peer);
    }
    event_loop.reserve_relays();
    Ok((Net { tx, local }, in_rx, event_loop))
}

/// What one relayed circuit may carry: task envelopes, their answers and
/// small blobs, not bulk transfers (a relay's bandwidth is a volunteer's).
pub const RELAY_CIRCUIT_BYTES: u64 = 1 << 20;

/// Task requests may take as long as the task; the worker's own timeout
/// (`limits.task_timeout_secs`) is the real bound.
const TASK_REQUEST_TIMEOUT: Duration = Duration::from_secs(3600);

/// Bytes received and sent so far, summed over the transport's bandwidth
/// counters (one per direction and protocol stack).
fn traffic(registry: &libp2p::metrics::Registry) -> (u64, u64) {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        return (0, 0);
    }
    let (mut received, mut sent) = (0u64, 0u64);
    for line in text.lines().filter(|l| l.starts_with("libp2p_bandwidth_bytes_total{")) {
        let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        if line.contains("direction=\"Inbound\"") {
            received += v as u64;
        } else if line.contains("direction=\"Outbound\"") {
            sent += v as u64;
        }
    }
    (received, sent)
}

/// Whether an address runs through a relay.
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == libp2p::multiaddr::Protocol::P2pCircuit)
}

/// Whether an address is a wildcard (`0.0.0.0`, `::`) rather than one to dial.
fn is_unspecified(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        libp2p::multiaddr::Protocol::Ip4(ip) => ip.is_unspecified(),
        libp2p::multiaddr::Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

/// Requests awaiting their response. The blob and task behaviours number
/// their requests independently, so the key says which one sent it.
type Pending = HashMap<(Rr, request_response::OutboundRequestId), oneshot::Sender<Result<Vec<u8>>>>;

/// The request-response behaviours, by protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Rr {
    Blob,
    Task,
    Sync,
}

impl Rr {
    fn of(protocol: &StreamProtocol) -> Rr {
        if *protocol == BLOB_PROTOCOL {
            Rr::Blob
        } else if *protocol == SYNC_PROTOCOL {
            Rr::Sync
        } else {
            Rr::Task
        }
    }
}

impl Behaviour {
    fn rr(&mut self, protocol: &StreamProtocol) -> &mut request_response::Behaviour<Codec> {
        match Rr::of(protocol) {
            Rr::Blob => &mut self.blob,
            Rr::Task => &mut self.task,
            Rr::Sync => &mut self.sync,
        }
    }
}

/// The task that owns the swarm.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    inbound: mpsc::Sender<Inbound>,
    pending: Pending,
    providers: HashMap<kad::QueryId, (HashSet<PeerId>, oneshot::Sender<HashSet<PeerId>>)>,
    /// Open connections: peer, remote address (for one a relay brought
    /// in, the circuit it came through) and whether it is relayed.
    connections: HashMap<libp2p::swarm::ConnectionId, Conn>,
    /// Inbound direct connections by remote IP, and the most one IP may hold.
    incoming_by_ip: HashMap<std::net::IpAddr, HashSet<libp2p::swarm::ConnectionId>>,
    max_incoming_per_ip: usize,
    /// A relay server takes its listen addresses as external ones.
    relay_server: bool,
    /// The configured relays and the state of each one's reservation.
    relays: Vec<RelaySlot>,
    /// Banned peers and when each ban ends.
    bans: HashMap<PeerId, tokio::time::Instant>,
    /// Remote addresses of banned peers: strikes, and when they lapse.
    strikes: HashMap<std::net::IpAddr, (u32, tokio::time::Instant)>,
    /// Known peers, and when each was last seen so.
    known: HashMap<PeerId, tokio::time::Instant>,
    /// Inbound connections from peers not known, and when each opened.
    unknown_inbound: HashMap<libp2p::swarm::ConnectionId, (PeerId, tokio::time::Instant)>,
    max_unknown_inbound: usize,
    /// AutoNAT's verdict, in words (see [`NetInfo::nat`]).
    nat: String,
    /// Why the last hole punch to each peer failed (at most [`MAX_KNOWN`]).
    punch: HashMap<PeerId, String>,
    /// The addresses outside relays that peers say they listen on
    /// (identify), for dialling a peer reached only through a relay
    /// (at most [`MAX_KNOWN`] peers, 8 addresses each).
    listen_addrs: HashMap<PeerId, Vec<Multiaddr>>,
    /// The transport's byte counters (libp2p's bandwidth metrics).
    metrics: libp2p::metrics::Registry,
    /// Known peers whose last connection closed, to dial again: when
    /// next, and the wait after that (doubling from a second; given up
    /// past [`REDIAL_GIVE_UP`]), at most [`MAX_KNOWN`].
    redial: HashMap<PeerId, (tokio::time::Instant, Duration)>,
    /// The connection budget (see [`budget`]); 0: none.
    target_connections: usize,
    /// When each peer last had a request either way (at most
    /// [`MAX_KNOWN`]).
    used: HashMap<PeerId, tokio::time::Instant>,
    /// Requests in flight per peer, either way.
    busy: HashMap<PeerId, u32>,
    /// Peers the budget disconnected, and when: not dialled again by this
    /// node (redial, mDNS) for [`TRIMMED_FOR`] (at most [`MAX_KNOWN`]).
    trimmed: HashMap<PeerId, tokio::time::Instant>,
    trimmed_total: u64,
    /// The configured relays' peer ids: never trimmed.
    relay_peers: HashSet<PeerId>,
    /// How long a connection is kept after it opened or was last used.
    idle_for: Duration,
    /// Keys the budget's ranking of peers: secret, so no peer can make
    /// itself the one every node keeps.
    salt: [u8; 32],
}

/// How long a peer the budget disconnected is not dialled again by this
/// node's own redials and mDNS dials.
const TRIMMED_FOR: Duration = Duration::from_secs(600);

/// The wait after which a lost peer is no longer dialled again (the waits
/// before it add up to about eight minutes).
const REDIAL_GIVE_UP: Duration = Duration::from_secs(256);

/// An open connection.
#[derive(Debug)]
struct Conn {
    peer: PeerId,
    addr: Multiaddr,
    relayed: bool,
    since: tokio::time::Instant,
}

/// A configured relay: its circuit listener while one is open, else when
/// to ask again (1 s after a failure, doubling to a minute while it keeps
/// failing; a reservation accepted starts the wait over).
#[derive(Debug)]
struct RelaySlot {
    addr: Multiaddr,
    listener: Option<libp2p::core::transport::ListenerId>,
    /// The relay accepted a reservation on the open listener (false again
    /// when the listener closes).
    reserved: bool,
    retry_at: tokio::time::Instant,
    backoff: Duration,
}

impl RelaySlot {
    const FIRST_RETRY: Duration = Duration::from_secs(1);
    const MAX_RETRY: Duration = Duration::from_secs(60);

    fn new(addr: Multiaddr) -> Self {
        Self {
            addr,
            listener: None,
            reserved: false,
            retry_at: tokio::time::Instant::now(),
            backoff: Self::FIRST_RETRY,
        }
    }
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("peer", self.swarm.local_peer_id())
            .finish()
    }
}

impl EventLoop {
    /// Runs until every [`Net`] handle is dropped.
    pub async fn run(mut self) {
        let mut bootstrap = tokio::time::interval(Duration::from_secs(60));
        let mut relay_tick = tokio::time::interval(RelaySlot::FIRST_RETRY);
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let mut redial_tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_event(event).await,
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => break,
                },
                _ = bootstrap.tick() => {
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
                _ = relay_tick.tick(), if !self.relays.is_empty() => self.reserve_relays(),
                _ = tick.tick() => {
                    let now = tokio::time::Instant::now();
                    self.lift_bans(now);
                    self.grant_tenure(now);
                    self.trim(now);
                }
                _ = redial_tick.tick(), if !self.redial.is_empty() => self.redial_lost(),
            }
        }
    }

    /// Listens through each relay that has no circuit listener open and
    /// whose retry time has come (all of them at start): the relay client
    /// dials the relay and asks it for a reservation.
    fn reserve_relays(&mut self) {
        let now = tokio::time::Instant::now();
        for slot in &mut self.relays {
            if slot.listener.is_some() || slot.retry_at > now {
                continue;
            }
            match self
                .swarm
                .listen_on(slot.addr.clone().with(libp2p::multiaddr::Protocol::P2pCircuit))
            {
                Ok(id) => slot.listener = Some(id),
                Err(e) => {
                    tracing::warn!(relay = %slot.addr, "listening through the relay: {e}");
                    slot.retry_at = now + RelaySlot::MAX_RETRY;
                }
            }
        }
    }

    /// Closes the relayed connections to `peer`, which has a direct one
    /// now: a relay's bandwidth is a volunteer's, and its circuits close
    /// after [`RELAY_CIRCUIT_BYTES`] or two minutes. Requests on them fail
    /// as retryable and go again over the direct connection.
    fn close_relayed(&mut self, peer: PeerId) {
        let relayed: Vec<_> = self
            .connections
            .iter()
            .filter(|(_, c)| c.peer == peer && c.relayed)
            .map(|(id, _)| *id)
            .collect();
        for id in relayed {
            tracing::debug!(%peer, "closing a relayed connection: a direct one is up");
            self.swarm.close_connection(id);
        }
    }

    /// Dials the lost peers whose time has come (a partition that heals,
    /// a link that came back, a peer that restarted): gossip and tasks
    /// need a connection, and nothing else would make one before the next
    /// Kademlia bootstrap or mDNS query, minutes away.
    fn redial_lost(&mut self) {
        let now = tokio::time::Instant::now();
        let due: Vec<PeerId> = self
            .redial
            .iter()
            .filter(|(_, (at, _))| *at <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in due {
            let Some((_, wait)) = self.redial.get(&peer).copied() else {
                continue;
            };
            if wait > REDIAL_GIVE_UP || self.bans.contains_key(&peer) {
                self.redial.remove(&peer);
                continue;
            }
            self.redial.insert(peer, (now + wait, wait * 2));
            self.dial_listen_addrs(peer, true);
        }
    }

    /// Dials `peer` at the addresses outside relays it told identify it
    /// listens on; `lost`: it is not connected, so the addresses the
    /// behaviours know (Kademlia's) are tried too. A peer connected through
    /// a relay is dialled at those addresses only, whatever it holds.
    fn dial_listen_addrs(&mut self, peer: PeerId, lost: bool) {
        use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
        let addrs = self.listen_addrs.get(&peer).cloned().unwrap_or_default();
        if addrs.is_empty() && !lost {
            return;
        }
        let opts = DialOpts::peer_id(peer).addresses(addrs);
        let opts = if lost {
            opts.condition(PeerCondition::DisconnectedAndNotDialing)
                .extend_addresses_through_behaviour()
        } else {
            opts.condition(PeerCondition::Always)
        };
        if let Err(e) = self.swarm.dial(opts.build()) {
            tracing::debug!(%peer, lost, "dialling: {e}");
        }
    }

    /// Lifts the bans that have ended and forgets lapsed strikes.
    fn lift_bans(&mut self, now: tokio::time::Instant) {
        let b = self.swarm.behaviour_mut();
        self.bans.retain(|peer, until| {
            let keep = *until > now;
            if !keep {
                b.banned.unblock_peer(*peer);
            }
            keep
        });
        self.strikes.retain(|_, (_, until)| *until > now);
    }

    fn ban(&mut self, peer: PeerId) {
        let now = tokio::time::Instant::now();
        if let Some(first) = make_room(&mut self.bans, &peer, MAX_BANS) {
            self.swarm.behaviour_mut().banned.unblock_peer(first);
        }
        self.bans.insert(peer, now + BAN);
        self.known.remove(&peer);
        let ips: HashSet<std::net::IpAddr> = self
            .connections
            .iter()
            .filter(|(id, c)| c.peer == peer && self.incoming_by_ip.values().any(|s| s.contains(id)))
            .filter_map(|(_, c)| ip_of(&c.addr))
            .filter(|ip| !ip.is_loopback())
            .collect();
        for ip in ips {
            if self.strikes.len() >= MAX_BANS && !self.strikes.contains_key(&ip) {
                continue;
            }
            let s = self.strikes.entry(ip).or_insert((0, now));
            s.0 += 1;
            s.1 = now + BAN;
        }
        tracing::info!(%peer, "banned for {BAN:?}: it sent past twice its rate limit");
        // Closes its connections and refuses new ones.
        self.swarm.behaviour_mut().banned.block_peer(peer);
    }

    /// Counts `peer` as known; its inbound connections stop counting
    /// against the share for peers not known.
    fn know(&mut self, peer: PeerId) {
        let now = tokio::time::Instant::now();
        make_room(&mut self.known, &peer, MAX_KNOWN);
        self.known.insert(peer, now);
        self.unknown_inbound.retain(|_, (p, _)| *p != peer);
    }

    /// Counts a request to or from `peer` starting (`1`) or ending (`-1`).
    fn use_peer(&mut self, peer: PeerId, delta: i32) {
        let now = tokio::time::Instant::now();
        make_room(&mut self.used, &peer, MAX_KNOWN);
        self.used.insert(peer, now);
        if delta > 0 {
            *self.busy.entry(peer).or_default() += 1;
        } else if let Some(n) = self.busy.get_mut(&peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.busy.remove(&peer);
            }
        }
    }

    fn recently_trimmed(&self, peer: &PeerId) -> bool {
        self.trimmed.get(peer).is_some_and(|t| t.elapsed() < TRIMMED_FOR)
    }

    /// Whether this node holds as many peers as its budget wants: then it
    /// dials no lost or newly found peer on its own.
    fn at_budget(&self) -> bool {
        self.target_connections > 0 && self.swarm.connected_peers().count() >= self.target_connections
    }

    /// Applies the connection budget (see [`budget`]): above its high-water
    /// mark, disconnects the longest idle peers that nothing protects.
    fn trim(&mut self, now: tokio::time::Instant) {
        if self.target_connections == 0 {
            return;
        }
        // Each peer's newest connection.
        let mut newest: HashMap<PeerId, tokio::time::Instant> = HashMap::new();
        for c in self.connections.values() {
            let e = newest.entry(c.peer).or_insert(c.since);
            *e = (*e).max(c.since);
        }
        if newest.len() <= budget::high_water(self.target_connections) {
            return;
        }
        let gossip = &self.swarm.behaviour().gossip;
        let ours: HashSet<&gossipsub::TopicHash> = gossip.topics().collect();
        let subscribed: Vec<(PeerId, Vec<gossipsub::TopicHash>)> = gossip
            .all_peers()
            .map(|(p, ts)| (*p, ts.into_iter().filter(|t| ours.contains(t)).cloned().collect()))
            .collect();
        let mesh: HashSet<PeerId> = gossip.all_mesh_peers().copied().collect();
        let salt = &self.salt;
        let keepers = budget::topic_keepers(&subscribed, &mesh, |p| {
            let h = blake3::keyed_hash(salt, &p.to_bytes());
            u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or_default())
        });
        let weighed: Vec<budget::Weighed> = newest
            .iter()
            .map(|(peer, since)| {
                let last = self.used.get(peer).map_or(*since, |u| (*u).max(*since));
                let protected = keepers.contains(peer)
                    || self.busy.contains_key(peer)
                    || self.relay_peers.contains(peer)
                    || now.duration_since(last) < self.idle_for;
                budget::Weighed {
                    peer: *peer,
                    protected,
                    idle_ms: now.duration_since(last).as_millis() as u64,
                }
            })
            .collect();
        for peer in budget::to_trim(&weighed, self.target_connections) {
            tracing::debug!(%peer, "disconnecting: over the connection budget and idle");
            make_room(&mut self.trimmed, &peer, MAX_KNOWN);
            self.trimmed.insert(peer, now);
            self.redial.remove(&peer);
            self.trimmed_total += 1;
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// Peers whose inbound connection has been open for [`TENURE`] become known.
    fn grant_tenure(&mut self, now: tokio::time::Instant) {
        let tenured: Vec<PeerId> = self
            .unknown_inbound
            .values()
            .filter(|(_, since)| now.duration_since(*since) >= TENURE)
            .map(|(p, _)| *p)
            .collect();
        for p in tenured {
            self.know(p);
        }
    }

    /// Whether inbound connections from `ip` are refused for its strikes.
    fn struck_out(&self, ip: std::net::IpAddr) -> bool {
        self.strikes.get(&ip).is_some_and(|(n, _)| *n >= IP_STRIKES)
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Ban { peer } => return self.ban(peer),
            Command::Trust { peer } => return self.know(peer),
            _ => {}
        }
        let b = self.swarm.behaviour_mut();
        match command {
            Command::Publish { shard, data, reply } => {
                let r = b
                    .gossip
                    .publish(gossipsub::IdentTopic::new(advert_topic(shard)), data)
                    .map(drop)
                    .map_err(|e| anyhow!("publishing: {e:?}"));
                let _ = reply.send(r);
            }
            Command::ShardPeers { reply } => {
                let mut counts = [0u16; protocol::shards::SHARDS as usize];
                for (_, topics) in b.gossip.all_peers() {
                    for t in topics {
                        if let Some(s) = (0..protocol::shards::SHARDS).find(|&s| t.as_str() == advert_topic(s)) {
                            counts[s as usize] = counts[s as usize].saturating_add(1);
                        }
                    }
                }
                let _ = reply.send(counts);
            }
            Command::DialPeer { peer } => {
                if !self.swarm.is_connected(&peer) {
                    let _ = self.swarm.dial(peer);
                }
            }
            Command::Follow { shards } => {
                for s in 0..protocol::shards::SHARDS {
                    let t = gossipsub::IdentTopic::new(advert_topic(s));
                    if shards.contains(s) {
                        let _ = b.gossip.subscribe(&t);
                    } else {
                        b.gossip.unsubscribe(&t);
                    }
                }
            }
            Command::Validation { source, id, accept } => {
                b.gossip.report_message_validation_result(&id, &source, accept);
            }
            Command::Request {
                peer,
                protocol,
                data,
                reply,
            } => {
                let id = b.rr(&protocol).send_request(&peer, data);
                self.pending.insert((Rr::of(&protocol), id), reply);
                self.use_peer(peer, 1);
            }
            Command::Respond {
                protocol,
                channel,
                data,
            } => {
                if b.rr(&protocol).send_response(channel, data).is_err() {
                    tracing::debug!("a peer went away before its response was sent");
                }
            }
            Command::Dial { addr, reply } => {
                if let Some(peer) = peer_of(&addr) {
                    b.kad.add_address(&peer, addr.clone());
                }
                let _ = reply.send(self.swarm.dial(addr).map_err(|e| anyhow!("dial: {e}")));
            }
            Command::AddAddress { peer, addr } => {
                b.kad.add_address(&peer, addr.clone());
                self.swarm.add_peer_address(peer, addr);
            }
            Command::Provide { key } => {
                if let Err(e) = b.kad.start_providing(kad::RecordKey::new(&key)) {
                    tracing::warn!("kademlia provider record: {e}");
                }
            }
            Command::Providers { key, reply } => {
                let q = b.kad.get_providers(kad::RecordKey::new(&key));
                self.providers.insert(q, (HashSet::new(), reply));
            }
            Command::Info { reply } => {
                let mut listen_addrs: Vec<String> = self.swarm.listeners().map(|a| a.to_string()).collect();
                for a in self.swarm.external_addresses() {
                    let a = a.to_string();
                    if !listen_addrs.contains(&a) {
                        listen_addrs.push(a);
                    }
                }
                let mut connections: Vec<ConnectionInfo> = self
                    .connections
                    .values()
                    .map(|c| ConnectionInfo {
                        peer: c.peer.to_string(),
                        addr: c.addr.to_string(),
                        relayed: c.relayed,
                    })
                    .collect();
                connections.sort_by(|a, b| (&a.peer, &a.addr).cmp(&(&b.peer, &b.addr)));
                let (bytes_in, bytes_out) = traffic(&self.metrics);
                let _ = reply.send(NetInfo {
                    bytes_in,
                    bytes_out,
                    peer_id: self.swarm.local_peer_id().to_string(),
                    listen_addrs,
                    connected: self.swarm.connected_peers().map(|p| p.to_string()).collect(),
                    connections,
                    banned: self.bans.len(),
                    unknown_inbound: self.unknown_inbound.len(),
                    max_unknown_inbound: self.max_unknown_inbound,
                    nat: self.nat.clone(),
                    relays: self
                        .relays
                        .iter()
                        .map(|r| RelayInfo {
                            addr: r.addr.to_string(),
                            reserved: r.reserved,
                        })
                        .collect(),
                    target_connections: self.target_connections,
                    trimmed: self.trimmed_total,
                });
            }
            Command::Path { peer, reply } => {
                let mut path = Path::None;
                for c in self.connections.values() {
                    if c.peer != peer {
                        continue;
                    }
                    if !c.relayed {
                        path = Path::Direct;
                        break;
                    }
                    path = Path::Relayed {
                        punch: self.punch.get(&peer).cloned(),
                    };
                }
                let _ = reply.send(path);
            }
            Command::DialDirect { peer } => self.dial_listen_addrs(peer, false),
            Command::Ban { .. } | Command::Trust { .. } => {}
        }
    }

    async fn forward(&mut self, event: Inbound) {
        // Bounded: if the node falls behind, the swarm waits (back-pressure)
        // instead of queueing without limit.
        if self.inbound.send(event).await.is_err() {
            tracing::debug!("inbound event dropped: the node is stopping");
        }
    }

    async fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                if self.relay_server && !is_relayed(&address) && !is_unspecified(&address) {
                    // A relay is a node others dial: what it listens on is
                    // what it hands its clients for their circuit addresses.
                    // Loopback only while it has nothing else (a swarm on
                    // one machine): elsewhere it names the dialler's own host.
                    let loopback = |a: &Multiaddr| ip_of(a).is_some_and(|ip| ip.is_loopback());
                    if !loopback(&address) {
                        let stale: Vec<Multiaddr> = self
                            .swarm
                            .external_addresses()
                            .filter(|a| loopback(a))
                            .cloned()
                            .collect();
                        for a in stale {
                            self.swarm.remove_external_address(&a);
                        }
                        self.swarm.add_external_address(address);
                    } else if self.swarm.external_addresses().all(loopback) {
                        self.swarm.add_external_address(address);
                    }
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                if endpoint.is_listener()
                    && !endpoint.is_relayed()
                    && let Some(ip) = ip_of(endpoint.get_remote_address())
                {
                    if self.struck_out(ip) {
                        tracing::debug!(peer = %peer_id, %ip, "refused: its address had peers banned");
                        self.swarm.close_connection(connection_id);
                        return;
                    }
                    let from_ip = self.incoming_by_ip.entry(ip).or_default();
                    if over_ip_cap(ip, from_ip.len(), self.max_incoming_per_ip) {
                        tracing::debug!(peer = %peer_id, %ip, "refused: too many connections from one address");
                        self.swarm.close_connection(connection_id);
                        return;
                    }
                    from_ip.insert(connection_id);
                }
                if endpoint.is_dialer() {
                    // This node chose to reach it.
                    self.know(peer_id);
                } else if !self.known.contains_key(&peer_id) {
                    if self.unknown_inbound.len() >= self.max_unknown_inbound {
                        tracing::debug!(peer = %peer_id, "refused: the connection slots for new peers are full");
                        self.swarm.close_connection(connection_id);
                        return;
                    }
                    self.unknown_inbound
                        .insert(connection_id, (peer_id, tokio::time::Instant::now()));
                }
                // A relayed connection's remote address, on the side it was
                // brought to, names only the peer: the circuit is the local one.
                let relayed = endpoint.is_relayed();
                let addr = match &endpoint {
                    libp2p::core::ConnectedPoint::Listener { local_addr, .. } if relayed => {
                        local_addr.clone().with(libp2p::multiaddr::Protocol::P2p(peer_id))
                    }
                    _ => endpoint.get_remote_address().clone(),
                };
                self.connections.insert(
                    connection_id,
                    Conn {
                        peer: peer_id,
                        addr,
                        relayed,
                        since: tokio::time::Instant::now(),
                    },
                );
                if !relayed {
                    self.punch.remove(&peer_id);
                    self.close_relayed(peer_id);
                } else if self.connections.values().any(|c| c.peer == peer_id && !c.relayed) {
                    // A direct connection is up already: this circuit is not needed.
                    self.swarm.close_connection(connection_id);
                }
                self.redial.remove(&peer_id);
                if num_established.get() == 1 {
                    self.forward(Inbound::Connected { peer: peer_id }).await;
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } if self.relay_server => {
                self.swarm.remove_external_address(&address);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                // `busy` is left as it is: every request in flight still
                // gets its failure event, which counts it down.
                self.connections.remove(&connection_id);
                if num_established == 0
                    && self.known.contains_key(&peer_id)
                    && !self.bans.contains_key(&peer_id)
                    && !self.recently_trimmed(&peer_id)
                    && !self.at_budget()
                    && (self.redial.len() < MAX_KNOWN || self.redial.contains_key(&peer_id))
                {
                    let first = Duration::from_secs(1);
                    self.redial
                        .entry(peer_id)
                        .or_insert((tokio::time::Instant::now() + first, first));
                }
                if let Some((peer, since)) = self.unknown_inbound.remove(&connection_id)
                    && since.elapsed() >= TENURE
                {
                    self.know(peer);
                }
                self.incoming_by_ip.retain(|_, c| {
                    c.remove(&connection_id);
                    !c.is_empty()
                });
            }
            SwarmEvent::ListenerClosed {
                listener_id, reason, ..
            } => {
                if let Some(slot) = self.relays.iter_mut().find(|s| s.listener == Some(listener_id)) {
                    tracing::warn!(
                        relay = %slot.addr,
                        "not reachable through the relay ({reason:?}); asking again in {:?}",
                        slot.backoff
                    );
                    slot.listener = None;
                    slot.reserved = false;
                    slot.retry_at = tokio::time::Instant::now() + slot.backoff;
                    slot.backoff = (slot.backoff * 2).min(RelaySlot::MAX_RETRY);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Relay(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                ..
            })) => {
                for slot in self
                    .relays
                    .iter_mut()
                    .filter(|s| peer_of(&s.addr) == Some(relay_peer_id))
                {
                    slot.backoff = RelaySlot::FIRST_RETRY;
                    slot.reserved = true;
                }
                if !renewal {
                    tracing::info!(relay = %relay_peer_id, "reachable through a relay");
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayServer(e)) => tracing::debug!("relay: {e:?}"),
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event { remote_peer_id, result })) => match result {
                Ok(_) => tracing::info!(peer = %remote_peer_id, "hole punched: a direct connection replaces the relay"),
                Err(e) => {
                    let why = format!("hole punching failed: {:#}", anyhow::Error::new(e));
                    tracing::info!(peer = %remote_peer_id, "{why}");
                    insert_bounded(&mut self.punch, remote_peer_id, why);
                }
            },
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(autonat::Event::StatusChanged { new, .. })) => {
                self.nat = match new {
                    autonat::NatStatus::Public(a) => format!("public {a}"),
                    autonat::NatStatus::Private => "private".into(),
                    autonat::NatStatus::Unknown => "unknown".into(),
                };
                tracing::info!(nat = %self.nat, "reachability");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, "dial failed: {error}");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                let direct: Vec<Multiaddr> = info
                    .listen_addrs
                    .iter()
                    .filter(|a| !is_relayed(a) && !is_unspecified(a))
                    .take(8)
                    .cloned()
                    .collect();
                insert_bounded(&mut self.listen_addrs, peer_id, direct);
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
                    if !self.swarm.is_connected(&peer) && !self.recently_trimmed(&peer) && !self.at_budget() {
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossip(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => {
                let shard = (0..protocol::shards::SHARDS).find(|&s| message.topic.as_str() == advert_topic(s));
                self.forward(Inbound::Advert {
                    source: propagation_source,
                    id: message_id,
                    shard,
                    data: message.data,
                })
                .await;
            }
            SwarmEvent::Behaviour(BehaviourEvent::Blob(e)) => self.on_rr(e, BLOB_PROTOCOL).await,
            SwarmEvent::Behaviour(BehaviourEvent::Task(e)) => self.on_rr(e, TASK_PROTOCOL).await,
            SwarmEvent::Behaviour(BehaviourEvent::Sync(e)) => self.on_rr(e, SYNC_PROTOCOL).await,
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(r),
                step,
                ..
            })) => {
                if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = r
                    && let Some((set, _)) = self.providers.get_mut(&id)
                {
                    set.extend(providers);
                }
                if step.last
                    && let Some((set, reply)) = self.providers.remove(&id)
                {
                    let _ = reply.send(set);
                }
            }
            _ => {}
        }
    }

    async fn on_rr(&mut self, e: request_response::Event<Vec<u8>, Vec<u8>>, protocol: StreamProtocol) {
        match e {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => {
                    self.use_peer(peer, 1);
                    let event = match Rr::of(&protocol) {
                        Rr::Blob => Inbound::BlobRequest { peer, request, channel },
                        Rr::Task => Inbound::Task { peer, request, channel },
                        Rr::Sync => Inbound::AdvertSync { peer, request, channel },
                    };
                    self.forward(event).await;
                }
                request_response::Message::Response { request_id, response } => {
                    self.use_peer(peer, -1);
                    if let Some(reply) = self.pending.remove(&(Rr::of(&protocol), request_id)) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                self.use_peer(peer, -1);
                if let Some(reply) = self.pending.remove(&(Rr::of(&protocol), request_id)) {
                    let retryable = matches!(
                        error,
                        request_response::OutboundFailure::ConnectionClosed
                            | request_response::OutboundFailure::DialFailure
                            | request_response::OutboundFailure::Io(_)
                    );
                    let _ = reply.send(Err(RequestFailed {
                        peer,
                        protocol,
                        retryable,
                        error: error.to_string(),
                    }
                    .into()));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                self.use_peer(peer, -1);
                tracing::debug!(%peer, "inbound {protocol} request failed: {error}");
            }
            request_response::Event::ResponseSent { peer, .. } => self.use_peer(peer, -1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_map_gives_up_its_earliest_entry_only_for_a_new_key() {
        let t0 = tokio::time::Instant::now();
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut m = HashMap::from([(a, t0 + Duration::from_secs(5)), (b, t0 + Duration::from_secs(1))]);
        assert_eq!(make_room(&mut m, &c, 3), None, "room left");
        assert_eq!(make_room(&mut m, &a, 2), None, "a key it holds needs no room");
        assert_eq!(make_room(&mut m, &c, 2), Some(b), "the earliest goes");
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn one_address_holds_at_most_its_share_of_inbound_connections() {
        let remote: std::net::IpAddr = "203.0.113.7".parse().unwrap();
        assert!(!over_ip_cap(remote, 15, 16));
        assert!(over_ip_cap(remote, 16, 16));
        assert!(
            !over_ip_cap("127.0.0.1".parse().unwrap(), 1000, 16),
            "loopback is exempt"
        );
        let a: Multiaddr = "/ip4/203.0.113.7/udp/4001/quic-v1".parse().unwrap();
        assert_eq!(ip_of(&a), Some(remote));
        let named: Multiaddr = "/dns4/example.com/tcp/1".parse().unwrap();
        assert_eq!(ip_of(&named), None);
    }
}
