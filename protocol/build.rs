//! Generates the wire types from `proto/` with prost, compiling the `.proto`
//! files with the pure-Rust `protox` so that no `protoc` is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let files =
        ["envelope", "advert", "task", "blob", "train"].map(|f| root.join("tern/v1").join(format!("{f}.proto")));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let descriptors = protox::compile(&files, [&root])?;
    prost_build::Config::new()
        // A blob group (1 MiB) decodes as a slice of the received frame
        // rather than a copy of it.
        .bytes([".tern.v1.BlobResponse"])
        .compile_fds(descriptors)?;
    Ok(())
}
