//! Usage: `tern --help`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // A closed pipe (`tern ... | head`) ends the process quietly, as for any Unix tool.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Buffers above 1.25 MiB (activations, gradients, logits chunks) are
    // mapped and unmapped on their own. glibc otherwise raises this
    // threshold after the first such free and keeps later ones in its heap,
    // which fragments: training a 2B4T-shaped model peaked at 1.23 GB
    // instead of 0.73 GB. The threshold sits just above the 1 MiB groups a
    // blob transfer moves (several buffers per group, hundreds of groups a
    // second): mapping each of those anew cost 256 page faults and zeroed
    // pages apiece, and with the threshold at exactly 1 MiB a 1 GiB transfer
    // over TCP ran at 261 MB/s instead of 332 MB/s.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, (1 << 20) + (1 << 18));
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = node::cli::Cli::parse();
    match node::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
