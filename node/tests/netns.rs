//! Real networks: `tern node` processes on hosts in Linux network
//! namespaces built by `scripts/netns` (a LAN on one bridge; hosts behind
//! home routers that masquerade and drop unsolicited inbound traffic, on a
//! shared "internet" with a public relay). Everything they send stays in
//! namespaces the test makes, and each test tears its own down.
//!
//! Needs root (network namespaces), iproute2 and nftables: without them the
//! tests are skipped with a loud message, and fail under CI.
#![cfg(target_os = "linux")]

#[allow(dead_code)] // the helpers other test files use too
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::tempdir;
use serde_json::Value;

/// The repository's `scripts/netns`.
fn netns_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/netns")
}

/// Whether namespaces can be made here; under CI, a failure if not.
fn netns_available() -> bool {
    let ok = Command::new(netns_script())
        .arg("check")
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "the network-namespace tests need root, iproute2 and nftables (scripts/netns check failed)"
        );
        eprintln!(
            "\n*** SKIPPED: network-namespace tests need root, iproute2 and nftables (scripts/netns check) ***\n"
        );
    }
    ok
}

/// A topology from `scripts/netns up`, torn down when dropped.
struct Topology {
    prefix: String,
}

impl Topology {
    fn up(kind: &str, name: &str, extra: &[&str]) -> Self {
        // Short, and unique per test process.
        let prefix = format!("t{}{name}", std::process::id() % 100_000);
        let out = Command::new(netns_script())
            .args(["up", kind, &prefix])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "scripts/netns up: {out:?}");
        Self { prefix }
    }

    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = Command::new(netns_script()).args(["down", &self.prefix]).status();
    }
}

/// A `tern node` daemon in a namespace; killed when dropped (its log is
/// printed then, when the test is failing).
struct Host {
    ns: String,
    dir: PathBuf,
    child: Child,
}

impl Host {
    /// Writes `dir/node.toml` (`config`, plus test defaults), starts the
    /// daemon in `ns` and returns once its control API answers.
    fn start(ns: &str, dir: &Path, config: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let file = dir.join("node.toml");
        std::fs::write(
            &file,
            format!("gpu = false\nbench = false\nadvert_interval_secs = 2\nadvert_ttl_secs = 30\n{config}"),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("node.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_tern"), "node", "--config"])
            .arg(&file)
            .arg("--data-dir")
            .arg(dir)
            .args(["--control", "127.0.0.1:0"])
            .env(
                "RUST_LOG",
                std::env::var("TERN_NETNS_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let h = Self {
            ns: ns.into(),
            dir: dir.into(),
            child,
        };
        let t0 = Instant::now();
        while !h.cli(&["status", "--json"]).status.success() {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the daemon in {ns} did not start"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        h
    }

    /// `tern ARGS --data-dir DIR`, run in this host's namespace (its
    /// control API listens on the namespace's own loopback).
    fn cli(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns, env!("CARGO_BIN_EXE_tern")])
            .args(args)
            .arg("--data-dir")
            .arg(&self.dir)
            .output()
            .unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        assert!(out.status.success(), "tern {args:?} in {}: {out:?}", self.ns);
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn status(&self) -> Value {
        self.json(&["status", "--json"])
    }

    fn peer_id(&self) -> String {
        self.status()["peer_id"].as_str().unwrap().to_string()
    }

    fn public_key(&self) -> String {
        self.status()["public_key"].as_str().unwrap().to_string()
    }

    /// Waits until this host's peer table holds an advert from `key`.
    fn wait_for_advert(&self, key: &str, within: Duration) {
        let t0 = Instant::now();
        loop {
            let peers = self.json(&["peers", "--json"]);
            if peers.as_array().unwrap().iter().any(|p| p.to_string().contains(key)) {
                return;
            }
            assert!(
                t0.elapsed() < within,
                "{} never learned {key}'s advert: {peers}",
                self.ns
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// This host's connections to `peer`.
    fn connections_to(&self, peer: &str) -> Vec<Value> {
        self.status()["connections"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["peer"] == peer)
            .cloned()
            .collect()
    }

    /// SIGKILL: no shutdown, nothing flushed or handed back.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "--- {} ({}) log, last lines ---\n{}",
                self.ns,
                self.dir.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// A `small` model as a GGUF file (about 20 MB: far more than a relay
/// circuit carries), made once per test process.
fn small_model() -> PathBuf {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| small_gguf(&tempdir("netns-model"), "3")).clone()
}

/// A `small` model with its own seed (so its own content id) in `dir`.
fn small_gguf(dir: &Path, seed: &str) -> PathBuf {
    let m = dir.join(format!("small-{seed}.gguf"));
    common::ok(&common::tern(&[
        "model",
        "init",
        "--preset",
        "small",
        "--seed",
        seed,
        "--format",
        "gguf-i2s",
        "--out",
        m.to_str().unwrap(),
    ]));
    m
}

/// Transports of a NAT test.
#[derive(Clone, Copy)]
enum Transport {
    Quic,
    Tcp,
}

impl Transport {
    fn listen(self, port: u16) -> String {
        match self {
            Self::Quic => format!("/ip4/0.0.0.0/udp/{port}/quic-v1"),
            Self::Tcp => format!("/ip4/0.0.0.0/tcp/{port}"),
        }
    }

    fn relay_addr(self, relay: &str) -> String {
        match self {
            Self::Quic => format!("/ip4/198.18.0.10/udp/4001/quic-v1/p2p/{relay}"),
            Self::Tcp => format!("/ip4/198.18.0.10/tcp/4001/p2p/{relay}"),
        }
    }
}

/// The NAT topology's three daemons: a public relay that takes no tasks,
/// a worker behind home router A, a client behind home router B; all with
/// `nat_traversal`, the two behind NATs reserving a slot on the relay.
struct NatSwarm {
    relay: Host,
    worker: Host,
    client: Host,
    // Last: the namespaces go after the daemons in them.
    _topo: Topology,
}

fn nat_swarm(name: &str, transport: Transport, symmetric: bool) -> NatSwarm {
    let topo = Topology::up("nat", name, if symmetric { &["symmetric"] } else { &[] });
    let d = tempdir(&format!("netns-{name}"));
    let relay = Host::start(
        &topo.ns("relay"),
        &d.join("relay"),
        &format!(
            "mdns = false\nrelay_server = true\nnat_traversal = true\nlisten = [\"{}\"]\n[policy]\nopen = false\n",
            transport.listen(4001)
        ),
    );
    let relay_addr = transport.relay_addr(&relay.peer_id());
    let behind_nat = format!(
        "mdns = false\nnat_traversal = true\nlisten = [\"{}\"]\nbootstrap = [\"{relay_addr}\"]\nrelays = [\"{relay_addr}\"]\n",
        transport.listen(0)
    );
    let worker = Host::start(&topo.ns("a"), &d.join("worker"), &behind_nat);
    let client = Host::start(&topo.ns("b"), &d.join("client"), &behind_nat);
    NatSwarm {
        relay,
        worker,
        client,
        _topo: topo,
    }
}

/// Hosts behind two home routers find each other through a public relay,
/// start on its circuit and end on a direct, hole-punched connection
/// (the client's own connection table says so), over which a worker
/// fetches a model twenty times what a circuit carries and answers an
/// inference the client verifies; with `job`, then runs a fine-tune on
/// another such model that the worker must fetch the same way.
fn hole_punched_inference(name: &str, transport: Transport, job: bool) {
    if !netns_available() {
        return;
    }
    let model = small_model();
    let s = nat_swarm(name, transport, false);
    let (worker_id, worker_key) = (s.worker.peer_id(), s.worker.public_key());

    // The worker holds a reservation on the relay, and says where it is
    // reached: through the relay's circuit.
    wait_until(Duration::from_secs(30), "the worker's relay reservation", || {
        s.worker.status()["relays"][0]["reserved"] == true
    });
    let st = s.worker.status();
    assert!(
        st["listen_addrs"].to_string().contains("p2p-circuit"),
        "the worker advertises its circuit address: {st}"
    );
    assert_ne!(st["nat"], "off", "{st}");
    let text = String::from_utf8_lossy(&s.worker.cli(&["status"]).stdout).into_owned();
    assert!(text.contains("relay       reserved"), "{text}");
    // The relay takes no tasks, so it offers no slot.
    let relay_key = s.relay.public_key();
    s.client.wait_for_advert(&worker_key, Duration::from_secs(60));
    s.client.wait_for_advert(&relay_key, Duration::from_secs(60));
    let peers = s.client.json(&["peers", "--json"]);
    let relay_row = peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p.to_string().contains(&relay_key))
        .unwrap();
    assert_eq!(
        relay_row.pointer("/entry/advert/max_tasks"),
        Some(&Value::from(0)),
        "a closed relay offers no task slot: {relay_row}"
    );

    let out = s.client.cli(&[
        "submit",
        "infer",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Hello there",
        "--max-tokens",
        "6",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "inference over the NAT failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["answer"]["worker"], worker_key.as_str(), "{answer}");
    assert_eq!(answer["answer"]["tokens"].as_array().unwrap().len(), 6, "{answer}");

    // The client reaches the worker directly: a hole punched through both
    // routers, not the relay's circuit.
    let to_worker = s.client.connections_to(&worker_id);
    assert!(
        !to_worker.is_empty() && to_worker.iter().all(|c| c["relayed"] == false),
        "the client's connections to the worker: {to_worker:?}"
    );
    let addr = to_worker[0]["addr"].as_str().unwrap();
    assert!(
        addr.starts_with("/ip4/198.18.0.21/"),
        "the worker is reached at its router's public address: {addr}"
    );
    let text = String::from_utf8_lossy(&s.client.cli(&["status"]).stdout).into_owned();
    assert!(text.contains(&format!("connection  direct  {worker_id}")), "{text}");
    assert!(s.worker.log().contains("hole punched") || s.client.log().contains("hole punched"));
    if !job {
        return;
    }

    // A fine-tune between the NATed client and the NATed worker, on a model
    // the worker does not hold yet: the shard task's inputs cross the hole.
    let d = tempdir(&format!("netns-{name}-job"));
    let job_model = small_gguf(&d, "4");
    let data = d.join("data.txt");
    std::fs::write(&data, "a job between two homes, through a punched hole. ".repeat(64)).unwrap();
    let out = s.client.cli(&[
        "submit",
        "finetune",
        "--model",
        job_model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--rounds",
        "2",
        "--local-steps",
        "2",
        "--shards",
        "1",
        "--seq-len",
        "32",
        "--verify",
        "none",
        "--min-workers",
        "1",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "the job across the NATs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(worker_key.as_str()),
        "the NATed worker took the shards: {text}"
    );
    let model_id = protocol::ContentId::of(&std::fs::read(&job_model).unwrap()).to_string();
    let held = String::from_utf8_lossy(&s.worker.cli(&["blob", "list"]).stdout).into_owned();
    assert!(held.contains(&model_id), "the worker fetched the job's model: {held}");
    let to_worker = s.client.connections_to(&worker_id);
    assert!(
        !to_worker.is_empty() && to_worker.iter().all(|c| c["relayed"] == false),
        "still direct after the job: {to_worker:?}"
    );
}

#[test]
fn behind_two_nats_a_hole_is_punched_over_quic_and_carries_a_model_and_a_job() {
    hole_punched_inference("q", Transport::Quic, true);
}

#[test]
fn behind_two_nats_a_hole_is_punched_over_tcp_and_carries_a_model() {
    hole_punched_inference("t", Transport::Tcp, false);
}

/// Behind routers that map every flow to a random port (symmetric NATs),
/// no hole can be punched: the inference fails within a minute, saying
/// that the worker is reachable only through a relay and why that is not
/// enough, instead of hanging.
#[test]
fn behind_symmetric_nats_the_client_is_told_why_the_worker_cannot_be_used() {
    if !netns_available() {
        return;
    }
    let model = small_model();
    let s = nat_swarm("s", Transport::Quic, true);
    s.client
        .wait_for_advert(&s.worker.public_key(), Duration::from_secs(60));
    let t0 = Instant::now();
    let out = s.client.cli(&[
        "submit",
        "infer",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Hello there",
        "--max-tokens",
        "4",
    ]);
    common::fails_with(&out, "reachable only through a relay");
    common::fails_with(&out, "symmetric NAT");
    assert!(t0.elapsed() < Duration::from_secs(120), "took {:?}", t0.elapsed());
    let to_worker = s.client.connections_to(&s.worker.peer_id());
    assert!(
        to_worker.iter().all(|c| c["relayed"] == true),
        "no direct connection can exist: {to_worker:?}"
    );
    drop(s.relay);
}

/// A LAN host's settings: found by mDNS, QUIC on every address.
const LAN: &str = "mdns = true\nlisten = [\"/ip4/0.0.0.0/udp/0/quic-v1\"]\n";

/// Three daemons on one LAN (`PREFIX-h1..h3`), the third (the client)
/// holding both others' adverts; with their directory.
fn lan(name: &str) -> (Topology, PathBuf, Vec<Host>) {
    let topo = Topology::up("lan", name, &[]);
    let d = tempdir(&format!("netns-lan-{name}"));
    let hosts: Vec<Host> = (1..=3)
        .map(|i| Host::start(&topo.ns(&format!("h{i}")), &d.join(format!("h{i}")), LAN))
        .collect();
    for w in &hosts[..2] {
        hosts[2].wait_for_advert(&w.public_key(), Duration::from_secs(60));
    }
    (topo, d, hosts)
}

/// A tiny model as an I2_S GGUF file in `dir`.
fn tiny_gguf(dir: &Path, seed: &str) -> PathBuf {
    common::init_with(dir, &format!("tiny-{seed}.gguf"), seed, &["--format", "gguf-i2s"])
}

/// Three hosts on one LAN, with no bootstrap address, find each other by
/// mDNS alone and run a fine-tune job: the client's daemon hands its
/// shards to the two others.
#[test]
fn a_lan_forms_a_swarm_by_mdns_alone_and_runs_a_job() {
    if !netns_available() {
        return;
    }
    let (_topo, d, hosts) = lan("l");
    let client = &hosts[2];
    let model = tiny_gguf(&d, "1");
    let data = d.join("data.txt");
    std::fs::write(&data, "the swarm on the LAN trains on this text. ".repeat(64)).unwrap();
    let out = client.cli(&[
        "submit",
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--rounds",
        "2",
        "--local-steps",
        "2",
        "--shards",
        "2",
        "--seq-len",
        "32",
        "--verify",
        "none",
        "--min-workers",
        "2",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "the LAN job failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let workers: Vec<String> = hosts[..2].iter().map(Host::public_key).collect();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        workers.iter().all(|w| text.contains(w.as_str())),
        "both LAN workers took shards: {text}"
    );
    // Found by mDNS: the connections are on the LAN's addresses.
    let conns = client.status()["connections"].to_string();
    assert!(conns.contains("/ip4/10.77.0.1"), "{conns}");
}

/// Reads a job's saved state straight from the client's data directory.
fn job_state(client: &Path, id: &str) -> Option<Value> {
    let text = std::fs::read_to_string(client.join("jobs").join(id).join("state.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Waits until `f` holds, polling every 100 ms.
fn wait_until(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Separate processes failing on a LAN with lossy links (20 Mbit/s, 1%
/// loss) while a job runs: a worker killed
/// with SIGKILL in the middle of a shard (it comes back later), the
/// client's daemon killed and started again (the job resumes from its
/// saved state), and a partition that cuts a worker off for 10 s in the
/// middle of a shard and heals. The job finishes, and its adapter is the one the client
/// computes alone from the same inputs (`tern job audit`): nothing
/// verified was lost, nothing unverified got in.
#[test]
fn a_job_survives_a_killed_worker_a_killed_client_and_a_partition() {
    if !netns_available() {
        return;
    }
    let (topo, d, hosts) = lan("f");
    let [h1, h2, client]: [Host; 3] = hosts.try_into().ok().unwrap();
    let model = tiny_gguf(&d, "2");
    let data = d.join("data.txt");
    std::fs::write(
        &data,
        "nodes fail and come back; the adapter does not change. ".repeat(200),
    )
    .unwrap();
    // Phone-grade links for the client and one worker: 20 Mbit/s with 1%
    // of what they send lost.
    let netns = |args: &[&str]| {
        let out = Command::new(netns_script()).args(args).output().unwrap();
        assert!(out.status.success(), "scripts/netns {args:?}: {out:?}");
    };
    for h in ["h2", "h3"] {
        netns(&["shape", &topo.ns(h), "eth0", "20mbit", "1"]);
    }
    let out = client.cli(&[
        "submit",
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--rounds",
        "4",
        "--local-steps",
        "40",
        "--shards",
        "2",
        "--seq-len",
        "64",
        "--verify",
        "none",
        "--min-workers",
        "2",
        "--detach",
        "--json",
    ]);
    let submitted: Value = serde_json::from_str(&common::ok(&out)).unwrap();
    let id = submitted["job"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 64, "the job id: {id}");
    let client_dir = client.dir.clone();

    // A worker dies mid-shard.
    wait_until(Duration::from_secs(120), "h1 runs a shard", || {
        h1.status()["active_tasks"].as_u64().unwrap_or(0) > 0
    });
    let h1_dir = h1.dir.clone();
    h1.kill();

    // The client's daemon dies once a round is done, and starts again;
    // the killed worker comes back too.
    wait_until(Duration::from_secs(180), "a round is done", || {
        job_state(&client_dir, &id).is_some_and(|s| s["round"].as_u64().unwrap_or(0) >= 1)
    });
    client.kill();
    let client = Host::start(&topo.ns("h3"), &client_dir, LAN);
    let h1 = Host::start(&topo.ns("h1"), &h1_dir, LAN);

    // A partition cuts h2 off for 10 s in the middle of a shard, and heals.
    wait_until(Duration::from_secs(120), "h2 runs a shard", || {
        h2.status()["active_tasks"].as_u64().unwrap_or(0) > 0
    });
    netns(&["cut", &topo.ns("h2"), "eth0"]);
    std::thread::sleep(Duration::from_secs(10));
    netns(&["heal", &topo.ns("h2"), "eth0"]);

    wait_until(Duration::from_secs(300), "the job finishes", || {
        job_state(&client_dir, &id).is_some_and(|s| s["finished"] == true)
    });
    let state = job_state(&client_dir, &id).unwrap();
    assert_eq!(state["round"], 4, "{state}");
    // The same bytes as the job computed alone.
    let audit = client.json(&["job", "audit", &id, "--json"]);
    assert_eq!(audit["same"], true, "{audit}");
    assert_eq!(audit["swarm_adapter"], state["adapter"], "{audit}");
    drop(h1);
}
