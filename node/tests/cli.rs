//! The `tern` binary as a user runs it.

use std::process::Command;

fn tern(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .output()
        .expect("run tern")
}

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
