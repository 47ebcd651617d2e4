//! `tern finetune`, `--adapter` and `tern adapter merge` as a user runs them.

mod common;

use std::path::Path;
use std::process::Output;

use common::{fails_with, init, ok, tempdir, tern};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The final JSON summary line of `tern finetune --json`.
fn summary(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// `tern finetune` on the built-in task with small defaults; `extra` adds
/// flags or overrides a default.
fn finetune(model: &Path, out: &Path, extra: &[&str]) -> Output {
    let defaults = [
        ("--lr", "5e-3"),
        ("--steps", "8"),
        ("--batch", "2"),
        ("--seq-len", "64"),
    ];
    let mut args = vec![
        "finetune",
        "--model",
        s(model),
        "--data",
        "synthetic",
        "--out",
        s(out),
        "--json",
    ];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    tern(&args)
}

#[test]
fn finetune_writes_every_output_and_is_reproducible_across_thread_counts() {
    let d = tempdir("repro");
    let m = init(&d, "m", "1");
    let a = summary(&ok(&finetune(
        &m,
        &d.join("a"),
        &["--threads", "1", "--dropout", "0.1"],
    )));
    let b = summary(&ok(&finetune(
        &m,
        &d.join("b"),
        &["--threads", "2", "--dropout", "0.1"],
    )));
    assert_eq!(
        a["adapter_id"], b["adapter_id"],
        "same seed, same adapter, any thread count"
    );
    assert!(a["eval_loss_end"].as_f64().unwrap() < a["eval_loss_start"].as_f64().unwrap());
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "adapter.gguf",
        "loss.svg",
        "summary.json",
    ] {
        assert!(d.join("a").join(f).is_file(), "{f}");
    }
    let c = summary(&ok(&finetune(&m, &d.join("c"), &["--seed", "9", "--dropout", "0.1"])));
    assert_ne!(a["adapter_id"], c["adapter_id"]);

    // Interrupted after 3 steps and resumed: the same adapter as one straight run.
    let r = d.join("r");
    ok(&finetune(
        &m,
        &r,
        &["--stop-after", "3", "--checkpoint-every", "0", "--dropout", "0.1"],
    ));
    let resumed = summary(&ok(&finetune(&m, &r, &["--resume", "--dropout", "0.1"])));
    assert_eq!(resumed["resumed_from_step"], 3);
    assert_eq!(resumed["adapter_id"], a["adapter_id"]);
    // Resuming with other settings is refused.
    fails_with(&finetune(&m, &r, &["--resume", "--lr", "1e-3"]), "other settings");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn adapters_change_generation_load_in_eval_merge_and_refuse_other_models() {
    let d = tempdir("use");
    let m = init(&d, "m", "1");
    let out = d.join("run");
    let data = d.join("pairs.jsonl");
    let pairs = [("ping", " pong"), ("sky", " blue"), ("two plus two", " four")];
    let lines: String = (0..8)
        .flat_map(|_| pairs.iter())
        .map(|(p, c)| format!("{}\n", serde_json::json!({"prompt": p, "completion": c})))
        .collect();
    std::fs::write(&data, lines).unwrap();
    ok(&tern(&[
        "finetune",
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--lr",
        "5e-3",
        "--steps",
        "40",
        "--batch",
        "2",
        "--json",
    ]));
    let text = d.join("t.txt");
    std::fs::write(&text, "the swarm checks results by hash, bit for bit").unwrap();
    let generate = |prompt: &str, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            s(&m),
            "--prompt",
            prompt,
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "--json",
        ];
        args.extend_from_slice(extra);
        let v: serde_json::Value = serde_json::from_str(&ok(&tern(&args))).unwrap();
        (v["tokens"].clone(), v["text"].as_str().unwrap().to_string())
    };
    for (prompt, completion) in pairs {
        let (_, before) = generate(prompt, &[]);
        assert!(
            !before.starts_with(completion),
            "the base model already says {before:?}"
        );
        let (tokens, after) = generate(prompt, &["--adapter", s(&out)]);
        assert!(
            after.starts_with(completion),
            "{prompt:?} -> {after:?}, expected {completion:?}"
        );
        assert_eq!(tokens, generate(prompt, &["--adapter", s(&out.join("adapter.gguf"))]).0);
    }
    let eval = |extra: &[&str]| {
        let mut args = vec!["eval", "--model", s(&m), "--text", s(&text), "--json"];
        args.extend_from_slice(extra);
        let v: serde_json::Value = serde_json::from_str(&ok(&tern(&args))).unwrap();
        v["mean_nll"].as_f64().unwrap()
    };
    assert_ne!(eval(&[]), eval(&["--adapter", s(&out)]));

    let merged = d.join("merged");
    ok(&tern(&[
        "adapter",
        "merge",
        "--model",
        s(&m),
        "--adapter",
        s(&out),
        "--out",
        s(&merged),
    ]));
    assert!(eval(&[]).is_finite());
    let v: serde_json::Value = serde_json::from_str(&ok(&tern(&[
        "eval",
        "--model",
        s(&merged),
        "--text",
        s(&text),
        "--json",
    ])))
    .unwrap();
    assert!(v["mean_nll"].as_f64().unwrap().is_finite());

    // Same shapes, other weights: refused by the base model's content id.
    let other = init(&d, "other", "2");
    let e = tern(&["generate", "--model", s(&other), "--prompt", "hi", "--adapter", s(&out)]);
    fails_with(&e, "was trained on model");
    // Other shapes: refused by shape.
    let small = d.join("small");
    ok(&tern(&["model", "init", "--preset", "small", "--out", s(&small)]));
    fails_with(
        &tern(&["eval", "--model", s(&small), "--text", s(&text), "--adapter", s(&out)]),
        "shape",
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn bad_training_data_is_reported_by_line() {
    let d = tempdir("bad");
    let m = init(&d, "m", "1");
    let data = d.join("d.jsonl");
    std::fs::write(&data, "{\"text\": \"fine\"}\n{\"text\": 3}\n{oops\n").unwrap();
    let out = tern(&[
        "finetune",
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--out",
        s(&d.join("o")),
    ]);
    fails_with(&out, "d.jsonl:2");
    fails_with(&out, "line 3");
    let missing = tern(&[
        "finetune",
        "--model",
        s(&m),
        "--data",
        s(&d.join("nope.txt")),
        "--out",
        s(&d.join("o")),
    ]);
    fails_with(&missing, "nope.txt");
    // A learning rate that makes the loss blow up stops with a clear message.
    let wild = finetune(
        &m,
        &d.join("w"),
        &[
            "--lr",
            "1e30",
            "--max-grad-norm",
            "0",
            "--steps",
            "30",
            "--checkpoint-every",
            "1",
        ],
    );
    fails_with(&wild, "diverged");
    fails_with(&wild, "last good checkpoint");
    std::fs::remove_dir_all(&d).unwrap();
}
