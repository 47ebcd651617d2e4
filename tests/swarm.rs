//! Several daemons in one process on loopback: adverts, blob transfer,
//! tasks, and what hostile or failing peers do to them.

use std::time::Duration;

use node::daemon::now_ms;
use node::fetch;
use node::job::submit::submit;
use node::net::TASK_PROTOCOL;
use protocol::envelope::seal_bytes;
use protocol::train::LoraShardOutput;
use protocol::{
    Advert, ContentId, InferOutput, LoraShardParams, Payload, Task, TaskParams, TaskStatus, Validity, open, seal, wire,
};
use tern_tests::{
    assert_eventually, assert_eventually_async, infer_task, small_hyper, spawn_nodes, tempdir, tiny_model,
};

const WAIT: Duration = Duration::from_secs(60);

fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| ((i as u64 * 2_654_435_761) >> 7) as u8 ^ seed).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adverts_from_every_node_reach_every_other() {
    let nodes = spawn_nodes(4, |_, _| {}).await;
    let keys: Vec<_> = nodes.iter().map(|n| n.public_key()).collect();
    for n in &nodes {
        assert_eventually(WAIT, "every advert everywhere", || {
            let known: Vec<_> = n.peers().into_iter().map(|(k, _)| k).collect();
            keys.iter().all(|k| known.contains(k))
        })
        .await;
    }
    // What an advert says about its node.
    let (_, entry) = nodes[1].peers().into_iter().find(|(k, _)| *k == keys[2]).unwrap();
    assert_eq!(entry.advert.version, env!("CARGO_PKG_VERSION"));
    assert!(entry.advert.cpu.threads > 0);
    assert!(entry.advert.listen_addrs.iter().any(|a| a.contains("127.0.0.1")));
    for n in nodes {
        n.shutdown().await;
    }
}

/// A node that joins learns the adverts its neighbours hold at once, by
/// asking them (advert sync), not from a publication: the swarm's nodes
/// advertise only every 5 minutes here and gossip keeps no history to
/// replay, so without the sync it would wait minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_learns_the_swarm_from_its_neighbours_at_once() {
    let slow = |_: usize, c: &mut node::config::Config| {
        c.advert_interval_secs = 300;
        c.advert_ttl_secs = 600;
    };
    let mut nodes = spawn_nodes(2, slow).await;
    let (k0, k1) = (nodes[0].public_key(), nodes[1].public_key());
    assert_eventually(WAIT, "the first two know each other", || {
        nodes[0].peers().iter().any(|(k, _)| *k == k1) && nodes[1].peers().iter().any(|(k, _)| *k == k0)
    })
    .await;
    // Past gossip's memory of recent messages (3 heartbeats of 0.5 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut c = node::config::Config::for_test(&tempdir("joiner"));
    slow(2, &mut c);
    c.bootstrap = nodes[0].dial_addrs().iter().map(|a| a.to_string()).collect();
    nodes.push(node::daemon::start(c).await.unwrap());
    let k2 = nodes[2].public_key();
    assert_eventually(Duration::from_secs(15), "the joiner holds both adverts", || {
        let known: Vec<_> = nodes[2].peers().into_iter().map(|(k, _)| k).collect();
        known.contains(&k0) && known.contains(&k1)
    })
    .await;
    assert_eventually(Duration::from_secs(15), "both hold the joiner's", || {
        nodes[..2].iter().all(|n| n.peers().iter().any(|(k, _)| *k == k2))
    })
    .await;
    for n in nodes {
        n.shutdown().await;
    }
}

/// With an advert target below the swarm's size, each node follows only
/// some advert shards, holds the advert of every node in those (gossip and
/// sync reach it within a shard), and none of the others once they expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_follow_part_of_the_advert_shards_and_hold_those_whole() {
    use protocol::shards::{SHARDS, shard_of};
    let nodes = spawn_nodes(8, |_, c| c.advert_target = 2).await;
    let keys: Vec<_> = nodes.iter().map(|n| n.public_key()).collect();
    assert_eventually(WAIT, "every node narrows what it follows", || {
        nodes.iter().all(|n| n.shared.follow.lock().followed().len() < SHARDS)
    })
    .await;
    // Adverts of shards no longer followed expire (10 s here) and none come in.
    assert_eventually(WAIT, "each holds exactly the nodes of its shards", || {
        nodes.iter().all(|n| {
            let followed = n.shared.follow.lock().followed();
            let mut held: Vec<_> = n.peers().into_iter().map(|(k, _)| k).collect();
            let mut expected: Vec<_> = keys
                .iter()
                .copied()
                .filter(|k| followed.contains(shard_of(k)))
                .collect();
            held.sort();
            expected.sort();
            held == expected
        })
    })
    .await;
    // Its own shard is always among them.
    for n in &nodes {
        assert!(n.shared.follow.lock().followed().contains(n.shared.own_shard));
        assert_eq!(n.shared.own_shard, shard_of(&n.public_key()));
    }
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_added_on_one_node_is_fetched_and_verified_on_another() {
    let nodes = spawn_nodes(3, |_, _| {}).await;
    let dir = tempdir("blob-src");
    let data = bytes(5 * (1 << 20) + 123, 1);
    std::fs::write(dir.join("weights.bin"), &data).unwrap();
    std::fs::write(dir.join("config.json"), b"{\"a\": 1}").unwrap();
    let imported = nodes[0].shared.store.import(&dir).unwrap();
    nodes[0].shared.store.pin(&imported.id).unwrap();
    let file_id = ContentId::of(&data);
    nodes[0].publish_advert().await.ok();
    // Node 2 finds the provider from node 0's advert, with no hint.
    assert_eventually(WAIT, "node 0's advert lists the blob", || {
        nodes[2]
            .peers()
            .iter()
            .any(|(_, e)| e.advert.blobs.contains(&file_id) || e.advert.models.contains(&file_id))
    })
    .await;
    fetch::fetch(&nodes[2].shared.blobs, &file_id, &[]).await.unwrap();
    assert_eq!(nodes[2].shared.store.read(&file_id).unwrap(), data);
    // A directory manifest and its files, exported as the directory.
    fetch::fetch(&nodes[2].shared.blobs, &imported.id, &[nodes[0].peer_id()])
        .await
        .unwrap();
    let m = protocol::DirManifest::decode(&nodes[2].shared.store.read(&imported.id).unwrap()).unwrap();
    for e in m.entries() {
        fetch::fetch(&nodes[2].shared.blobs, &e.id, &[nodes[0].peer_id()])
            .await
            .unwrap();
    }
    let out = tempdir("blob-out");
    nodes[2].shared.store.export(&imported.id, &out.join("copy")).unwrap();
    assert_eq!(std::fs::read(out.join("copy/weights.bin")).unwrap(), data);
    // Nobody holds this one: a clear error, not a hang.
    let err = fetch::fetch(&nodes[1].shared.blobs, &ContentId::of(b"nobody"), &[])
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("no peer"), "{err:#}");
    for n in nodes {
        n.shutdown().await;
    }
}

/// An outline whose size lies within its last group merges to the id all
/// the same, so it was accepted and then every honest group looked wrong.
/// The last group's bytes prove the size: the lie is corrected and the blob
/// arrives, even from the liar alone (its bytes are right).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outline_that_lies_about_the_size_is_corrected_by_the_bytes() {
    let nodes = spawn_nodes(3, |_, _| {}).await;
    for len in [3 * (1 << 20) + 12_345, 1000] {
        let data = bytes(len, 9);
        let id = nodes[0].shared.store.put(&data).unwrap();
        assert_eq!(nodes[1].shared.store.put(&data).unwrap(), id);
        let lie = protocol::wire::Outline {
            size: len as u64 - 100,
            ..nodes[0].shared.store.outline(&id).unwrap().to_wire()
        };
        let outline_file = nodes[0].shared.store.path(&id).with_extension("outline");
        std::fs::write(&outline_file, prost::Message::encode_to_vec(&lie)).unwrap();
        assert_eq!(
            nodes[0].shared.store.outline(&id).unwrap().size(),
            len as u64 - 100,
            "the liar serves the lie"
        );
        let err = fetch::fetch(&nodes[2].shared.blobs, &id, &[nodes[0].peer_id()])
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("last group proves"), "{err:#}");
        let both = [nodes[0].peer_id(), nodes[1].peer_id()];
        fetch::fetch(&nodes[2].shared.blobs, &id, &both).await.unwrap();
        assert_eq!(nodes[2].shared.store.read(&id).unwrap(), data);
        assert_eq!(nodes[2].shared.store.outline(&id).unwrap().size(), len as u64);
    }
    for n in nodes {
        n.shutdown().await;
    }
}

/// Fetches of one id on one node are single-flight: they would otherwise
/// share one partial file, and all but the first failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fetches_of_one_blob_all_succeed() {
    let nodes = spawn_nodes(2, |_, _| {}).await;
    let data = bytes(9 * (1 << 20) + 7, 5);
    let id = nodes[0].shared.store.put(&data).unwrap();
    let hint = [nodes[0].peer_id()];
    let s = &nodes[1].shared;
    let (a, b, c) = tokio::join!(
        fetch::fetch(&s.blobs, &id, &hint),
        fetch::fetch(&s.blobs, &id, &hint),
        fetch::fetch(&s.blobs, &id, &hint)
    );
    for r in [a, b, c] {
        r.unwrap();
    }
    assert_eq!(s.store.read(&id).unwrap(), data);
    assert_eq!(s.blobs.fetches_in_progress(), 0, "no single-flight lock is left held");
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_provider_is_dropped_and_a_peer_that_leaves_mid_transfer_is_replaced() {
    let nodes = spawn_nodes(3, |_, _| {}).await;
    let data = bytes(24 * (1 << 20), 2);
    let id = nodes[0].shared.store.put(&data).unwrap();
    assert_eq!(nodes[1].shared.store.put(&data).unwrap(), id);
    // Node 0 now serves corrupt bytes (same length, its outline still right).
    let path = nodes[0].shared.store.path(&id);
    let mut bad = data.clone();
    for b in bad.iter_mut().step_by(4096) {
        *b ^= 0x55;
    }
    std::fs::write(&path, &bad).unwrap();
    let (a, b) = (nodes[0].peer_id(), nodes[1].peer_id());
    // Only the liar: refused, nothing stored under the id.
    let err = fetch::fetch(&nodes[2].shared.blobs, &id, &[a]).await.unwrap_err();
    assert!(format!("{err:#}").contains("groups missing"), "{err:#}");
    assert!(!nodes[2].shared.store.has(&id));
    // The liar and an honest peer: the liar is dropped, the blob arrives intact.
    fetch::fetch(&nodes[2].shared.blobs, &id, &[a, b]).await.unwrap();
    assert_eq!(nodes[2].shared.store.read(&id).unwrap(), data);

    // A provider that leaves mid-transfer: the others finish the job.
    let mut nodes = nodes;
    let late = spawn_nodes(1, |_, c| {
        c.bootstrap = nodes[1].dial_addrs().iter().map(|a| a.to_string()).collect()
    })
    .await;
    let big = bytes(96 * (1 << 20), 3);
    let big_id = nodes[1].shared.store.put(&big).unwrap();
    nodes[2].shared.store.put(&big).unwrap();
    let leaver = nodes.remove(1);
    let (leaver_id, stayer_id) = (leaver.peer_id(), nodes[1].peer_id());
    let fetcher = late[0].shared.clone();
    let f = tokio::spawn(async move { fetch::fetch(&fetcher.blobs, &big_id, &[leaver_id, stayer_id]).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    leaver.shutdown().await;
    f.await.unwrap().unwrap();
    assert_eq!(late[0].shared.store.read(&big_id).unwrap(), big);
    for n in nodes.into_iter().chain(late) {
        n.shutdown().await;
    }
}

/// A provider that takes group requests and never answers them, as one with
/// a hung disk or a frozen process does (its requests time out only after a
/// minute): a swarm speaking tern's protocols with no daemon behind it,
/// which answers outline requests truthfully and holds every group request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_stops_answering_does_not_hold_the_fetch_back() {
    use node::net::{BLOB_PROTOCOL, Inbound};
    use prost::Message as _;

    let nodes = spawn_nodes(2, |_, _| {}).await;
    let data = bytes(32 << 20, 5);
    let id = nodes[0].shared.store.put(&data).unwrap();
    let outline = nodes[0].shared.store.outline(&id).unwrap();
    let (honest, fetcher) = (&nodes[0], &nodes[1]);

    let mut config = node::config::Config::for_test(&tempdir("staller"));
    config.bootstrap = fetcher.dial_addrs().iter().map(|a| a.to_string()).collect();
    let key = node::identity::load_or_create(&config.data_dir).unwrap();
    let (net, mut inbound, event_loop) =
        node::net::start(&config, node::identity::libp2p_keypair(&key).unwrap()).unwrap();
    tokio::spawn(event_loop.run());
    let staller = net.info().await.map(|i| i.peer_id);
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(event) = inbound.recv().await {
            if let Inbound::BlobRequest { request, channel, .. } = event {
                let request = wire::BlobRequest::decode(request.as_slice()).unwrap();
                if let Some(wire::blob_request::What::Outline(_)) = request.what {
                    let answer = wire::BlobResponse {
                        result: Some(wire::blob_response::Result::Outline(outline.to_wire())),
                    };
                    net.respond(BLOB_PROTOCOL, channel, answer.encode_to_vec()).await;
                } else {
                    held.push(channel);
                }
            }
        }
    });
    let staller_id = staller.unwrap();
    assert_eventually_async(WAIT, "the fetcher connects to the staller", || async {
        fetcher.shared.net.info().await.unwrap().connected.contains(&staller_id)
    })
    .await;
    let staller = staller_id.parse().unwrap();

    // The staller is asked first, so it holds a full window of groups.
    let t0 = std::time::Instant::now();
    fetch::fetch(&fetcher.shared.blobs, &id, &[staller, honest.peer_id()])
        .await
        .unwrap();
    let took = t0.elapsed();
    assert_eq!(fetcher.shared.store.read(&id).unwrap(), data);
    assert!(
        took < Duration::from_secs(30),
        "the fetch waited {took:?}, as if for the staller's requests to time out (60 s)"
    );
    held.abort();
    for n in nodes {
        n.shutdown().await;
    }
}

/// A worker with no address anyone can dial, as behind a NAT, reserves a
/// slot on a relay and advertises its circuit address: a client that knows
/// it only from gossip reaches it through the relay and gets its task done
/// (the worker fetches the model by dialling out, as a NATed node can).
/// When the relay restarts, the worker reserves its slot again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_behind_a_relay_is_reached_through_it() {
    let relay_dir = tempdir("relay");
    let relay_config = |listen: &str| {
        let mut c = node::config::Config::for_test(&relay_dir);
        c.relay_server = true;
        c.listen = vec![listen.to_string()];
        c
    };
    let relay = node::daemon::start(relay_config("/ip4/127.0.0.1/udp/0/quic-v1"))
        .await
        .unwrap();
    let relay_listen = relay.shared.listen_addrs.lock()[0].clone();
    let relay_addr = relay.dial_addrs()[0].to_string();
    let workers = spawn_nodes(1, |_, c| {
        c.listen = Vec::new();
        c.relays = vec![relay_addr.clone()];
        c.bootstrap = vec![relay_addr.clone()];
    })
    .await;
    let clients = spawn_nodes(1, |_, c| c.bootstrap = vec![relay_addr.clone()]).await;
    let (worker, client) = (&workers[0], &clients[0]);

    // The worker's only address is its circuit through the relay, and that
    // is what its advert tells the client.
    assert_eventually(WAIT, "the worker's relay reservation", || {
        !worker.shared.listen_addrs.lock().is_empty()
    })
    .await;
    let addrs = worker.shared.listen_addrs.lock().clone();
    assert!(
        addrs.iter().all(|a| a.contains("/p2p-circuit")),
        "the worker listens directly: {addrs:?}"
    );
    worker.publish_advert().await.ok();
    assert_eventually(WAIT, "the worker's advert at the client", || {
        client
            .peers()
            .iter()
            .any(|(k, e)| *k == worker.public_key() && e.advert.listen_addrs.iter().any(|a| a.contains("/p2p-circuit")))
    })
    .await;

    let dir = tempdir("relayed-task");
    let (model, _) = client.shared.store.import_file(&tiny_model(&dir)).unwrap();
    let sub = submit(&client.shared.client, infer_task(worker.public_key(), model), 1 << 30)
        .await
        .unwrap();
    assert_eq!(sub.result.status, TaskStatus::Done, "{}", sub.result.error);
    assert_eq!(open(&sub.envelope).unwrap().signer, worker.public_key());
    // The client reached the worker through the relay; the worker, which
    // can dial out, fetched the model (more than half a circuit) over a
    // connection of its own to the client, which replaced the circuit.
    let info = client.shared.net.info().await.unwrap();
    let worker_peer = worker.peer_id().to_string();
    let to_worker: Vec<_> = info.connections.iter().filter(|c| c.peer == worker_peer).collect();
    assert!(
        !to_worker.is_empty() && to_worker.iter().all(|c| !c.relayed),
        "the client's connections to the worker: {to_worker:?}"
    );

    // The relay goes away and comes back (same key, same address).
    let circuits = || async {
        let info = worker.shared.net.info().await.unwrap();
        info.listen_addrs.iter().filter(|a| a.contains("/p2p-circuit")).count()
    };
    relay.shutdown().await;
    assert_eventually_async(
        WAIT,
        "the worker drops its circuit through the stopped relay",
        || async { circuits().await == 0 },
    )
    .await;
    // quinn lets go of the old socket once its endpoint driver ends.
    let t0 = std::time::Instant::now();
    let relay = loop {
        match node::daemon::start(relay_config(&relay_listen)).await {
            Ok(r) => break r,
            Err(e) if t0.elapsed() < WAIT => {
                eprintln!("restarting the relay: {e:#}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the relay does not restart: {e:#}"),
        }
    };
    assert_eventually_async(WAIT, "the worker reserves a slot on the restarted relay", || async {
        circuits().await > 0
    })
    .await;
    for n in [vec![relay], workers, clients].into_iter().flatten() {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_sent_from_one_node_runs_on_another_and_its_signed_result_verifies() {
    let nodes = spawn_nodes(2, |_, _| {}).await;
    let dir = tempdir("task");
    let model_path = tiny_model(&dir);
    let (model, _) = nodes[0].shared.store.import_file(&model_path).unwrap();
    let task = infer_task(nodes[1].public_key(), model);
    let sub = submit(&nodes[0].shared.client, task.clone(), 1 << 30).await.unwrap();
    assert_eq!(sub.result.status, TaskStatus::Done, "{}", sub.result.error);
    // The evidence stands alone: signed by the worker, naming the task.
    let evidence = open(&sub.envelope).unwrap();
    assert_eq!(evidence.signer, nodes[1].public_key());
    // The worker fetched the model from the submitter and computed exactly
    // what a local run computes.
    assert!(nodes[1].shared.store.has(&model));
    let out = InferOutput::decode(&nodes[0].shared.store.read(&sub.result.output.unwrap()).unwrap()).unwrap();
    let loaded = kernels::model::load(&model_path).unwrap();
    let m = kernels::model::Model::new(&loaded.weights, kernels::Backend::cpu().unwrap()).unwrap();
    let mut sampler = kernels::model::Sampler::new(kernels::model::SamplingParams {
        temperature: 0.8,
        top_k: 20,
        top_p: 0.95,
        repetition_penalty: 1.0,
        seed: 5,
    })
    .unwrap();
    let (local, _) = m.generate(&[1, 17, 42, 99], 12, &mut sampler, &[], |_| true).unwrap();
    assert_eq!(out.tokens, local);
    assert_eq!(sub.result.work, 4 + 12);

    // One envelope sent twice at once (a submitter whose connection broke
    // sends it again) runs once: both sends get the same signed answer.
    let done = nodes[1].shared.stats.lock().tasks_done;
    let envelope = nodes[0].shared.seal(&Payload::Task(task), Duration::from_secs(60));
    let send = || {
        nodes[0]
            .shared
            .net
            .request(nodes[1].peer_id(), TASK_PROTOCOL, envelope.clone())
    };
    let (a, b) = tokio::join!(send(), send());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a, b, "one computation's answer");
    let Payload::TaskResult(r) = open(&a).unwrap().payload else {
        panic!()
    };
    assert_eq!(r.status, TaskStatus::Done, "{}", r.error);
    assert_eq!(nodes[1].shared.stats.lock().tasks_done, done + 1, "run once");
    for n in nodes {
        n.shutdown().await;
    }
}

/// A LoRA-shard task's inputs in `client`'s store: the model at
/// `model_path`, a fresh adapter and a synthetic data shard.
fn shard_inputs(
    client: &node::daemon::Shared,
    model_path: &std::path::Path,
) -> (
    LoraShardParams,
    protocol::train::AdapterParams,
    protocol::train::Sequences,
) {
    let (model, _) = client.store.import_file(model_path).unwrap();
    let config = kernels::model::load(model_path).unwrap().weights.config;
    let hyper = small_hyper();
    let start = node::shard::initial_adapter(&config, &hyper, 1).unwrap();
    let adapter = client.store.put(&start.encode()).unwrap();
    let (seqs, _) = kernels::train::data::synthetic_mapping(config.vocab_size, 1, 16, 8, 3);
    let shard = node::shard::shard_of(&seqs);
    let data = client.store.put(&shard.encode()).unwrap();
    let params = LoraShardParams {
        model,
        adapter,
        data,
        local_steps: 3,
        seed: 9,
        hyper,
        optimizer: None,
    };
    (params, start, shard)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lora_shard_runs_on_another_node_and_returns_the_delta_a_local_run_computes() {
    let nodes = spawn_nodes(2, |_, _| {}).await;
    let dir = tempdir("shard");
    let model_path = tiny_model(&dir);
    let client = &nodes[0].shared;
    let (params, start, shard) = shard_inputs(client, &model_path);
    let (model, adapter, data) = (params.model, params.adapter, params.data);
    let loaded = kernels::model::load(&model_path).unwrap();
    let task = |adapter| Task {
        worker: nodes[1].public_key(),
        inputs: vec![model, adapter, data],
        max_work: 1 << 20,
        params: TaskParams::LoraShard(LoraShardParams {
            adapter,
            ..params.clone()
        }),
    };
    let sub = submit(&client.client, task(adapter), 1 << 30).await.unwrap();
    assert_eq!(sub.result.status, TaskStatus::Done, "{}", sub.result.error);
    let remote = LoraShardOutput::decode(&client.store.read(&sub.result.output.unwrap()).unwrap()).unwrap();
    let m = kernels::model::Model::new(&loaded.weights, kernels::Backend::cpu().unwrap()).unwrap();
    let (local, work) = node::shard::run(&m, &params, &start, None, &shard, 1 << 20, &|| false).unwrap();
    assert_eq!(remote, local, "the worker's delta is bit-identical to a local run");
    assert_eq!(sub.result.work, work);
    assert_eq!(remote.steps, 3);
    assert!(remote.delta.iter().any(|d| *d != 0.0), "the steps changed the adapter");

    // An adapter blob that is not one fails with a reason, not a panic.
    let junk = client.store.put(b"not an adapter").unwrap();
    let sub = submit(&client.client, task(junk), 1 << 30).await.unwrap();
    assert_eq!(sub.result.status, TaskStatus::Failed);
    assert!(sub.result.error.contains("adapter blob"), "{}", sub.result.error);
    for n in nodes {
        n.shutdown().await;
    }
}

/// Products are exact and everything around them runs in one fixed order,
/// so a worker that runs its tasks on a GPU answers with the very blobs a
/// CPU worker answers with, and a client compares the two by id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_worker_returns_the_same_bytes_as_a_cpu_worker() {
    if !tern_tests::have_gpu("a_gpu_worker_returns_the_same_bytes_as_a_cpu_worker") {
        return;
    }
    let nodes = spawn_nodes(3, |i, c| {
        if i == 1 {
            c.compute = node::config::Compute::Wgpu;
            c.bench = true;
        }
    })
    .await;
    let (client, gpu, cpu) = (&nodes[0], &nodes[1], &nodes[2]);
    assert!(matches!(gpu.shared.backend, kernels::Backend::Wgpu(_)));
    assert!(matches!(cpu.shared.backend, kernels::Backend::Cpu(_)));
    // The adverts say where each worker runs its tasks.
    assert_eventually(WAIT, "both workers' adverts", || client.peers().len() == 3).await;
    let advert = |k| client.peers().into_iter().find(|(p, _)| *p == k).unwrap().1.advert;
    assert!(advert(gpu.public_key()).gpus.iter().any(|g| g.runs_tasks));
    assert!(!advert(cpu.public_key()).gpus.iter().any(|g| g.runs_tasks));
    // Its benchmark ran on the GPU, and the client, recomputing the hash on
    // its CPU, finds it right.
    assert_eventually(WAIT, "the GPU worker's verified score", || {
        client
            .peers()
            .iter()
            .any(|(k, e)| *k == gpu.public_key() && e.advert.score.is_some() && e.score_verified)
    })
    .await;

    let dir = tempdir("gpu-task");
    let model_path = tiny_model(&dir);
    let (params, _, _) = shard_inputs(&client.shared, &model_path);
    let outputs = |make: &dyn Fn(protocol::PublicKey) -> Task| {
        let (a, b) = (make(gpu.public_key()), make(cpu.public_key()));
        async move {
            let mut ids = Vec::new();
            for task in [a, b] {
                let sub = submit(&client.shared.client, task, 1 << 30).await.unwrap();
                assert_eq!(sub.result.status, TaskStatus::Done, "{}", sub.result.error);
                ids.push(sub.result.output.unwrap());
            }
            ids
        }
    };
    let infer = outputs(&|w| infer_task(w, params.model)).await;
    assert_eq!(infer[0], infer[1], "inference on the GPU and on the CPU");
    let shard = outputs(&|worker| Task {
        worker,
        inputs: vec![params.model, params.adapter, params.data],
        max_work: 1 << 20,
        params: TaskParams::LoraShard(params.clone()),
    })
    .await;
    assert_eq!(shard[0], shard[1], "a LoRA shard on the GPU and on the CPU");
    let out = LoraShardOutput::decode(&client.shared.store.read(&shard[0]).unwrap()).unwrap();
    assert!(out.delta.iter().any(|d| *d != 0.0), "the steps changed the adapter");
    // And the GPU worker really ran them on its GPU, with no CPU fallback.
    let cached = gpu.shared.models.cached().expect("the worker's model");
    assert!(matches!(cached.1.backend(), kernels::Backend::Wgpu(_)));
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replayed_expired_oversized_and_malformed_messages_are_refused() {
    let client_key = std::sync::Mutex::new(None);
    let nodes = spawn_nodes(3, |i, c| {
        if i == 0 {
            *client_key.lock().unwrap() = Some(node::identity::load_or_create(&c.data_dir).unwrap().public());
        }
        if i == 1 {
            // The worker takes tasks only from node 0.
            c.policy.open = false;
            c.policy.allow = vec![client_key.lock().unwrap().unwrap().to_string()];
        }
    })
    .await;
    let (client, worker, third) = (&nodes[0], &nodes[1], &nodes[2]);
    assert_eventually(WAIT, "the swarm forms", || client.peers().len() == 3).await;
    // Rejected gossip is not forwarded: count at node 0, which the
    // sender bootstrapped from and so is connected to.
    let refused_before = client.shared.stats.lock().adverts_refused;
    let stale_before = client.shared.stats.lock().adverts_stale;

    // Gossip: forged, replayed, expired, oversized and malformed adverts.
    let mut forged = wire::Envelope::default();
    let good = seal(
        &third.shared.key,
        &Payload::Advert(Advert::default()),
        Validity::new(1, now_ms(), 60_000),
    );
    {
        use prost::Message as _;
        let mut env = wire::Envelope::decode(good.as_slice()).unwrap();
        env.signer = client.public_key().as_bytes().to_vec();
        forged.body = env.body;
        forged.signer = env.signer;
        forged.signature = env.signature;
    }
    let forged = prost::Message::encode_to_vec(&forged);
    let expired = seal(
        &third.shared.key,
        &Payload::Advert(Advert::default()),
        Validity::new(2, now_ms() - 120_000, 60_000),
    );
    let oversized = vec![7u8; protocol::limits::MAX_ENVELOPE_BYTES + 100];
    let replay = third
        .shared
        .seal(&Payload::Advert(third.shared.advert()), Duration::from_secs(60));
    let own = third.shared.own_shard;
    third.shared.net.publish(own, replay.clone()).await.unwrap();
    // The same bytes again are one gossip message (its id is their hash):
    // gossipsub itself drops them while it remembers the id.
    assert!(
        third.shared.net.publish(own, replay).await.is_err(),
        "a duplicate is not sent"
    );
    // An older advert of the same signer, sealed anew (other bytes), is a
    // replay the peer table refuses: it holds a newer one.
    let older = seal(
        &third.shared.key,
        &Payload::Advert(third.shared.advert()),
        Validity::new(3, now_ms() - 5_000, 60_000),
    );
    for bad in [forged, expired, oversized, b"\x0a\x03abc".to_vec(), older] {
        third.shared.net.publish(own, bad).await.unwrap();
    }
    // A fresh, valid advert on another shard's topic: an honest node
    // publishes only on its own shard, and forwards nothing else.
    let elsewhere = third
        .shared
        .seal(&Payload::Advert(third.shared.advert()), Duration::from_secs(60));
    third
        .shared
        .net
        .publish((own + 1) % protocol::shards::SHARDS, elsewhere)
        .await
        .unwrap();
    // The older one is refused as stale by the peer table, which holds the
    // signer's newer advert; the other five fail validation.
    assert_eventually(WAIT, "five bad adverts refused and the replay found stale", || {
        let st = client.shared.stats.lock();
        st.adverts_refused >= refused_before + 5 && st.adverts_stale > stale_before
    })
    .await;

    // Tasks: each bad envelope gets a signed refusal, with its reason.
    let model = ContentId::of(b"some model");
    let ask = |bytes: Vec<u8>| async move {
        let answer = client
            .shared
            .net
            .request(worker.peer_id(), TASK_PROTOCOL, bytes)
            .await
            .unwrap();
        let o = open(&answer).unwrap();
        assert_eq!(o.signer, worker.public_key());
        match o.payload {
            Payload::TaskResult(r) => r,
            other => panic!("not a result: {other:?}"),
        }
    };
    let v = || Validity::new(node::daemon::random_u64(), now_ms(), 60_000);
    let task = Payload::Task(infer_task(worker.public_key(), model));
    let valid = seal(&client.shared.key, &task, v());
    let mut tampered = valid.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let cases = [
        ("tampered", tampered, "signature"),
        (
            "expired",
            seal(&client.shared.key, &task, Validity::new(9, now_ms() - 100_000, 50_000)),
            "expired",
        ),
        (
            "other worker",
            seal(
                &client.shared.key,
                &Payload::Task(infer_task(third.public_key(), model)),
                v(),
            ),
            "another worker",
        ),
        ("garbage", b"not an envelope".to_vec(), "refused envelope"),
        (
            "unknown kind",
            seal_bytes(&client.shared.key, 99, vec![1, 2, 3], v()),
            "unknown payload kind",
        ),
    ];
    for (name, bytes, why) in cases {
        let r = ask(bytes).await;
        assert_eq!(r.status, TaskStatus::Refused, "{name}");
        assert!(r.error.contains(why), "{name}: {}", r.error);
    }
    // A task from a key that is not on the allowlist.
    let stranger = third.shared.seal(
        &Payload::Task(infer_task(worker.public_key(), model)),
        Duration::from_secs(60),
    );
    let answer = third
        .shared
        .net
        .request(worker.peer_id(), TASK_PROTOCOL, stranger)
        .await
        .unwrap();
    let Payload::TaskResult(r) = open(&answer).unwrap().payload else {
        panic!()
    };
    assert!(r.error.contains("allowlist"), "{}", r.error);

    // The first send of a valid task runs (and fails: nobody holds the
    // model); the same envelope sent again by its signer (as after a broken
    // connection) is answered by that run: the same signed bytes, not a
    // second run nor a replay refusal.
    let send = |bytes: Vec<u8>| client.shared.net.request(worker.peer_id(), TASK_PROTOCOL, bytes);
    let first_bytes = send(valid.clone()).await.unwrap();
    let Payload::TaskResult(first) = open(&first_bytes).unwrap().payload else {
        panic!()
    };
    assert_eq!(first.status, TaskStatus::Failed, "{}", first.error);
    assert!(
        first.error.contains("no peer") || first.error.contains("not held"),
        "{}",
        first.error
    );
    let runs = worker.shared.stats.lock().tasks_failed;
    assert_eq!(send(valid).await.unwrap(), first_bytes, "answered by the first run");
    assert_eq!(worker.shared.stats.lock().tasks_failed, runs, "not run again");

    // Through all of it the worker kept serving everyone.
    let data = bytes(3 << 20, 9);
    let id = worker.shared.store.put(&data).unwrap();
    fetch::fetch(&third.shared.blobs, &id, &[worker.peer_id()])
        .await
        .unwrap();
    assert_eq!(third.shared.store.read(&id).unwrap(), data);
    for n in nodes {
        n.shutdown().await;
    }
}

/// One process per data directory: a second node on a directory in use is
/// refused with the holder's pid, and starts once the first has stopped.
/// Two daemons with their own directories both start on the default
/// control port: the second takes a free one (the CLI reads it from
/// `control.addr`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_runs_one_node_and_a_taken_control_port_is_not_fatal() {
    use node::config::Config;
    use node::daemon;
    let dir = tempdir("locked");
    let first = daemon::start(Config::for_test(&dir)).await.unwrap();
    let err = format!("{:#}", daemon::start(Config::for_test(&dir)).await.unwrap_err());
    assert!(err.contains("in use by another tern process"), "{err}");
    assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
    first.shutdown().await;
    let again = daemon::start(Config::for_test(&dir))
        .await
        .expect("free after shutdown");
    again.shutdown().await;

    let default_control = Config::default().control;
    let mut daemons = Vec::new();
    for name in ["control-a", "control-b"] {
        let mut c = Config::for_test(&tempdir(name));
        c.control = default_control;
        daemons.push(
            daemon::start(c)
                .await
                .expect("starts on the default control port or a free one"),
        );
    }
    assert_ne!(daemons[0].control_addr, daemons[1].control_addr);
    for d in &daemons {
        let written = std::fs::read_to_string(d.shared.config.data_dir.join("control.addr")).unwrap();
        assert_eq!(written.trim(), d.control_addr.to_string());
        let dir = d.shared.config.data_dir.clone();
        let status = tokio::task::spawn_blocking(move || {
            node::control::ControlClient::new(&dir)
                .unwrap()
                .get("/v1/status")
                .unwrap()
        })
        .await
        .unwrap();
        assert_eq!(status["peer_id"], d.peer_id().to_string());
    }
    for d in daemons {
        d.shutdown().await;
    }
}

/// The connection budget: twelve nodes that all bootstrap from the first
/// (which so starts connected to every other) come down to about their
/// target of 4 peers (at most 6, the high-water mark), every advert still
/// reaches every node, and a node that joins afterwards is heard by all
/// over the trimmed graph.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_keeps_about_its_connection_budget_and_still_hears_every_advert() {
    let n = 12;
    let budget = |_: usize, c: &mut node::config::Config| {
        c.target_connections = 4;
        c.connection_idle_secs = 2;
    };
    let mut nodes = spawn_nodes(n, budget).await;
    assert_eventually(Duration::from_secs(60), "every node holds every advert", || {
        nodes.iter().all(|x| x.peers().len() >= n)
    })
    .await;
    let high = node::net::budget::high_water(4);
    assert_eventually_async(Duration::from_secs(60), "every node within its budget", || async {
        for x in &nodes {
            if x.shared.net.info().await.unwrap().connected.len() > high {
                return false;
            }
        }
        true
    })
    .await;
    let mut trimmed = 0;
    for x in &nodes {
        trimmed += x.shared.net.info().await.unwrap().trimmed;
    }
    assert!(trimmed > 0, "the first node started with {} peers", n - 1);

    let mut c = node::config::Config::for_test(&tempdir("budget-joiner"));
    budget(n, &mut c);
    c.bootstrap = nodes[n / 2].dial_addrs().iter().map(|a| a.to_string()).collect();
    nodes.push(node::daemon::start(c).await.unwrap());
    let joiner = nodes[n].public_key();
    assert_eventually(Duration::from_secs(60), "every node holds the joiner's advert", || {
        nodes.iter().all(|x| x.peers().iter().any(|(k, _)| *k == joiner))
    })
    .await;
    for x in nodes {
        x.shutdown().await;
    }
}
