//! The `tern` binary as a user runs it.

mod common;

use common::{fails_with, init, ok, tempdir, tern};

#[test]
fn bench_kernels_quick_reports_every_figure_as_json() {
    let out = tern(&["bench", "kernels", "--quick", "--json", "--backend", "cpu"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert!(report["read_bandwidth"].as_f64().unwrap() > 0.0);
    let gemv = report["gemv"].as_array().unwrap();
    let gemm = report["gemm"].as_array().unwrap();
    assert_eq!(gemv.len(), 2, "one GEMV figure per quick shape");
    assert_eq!(gemm.len(), 2, "one GEMM figure per quick shape and batch");
    for g in gemv {
        assert!(g["weight_bandwidth"].as_f64().unwrap() > 0.0);
        assert!(g["bandwidth_fraction"].as_f64().unwrap() > 0.0);
    }
    for g in gemm {
        assert!(g["gops"].as_f64().unwrap() > 0.0);
        assert!(g["speedup_vs_f32"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn bad_arguments_fail_with_usage() {
    let out = tern(&["bench", "kernels", "--backend", "tpu"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value 'tpu'"));
}

#[test]
fn model_init_inspect_convert_generate_eval() {
    let d = tempdir("model");
    let hf = init(&d, "tiny", "3");
    let hf_s = hf.to_str().unwrap();
    let inspect: serde_json::Value = serde_json::from_str(&ok(&tern(&["model", "inspect", hf_s, "--json"]))).unwrap();
    assert_eq!(inspect["format"], "hf-packed");
    assert_eq!(inspect["architecture"]["hidden_size"], 256);
    let id = inspect["model_id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 64);
    // The same seed writes the same model: the same id.
    let again = init(&d, "again", "3");
    let again: serde_json::Value =
        serde_json::from_str(&ok(&tern(&["model", "inspect", again.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(again["model_id"].as_str().unwrap(), id);

    let generate = |model: &str| -> serde_json::Value {
        let out = tern(&[
            "generate",
            "--model",
            model,
            "--prompt",
            "The swarm",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "--json",
        ]);
        serde_json::from_str(&ok(&out)).unwrap()
    };
    let reference = generate(hf_s);
    assert_eq!(reference["tokens"].as_array().unwrap().len(), 12);
    for format in ["gguf-tq1", "gguf-tq2", "gguf-i2s"] {
        let out = d.join(format!("tiny-{format}.gguf"));
        ok(&tern(&[
            "model",
            "convert",
            hf_s,
            "--to",
            format,
            "--out",
            out.to_str().unwrap(),
        ]));
        assert_eq!(
            generate(out.to_str().unwrap())["tokens"],
            reference["tokens"],
            "{format}"
        );
    }

    let text = d.join("text.txt");
    std::fs::write(&text, "The quick brown fox jumps over the lazy dog. ".repeat(8)).unwrap();
    let logits = d.join("logits.safetensors");
    let eval: serde_json::Value = serde_json::from_str(&ok(&tern(&[
        "eval",
        "--model",
        hf_s,
        "--text",
        text.to_str().unwrap(),
        "--dump-logits",
        logits.to_str().unwrap(),
        "--json",
    ])))
    .unwrap();
    let ppl = eval["perplexity"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0, "{eval}");
    let bytes = std::fs::read(&logits).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor("logits").unwrap().shape(),
        [eval["tokens"].as_u64().unwrap() as usize, 512]
    );
}

/// `--head q8` re-stores the embedding as Q8_0; the file then runs the
/// integer head everywhere: it generates, `bench model --model` measures it,
/// and `eval --reference` shows it close to the bf16 file and the bf16 file
/// identical to itself.
#[test]
fn a_q8_head_converts_generates_benches_and_is_scored_against_bf16() {
    let d = tempdir("q8-head");
    let hf = init(&d, "tiny", "5");
    let (bf16, q8) = (d.join("bf16.gguf"), d.join("q8.gguf"));
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    ok(&tern(&[
        "model",
        "convert",
        &s(&hf),
        "--to",
        "gguf-tq2",
        "--out",
        &s(&bf16),
    ]));
    ok(&tern(&[
        "model",
        "convert",
        &s(&hf),
        "--to",
        "gguf-tq2",
        "--head",
        "q8",
        "--out",
        &s(&q8),
    ]));
    let embd = embedding_tensor(&q8);
    assert_eq!(embd["dtype"], "Q8_0", "{embd}");
    assert_eq!(embd["bytes"], 512 * 256 / 32 * 34);

    let generated: serde_json::Value = serde_json::from_str(&ok(&tern(&[
        "generate",
        "--model",
        &s(&q8),
        "--prompt",
        "The swarm",
        "--max-tokens",
        "8",
        "--json",
    ])))
    .unwrap();
    assert_eq!(generated["tokens"].as_array().unwrap().len(), 8, "{generated}");

    let bench: serde_json::Value = serde_json::from_str(&ok(&tern(&[
        "bench",
        "model",
        "--model",
        &s(&q8),
        "--prompt-tokens",
        "16",
        "--decode-tokens",
        "4",
        "--json",
    ])))
    .unwrap();
    assert_eq!(bench["head"], "q8_0", "{bench}");
    assert_eq!(bench["figures"][0]["format"], "gguf-tq2");
    assert!(bench["figures"][0]["decode_tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(!bench["read_methods"].as_array().unwrap().is_empty());

    let text = d.join("text.txt");
    std::fs::write(&text, "The quick brown fox jumps over the lazy dog. ".repeat(8)).unwrap();
    let eval = |model: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&ok(&tern(&[
            "eval",
            "--model",
            &s(model),
            "--reference",
            &s(&bf16),
            "--text",
            &s(&text),
            "--json",
        ])))
        .unwrap()
    };
    let same = eval(&bf16);
    assert_eq!(same["reference"]["mean_kl_divergence"], 0.0, "{same}");
    assert_eq!(same["reference"]["top1_agreement"], 1.0);
    assert_eq!(same["reference"]["mean_nll"], same["mean_nll"]);
    let other = eval(&q8);
    let kl = other["reference"]["mean_kl_divergence"].as_f64().unwrap();
    assert!(kl > 0.0 && kl < 0.05, "{other}");
}

/// `tern model inspect --json`'s entry for a model's token embedding.
fn embedding_tensor(model: &std::path::Path) -> serde_json::Value {
    let inspect: serde_json::Value =
        serde_json::from_str(&ok(&tern(&["model", "inspect", model.to_str().unwrap(), "--json"]))).unwrap();
    inspect["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "token_embd.weight")
        .unwrap()
        .clone()
}

/// The file llama.cpp's tools wrote (see `scripts/make-llamacpp-fixture`):
/// a SentencePiece vocabulary, a tied Q6_K embedding, TQ2_0 projections.
#[test]
fn a_file_written_by_llama_cpp_tools_generates_converts_and_round_trips() {
    let d = tempdir("llamacpp-file");
    let src =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernels/tests/fixtures/llamacpp_bitnet/model.gguf");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let embd_dtype = |p: &std::path::Path| embedding_tensor(p)["dtype"].as_str().unwrap().to_owned();
    let generate = |p: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&ok(&tern(&[
            "generate",
            "--model",
            &s(p),
            "--prompt",
            "To be, or not",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "--json",
        ])))
        .unwrap()
    };
    assert_eq!(embd_dtype(&src), "Q6_K");
    let original = generate(&src);
    let n = original["tokens"].as_array().unwrap().len();
    assert!(n > 0 && n <= 12, "{original}");

    // GGUF to GGUF keeps the Q6_K bytes and the SentencePiece vocabulary, so
    // the same tokens come out.
    let again = d.join("again.gguf");
    ok(&tern(&[
        "model",
        "convert",
        &s(&src),
        "--to",
        "gguf-tq2",
        "--out",
        &s(&again),
    ]));
    assert_eq!(embd_dtype(&again), "Q6_K");
    assert_eq!(generate(&again)["tokens"], original["tokens"]);

    // To Hugging Face's layout (the vocabulary as BPE with byte fallback) and
    // back: the same prompt tokens, and a model that still generates.
    let hf = d.join("hf");
    ok(&tern(&[
        "model",
        "convert",
        &s(&src),
        "--to",
        "hf-packed",
        "--out",
        &s(&hf),
    ]));
    assert!(hf.join("tokenizer.json").exists());
    assert!(!generate(&hf)["tokens"].as_array().unwrap().is_empty());

    // An exact 8-bit head made from the Q6_K one scores close to it.
    let q8 = d.join("q8.gguf");
    ok(&tern(&[
        "model",
        "convert",
        &s(&src),
        "--to",
        "gguf-tq2",
        "--head",
        "q8",
        "--out",
        &s(&q8),
    ]));
    assert_eq!(embd_dtype(&q8), "Q8_0");
    let text = d.join("text.txt");
    std::fs::write(
        &text,
        "Now is the winter of our discontent made glorious summer by this sun of York. ".repeat(4),
    )
    .unwrap();
    let eval: serde_json::Value = serde_json::from_str(&ok(&tern(&[
        "eval",
        "--model",
        &s(&q8),
        "--reference",
        &s(&src),
        "--text",
        &s(&text),
        "--json",
    ])))
    .unwrap();
    let kl = eval["reference"]["mean_kl_divergence"].as_f64().unwrap();
    assert!(kl > 0.0 && kl < 0.01, "{eval}");
}

#[test]
fn bad_model_input_is_a_clear_error() {
    let d = tempdir("bad");
    let good = d.join("m.gguf");
    ok(&tern(&[
        "model",
        "init",
        "--preset",
        "tiny",
        "--format",
        "gguf-tq2",
        "--out",
        good.to_str().unwrap(),
    ]));
    let bytes = std::fs::read(&good).unwrap();
    let path = |name: &str, b: &[u8]| {
        let p = d.join(name);
        std::fs::write(&p, b).unwrap();
        p.to_str().unwrap().to_string()
    };
    let truncated = path("truncated.gguf", &bytes[..bytes.len() / 2]);
    fails_with(&tern(&["model", "inspect", &truncated]), "truncated");
    let mut magic = bytes.clone();
    magic[..4].copy_from_slice(b"GGML");
    fails_with(&tern(&["model", "inspect", &path("magic.gguf", &magic)]), "wrong magic");
    // A corrupted 2-bit code (3 never occurs in TQ2_0 data): flip the last tensor's bytes.
    let mut corrupt = bytes.clone();
    let n = corrupt.len();
    corrupt[n - 200..n - 100].fill(0xFF);
    fails_with(&tern(&["model", "inspect", &path("corrupt.gguf", &corrupt)]), "blk.1");

    let hf = d.join("hf");
    ok(&tern(&[
        "model",
        "init",
        "--preset",
        "tiny",
        "--out",
        hf.to_str().unwrap(),
    ]));
    std::fs::remove_file(hf.join("tokenizer.json")).unwrap();
    fails_with(
        &tern(&["model", "inspect", hf.to_str().unwrap()]),
        "tokenizer.json is missing",
    );

    let long = "word ".repeat(2000);
    fails_with(
        &tern(&[
            "generate",
            "--model",
            good.to_str().unwrap(),
            "--prompt",
            &long,
            "--max-tokens",
            "4",
        ]),
        "context",
    );
    fails_with(
        &tern(&["model", "inspect", d.join("nothing").to_str().unwrap()]),
        "No such file",
    );
}

/// Kills the daemon if the test fails before it stops it.
#[cfg(unix)]
struct Daemon(std::process::Child);

#[cfg(unix)]
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(unix)]
impl Daemon {
    /// `tern node --config FILE` with extra flags; returns once its control API answers.
    fn start(dir: &std::path::Path, extra: &[&str]) -> (Self, serde_json::Value) {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("node.toml");
        std::fs::write(
            &config,
            "gpu = false\nbench = false\nadvert_interval_secs = 2\nadvert_ttl_secs = 30\n",
        )
        .unwrap();
        let mut args = vec![
            "node",
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "--control",
            "127.0.0.1:0",
            "--no-mdns",
        ];
        args.extend_from_slice(extra);
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let d = Self(child);
        let t0 = std::time::Instant::now();
        loop {
            let out = tern(&["status", "--json", "--data-dir", dir.to_str().unwrap()]);
            if out.status.success() {
                return (d, serde_json::from_slice(&out.stdout).unwrap());
            }
            assert!(t0.elapsed().as_secs() < 60, "the daemon did not start: {out:?}");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// SIGTERM, then the exit status within the shutdown grace.
    fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.0.id().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let t0 = std::time::Instant::now();
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            assert!(t0.elapsed().as_secs() < 30, "the daemon did not stop on SIGTERM");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

#[cfg(unix)]
#[test]
fn two_daemons_find_each_other_and_share_a_blob_through_the_cli() {
    use std::os::unix::fs::PermissionsExt as _;
    let d = tempdir("daemons");
    let (a, b) = (d.join("a"), d.join("b"));
    let (a_s, b_s) = (a.to_str().unwrap(), b.to_str().unwrap());

    // `tern id` creates the key once, private, and prints the same id after.
    let id = ok(&tern(&["id", "--data-dir", a_s])).trim().to_string();
    assert!(id.starts_with("12D3KooW"), "{id}");
    assert_eq!(ok(&tern(&["id", "--data-dir", a_s])).trim(), id);
    let mode = std::fs::metadata(a.join("node.key")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let printed: toml::Value = toml::from_str(&ok(&tern(&["node", "--print-config"]))).unwrap();
    assert!(printed.get("listen").is_some() && printed.get("limits").is_some());

    // No daemon yet: a clear error.
    fails_with(&tern(&["status", "--data-dir", a_s]), "tern node");

    let (da, status) = Daemon::start(&a, &[]);
    assert_eq!(status["peer_id"], id.as_str());
    let addr = format!("{}/p2p/{id}", status["listen_addrs"][0].as_str().unwrap());
    let (db, _) = Daemon::start(&b, &["--bootstrap", &addr]);
    let t0 = std::time::Instant::now();
    while serde_json::from_str::<serde_json::Value>(&ok(&tern(&["peers", "--json", "--data-dir", b_s])))
        .unwrap()
        .as_array()
        .unwrap()
        .len()
        < 2
    {
        assert!(t0.elapsed().as_secs() < 60, "b did not learn a's advert");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(ok(&tern(&["peers", "--data-dir", b_s])).contains(&id));
    // b dialled a on loopback: the connection table says so, and direct.
    let b_status: serde_json::Value =
        serde_json::from_str(&ok(&tern(&["status", "--json", "--data-dir", b_s]))).unwrap();
    let to_a: Vec<_> = b_status["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["peer"] == id.as_str())
        .collect();
    assert!(
        !to_a.is_empty() && to_a.iter().all(|c| c["relayed"] == false),
        "{b_status}"
    );
    assert!(ok(&tern(&["status", "--data-dir", b_s])).contains(&format!("connection  direct  {id}")));

    let file = d.join("payload.bin");
    let payload: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&file, &payload).unwrap();
    let blob = ok(&tern(&["blob", "add", file.to_str().unwrap(), "--data-dir", a_s]))
        .trim()
        .to_string();
    assert_eq!(blob, blake3::hash(&payload).to_hex().as_str());
    assert!(ok(&tern(&["blob", "list", "--data-dir", a_s])).contains(&blob));
    let got = d.join("got.bin");
    ok(&tern(&[
        "blob",
        "get",
        &blob,
        "--out",
        got.to_str().unwrap(),
        "--data-dir",
        b_s,
    ]));
    assert_eq!(std::fs::read(&got).unwrap(), payload);
    fails_with(
        &tern(&[
            "blob",
            "get",
            &"0".repeat(64),
            "--out",
            got.to_str().unwrap(),
            "--data-dir",
            b_s,
        ]),
        "no peer",
    );

    assert!(db.stop().success());
    assert!(da.stop().success());
    let _ = std::fs::remove_dir_all(&d);
}

#[cfg(unix)]
#[test]
fn bench_swarm_quick_measures_convergence_transfer_and_idle_memory() {
    let d = tempdir("bench-swarm");
    let out = ok(&tern(&[
        "bench",
        "swarm",
        "--quick",
        "--json",
        "--dir",
        d.to_str().unwrap(),
    ]));
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["nodes"], 4);
    assert!(r["convergence_seconds"].as_f64().unwrap() > 0.0);
    let transfers = r["transfers"].as_array().unwrap();
    assert_eq!(transfers.len(), 2, "QUIC and TCP");
    for t in transfers {
        assert!(t["bytes_per_second"].as_f64().unwrap() > 0.0);
    }
    let idle = r["idle"].as_array().unwrap();
    assert_eq!(idle[1]["peers_known"], 5, "the idle daemon joined the 4-node swarm");
    assert!(idle.iter().all(|i| i["rss_bytes"].as_u64().unwrap() > 1 << 20));

    // The scale run: one swarm grown through two sizes, every node holding
    // every advert at each, and the traffic counted.
    let out = ok(&tern(&[
        "bench",
        "swarm",
        "--scale",
        "3,5",
        "--quick",
        "--json",
        "--dir",
        d.to_str().unwrap(),
    ]));
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let points = r["scale"]["points"].as_array().unwrap();
    assert_eq!(points.len(), 2, "{r}");
    for (p, n) in points.iter().zip([3, 5]) {
        assert_eq!(p["nodes"], n);
        assert!(p["convergence_seconds"].as_f64().is_some(), "{p}");
        assert_eq!(p["observer_adverts_known"], n, "{p}");
        assert!(p["observer_rss_bytes"].as_u64().unwrap() > 1 << 20, "{p}");
    }
    assert!(r["scale"]["advert_bytes"].as_f64().unwrap() > 100.0, "{r}");
    let _ = std::fs::remove_dir_all(&d);
}

/// `tern bench api`: both paths generate the same tokens, and the figures
/// are there.
#[test]
fn the_api_benchmark_measures_both_paths() {
    let out = ok(&tern(&[
        "bench",
        "api",
        "--preset",
        "tiny",
        "--runs",
        "2",
        "--max-tokens",
        "12",
        "--json",
    ]));
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["engine"]["tokens"], r["api"]["tokens"], "{r}");
    for side in ["engine", "api"] {
        assert!(r[side]["first_token_seconds"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r[side]["tokens_per_second"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(r["tokens_per_second_ratio"].as_f64().unwrap() > 0.0);
}

#[cfg(unix)]
#[test]
fn a_finetune_submitted_through_the_cli_runs_on_a_daemon_and_its_adapter_is_fetched() {
    let d = tempdir("submit");
    let (w, c) = (d.join("worker"), d.join("client"));
    let model = d.join("tiny.gguf");
    let (m, c_s) = (model.to_str().unwrap(), c.to_str().unwrap());
    ok(&tern(&[
        "model", "init", "--preset", "tiny", "--seed", "2", "--format", "gguf-tq2", "--out", m,
    ]));
    let config = d.join("client.toml");
    std::fs::write(
        &config,
        "gpu = false\nbench = false\nmdns = false\nlisten = [\"/ip4/127.0.0.1/udp/0/quic-v1\"]\n",
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    // A dataset that does not parse: the line is named, nothing starts.
    let bad = d.join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n{not json}\n").unwrap();
    fails_with(
        &tern(&[
            "submit",
            "finetune",
            "--model",
            m,
            "--data",
            bad.to_str().unwrap(),
            "--data-dir",
            c_s,
            "--config",
            cfg,
        ]),
        "bad.jsonl:2: invalid JSON",
    );

    let (_worker, status) = Daemon::start(&w, &[]);
    let addr = format!(
        "{}/p2p/{}",
        status["listen_addrs"][0].as_str().unwrap(),
        status["peer_id"].as_str().unwrap()
    );
    let out = ok(&tern(&[
        "submit",
        "finetune",
        "--model",
        m,
        "--data",
        "synthetic",
        "--rounds",
        "2",
        "--local-steps",
        "2",
        "--shards",
        "2",
        "--verify",
        "spot:1",
        "--lr",
        "0.01",
        "--bootstrap",
        &addr,
        "--data-dir",
        c_s,
        "--config",
        cfg,
        "--json",
    ]));
    let state: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(state["finished"], true);
    assert_eq!(state["rounds"].as_array().unwrap().len(), 2);
    let id = state["id"].as_str().unwrap();
    // Every result was spot-checked by the client's re-run and held.
    assert!(out.contains("\"check\":\"spot\""), "{out}");
    assert!(state["verdicts"].as_array().unwrap().is_empty());

    let text = ok(&tern(&["job", "status", id, "--data-dir", c_s]));
    assert!(text.contains("finished") && text.contains("round   2"), "{text}");
    let adapter = d.join("adapter");
    ok(&tern(&[
        "job",
        "fetch",
        id,
        "--data-dir",
        c_s,
        "--out",
        adapter.to_str().unwrap(),
    ]));
    assert!(adapter.join("adapter_model.safetensors").exists());
    assert!(adapter.join("adapter.gguf").exists());
    // The fetched adapter loads onto its base model and generates.
    ok(&tern(&[
        "generate",
        "--model",
        m,
        "--adapter",
        adapter.to_str().unwrap(),
        "--prompt",
        "a",
        "--max-tokens",
        "2",
    ]));
    fails_with(&tern(&["job", "status", &"0".repeat(64), "--data-dir", c_s]), "no job");
}

#[test]
fn the_demo_fine_tunes_on_a_local_swarm_and_the_adapter_helps() {
    let d = tempdir("demo");
    let out = ok(&tern(&["demo", "--rounds", "3", "--dir", d.to_str().unwrap()]));
    assert!(out.contains("(finished)"), "{out}");
    let right = |label: &str| -> usize {
        let line = out.lines().find(|l| l.starts_with(label)).unwrap();
        line.split(": ")
            .nth(1)
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (before, after) = (right("generation before"), right("generation after"));
    assert!(after > before, "before {before}, after {after}\n{out}");
    // What it learned reads as words a person can check, not token names.
    assert!(out.contains("made-up word pairs (\""), "{out}");
    assert!(!out.contains("reserved_special"), "{out}");
    // Where to watch it: the client's dashboard, its key in the fragment.
    let watch = out
        .lines()
        .find(|l| l.starts_with("watch it live in a browser: "))
        .unwrap();
    assert!(
        watch.contains("http://127.0.0.1:") && watch.contains("/#token="),
        "{watch}"
    );
    assert!(d.join("adapter/adapter_model.safetensors").exists());
}

#[cfg(unix)]
#[test]
fn a_finetune_handed_to_the_daemon_runs_there_and_is_watched_listed_and_fetched() {
    let d = tempdir("daemon-job");
    let (w, c) = (d.join("worker"), d.join("client"));
    let model = d.join("tiny.gguf");
    let (m, c_s) = (model.to_str().unwrap(), c.to_str().unwrap());
    ok(&tern(&[
        "model", "init", "--preset", "tiny", "--seed", "2", "--format", "gguf-tq2", "--out", m,
    ]));
    let (_worker, status) = Daemon::start(&w, &[]);
    let addr = format!(
        "{}/p2p/{}",
        status["listen_addrs"][0].as_str().unwrap(),
        status["peer_id"].as_str().unwrap()
    );
    let (_client, _) = Daemon::start(&c, &["--bootstrap", &addr]);
    // The CLI hands the job to the daemon on its data directory and returns.
    let out = ok(&tern(&[
        "submit",
        "finetune",
        "--model",
        m,
        "--data",
        "synthetic",
        "--rounds",
        "2",
        "--local-steps",
        "1",
        "--shards",
        "2",
        "--verify",
        "none",
        "--data-dir",
        c_s,
        "--detach",
        "--json",
    ]));
    let answer: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let id = answer["job"].as_str().unwrap().to_string();
    // Another CLI follows it to its end.
    let out = ok(&tern(&["job", "watch", &id, "--data-dir", c_s, "--json"]));
    let state: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(state["finished"], true, "{out}");
    assert_eq!(state["id"], id.as_str());
    assert_eq!(state["rounds"].as_array().unwrap().len(), 2);
    let list = ok(&tern(&["job", "list", "--data-dir", c_s]));
    assert!(list.contains(&id) && list.contains("finished"), "{list}");
    let adapter = d.join("adapter");
    ok(&tern(&[
        "job",
        "fetch",
        &id,
        "--data-dir",
        c_s,
        "--out",
        adapter.to_str().unwrap(),
    ]));
    assert!(adapter.join("adapter_model.safetensors").exists());
    // Cancelling a job the daemon does not hold says so.
    fails_with(
        &tern(&["job", "cancel", &"0".repeat(64), "--data-dir", c_s]),
        "no daemon job",
    );
    // Inference goes through the daemon too: computed by the worker,
    // checked by the daemon, with the daemon's key (the CLI starts no node).
    let out = ok(&tern(&[
        "submit",
        "infer",
        "--model",
        m,
        "--prompt",
        "once upon",
        "--max-tokens",
        "5",
        "--data-dir",
        c_s,
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(v["answer"]["tokens"].as_array().unwrap().len(), 5, "{v}");
    assert_eq!(v["answer"]["worker"], status["public_key"], "computed by the worker");
    assert!(v["text"].is_string());
    // The same through a client node of its own, on another directory,
    // gives the same tokens (generation is exact).
    let own = d.join("own");
    let out = ok(&tern(&[
        "submit",
        "infer",
        "--model",
        m,
        "--prompt",
        "once upon",
        "--max-tokens",
        "5",
        "--data-dir",
        own.to_str().unwrap(),
        "--bootstrap",
        &addr,
        "--json",
    ]));
    let alone: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(alone["answer"]["tokens"], v["answer"]["tokens"]);
}
