//! The `tern` binary as a user runs it.

mod common;

use common::{fails_with, ok, tempdir, tern};

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
    let hf = d.join("tiny");
    let hf_s = hf.to_str().unwrap();
    ok(&tern(&[
        "model", "init", "--preset", "tiny", "--seed", "3", "--out", hf_s,
    ]));
    let inspect: serde_json::Value = serde_json::from_str(&ok(&tern(&["model", "inspect", hf_s, "--json"]))).unwrap();
    assert_eq!(inspect["format"], "hf-packed");
    assert_eq!(inspect["architecture"]["hidden_size"], 256);
    let id = inspect["model_id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 64);
    // The same seed writes the same model: the same id.
    let again = d.join("again");
    ok(&tern(&[
        "model",
        "init",
        "--preset",
        "tiny",
        "--seed",
        "3",
        "--out",
        again.to_str().unwrap(),
    ]));
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
