//! Shared helpers for tern's cross-crate integration tests: nodes started
//! in this process on loopback (port 0), and waiting for a condition.

use std::path::PathBuf;
use std::time::Duration;

use node::config::Config;
use node::daemon::{self, NodeHandle};

/// A fresh directory under the system temp dir, left for inspection after
/// the test. The first call removes those that earlier test processes left
/// behind (a node's store and models add up to hundreds of MB a run), once
/// their process has exited.
pub fn tempdir(name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(remove_dead_runs);
    let d = std::env::temp_dir().join(format!(
        "tern-it-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// Removes `tern-it-NAME-PID-N` directories whose process is gone (where
/// the OS says which processes run: Linux's /proc).
fn remove_dead_runs() {
    let proc = std::path::Path::new("/proc/self");
    if !proc.exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("tern-it-") {
            continue;
        }
        let Some(pid) = name.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Starts `n` nodes on loopback; each bootstraps from the first.
pub async fn spawn_nodes(n: usize, tweak: impl Fn(usize, &mut Config)) -> Vec<NodeHandle> {
    let mut nodes: Vec<NodeHandle> = Vec::new();
    for i in 0..n {
        let mut c = Config::for_test(&tempdir(&format!("node{i}")));
        if let Some(first) = nodes.first() {
            c.bootstrap = first.dial_addrs().iter().map(|a| a.to_string()).collect();
        }
        tweak(i, &mut c);
        nodes.push(daemon::start(c).await.expect("node starts"));
    }
    nodes
}

/// Polls `cond` until it holds or `timeout` passes; panics with `what` then.
pub async fn assert_eventually(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    assert_eventually_async(timeout, what, || std::future::ready(cond())).await
}

/// [`assert_eventually`] for a condition that must await (the network's
/// state, say).
pub async fn assert_eventually_async<F: std::future::Future<Output = bool>>(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> F,
) {
    let t0 = tokio::time::Instant::now();
    while !cond().await {
        assert!(t0.elapsed() < timeout, "not within {timeout:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `tiny` preset with seed 7, written as a GGUF file into `dir`.
pub fn tiny_model(dir: &std::path::Path) -> PathBuf {
    let (w, t) = kernels::model::init::random(kernels::model::Preset::parse("tiny").expect("preset"), 7).expect("init");
    let path = dir.join("tiny.gguf");
    kernels::model::save(&w, &t, kernels::model::ModelFormat::GgufTq2, &path).expect("save");
    path
}

/// Small LoRA hyper-parameters that train the tiny model in a few steps.
pub fn small_hyper() -> protocol::train::LoraHyper {
    protocol::train::LoraHyper {
        rank: 4,
        alpha: 8.0,
        targets: 0b111_1111,
        lr: 1e-3,
        batch: 2,
        max_grad_norm: 1.0,
        weight_decay: 0.0,
        dropout: 0.0,
    }
}

/// Whether a wgpu adapter opens on this machine, for tests of nodes that
/// run their tasks on a GPU. Without one such a test is skipped with a loud
/// message, or fails where `TERN_REQUIRE_GPU=1` (CI, on lavapipe).
pub fn have_gpu(test: &str) -> bool {
    match kernels::gpu::Gpu::new(&Default::default()) {
        Ok(_) => true,
        Err(e) if std::env::var_os("TERN_REQUIRE_GPU").is_some_and(|v| v == "1") => {
            panic!("TERN_REQUIRE_GPU=1 but no wgpu adapter for {test}: {e}")
        }
        Err(e) => {
            eprintln!("\n*** SKIPPING {test}: no wgpu adapter ({e}); set TERN_REQUIRE_GPU=1 to fail instead ***\n");
            false
        }
    }
}

/// How long the job tests wait for a swarm to form.
pub const SWARM_WAIT: Duration = Duration::from_secs(60);

/// A job's model file and a spec whose inputs are in a client's store.
#[derive(Debug)]
pub struct Setup {
    pub model_path: PathBuf,
    pub spec: node::job::JobSpec,
}

/// Two data shards of the synthetic task on the tiny model, two rounds of
/// two local steps, carried moments, verified by `verify`.
pub fn setup(client: &NodeHandle, verify: node::job::Verify) -> Setup {
    let dir = tempdir("job-model");
    let model_path = tiny_model(&dir);
    let loaded = kernels::model::load(&model_path).expect("the tiny model loads");
    let vocab = loaded.weights.config.vocab_size;
    let (seqs, _) = kernels::train::data::synthetic_mapping(vocab, 1, 8, 12, 3);
    let (train, eval) = seqs.split_at(8);
    let (model, shards, eval, longest) =
        node::job::put_inputs(&client.shared.store, &model_path, train, eval, 2).expect("inputs stored");
    let spec = node::job::JobSpec {
        model,
        shards,
        eval,
        hyper: protocol::train::LoraHyper {
            lr: 1e-2,
            ..small_hyper()
        },
        rounds: 2,
        local_steps: 2,
        seed: 11,
        rule: protocol::train::Rule::Mean,
        outer: protocol::train::Outer::default(),
        verify,
        max_tasks_per_peer: 1,
        task_timeout_secs: 120,
        max_sequence_tokens: longest,
        carry_moments: true,
    };
    Setup { model_path, spec }
}

/// The job's rounds computed alone, as an auditor would.
pub fn reference(s: &Setup, client: &NodeHandle) -> Vec<protocol::train::AdapterParams> {
    let loaded = kernels::model::load(&s.model_path).expect("the model loads");
    let m = kernels::model::Model::new(&loaded.weights, kernels::Backend::cpu().expect("cpu")).expect("model");
    node::job::run_locally(&m, &s.spec, |id| client.shared.store.read(id)).expect("the local replay runs")
}

/// Waits until `client` knows `n` peers (itself included).
pub async fn wait_for_swarm(client: &NodeHandle, n: usize) {
    assert_eventually(SWARM_WAIT, "the client knows every worker", || {
        client.peers().len() >= n
    })
    .await;
}

/// The adapter a job ended with.
pub fn adapter_of(client: &NodeHandle, state: &node::job::JobState) -> protocol::train::AdapterParams {
    let bytes = client
        .shared
        .store
        .read(&state.result())
        .expect("the adapter is stored");
    protocol::train::AdapterParams::decode(&bytes).expect("the adapter decodes")
}

/// A small seeded inference task on `model` for `worker`.
pub fn infer_task(worker: protocol::PublicKey, model: protocol::ContentId) -> protocol::Task {
    protocol::Task {
        worker,
        inputs: vec![model],
        max_work: 64,
        params: protocol::TaskParams::Infer(protocol::InferParams {
            model,
            prompt: vec![1, 17, 42, 99],
            max_tokens: 12,
            sampling: protocol::Sampling {
                temperature: 0.8,
                top_k: 20,
                top_p: 0.95,
                seed: 5,
            },
        }),
    }
}

/// A LoRA-shard task for `worker` with its inputs in `client`'s store: the
/// model at `model_path`, a fresh adapter, and four synthetic sequences of
/// `pairs` key-value pairs; `steps` local steps, or as many as the default
/// work limit (2^20 tokens) allows.
pub fn shard_task(
    client: &node::daemon::Shared,
    worker: protocol::PublicKey,
    model_path: &std::path::Path,
    pairs: usize,
    steps: Option<u32>,
) -> protocol::Task {
    let (model, _) = client.store.import_file(model_path).unwrap();
    let config = kernels::model::load(model_path).unwrap().weights.config;
    let hyper = small_hyper();
    let start = node::shard::initial_adapter(&config, &hyper, 1).unwrap();
    let adapter = client.store.put(&start.encode()).unwrap();
    let (seqs, _) = kernels::train::data::synthetic_mapping(config.vocab_size, 1, pairs, 4, 3);
    let data = client.store.put(&node::shard::shard_of(&seqs).encode()).unwrap();
    let longest = seqs.iter().map(|s| s.tokens.len()).max().unwrap() as u64;
    let local_steps = steps.unwrap_or(((1u64 << 20) / (u64::from(hyper.batch) * longest)) as u32);
    protocol::Task {
        worker,
        inputs: vec![model, adapter, data],
        max_work: 1 << 20,
        params: protocol::TaskParams::LoraShard(protocol::LoraShardParams {
            model,
            adapter,
            data,
            local_steps,
            seed: 9,
            hyper,
            optimizer: None,
        }),
    }
}

/// A daemon's HTTP base URL (its control address) and its key.
pub fn endpoint(n: &NodeHandle) -> (String, String) {
    let c = node::control::ControlClient::new(&n.shared.config.data_dir).expect("the daemon's control files");
    let (base, token) = c.endpoint();
    (base.to_string(), token.to_string())
}

/// An HTTP client that returns error statuses as responses, for tests
/// that check them.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}
