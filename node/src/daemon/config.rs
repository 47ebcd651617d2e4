//! The daemon's configuration: a TOML file whose defaults suit a laptop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub use crate::task::power::PowerPolicy;

/// `profile = "phone"`: settings for a phone (or a small ARM board) in one
/// line. The file's own settings win over the profile's.
pub const PHONE_PROFILE: &str = r#"
[limits]
max_tasks = 1
max_threads = 4
max_memory_mib = 2048
max_disk_mib = 8192

[power]
min_battery_percent = 40
pause_above_celsius = 42.0
resume_below_celsius = 37.0
"#;

/// The profiles `profile = "..."` names.
fn profile(name: &str) -> Result<&'static str> {
    match name {
        "phone" => Ok(PHONE_PROFILE),
        "laptop" | "default" => Ok(""),
        other => anyhow::bail!("profile {other:?} is not one of phone, laptop"),
    }
}

/// `over` on top of `base`, tables merged key by key.
fn merge(mut base: toml::Table, over: toml::Table) -> toml::Table {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => {
                let merged = merge(std::mem::take(b), o);
                *b = merged;
            }
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
    base
}

/// Everything `tern node` can be told. Every field has a default, so an
/// empty file (or none) is a valid configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the key, blobs and state live.
    pub data_dir: PathBuf,
    /// Multiaddresses to listen on (QUIC and TCP on all interfaces by default).
    pub listen: Vec<String>,
    /// Peers to dial at start and to seed Kademlia with (`/ip4/.../p2p/<id>`).
    pub bootstrap: Vec<String>,
    /// Find peers on the local network with mDNS.
    pub mdns: bool,
    /// NAT traversal: AutoNAT probes and hole punching (DCUtR) through relays.
    pub nat_traversal: bool,
    /// Serve as a circuit relay (v2) for peers that cannot be dialled (behind
    /// a NAT): for nodes with a public address, whose listen addresses are
    /// then taken as external. A relayed connection carries requests and
    /// answers, at most 1 MiB and 2 minutes a circuit; bulk data moves over
    /// direct connections (the relayed node dials out to fetch).
    pub relay_server: bool,
    /// Relays to reserve a slot on (`/ip4/.../p2p/<relay id>`): the node
    /// listens at `<relay>/p2p-circuit` and advertises that address, so
    /// peers reach it through the relay when it has no dialable address.
    pub relays: Vec<String>,
    /// Addresses peers reach this node at that its listeners do not show
    /// (a port forward): advertised, and handed to a relay's clients.
    pub external_addrs: Vec<String>,
    /// The local control API (HTTP, JSON) address; loopback only. When it
    /// is the default (127.0.0.1:7447) and taken, a free port is used; the
    /// CLI reads the one in use from `<data_dir>/control.addr`.
    pub control: SocketAddr,
    /// Most simultaneous connections, and per peer. Inbound connections
    /// from peers the node does not know hold at most 3/4 of
    /// `max_connections`; the rest is kept for known peers.
    pub max_connections: u32,
    pub max_connections_per_peer: u32,
    /// The connection budget: peers this node stays connected to. Above
    /// a quarter more, it disconnects the longest idle peers that have no
    /// request in flight, are not among the three it keeps per followed
    /// advert topic, are no configured relay, and neither connected nor
    /// had a request within `connection_idle_secs`; and it dials no lost
    /// or newly found peer while at the budget. 0 (the default): no
    /// budget, `max_connections` alone bounds them. Off by default because
    /// at 128 nodes it cut connections from 110 to 44 per node but raised
    /// traffic from 48 to 69 KB/s: peers it disconnects redial, and each
    /// new connection costs an advert sync (BENCHMARKS.md).
    pub target_connections: u32,
    pub connection_idle_secs: u64,
    /// Most inbound connections from one IP address (loopback exempt): a
    /// flood of fresh keys from one host cannot take every slot from the
    /// peers already connected.
    pub max_incoming_per_ip: u32,
    /// Seconds between adverts, and how long each stays valid.
    pub advert_interval_secs: u64,
    pub advert_ttl_secs: u64,
    /// Adverts this node aims to hold: it follows its own advert shard and
    /// as many next ones as hold about this many (`protocol::shards`), so
    /// its gossip stays bounded however large the swarm. 0 follows every
    /// shard (a client that wants to know the whole swarm, at any cost).
    pub advert_target: usize,
    /// Generate OpenAI API requests on this node when it holds the model
    /// and is not paused by its power policy; false sends every one to a
    /// peer (checked here before it is answered): a phone that should not
    /// spend its battery on generation.
    pub api_local: bool,
    /// Also serve the OpenAI API (and only it) on this address, for other
    /// machines: `0.0.0.0:8080`, say. Every request there needs the key
    /// (the control token, which `tern api` prints; it changes when the
    /// daemon restarts), whatever Host it names. Plain HTTP: put a TLS
    /// proxy in front of it beyond a trusted network. None: loopback only.
    pub api_listen: Option<SocketAddr>,
    /// Run the benchmark and advertise its score.
    pub bench: bool,
    /// Look for a GPU to advertise (opening one takes a moment).
    pub gpu: bool,
    /// Where tasks run: `auto` (a hardware GPU when there is one, else the
    /// CPU), `cpu`, or `wgpu` (the first wgpu adapter, software ones
    /// included; the node does not start without one). Results are the
    /// same bytes on every backend, so this changes speed, never answers.
    pub compute: Compute,
    /// Who may submit tasks.
    pub policy: Policy,
    /// Resource limits for tasks.
    pub limits: Limits,
    /// When the node takes tasks: battery, charger, temperature.
    pub power: PowerPolicy,
    /// Deliberate misbehaviour, for tests and benchmarks of verification.
    /// Never read from a file.
    #[serde(skip)]
    pub fault: Option<Fault>,
}

/// Wrong answers a worker can be told to give, so that tests and
/// benchmarks exercise verification against a real dishonest peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Adds 1e-3 to the first coordinate of every LoRA-shard delta.
    PerturbShard,
    /// Returns bytes that are no shard result at all.
    JunkShard,
    /// Replaces the last generated token of every inference answer.
    TamperInfer,
    /// Claims 1000 times the counted tokens of every LoRA shard (to own
    /// the token-weighted mean).
    InflateTokens,
    /// Sets the first coordinate of every LoRA-shard delta to `f32::MAX`
    /// (finite, so it decodes; enough to overflow the aggregate).
    HugeDelta,
    /// Perturbs a LoRA-shard delta only where a worker that knows the job's
    /// public seed would predict no spot check at `percent`%: it recovers
    /// the round and shard from the task's seed and applies the draw that
    /// spot checks used before the client kept a secret audit key.
    CheatWhereUnchecked { job_seed: u64, percent: u32 },
    /// Accepts tasks and never answers them (until cancelled).
    Stall,
}

/// Where a node runs its tasks (see [`Config::compute`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compute {
    /// A GPU that is real hardware (integrated, discrete or virtual), when
    /// `gpu` is on and one is found; else the CPU. A software adapter
    /// (Mesa's lavapipe) is slower than tern's CPU kernels and is passed over.
    #[default]
    Auto,
    /// The CPU, always.
    Cpu,
    /// The first wgpu adapter, whatever it is.
    Wgpu,
}

/// Who may submit tasks to this node.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Accept tasks from anyone.
    pub open: bool,
    /// Otherwise, accept tasks only from these public keys (hex).
    pub allow: Vec<String>,
}

/// Limits on what tasks may use; phones want them low.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Tasks running at once.
    pub max_tasks: u32,
    /// Compute threads (0: all cores).
    pub max_threads: u32,
    /// Most memory a task may need, in MiB (a model that needs more is refused).
    pub max_memory_mib: u64,
    /// Disk the blob store may fill, in MiB; fetches that would pass it are refused.
    pub max_disk_mib: u64,
    /// Most work units (tokens processed) per task.
    pub max_work: u64,
    /// Take tasks only on mains power (as `power.only_when_charging`).
    pub only_when_charging: bool,
    /// Seconds a task may run before it is abandoned.
    pub task_timeout_secs: u64,
    /// Seconds in-flight tasks get to finish at shutdown before they are handed back.
    pub shutdown_grace_secs: u64,
    /// Adverts a second that one connected peer may forward to this node
    /// (after a burst of `advert_burst`); past that they are dropped unread,
    /// and a peer past twice the rate for a burst's worth is banned for 10
    /// minutes. The node accepts (and forwards) at most 4/5 of this rate in
    /// all, so the nodes of a swarm should agree on it.
    pub adverts_per_sec: u32,
    pub advert_burst: u32,
    /// Task requests a second one peer may send (after a burst of
    /// `task_burst`); past twice that for a burst's worth, it is banned.
    pub tasks_per_sec: u32,
    pub task_burst: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            listen: vec!["/ip4/0.0.0.0/udp/0/quic-v1".into(), "/ip4/0.0.0.0/tcp/0".into()],
            bootstrap: Vec::new(),
            mdns: true,
            nat_traversal: false,
            relay_server: false,
            relays: Vec::new(),
            external_addrs: Vec::new(),
            control: SocketAddr::from(([127, 0, 0, 1], 7447)),
            max_connections: 128,
            max_connections_per_peer: 2,
            target_connections: 0,
            connection_idle_secs: 30,
            max_incoming_per_ip: 16,
            advert_interval_secs: 30,
            advert_ttl_secs: 120,
            advert_target: 256,
            api_local: true,
            api_listen: None,
            bench: true,
            gpu: true,
            compute: Compute::Auto,
            policy: Policy {
                open: true,
                allow: Vec::new(),
            },
            limits: Limits::default(),
            power: PowerPolicy::default(),
            fault: None,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_tasks: 2,
            max_threads: 0,
            max_memory_mib: 4096,
            max_disk_mib: 32 * 1024,
            max_work: 1 << 20,
            only_when_charging: false,
            task_timeout_secs: 600,
            shutdown_grace_secs: 10,
            adverts_per_sec: 50,
            advert_burst: 500,
            tasks_per_sec: 20,
            task_burst: 64,
        }
    }
}

/// `$TERN_HOME`, else `$XDG_DATA_HOME/tern`, else `~/.local/share/tern`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TERN_HOME") {
        return d.into();
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("tern");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/tern"),
        None => PathBuf::from(".tern"),
    }
}

impl Config {
    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Parses a configuration, with the profile it names (`profile =
    /// "phone"`) under its own settings.
    pub fn from_toml(text: &str) -> Result<Self> {
        let mut table: toml::Table = toml::from_str(text)?;
        if let Some(p) = table.remove("profile") {
            let name = p.as_str().context("profile must be a string")?;
            table = merge(toml::from_str(profile(name)?)?, table);
        }
        let c: Self = table.try_into()?;
        c.validate()?;
        Ok(c)
    }

    /// Refuses settings that cannot work.
    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            self.control.ip().is_loopback(),
            "the control API must listen on loopback, not {}",
            self.control
        );
        anyhow::ensure!(self.limits.max_tasks > 0, "limits.max_tasks must be at least 1");
        self.power.validate()?;
        anyhow::ensure!(self.advert_interval_secs > 0, "advert_interval_secs must be at least 1");
        anyhow::ensure!(
            self.advert_ttl_secs > self.advert_interval_secs
                && self.advert_ttl_secs * 1000 <= protocol::limits::MAX_ADVERT_TTL_MS,
            "advert_ttl_secs must be above advert_interval_secs and at most {} s",
            protocol::limits::MAX_ADVERT_TTL_MS / 1000
        );
        anyhow::ensure!(
            self.limits.adverts_per_sec > 0 && self.limits.tasks_per_sec > 0,
            "limits.adverts_per_sec and limits.tasks_per_sec must be at least 1"
        );
        for r in &self.relays {
            let a: libp2p::Multiaddr = r.parse().with_context(|| format!("relays entry {r:?}"))?;
            anyhow::ensure!(
                crate::identity::peer_of(&a).is_some(),
                "relays entry {r:?} must end with /p2p/<the relay's peer id>"
            );
        }
        for a in &self.external_addrs {
            a.parse::<libp2p::Multiaddr>()
                .with_context(|| format!("external_addrs entry {a:?}"))?;
        }
        for a in &self.policy.allow {
            a.parse::<protocol::PublicKey>()
                .with_context(|| format!("policy.allow entry {a:?}"))?;
        }
        Ok(())
    }

    /// A configuration for tests and benchmarks: loopback, port 0, no mDNS,
    /// no benchmark or GPU probing, short advert intervals.
    pub fn for_test(data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.to_path_buf(),
            listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".into()],
            mdns: false,
            control: SocketAddr::from(([127, 0, 0, 1], 0)),
            advert_interval_secs: 1,
            advert_ttl_secs: 10,
            bench: false,
            gpu: false,
            ..Self::default()
        }
    }

    /// Advert interval.
    pub fn advert_interval(&self) -> Duration {
        Duration::from_secs(self.advert_interval_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_defaults_and_typos_are_refused() {
        let c: Config = toml::from_str("").unwrap();
        c.validate().unwrap();
        assert!(c.mdns && c.policy.open);
        let phone = Config::from_toml("profile = \"phone\"\n[limits]\nmax_tasks = 3\n").unwrap();
        assert_eq!(phone.power.min_battery_percent, 40, "from the profile");
        assert_eq!(phone.limits.max_memory_mib, 2048, "from the profile");
        assert_eq!(phone.limits.max_tasks, 3, "the file wins");
        assert!(Config::from_toml("profile = \"tablet\"\n").is_err());
        let c: Config = toml::from_str("[limits]\nmax_tasks = 1\nonly_when_charging = true\n").unwrap();
        assert!(c.limits.only_when_charging);
        assert!(toml::from_str::<Config>("mdsn = false").is_err());
        assert_eq!(c.compute, Compute::Auto);
        let c: Config = toml::from_str("compute = \"wgpu\"").unwrap();
        assert_eq!(c.compute, Compute::Wgpu);
        assert!(toml::from_str::<Config>("compute = \"tpu\"").is_err());
        let c: Config = toml::from_str("control = \"0.0.0.0:7447\"").unwrap();
        assert!(c.validate().is_err());
        let c: Config = toml::from_str("[policy]\nallow = [\"nope\"]").unwrap();
        assert!(c.validate().is_err());
        // A relay must name its peer id, so the reservation goes to that peer.
        let c: Config = toml::from_str("relays = [\"/ip4/1.2.3.4/udp/4001/quic-v1\"]").unwrap();
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("/p2p/"));
        let c: Config = toml::from_str(
            "relays = [\"/ip4/1.2.3.4/udp/4001/quic-v1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN\"]",
        )
        .unwrap();
        c.validate().unwrap();
    }
}
