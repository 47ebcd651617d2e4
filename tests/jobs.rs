//! Distributed fine-tuning jobs and verified inference on swarms of
//! daemons in one process: determinism, dishonest and dying workers, a
//! client that restarts, and bad input.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use node::config::Fault;
use node::daemon;
use node::job::{self, Event, Job, JobState, Verify};
use protocol::{ContentId, PublicKey, Sampling};
use tern_tests::{adapter_of, assert_eventually, reference, setup, spawn_nodes, tempdir, tiny_model, wait_for_swarm};

const WAIT: Duration = Duration::from_secs(60);

fn quiet(e: &Event) {
    if let Event::Failed { why, .. } | Event::Caught { why, .. } = e {
        eprintln!("{e:?}: {why}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_reproducible_bit_for_bit_and_resumes_after_a_client_restart() {
    let nodes = spawn_nodes(3, |_, _| {}).await;
    wait_for_swarm(&nodes[0], 3).await;
    let s = setup(&nodes[0], Verify::None);
    let state = job::run(&nodes[0].shared.client, s.spec.clone(), &quiet).await.unwrap();
    assert!(state.finished);
    assert_eq!(state.rounds.len(), 2);
    let expected = reference(&s, &nodes[0]);
    assert_eq!(
        adapter_of(&nodes[0], &state),
        expected[1],
        "the swarm's adapter is the local replay's"
    );
    assert_eq!(state.rounds[0].adapter, expected[0].id());
    // AdamW's state went from round to round: the last one has taken every
    // round's local steps.
    let opt = state.optimizer.expect("the job carries its optimizer state");
    let opt = protocol::train::OptimizerState::decode(&nodes[0].shared.store.read(&opt).unwrap()).unwrap();
    assert_eq!(opt.step, u64::from(s.spec.rounds * s.spec.local_steps));
    assert!(opt.v.iter().any(|v| *v > 0.0));
    // Both workers took part, and training lowered the held-out loss.
    assert_eq!(state.workers.values().filter(|w| w.accepted > 0).count(), 2);
    let (start, end) = (state.eval_loss_start.unwrap(), state.rounds[1].eval_loss.unwrap());
    assert!(end < start, "held-out loss {start} -> {end}");
    // The saved state is what the run returned.
    assert_eq!(
        JobState::load(&nodes[0].shared.config.data_dir, &state.id).unwrap(),
        state
    );

    // The same job on a second client, stopped mid-job and restarted from
    // its data directory: it resumes without redoing accepted work and
    // ends with the same bytes.
    let dir = tempdir("job-client");
    let config = || {
        let mut c = node::config::Config::for_test(&dir);
        c.bootstrap = nodes[1].dial_addrs().iter().map(|a| a.to_string()).collect();
        c
    };
    let client = daemon::start(config()).await.unwrap();
    wait_for_swarm(&client, 4).await;
    // The client crashes right after its third accepted result is saved.
    let spec = s.spec.clone();
    let shared = client.shared.clone();
    let crashed = tokio::spawn(async move {
        let accepted = Mutex::new(0);
        let on = move |e: &Event| {
            if let Event::Accepted { .. } = e {
                let mut n = accepted.lock().unwrap();
                *n += 1;
                assert!(*n < 3, "simulated crash");
            }
        };
        job::run(&shared.client, spec, &on).await
    });
    assert!(crashed.await.unwrap_err().is_panic());
    client.shutdown().await;
    let saved = JobState::load(&dir, &state.id).unwrap();
    assert_eq!((saved.round, saved.accepted.len()), (1, 1), "progress was saved");
    let kept = 3;

    let client = daemon::start(config()).await.unwrap();
    wait_for_swarm(&client, 4).await;
    let resumed = Arc::new(Mutex::new(None));
    let r2 = resumed.clone();
    let on = move |e: &Event| {
        if let Event::Started { round, accepted, .. } = e {
            *r2.lock().unwrap() = Some((*round, *accepted));
        }
    };
    let again = job::run(&client.shared.client, s.spec.clone(), &on).await.unwrap();
    let (round, kept_now) = resumed.lock().unwrap().unwrap();
    assert_eq!(
        round as usize * 2 + kept_now,
        kept,
        "the restart resumed where the state file was"
    );
    assert_eq!(again.result(), state.result(), "same job, same adapter bytes");
    assert_eq!(again.rounds.len(), 2);
    client.shutdown().await;
    for n in nodes {
        n.shutdown().await;
    }
}

/// A swarm of mixed hardware: with redundancy 2 every shard runs on a GPU
/// worker and on a CPU worker, and their results must agree to the bit for
/// the job to go on without a dispute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_and_cpu_workers_agree_on_every_shard() {
    if !tern_tests::have_gpu("gpu_and_cpu_workers_agree_on_every_shard") {
        return;
    }
    let nodes = spawn_nodes(3, |i, c| {
        if i == 1 {
            c.compute = node::config::Compute::Wgpu;
        }
    })
    .await;
    wait_for_swarm(&nodes[0], 3).await;
    let s = setup(&nodes[0], Verify::Redundancy { k: 2 });
    let state = job::run(&nodes[0].shared.client, s.spec.clone(), &quiet).await.unwrap();
    assert!(state.finished);
    assert!(state.verdicts.is_empty(), "a dispute: {:?}", state.verdicts);
    assert!(state.excluded().is_empty());
    let shards = s.spec.shards.len() as u64 * u64::from(s.spec.rounds);
    for n in &nodes[1..] {
        assert_eq!(state.workers[&n.public_key()].accepted, shards, "{:?}", state.workers);
    }
    assert_eq!(adapter_of(&nodes[0], &state), reference(&s, &nodes[0])[1]);
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dishonest_workers_are_caught_excluded_and_change_nothing() {
    // Node 1 perturbs its deltas, node 2 returns junk; 3 and 4 are honest.
    let nodes = spawn_nodes(5, |i, c| {
        c.fault = match i {
            1 => Some(Fault::PerturbShard),
            2 => Some(Fault::JunkShard),
            _ => None,
        }
    })
    .await;
    wait_for_swarm(&nodes[0], 5).await;
    let (liar, junk) = (nodes[1].public_key(), nodes[2].public_key());
    let s = setup(&nodes[0], Verify::Redundancy { k: 2 });
    let caught = Arc::new(Mutex::new(Vec::<(PublicKey, String)>::new()));
    let c2 = caught.clone();
    let on = move |e: &Event| {
        if let Event::Caught { worker, why, .. } = e {
            c2.lock().unwrap().push((*worker, why.clone()));
        }
    };
    let state = job::run(&nodes[0].shared.client, s.spec.clone(), &on).await.unwrap();
    assert!(state.finished);
    let expected = reference(&s, &nodes[0]);
    assert_eq!(
        adapter_of(&nodes[0], &state),
        expected[1],
        "the final adapter equals the run without the bad workers"
    );
    // Each bad worker was excluded at most once, with a reason and kept evidence.
    let excluded = state.excluded();
    let assigned = |k: &PublicKey| state.workers.get(k).map_or(0, |w| w.assigned);
    for bad in [liar, junk] {
        if assigned(&bad) > 0 {
            assert!(
                excluded.contains(&bad),
                "{bad} took tasks and was not excluded: {:?}",
                state.workers
            );
        }
    }
    assert!(
        !excluded.is_empty(),
        "no bad worker was given a task: {:?}",
        state.workers
    );
    for k in &excluded {
        assert!(*k == liar || *k == junk, "an honest worker was excluded");
    }
    for v in &state.verdicts {
        assert!(!v.evidence.is_empty());
        for e in &v.evidence {
            // Evidence is a worker's signed result, verifiable on its own.
            let o = protocol::open(&nodes[0].shared.store.read(e).unwrap()).unwrap();
            assert!(matches!(o.payload, protocol::Payload::TaskResult(_)));
        }
    }
    if excluded.contains(&junk) {
        let why = &state.workers[&junk].excluded;
        assert!(format!("{why:?}").contains("not a valid adapter delta"), "{why:?}");
    }
    if excluded.contains(&liar) {
        let v = state
            .verdicts
            .iter()
            .find(|v| v.wrong.iter().any(|(w, _)| *w == liar))
            .unwrap();
        assert!(v.why.contains("re-run"), "{}", v.why);
    }
    assert_eq!(caught.lock().unwrap().len(), excluded.len());
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_round_is_replaced_and_spot_checks_pass_honest_work() {
    let nodes = spawn_nodes(4, |_, c| c.limits.shutdown_grace_secs = 0).await;
    wait_for_swarm(&nodes[0], 4).await;
    let s = setup(&nodes[0], Verify::Spot { fraction: 0.5 });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let on = move |e: &Event| {
        if let Event::Assigned { worker, .. } = e {
            let _ = tx.send(*worker);
        }
    };
    let shared = nodes[0].shared.clone();
    let spec = s.spec.clone();
    let running = tokio::spawn(async move { job::run(&shared.client, spec, &on).await });
    // Kill the first worker given a task, as soon as it is given it.
    let victim = tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    let mut nodes = nodes;
    let at = nodes.iter().position(|n| n.public_key() == victim).unwrap();
    nodes.remove(at).shutdown().await;
    let state = running.await.unwrap().unwrap();
    assert!(state.finished);
    assert_eq!(adapter_of(&nodes[0], &state), reference(&s, &nodes[0])[1]);
    let v = &state.workers[&victim];
    // Shut down, it hands its task back (or its connection just drops).
    assert!(v.failed + v.handed_back >= 1 && state.reassigned >= 1, "{v:?}");
    assert!(
        state.excluded().is_empty(),
        "failing is not cheating: {:?}",
        state.workers
    );
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_inference_answer_is_caught_and_an_honest_one_is_returned() {
    let nodes = spawn_nodes(3, |i, c| {
        if i == 1 {
            c.fault = Some(Fault::TamperInfer);
        }
    })
    .await;
    let dir = tempdir("infer-model");
    let path = tiny_model(&dir);
    let (model, _) = nodes[0].shared.store.import_file(&path).unwrap();
    // The liar holds the model, so the client asks it first.
    nodes[1].shared.store.import_file(&path).unwrap();
    nodes[1].shared.store.pin(&model).unwrap();
    nodes[1].publish_advert().await.unwrap();
    assert_eventually(WAIT, "the client sees the liar's model", || {
        nodes[0].peers().iter().any(|(k, e)| {
            *k == nodes[1].public_key() && (e.advert.models.contains(&model) || e.advert.blobs.contains(&model))
        })
    })
    .await;
    wait_for_swarm(&nodes[0], 3).await;
    let sampling = Sampling {
        temperature: 0.8,
        top_k: 20,
        top_p: 0.95,
        seed: 5,
    };
    let prompt = vec![1, 17, 42, 99];
    let answer = node::infer::infer(&nodes[0].shared.client, model, prompt.clone(), 12, sampling, &|_| {})
        .await
        .unwrap();
    assert_eq!(answer.worker, nodes[2].public_key());
    assert_eq!(answer.faults.len(), 1);
    let fault = &answer.faults[0];
    assert_eq!(fault.worker, nodes[1].public_key());
    assert_eq!(fault.mismatch.position, 11, "the last token was replaced");
    let evidence = protocol::open(&nodes[0].shared.store.read(&fault.evidence).unwrap()).unwrap();
    assert_eq!(evidence.signer, nodes[1].public_key());

    // The answer is the local generation, and the checker accepts exactly it.
    let loaded = kernels::model::load(&path).unwrap();
    let m = kernels::model::Model::new(&loaded.weights, kernels::Backend::cpu().unwrap()).unwrap();
    let mut sampler = node::infer::sampler(&sampling).unwrap();
    let (local, _) = m.generate(&prompt, 12, &mut sampler, &[], |_| true).unwrap();
    assert_eq!(answer.tokens, local);
    let p = protocol::InferParams {
        model,
        prompt,
        max_tokens: 12,
        sampling,
    };
    assert_eq!(node::infer::check(&m, &p, &local).unwrap(), None);
    let mut bad = local.clone();
    bad[3] = (bad[3] + 1) % 100;
    assert_eq!(node::infer::check(&m, &p, &bad).unwrap().unwrap().position, 3);
    assert!(
        node::infer::check(&m, &p, &local[..5]).unwrap().is_some(),
        "a short answer is caught"
    );
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_fails_with_the_reason_and_keeps_what_was_verified() {
    let nodes = spawn_nodes(1, |_, _| {}).await;
    let client = &nodes[0];
    let s = setup(client, Verify::None);
    // A model nobody holds.
    let mut spec = s.spec.clone();
    spec.model = ContentId::of(b"no such model");
    let err = job::run(&client.shared.client, spec, &quiet).await.unwrap_err();
    assert!(format!("{err:#}").contains("not held here"), "{err:#}");
    // No capable peer: the round fails, the job's state stays on disk.
    let j = Job::open(&client.shared.client, s.spec.clone())
        .await
        .unwrap()
        .with_peer_wait(Duration::from_millis(500));
    let err = j.run(&quiet).await.unwrap_err();
    assert!(format!("{err:#}").contains("no capable peer"), "{err:#}");
    let saved = JobState::load(&client.shared.config.data_dir, &s.spec.id()).unwrap();
    assert_eq!(saved.round, 0);
    // A spec that cannot run.
    let mut spec = s.spec.clone();
    spec.rounds = 0;
    let err = job::run(&client.shared.client, spec, &quiet).await.unwrap_err();
    assert!(format!("{err:#}").contains("rounds 0"), "{err:#}");
    for n in nodes {
        n.shutdown().await;
    }
}

/// One daemon per machine: a job submitted through the control API runs in
/// the daemon, outlives the client that submitted it, survives a daemon
/// restart (resumed on its own from the data directory) and ends with the
/// adapter of the same job run alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_submitted_to_the_daemon_outlives_its_client_and_resumes_after_a_restart() {
    use node::control::ControlClient;
    let mut nodes = spawn_nodes(3, |_, _| {}).await;
    let daemon_node = nodes.pop().unwrap();
    wait_for_swarm(&daemon_node, 3).await;
    let mut s = setup(&daemon_node, Verify::None);
    s.spec.rounds = 3;
    let expected = reference(&s, &daemon_node);
    let dir = daemon_node.shared.config.data_dir.clone();
    let config = daemon_node.shared.config.clone();

    // The submitting client: one request, then it is gone.
    let (d, spec) = (dir.clone(), serde_json::to_value(&s.spec).unwrap());
    let answer = tokio::task::spawn_blocking(move || ControlClient::new(&d)?.post("/v1/jobs", spec))
        .await
        .unwrap()
        .unwrap();
    let id: ContentId = answer["job"].as_str().unwrap().parse().unwrap();
    assert_eq!(id, s.spec.id());

    // A watcher sees the job's events as JSON lines.
    let d = dir.clone();
    let first = tokio::task::spawn_blocking(move || {
        let mut first = None;
        ControlClient::new(&d)
            .unwrap()
            .stream(&format!("/v1/jobs/{id}/events"), |e| {
                // A heartbeat says only that the daemon is alive.
                first = e["event"].as_str().filter(|e| *e != "heartbeat").map(str::to_string);
                first.is_none()
            })
            .unwrap();
        first
    });
    assert_eventually(WAIT, "the daemon's job saves a result", || {
        JobState::load(&dir, &id).is_ok_and(|s| s.round > 0 || !s.accepted.is_empty())
    })
    .await;
    assert!(first.await.unwrap().is_some(), "an event was streamed");

    // The daemon stops mid-job and starts again on the same directory.
    daemon_node.shutdown().await;
    let saved = JobState::load(&dir, &id).unwrap();
    assert!(!saved.finished, "stopped mid-job");
    let restarted = daemon::start(config).await.unwrap();
    wait_for_swarm(&restarted, 3).await;
    assert_eventually(Duration::from_secs(240), "the resumed job finishes", || {
        JobState::load(&dir, &id).is_ok_and(|s| s.finished)
    })
    .await;
    let state = JobState::load(&dir, &id).unwrap();
    assert!(state.rounds.len() == 3 && state.round == 3);
    assert_eq!(
        adapter_of(&restarted, &state),
        expected[2],
        "the adapter of the job run alone"
    );
    let d = dir.clone();
    let status = tokio::task::spawn_blocking(move || ControlClient::new(&d)?.get(&format!("/v1/jobs/{id}")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status["status"]["run"], "finished", "{status}");
    assert!(status["state"]["audit_key"].is_string(), "revealed once finished");
    restarted.shutdown().await;
    for n in nodes {
        n.shutdown().await;
    }
}

/// A daemon job that fails (here: its model is nowhere) waits and runs
/// again, counts its failures across daemon restarts, is given up after
/// `MAX_ATTEMPTS`, and runs afresh when submitted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_daemon_job_is_retried_after_a_wait_and_given_up_after_its_attempts() {
    use node::job::runner::{MAX_ATTEMPTS, Run, backoff};
    let mut nodes = spawn_nodes(1, |_, _| {}).await;
    let first = nodes.pop().unwrap();
    let mut s = setup(&first, Verify::None);
    s.spec.model = ContentId::of(b"a model nobody holds");
    let id = s.spec.id();
    let config = first.shared.config.clone();
    let retrying = |n: &node::daemon::NodeHandle, attempt: u32| {
        matches!(n.jobs.run_of(&id), Some(Run::Retrying { attempt: a, ref error, retry_at_ms })
            if a == attempt && error.contains("is not held here") && retry_at_ms > node::daemon::now_ms() + 20_000)
    };
    first.jobs.submit(s.spec.clone()).unwrap();
    assert_eventually(WAIT, "the job fails and waits to run again", || retrying(&first, 1)).await;
    assert_eq!(backoff(1), Duration::from_secs(30));
    assert_eq!(backoff(2), Duration::from_secs(60));
    assert_eq!(backoff(40), node::job::runner::MAX_BACKOFF);
    first.shutdown().await;

    // A restart runs it at once, and its failures still count.
    let second = daemon::start(config.clone()).await.unwrap();
    assert_eventually(WAIT, "the resumed job fails a second time", || retrying(&second, 2)).await;
    second.shutdown().await;

    // At its last attempt it is not resumed; submitted again, it runs.
    let record = config.data_dir.join("jobs").join(id.to_string()).join("daemon.json");
    let mut r: serde_json::Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert_eq!(r["failures"], 2);
    r["failures"] = MAX_ATTEMPTS.into();
    std::fs::write(&record, serde_json::to_vec(&r).unwrap()).unwrap();
    let third = daemon::start(config).await.unwrap();
    assert!(
        matches!(third.jobs.run_of(&id), Some(Run::Failed { ref error }) if error.contains("is not held here")),
        "{:?}",
        third.jobs.run_of(&id)
    );
    third.jobs.submit(s.spec.clone()).unwrap();
    assert_eventually(WAIT, "submitted again, it starts its attempts afresh", || {
        retrying(&third, 1)
    })
    .await;
    third.shutdown().await;
}
