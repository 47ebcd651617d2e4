//! `tern node`, `tern id`, `tern peers`, `tern status` and `tern blob ...`.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::config::{Config, default_data_dir};
use crate::daemon::control::ControlClient;
use crate::{daemon, identity};

/// Arguments of `tern node`.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// TOML configuration file (every setting has a default).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data directory (key, blobs); overrides the file.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Listen address (repeatable); replaces the configured ones.
    #[arg(long)]
    pub listen: Vec<String>,
    /// Bootstrap peer `/ip4/.../p2p/<id>` (repeatable); added to the configured ones.
    #[arg(long)]
    pub bootstrap: Vec<String>,
    /// Control API address (loopback).
    #[arg(long)]
    pub control: Option<std::net::SocketAddr>,
    /// Turn mDNS discovery off.
    #[arg(long)]
    pub no_mdns: bool,
    /// Print the configuration with every default, as TOML, and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// Where the CLI finds the daemon.
#[derive(Debug, Clone, clap::Args)]
pub struct DataDirArg {
    /// The daemon's data directory.
    #[arg(long, default_value_os_t = default_data_dir())]
    pub data_dir: PathBuf,
}

/// `tern blob ...`.
#[derive(Debug, clap::Subcommand)]
pub enum BlobCommand {
    /// Import a file or directory into the node's store (pinned); prints its id.
    Add {
        path: PathBuf,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Fetch a blob from the swarm (verified) and write it to a path.
    Get {
        id: String,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// List the blobs the node holds.
    List {
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Remove blobs that are not pinned.
    Gc {
        #[command(flatten)]
        dir: DataDirArg,
    },
}

/// `tern node`.
pub fn node(args: &NodeArgs) -> Result<()> {
    if args.print_config {
        print!("{}", default_config_toml()?);
        return Ok(());
    }
    let mut config = daemon::load_config(args.config.as_deref())?;
    if let Some(d) = &args.data_dir {
        config.data_dir = d.clone();
    }
    if !args.listen.is_empty() {
        config.listen = args.listen.clone();
    }
    config.bootstrap.extend(args.bootstrap.iter().cloned());
    if let Some(c) = args.control {
        config.control = c;
    }
    if args.no_mdns {
        config.mdns = false;
    }
    config.validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(daemon::run(config, shutdown_signal()))
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// `tern id`: the peer id (creating the key on first use).
pub fn id(dir: &DataDirArg) -> Result<()> {
    let key = identity::load_or_create(&dir.data_dir)?;
    println!("{}", identity::peer_id(&key.public())?);
    Ok(())
}

/// `tern api`.
pub fn api(dir: &DataDirArg) -> Result<()> {
    let c = ControlClient::new(&dir.data_dir)?;
    let (base, token) = c.endpoint();
    println!("export OPENAI_BASE_URL={base}/v1");
    println!("export OPENAI_API_KEY={token}");
    eprintln!(
        "(an OpenAI client reads both from the environment: `eval $(tern api)`; models: curl -H \"Authorization: Bearer $OPENAI_API_KEY\" $OPENAI_BASE_URL/models)"
    );
    if let Ok(public) = std::fs::read_to_string(dir.data_dir.join("api.addr")) {
        eprintln!(
            "(other machines: http://{}/v1 with the same key, this machine's address in place of an unspecified one; the key changes when the daemon restarts)",
            public.trim()
        );
    }
    Ok(())
}

/// `tern dashboard`.
pub fn dashboard(dir: &DataDirArg) -> Result<()> {
    let c = ControlClient::new(&dir.data_dir)?;
    // Asks the daemon, so a stale address or token is an error here
    // rather than a page that cannot log in.
    c.get("/v1/status")?;
    let (base, token) = c.endpoint();
    let address = crate::api::dashboard::address(base, token);
    println!("{address}");
    // Not opened for the user: a browser started with the address would
    // show the key to every local user in its command line.
    eprintln!(
        "(open it in a browser here; the address carries the key in its fragment, which browsers do not send: keep it to yourself)"
    );
    Ok(())
}

/// `tern status`.
pub fn status(dir: &DataDirArg, json: bool) -> Result<()> {
    let s = ControlClient::new(&dir.data_dir)?.get("/v1/status")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let f = |k: &str| {
        s.get(k)
            .map(|v| v.to_string().trim_matches('"').to_string())
            .unwrap_or_default()
    };
    println!("peer id     {}", f("peer_id"));
    println!("version     {}", f("version"));
    println!(
        "connected   {} peers, {} known from adverts (following {} of {} advert shards)",
        f("connected_peers"),
        f("known_peers"),
        f("advert_shards_followed"),
        protocol::shards::SHARDS
    );
    println!("blobs       {} ({} bytes)", f("blobs"), f("blob_bytes"));
    println!("tasks       {} running, on {}", f("active_tasks"), f("compute"));
    println!("power       {}", f("power"));
    println!("nat         {}", f("nat"));
    for r in s.get("relays").and_then(|a| a.as_array()).into_iter().flatten() {
        let how = if r["reserved"] == true {
            "reserved"
        } else {
            "no reservation"
        };
        println!("relay       {how:<14} {}", r["addr"].as_str().unwrap_or_default());
    }
    if let Some(addrs) = s.get("listen_addrs").and_then(|a| a.as_array()) {
        for a in addrs {
            println!("listen      {}", a.as_str().unwrap_or_default());
        }
    }
    for c in s.get("connections").and_then(|a| a.as_array()).into_iter().flatten() {
        let how = if c["relayed"] == true { "relayed" } else { "direct" };
        println!(
            "connection  {how:<7} {} {}",
            c["peer"].as_str().unwrap_or_default(),
            c["addr"].as_str().unwrap_or_default()
        );
    }
    Ok(())
}

/// `tern peers`.
pub fn peers(dir: &DataDirArg, json: bool) -> Result<()> {
    let rows = ControlClient::new(&dir.data_dir)?.get("/v1/peers")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<54} {:>7} {:>9} {:>10} {:>8} {:>6}  gpu (* runs tasks)",
        "peer", "threads", "ram GiB", "Gmac/s", "power", "tasks"
    );
    for r in rows.as_array().into_iter().flatten() {
        let e = &r["entry"];
        let a = &e["advert"];
        let score = a["score"]["macs_per_second"]
            .as_f64()
            .map(|m| format!("{:.1}{}", m / 1e9, if e["score_verified"] == true { "" } else { "?" }));
        let gpu = a["gpus"]
            .as_array()
            .and_then(|g| g.first())
            .map(|g| {
                let name = g["name"].as_str().unwrap_or("?");
                if g["runs_tasks"] == true {
                    format!("{name} *")
                } else {
                    name.to_string()
                }
            })
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<54} {:>7} {:>9.1} {:>10} {:>8} {:>6}  {gpu}",
            r["peer_id"].as_str().unwrap_or_default(),
            a["cpu"]["threads"],
            a["ram_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64,
            score.unwrap_or_else(|| "-".into()),
            if a["availability"]["paused"].as_str().is_some_and(|p| !p.is_empty()) {
                "paused".to_string()
            } else {
                match (a["power"].as_str(), a["availability"]["battery_percent"].as_u64()) {
                    (Some("battery"), Some(b)) if b > 0 => format!("bat {b}%"),
                    (p, _) => p.unwrap_or("?").to_string(),
                }
            },
            format!("{}/{}", a["active_tasks"], a["max_tasks"]),
        );
    }
    Ok(())
}

/// `tern blob ...`.
pub fn blob(cmd: &BlobCommand) -> Result<()> {
    match cmd {
        BlobCommand::Add { path, dir } => {
            let path = std::fs::canonicalize(path).with_context(|| format!("{}", path.display()))?;
            let r = ControlClient::new(&dir.data_dir)?.post_long("/v1/blobs", serde_json::json!({ "path": path }))?;
            println!("{}", r["id"].as_str().unwrap_or_default());
        }
        BlobCommand::Get { id, out, dir } => {
            let c = ControlClient::new(&dir.data_dir)?;
            c.post_long(&format!("/v1/blobs/{id}/fetch"), serde_json::json!({}))?;
            let out = std::path::absolute(out)?;
            c.post_long(&format!("/v1/blobs/{id}/export"), serde_json::json!({ "out": out }))?;
            println!("{}", out.display());
        }
        BlobCommand::List { dir } => {
            for b in ControlClient::new(&dir.data_dir)?
                .get("/v1/blobs")?
                .as_array()
                .into_iter()
                .flatten()
            {
                println!(
                    "{} {:>12}{}",
                    b["id"].as_str().unwrap_or_default(),
                    b["size"],
                    if b["pinned"] == true { "  pinned" } else { "" }
                );
            }
        }
        BlobCommand::Gc { dir } => {
            let r = ControlClient::new(&dir.data_dir)?.post_long("/v1/gc", serde_json::json!({}))?;
            println!(
                "removed {} blobs ({} bytes), kept {}",
                r["removed"], r["bytes"], r["kept"]
            );
        }
    }
    Ok(())
}

/// A configuration with every default, as TOML (for `tern node --print-config`).
pub fn default_config_toml() -> Result<String> {
    Ok(toml::to_string_pretty(&Config::default())?)
}
