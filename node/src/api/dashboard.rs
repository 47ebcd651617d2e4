//! The web dashboard: a page the daemon serves at `/` (its assets are
//! compiled into the binary), and the one JSON view it polls,
//! `GET /v1/dashboard`, which the control API serves with its key.
//!
//! The page holds no secret of its own: `tern dashboard` prints the
//! address with the control token in the URL's fragment (`#token=...`),
//! which browsers never send to a server; the page moves it to the tab's
//! session storage, drops it from the address bar and sends it as the
//! bearer key, as any API client does. Everything it shows comes from the
//! control and OpenAI APIs.

use std::collections::BTreeMap;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use protocol::{ContentId, PublicKey};
use protocol::{PeerEntry, Power};
use serde::{Deserialize, Serialize};

use crate::daemon::shared::Shared;
use crate::job::JobState;
use crate::job::runner::{Jobs, Run};
use crate::net::{ConnectionInfo, NetInfo};
use crate::task::executor::RunningTask;

const INDEX: &str = include_str!("dashboard/index.html");
const APP: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/style.css");

/// Scripts and styles from this origin only, no inline script, no frames:
/// a page that shows peers' strings (model names, pause reasons) must not
/// run them.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page and its assets. They need no key (they hold nothing); the
/// control router they are merged into checks the Host and Origin, as
/// for every route.
pub fn router() -> Router {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route(
            "/dashboard/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP) }),
        )
        .route(
            "/dashboard/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(kind)),
            (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY)),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response()
}

/// The address `tern dashboard` prints: the page, with the key in the
/// fragment.
pub fn address(base: &str, token: &str) -> String {
    format!("{}/#token={token}", base.trim_end_matches('/'))
}

/// `GET /v1/dashboard`: everything the page shows but a job's detail
/// (`GET /v1/jobs/{id}`) and the models (`GET /v1/models`).
#[derive(Debug, Serialize, Deserialize)]
pub struct View {
    pub node: NodeView,
    /// Peers whose adverts this node holds, best score first.
    pub peers: Vec<PeerView>,
    /// Tasks this node runs for others now.
    pub tasks: Vec<RunningTask>,
    /// Jobs this daemon runs or ran, newest first.
    pub jobs: Vec<JobView>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NodeView {
    pub version: String,
    pub peer_id: String,
    pub public_key: String,
    pub compute: String,
    pub power: String,
    pub paused: Option<String>,
    pub nat: String,
    pub connected_peers: usize,
    pub relayed_connections: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub blobs: usize,
    pub blob_bytes: u64,
    pub listen_addrs: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PeerView {
    pub public_key: PublicKey,
    pub peer_id: String,
    pub version: String,
    /// `x86_64, 8 threads (avx2, avx512-vnni), 31.2 GiB`.
    pub hardware: String,
    /// Where it runs tasks: its CPU, or the GPU that `runs_tasks`.
    pub runs_on: String,
    /// Ternary multiply-accumulates per second it claims, and whether
    /// this node recomputed its benchmark hash and found it right.
    pub macs_per_second: Option<u64>,
    pub score_verified: bool,
    /// `mains`, `battery 57%, stops below 40%`, `paused: ...`.
    pub power: String,
    pub paused: bool,
    pub active_tasks: u32,
    pub max_tasks: u32,
    pub models: usize,
    /// `this node`, `direct`, `relayed`, or `not connected`.
    pub link: String,
    /// The connection's remote address, when connected.
    pub addr: Option<String>,
    /// Seconds until its advert expires.
    pub expires_in_secs: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JobView {
    pub job: ContentId,
    pub status: Run,
    pub created_ms: Option<u64>,
    /// Rounds done, of how many.
    pub round: Option<u32>,
    pub rounds: Option<u32>,
    /// Shards accepted in the running round, of how many.
    pub accepted: Option<usize>,
    pub shards: Option<u32>,
    pub last_loss: Option<f64>,
    pub last_eval_loss: Option<f64>,
    pub verdicts: usize,
    pub adapter: Option<ContentId>,
}

/// Builds the view.
pub fn view(shared: &Shared, jobs: &Jobs, info: NetInfo, now_ms: u64) -> View {
    let blobs = shared.store.list();
    let links: BTreeMap<&str, &ConnectionInfo> = info
        .connections
        .iter()
        // A direct connection is the one to show when a relayed one exists too.
        .fold(BTreeMap::new(), |mut m, c| {
            let e = m.entry(c.peer.as_str()).or_insert(c);
            if e.relayed && !c.relayed {
                *e = c;
            }
            m
        });
    let mut peers: Vec<PeerView> = shared
        .peer_entries()
        .into_iter()
        .map(|(k, e)| peer_view(k, &e, &links, now_ms, k == shared.key.public()))
        .collect();
    peers.sort_by(|a, b| {
        (b.score_verified, b.macs_per_second, &a.peer_id).cmp(&(a.score_verified, a.macs_per_second, &b.peer_id))
    });
    let dir = &shared.config.data_dir;
    let mut jobs: Vec<JobView> = jobs
        .list()
        .into_iter()
        .map(|(id, status)| job_view(id, status, JobState::load(dir, &id).ok()))
        .collect();
    jobs.sort_by_key(|j| std::cmp::Reverse(j.created_ms));
    let (power, availability) = &*shared.availability.lock();
    View {
        node: NodeView {
            version: env!("CARGO_PKG_VERSION").into(),
            peer_id: info.peer_id,
            public_key: shared.key.public().to_string(),
            compute: shared.backend.name(),
            power: availability.describe(*power),
            paused: shared.worker.paused.borrow().clone(),
            nat: info.nat,
            connected_peers: info.connected.len(),
            relayed_connections: info.connections.iter().filter(|c| c.relayed).count(),
            bytes_in: info.bytes_in,
            bytes_out: info.bytes_out,
            blobs: blobs.len(),
            blob_bytes: blobs.iter().map(|b| b.1).sum(),
            listen_addrs: info.listen_addrs,
        },
        peers,
        tasks: shared.worker.running.lock().values().cloned().collect(),
        jobs,
    }
}

fn peer_view(
    key: PublicKey,
    e: &PeerEntry,
    links: &BTreeMap<&str, &ConnectionInfo>,
    now_ms: u64,
    this_node: bool,
) -> PeerView {
    let a = &e.advert;
    let peer_id = crate::identity::peer_id(&key)
        .map(|p| p.to_string())
        .unwrap_or_default();
    let features = if a.cpu.features.is_empty() {
        String::new()
    } else {
        format!(" ({})", a.cpu.features.join(", "))
    };
    let mut hardware = format!(
        "{}, {} threads{features}, {:.1} GiB",
        a.cpu.arch,
        a.cpu.threads,
        a.ram_bytes as f64 / f64::from(1u32 << 30)
    );
    for g in &a.gpus {
        hardware.push_str(&format!("; {} ({})", g.name, g.api));
    }
    let runs_on = a
        .gpus
        .iter()
        .find(|g| g.runs_tasks)
        .map_or_else(|| "cpu".to_owned(), |g| format!("gpu: {}", g.name));
    let link = links.get(peer_id.as_str());
    PeerView {
        public_key: key,
        version: a.version.clone(),
        hardware,
        runs_on,
        macs_per_second: a.score.as_ref().map(|s| s.macs_per_second),
        score_verified: e.score_verified,
        power: a.availability.describe(a.power),
        paused: !a.availability.paused.is_empty()
            || (a.power == Power::Battery && a.availability.headroom(a.power) == 0),
        active_tasks: a.active_tasks,
        max_tasks: a.max_tasks,
        models: a.models.len(),
        link: match link {
            _ if this_node => "this node",
            Some(c) if c.relayed => "relayed",
            Some(_) => "direct",
            None => "not connected",
        }
        .into(),
        addr: link.map(|c| c.addr.clone()),
        expires_in_secs: e.expires_at_ms.saturating_sub(now_ms) / 1000,
        peer_id,
    }
}

fn job_view(job: ContentId, status: Run, state: Option<JobState>) -> JobView {
    let s = state.as_ref();
    let last = s.and_then(|s| s.rounds.last());
    JobView {
        job,
        status,
        created_ms: s.map(|s| s.created_ms),
        round: s.map(|s| s.round),
        rounds: s.map(|s| s.spec.rounds),
        accepted: s.map(|s| s.accepted.len()),
        shards: s.map(|s| s.spec.shards.len() as u32),
        last_loss: last.map(|r| r.loss),
        last_eval_loss: last.and_then(|r| r.eval_loss),
        verdicts: s.map_or(0, |s| s.verdicts.len()),
        adapter: s.map(JobState::result),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_travels_in_the_fragment_only() {
        let a = address("http://127.0.0.1:7447/", "abc");
        assert_eq!(a, "http://127.0.0.1:7447/#token=abc");
        let (before, _) = a.split_once('#').unwrap();
        assert!(!before.contains("abc"), "a browser sends everything before '#'");
    }

    #[test]
    fn the_page_loads_only_its_own_scripts() {
        // No inline script: the policy would block it.
        for tag in INDEX.split("<script").skip(1) {
            assert!(
                tag.trim_start().starts_with("src=\"/dashboard/"),
                "inline or foreign script: {tag}"
            );
        }
        assert!(INDEX.contains("/dashboard/app.js") && INDEX.contains("/dashboard/style.css"));
        assert!(
            !APP.contains("innerHTML"),
            "text from peers goes in as text, never as markup"
        );
    }
}
