//! Attacks on an open swarm, each made by a real dishonest node started in
//! this process: workers that lie about their weight, return deltas no
//! honest run could make or collude as sybils; a peer that floods adverts
//! and task requests; a worker that takes a task and never answers; a task
//! that runs past its timeout. Each test checks that the attacker is caught
//! or cut off and that the honest work still ends with the bytes it would
//! have had without the attacker.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use node::config::Fault;
use node::daemon::now_ms;
use node::job::submit::submit;
use node::job::{self, Event, JobState, Verify};
use node::net::TASK_PROTOCOL;
use node::reputation::Reputation;
use protocol::{ContentId, Keypair, Payload, PublicKey, Sampling, Task, TaskParams, TaskStatus, Validity};
use tern_tests::{
    adapter_of, assert_eventually, assert_eventually_async, infer_task, reference, setup, shard_task, spawn_nodes,
    tempdir, tiny_model, wait_for_swarm,
};

const WAIT: Duration = Duration::from_secs(60);

/// Who was caught, and why.
type Caught = Arc<Mutex<Vec<(PublicKey, String)>>>;

/// Records who was caught, and why.
fn catcher() -> (Caught, impl Fn(&Event) + Send + Sync) {
    let caught = Arc::new(Mutex::new(Vec::new()));
    let c = caught.clone();
    (caught, move |e: &Event| match e {
        Event::Caught { worker, why, .. } => c.lock().unwrap().push((*worker, why.clone())),
        Event::Failed { why, .. } => eprintln!("{e:?}: {why}"),
        _ => {}
    })
}

/// A client, a worker told to lie with `fault` and an honest worker run a
/// job with no verification at all: with one task per peer at a time, each
/// worker gets one of round 0's two shards. What the client sent is enough
/// to convict the liar: the job ends with the honest adapter, and the
/// client's next job never gives the liar a task.
async fn a_liar_is_convicted_by_what_the_client_sent(fault: Fault, reason: &str) {
    let nodes = spawn_nodes(3, |i, c| {
        if i == 1 {
            c.fault = Some(fault);
        }
    })
    .await;
    wait_for_swarm(&nodes[0], 3).await;
    let liar = nodes[1].public_key();
    let s = setup(&nodes[0], Verify::None);
    let (caught, on) = catcher();
    let state = job::run(&nodes[0].shared.client, s.spec.clone(), &on).await.unwrap();
    assert!(state.finished);
    assert_eq!(
        adapter_of(&nodes[0], &state),
        reference(&s, &nodes[0])[1],
        "the liar changed nothing"
    );
    let caught = caught.lock().unwrap().clone();
    assert_eq!(caught.len(), 1, "{caught:?}");
    assert_eq!(caught[0].0, liar);
    assert!(caught[0].1.contains(reason), "{}", caught[0].1);
    assert_eq!(state.excluded(), vec![liar]);
    let verdict = &state.verdicts[0];
    let evidence = protocol::open(&nodes[0].shared.store.read(&verdict.evidence[0]).unwrap()).unwrap();
    assert_eq!(evidence.signer, liar, "the liar's own signed result is the evidence");

    // No node advertises a shard output or a signed result naming one, so a
    // lazy worker cannot learn an output id without computing it.
    let secret: Vec<ContentId> = state
        .rounds
        .iter()
        .flat_map(|r| r.results.iter().copied())
        .chain(state.verdicts.iter().flat_map(|v| v.evidence.iter().copied()))
        .collect();
    assert!(!secret.is_empty());
    for n in &nodes {
        let a = n.shared.advert();
        for id in &secret {
            assert!(
                !a.blobs.contains(id) && !a.models.contains(id),
                "{} advertises task output or evidence {id}",
                n.public_key()
            );
        }
    }

    // The conviction outlives the job: the client's next job passes the liar over.
    let dir = &nodes[0].shared.config.data_dir;
    assert!(Reputation::load(dir).unwrap().convicted(&liar));
    let next = job::JobSpec {
        seed: s.spec.seed + 1,
        rounds: 1,
        ..s.spec.clone()
    };
    let state: JobState = job::run(&nodes[0].shared.client, next, &on).await.unwrap();
    assert!(state.finished);
    assert_eq!(
        state.workers.get(&liar).map_or(0, |w| w.assigned),
        0,
        "{:?}",
        state.workers
    );
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_inflates_its_token_count_is_convicted() {
    a_liar_is_convicted_by_what_the_client_sent(Fault::InflateTokens, "counted tokens").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_returns_a_huge_delta_is_convicted_and_the_job_completes() {
    a_liar_is_convicted_by_what_the_client_sent(Fault::HugeDelta, "no honest run gives this delta").await;
}

/// Two sybils that return the same wrong delta agree with each other, so
/// redundancy alone accepts them whenever both copies of a shard go to
/// them. Combined with spot checks at 1.0 (every agreed result re-run by
/// the client) they are caught wherever they land, and the job ends with
/// the honest adapter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colluding_sybils_are_caught_under_redundancy_with_spot_checks() {
    let nodes = spawn_nodes(5, |i, c| {
        if i == 1 || i == 2 {
            c.fault = Some(Fault::PerturbShard);
        }
    })
    .await;
    wait_for_swarm(&nodes[0], 5).await;
    let sybils = [nodes[1].public_key(), nodes[2].public_key()];
    let s = setup(&nodes[0], Verify::RedundancySpot { k: 2, fraction: 1.0 });
    let (caught, on) = catcher();
    let state = job::run(&nodes[0].shared.client, s.spec.clone(), &on).await.unwrap();
    assert!(state.finished);
    assert_eq!(adapter_of(&nodes[0], &state), reference(&s, &nodes[0])[1]);
    // Round 0 needs four copies and each of the four workers takes one, so
    // both sybils were given a shard, and both were caught.
    let mut excluded = state.excluded();
    excluded.sort();
    let mut expected = sybils.to_vec();
    expected.sort();
    assert_eq!(excluded, expected, "workers: {:?}", state.workers);
    assert!(caught.lock().unwrap().iter().all(|(w, _)| sybils.contains(w)));
    for n in nodes {
        n.shutdown().await;
    }
}

/// `advert` sealed by fresh key number `n` of the set `tag`, valid for the
/// longest time a receiver accepts.
/// On its key's advert shard, as an honest node would publish it.
fn fresh_key_advert(advert: &protocol::Advert, n: u32, tag: u8) -> (u8, Vec<u8>) {
    let mut secret = [0u8; 32];
    secret[..4].copy_from_slice(&n.to_le_bytes());
    secret[31] = tag;
    let key = Keypair::from_secret(secret);
    let bytes = protocol::seal(
        &key,
        &Payload::Advert(advert.clone()),
        Validity::new(u64::from(n), now_ms(), protocol::limits::MAX_ADVERT_TTL_MS),
    );
    (protocol::shards::shard_of(&key.public()), bytes)
}

/// A peer floods the advert topic with adverts from thousands of fresh keys
/// (each valid for the longest time a receiver accepts) and floods a worker
/// with task requests. The forwarder's rate limit drops the excess unread,
/// the flooder, far past twice its rate, is banned (its connections closed,
/// none let back in), the task replay guard is not touched by adverts, and
/// an honest task still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_advert_and_task_flood_from_one_peer_is_cut_off_and_honest_work_runs() {
    let nodes = spawn_nodes(3, |_, c| {
        c.limits.adverts_per_sec = 20;
        c.limits.advert_burst = 100;
    })
    .await;
    let (client, worker, attacker) = (&nodes[0], &nodes[1], &nodes[2]);
    assert_eventually(WAIT, "the swarm forms", || client.peers().len() == 3).await;
    let before = client.shared.stats.lock().clone();
    let flood = 3000u32;
    // A well-formed advert (the attacker's own hardware), so each copy
    // passes validation and costs the receiver a signature check.
    let advert = attacker.shared.advert();
    for n in 0..flood {
        let (shard, bytes) = fresh_key_advert(&advert, n, 0xa5);
        if attacker.shared.net.publish(shard, bytes).await.is_err() {
            // Every peer has cut it off.
            break;
        }
    }
    // Task requests: far more than the worker's per-peer rate. Each is a
    // valid signed task that the worker refuses (it names an input its
    // parameters do not use), so none occupies a slot the honest task needs.
    let dir = tempdir("flood-model");
    let (model, _) = client.shared.store.import_file(&tiny_model(&dir)).unwrap();
    let mut pending = Vec::new();
    for _ in 0..300 {
        let mut t = infer_task(worker.public_key(), model);
        t.inputs.push(ContentId::of(b"unused"));
        let bytes = attacker.shared.seal(&Payload::Task(t), Duration::from_secs(60));
        let net = attacker.shared.net.clone();
        let peer = worker.peer_id();
        pending.push(tokio::spawn(
            async move { net.request(peer, TASK_PROTOCOL, bytes).await },
        ));
    }
    assert_eventually(WAIT, "the client and the worker ban the flooder", || {
        client.shared.stats.lock().peers_banned > 0 && worker.shared.stats.lock().peers_banned > 0
    })
    .await;
    let st = client.shared.stats.lock().clone();
    assert!(st.adverts_dropped > 0, "the excess was dropped unread: {st:?}");
    assert!(
        st.adverts_accepted - before.adverts_accepted < u64::from(flood) / 4,
        "most of the flood never got in: {st:?}"
    );
    let attacker_id = attacker.peer_id().to_string();
    for n in [client, worker] {
        let info = n.shared.net.info().await.unwrap();
        assert_eq!(info.banned, 1, "{info:?}");
        assert!(!info.connected.contains(&attacker_id), "still connected: {info:?}");
    }
    // None of its requests is answered any more, and it cannot come back.
    for p in pending {
        let _ = p.await;
    }
    let mut t = infer_task(worker.public_key(), model);
    t.inputs.push(ContentId::of(b"unused"));
    let bytes = attacker.shared.seal(&Payload::Task(t), Duration::from_secs(60));
    assert!(
        attacker
            .shared
            .net
            .request(worker.peer_id(), TASK_PROTOCOL, bytes)
            .await
            .is_err(),
        "a banned peer's request is not answered"
    );
    assert!(
        client.shared.peers.lock().get(&worker.public_key()).is_some(),
        "the honest worker is still known"
    );
    // An honest task from the client runs while the flood's entries live.
    let sub = submit(&client.shared.client, infer_task(worker.public_key(), model), 1 << 20)
        .await
        .unwrap();
    assert_eq!(sub.result.status, TaskStatus::Done, "{}", sub.result.error);
    for n in nodes {
        n.shutdown().await;
    }
}

/// A peer that keeps within twice its rate loses only what is past the
/// rate and stays connected: an honest forwarder whose traffic is bursty
/// is never banned. And what a node forwards stays under its neighbours'
/// limit however many peers flood it, because it accepts at most 4/5 of
/// that limit in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_within_twice_its_rate_is_throttled_not_banned() {
    let nodes = spawn_nodes(3, |_, c| {
        c.limits.adverts_per_sec = 20;
        c.limits.advert_burst = 60;
    })
    .await;
    let (client, relay, attacker) = (&nodes[0], &nodes[1], &nodes[2]);
    assert_eventually(WAIT, "the swarm forms", || client.peers().len() == 3).await;
    let advert = attacker.shared.advert();
    // 35 a second for 8 s: past the rate, within twice it.
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / 35));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0..280u32 {
        tick.tick().await;
        let (shard, bytes) = fresh_key_advert(&advert, n, 0x5a);
        attacker.shared.net.publish(shard, bytes).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for n in [client, relay] {
        let st = n.shared.stats.lock().clone();
        assert_eq!(st.peers_banned, 0, "{st:?}");
        assert!(
            st.adverts_dropped + st.adverts_over_accept_rate > 0,
            "throttled: {st:?}"
        );
    }
    // The relay accepted (and so forwarded) at most its share: 16/s after a
    // burst of 48, under the client's limit for it.
    let relayed = relay.shared.stats.lock().adverts_accepted;
    assert!(relayed <= 48 + 16 * 11, "the relay accepted {relayed}");
    let attacker_id = attacker.peer_id().to_string();
    assert!(
        client.shared.net.info().await.unwrap().connected.contains(&attacker_id),
        "the throttled peer is still connected"
    );
    for n in nodes {
        n.shutdown().await;
    }
}

/// Fresh keys cannot take every connection slot: inbound connections from
/// peers the node does not know hold at most 3/4 of `max_connections`, and
/// a known peer (here one the daemon trusts, as it does a peer whose
/// benchmark it verified) still gets in when they are full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_keys_cannot_take_the_connection_slots_kept_for_known_peers() {
    let hub = spawn_nodes(1, |_, c| c.max_connections = 8).await.remove(0);
    let addrs: Vec<String> = hub.dial_addrs().iter().map(|a| a.to_string()).collect();
    let mut fresh = Vec::new();
    for i in 0..8 {
        let mut c = node::config::Config::for_test(&tempdir(&format!("fresh{i}")));
        c.bootstrap = addrs.clone();
        fresh.push(node::daemon::start(c).await.unwrap());
    }
    let info = || async { hub.shared.net.info().await.unwrap() };
    assert_eventually_async(WAIT, "six fresh peers in", || async {
        info().await.unknown_inbound == 6
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let i = info().await;
    assert_eq!(
        (i.unknown_inbound, i.max_unknown_inbound),
        (6, 6),
        "no more than 3/4 of the 8 slots for unknown peers: {i:?}"
    );

    let known = node::daemon::start(node::config::Config::for_test(&tempdir("known")))
        .await
        .unwrap();
    hub.shared.net.trust(known.peer_id()).await;
    known.shared.net.dial(hub.dial_addrs()[0].clone()).await.unwrap();
    let known_id = known.peer_id().to_string();
    assert_eventually_async(WAIT, "the known peer gets a kept slot", || async {
        hub.shared.net.info().await.unwrap().connected.contains(&known_id)
    })
    .await;
    assert_eq!(
        info().await.unknown_inbound,
        6,
        "the known peer does not count as unknown"
    );
    for n in fresh.into_iter().chain([known, hub]) {
        n.shutdown().await;
    }
}

/// A worker that takes an inference task and never answers is replaced
/// within the client's task timeout by an honest one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalling_peer_is_replaced_within_the_task_timeout() {
    let mut nodes = spawn_nodes(2, |i, c| {
        if i == 0 {
            c.limits.task_timeout_secs = 8;
        } else {
            c.fault = Some(Fault::Stall);
            c.limits.shutdown_grace_secs = 0;
        }
    })
    .await;
    assert_eventually(WAIT, "the client knows the staller", || nodes[0].peers().len() == 2).await;
    let dir = tempdir("stall-model");
    let path = tiny_model(&dir);
    let (model, _) = nodes[0].shared.store.import_file(&path).unwrap();
    let staller = nodes[1].public_key();
    let shared = nodes[0].shared.clone();
    let sampling = Sampling::greedy();
    let asked =
        tokio::spawn(
            async move { node::infer::infer(&shared.client, model, vec![1, 5, 9], 6, sampling, &|_| {}).await },
        );
    assert_eventually(WAIT, "the staller holds the task", || {
        nodes[1].shared.worker.active_tasks.load(Ordering::SeqCst) == 1
    })
    .await;
    // An honest worker joins while the staller sits on the task.
    let mut c = node::config::Config::for_test(&tempdir("honest"));
    c.bootstrap = nodes[0].dial_addrs().iter().map(|a| a.to_string()).collect();
    nodes.push(node::daemon::start(c).await.unwrap());
    let t0 = std::time::Instant::now();
    let answer = asked.await.unwrap().unwrap();
    assert_eq!(answer.worker, nodes[2].public_key(), "the honest worker answered");
    assert_ne!(answer.worker, staller);
    assert!(t0.elapsed() < Duration::from_secs(40), "took {:?}", t0.elapsed());
    for n in nodes {
        n.shutdown().await;
    }
}

/// A task that runs past the worker's timeout stops computing (at its next
/// training step) instead of running on after its answer, and its slot is
/// free only then; a task naming inputs its parameters do not use is
/// refused before anything is fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_task_stops_computing_and_extra_inputs_are_refused() {
    let nodes = spawn_nodes(2, |i, c| {
        if i == 1 {
            c.limits.task_timeout_secs = 3;
            c.limits.max_tasks = 1;
        }
    })
    .await;
    assert_eventually(WAIT, "the swarm forms", || nodes[0].peers().len() == 2).await;
    let (client, worker) = (&nodes[0].shared, &nodes[1]);
    let dir = tempdir("timeout-model");
    // As many steps as the worker's work limit allows: far more than a second's.
    let full = shard_task(client, worker.public_key(), &tiny_model(&dir), 8, None);
    let (model, adapter, data) = match &full.params {
        TaskParams::LoraShard(p) => (p.model, p.adapter, p.data),
        TaskParams::Infer(_) => unreachable!(),
    };
    let task = |inputs: Vec<ContentId>| Task { inputs, ..full.clone() };
    let extra = client.store.put(b"a blob the task does not use").unwrap();
    let sub = submit(&client.client, task(vec![model, adapter, data, extra]), 1 << 30)
        .await
        .unwrap();
    assert_eq!(sub.result.status, TaskStatus::Refused);
    assert!(
        sub.result.error.contains("not exactly the blobs"),
        "{}",
        sub.result.error
    );
    assert!(!worker.shared.store.has(&extra), "the unused input was not fetched");

    // The training must have started (the check below means nothing
    // otherwise): watch for it while the task runs.
    let started = async {
        assert_eventually(WAIT, "the training started", || {
            worker.shared.worker.computing.load(Ordering::SeqCst) == 1
        })
        .await
    };
    let (sub, ()) = tokio::join!(
        submit(&client.client, task(vec![model, adapter, data]), 1 << 30),
        started
    );
    let sub = sub.unwrap();
    assert_eq!(sub.result.status, TaskStatus::Failed, "{}", sub.result.error);
    assert!(sub.result.error.contains("timed out"), "{}", sub.result.error);
    assert_eventually(Duration::from_secs(10), "the timed-out training stopped", || {
        worker.shared.worker.computing.load(Ordering::SeqCst) == 0
    })
    .await;
    assert_eq!(
        worker.shared.worker.active_tasks.load(Ordering::SeqCst),
        0,
        "its slot is free"
    );
    // The slot is free for the next task.
    let sub = submit(&client.client, infer_task(worker.public_key(), model), 1 << 20)
        .await
        .unwrap();
    assert_eq!(sub.result.status, TaskStatus::Done, "{}", sub.result.error);
    for n in nodes {
        n.shutdown().await;
    }
}

/// A shard whose sequences would make attention's `heads x t x t` weights
/// pass the worker's memory limit is refused before any step runs, with
/// the estimate in the reason; the same task with short sequences runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_needs_more_memory_than_the_worker_allows_is_refused() {
    let nodes = spawn_nodes(2, |i, c| {
        if i == 1 {
            c.limits.max_memory_mib = 6;
        }
    })
    .await;
    assert_eventually(WAIT, "the swarm forms", || nodes[0].peers().len() == 2).await;
    let client = &nodes[0].shared;
    let dir = tempdir("memory-model");
    let model_path = tiny_model(&dir);
    let size = std::fs::metadata(&model_path).unwrap().len();
    assert!(size < 3 << 20, "the tiny model fits the limit: {size}");
    let context = kernels::model::load(&model_path)
        .unwrap()
        .weights
        .config
        .max_position_embeddings;
    // Sequences of `pairs` key-value pairs (two tokens each, after BOS).
    let run = |pairs: usize| {
        let task = shard_task(client, nodes[1].public_key(), &model_path, pairs, Some(1));
        async move { submit(&client.client, task, 1 << 30).await.unwrap() }
    };
    let long = run(context / 2 - 8).await;
    assert_eq!(long.result.status, TaskStatus::Failed);
    assert!(
        long.result.error.contains("more than this node's memory limit"),
        "{}",
        long.result.error
    );
    let short = run(4).await;
    assert_eq!(short.result.status, TaskStatus::Done, "{}", short.result.error);
    for n in nodes {
        n.shutdown().await;
    }
}

/// A worker whose store is full collects what nothing needs (unpinned,
/// unused, not fresh) to take a task, keeps its pins, and refuses an input
/// that cannot fit before fetching any of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_collects_what_nothing_needs_and_refuses_what_cannot_fit() {
    let nodes = spawn_nodes(2, |i, c| {
        if i == 1 {
            c.limits.max_disk_mib = 4;
        }
    })
    .await;
    assert_eventually(WAIT, "the swarm forms", || nodes[0].peers().len() == 2).await;
    let (client, worker) = (&nodes[0].shared, &nodes[1].shared);
    let dir = tempdir("disk-model");
    let (model, size) = client.store.import_file(&tiny_model(&dir)).unwrap();
    assert!(size < 2 << 20, "{size}");
    // The worker holds an old unpinned blob that fills most of its limit,
    // and a pinned one.
    let junk = worker.store.put(&vec![7u8; (4 << 20) - size as usize / 2]).unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(worker.store.path(&junk))
        .unwrap()
        .set_modified(old)
        .unwrap();
    let kept = worker.store.put_pinned(b"a blob its owner pinned").unwrap();
    let sub = submit(&client.client, infer_task(nodes[1].public_key(), model), 1 << 20)
        .await
        .unwrap();
    assert_eq!(sub.result.status, TaskStatus::Done, "{}", sub.result.error);
    assert!(!worker.store.has(&junk), "the unused blob was collected");
    assert!(worker.store.has(&kept) && worker.store.has(&model));

    // A "model" larger than the whole store is refused from its outline.
    let huge = client.store.put(&vec![3u8; 5 << 20]).unwrap();
    let sub = submit(&client.client, infer_task(nodes[1].public_key(), huge), 1 << 20)
        .await
        .unwrap();
    assert_eq!(sub.result.status, TaskStatus::Failed);
    assert!(sub.result.error.contains("disk limit"), "{}", sub.result.error);
    assert!(!worker.store.has(&huge) && worker.store.has(&kept) && worker.store.has(&model));
    for n in nodes {
        n.shutdown().await;
    }
}
