//! The local control API (HTTP + JSON on loopback) and the CLI's client.
//!
//! The daemon writes its address to `control.addr` and a random bearer
//! token to `control.token` (0600) in its data directory; the CLI reads both,
//! so only users who can read the data directory control the node.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use protocol::ContentId;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::daemon::shared::Shared;
use crate::identity::write_private;
use crate::job::runner::{Jobs, MAX_SPEC_BYTES, Run};
use crate::job::{JobSpec, JobState};
use crate::net::fetch;

/// How often an event stream with nothing to say sends a heartbeat line.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// How long the CLI waits for a daemon: to connect, for a short answer
/// (status, lists, submissions), for a long one (imports, fetches,
/// inference), and between two lines of an event stream (heartbeats
/// come every [`HEARTBEAT`]).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const SHORT_TIMEOUT: Duration = Duration::from_secs(60);
const LONG_TIMEOUT: Duration = Duration::from_secs(3600);
const STREAM_READ_TIMEOUT: Duration = Duration::from_secs(6 * HEARTBEAT.as_secs());

/// `GET /v1/status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub peer_id: String,
    pub public_key: String,
    pub listen_addrs: Vec<String>,
    pub connected_peers: usize,
    /// Every open connection: the peer, its remote address and whether it
    /// runs through a relay (`relayed`) or directly (a dialled address or a
    /// hole punched by DCUtR).
    #[serde(default)]
    pub connections: Vec<crate::net::ConnectionInfo>,
    /// AutoNAT's verdict on this node's reachability (`public ADDR`,
    /// `private`, `unknown`, `off`).
    #[serde(default)]
    pub nat: String,
    /// The configured relays, and whether each holds our reservation.
    #[serde(default)]
    pub relays: Vec<crate::net::RelayInfo>,
    /// Bytes received and sent over every connection since the start.
    #[serde(default)]
    pub bytes_in: u64,
    #[serde(default)]
    pub bytes_out: u64,
    pub known_peers: usize,
    /// The advert shards this node follows (bit s for shard s; see
    /// `protocol::shards`), and how many.
    #[serde(default)]
    pub advert_shards: u64,
    #[serde(default)]
    pub advert_shards_followed: u8,
    pub blobs: usize,
    pub blob_bytes: u64,
    pub active_tasks: u32,
    /// Where tasks run: `cpu/avx512-vnni/8t`, `wgpu/vulkan/...`.
    pub compute: String,
    /// The power source and policy in words (`battery 57%, stops below
    /// 40%`, `paused: too hot: ...`).
    pub power: String,
    /// Why the worker takes no task now (the power policy); absent while
    /// it works.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<String>,
    /// The tasks this node runs for others now.
    #[serde(default)]
    pub tasks: Vec<crate::task::executor::RunningTask>,
    pub stats: serde_json::Value,
}

/// `POST /v1/blobs` body.
#[derive(Debug, Serialize, Deserialize)]
pub struct AddBlob {
    pub path: PathBuf,
}

/// `POST /v1/blobs/{id}/export` body.
#[derive(Debug, Serialize, Deserialize)]
pub struct Export {
    pub out: PathBuf,
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("{e:#}"))
    }
}

type ApiResult<T> = std::result::Result<Json<T>, ApiError>;

#[derive(Clone)]
struct Api {
    shared: Arc<Shared>,
    jobs: Jobs,
    token: Arc<String>,
}

fn authorize(api: &Api, headers: &HeaderMap) -> std::result::Result<(), ApiError> {
    if crate::api::bearer_is(headers, &api.token) {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong control token".into(),
        ))
    }
}

fn parse_id(s: &str) -> std::result::Result<ContentId, ApiError> {
    s.parse()
        .map_err(|e: protocol::Error| ApiError(StatusCode::BAD_REQUEST, e.to_string()))
}

/// Starts the API; returns its address and task.
pub async fn serve(
    shared: Arc<Shared>,
    jobs: Jobs,
    mut stop: watch::Receiver<bool>,
) -> Result<(SocketAddr, JoinHandle<()>)> {
    let want = shared.config.control;
    let listener = match tokio::net::TcpListener::bind(want).await {
        Ok(l) => l,
        // The default port is taken (another daemon, with its own data
        // directory): take a free one. The CLI finds it in `control.addr`.
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && want == crate::config::Config::default().control => {
            let any = SocketAddr::new(want.ip(), 0);
            tracing::info!("the control port {want} is taken; using a free one");
            tokio::net::TcpListener::bind(any)
                .await
                .with_context(|| format!("binding the control API on {any}"))?
        }
        Err(e) => return Err(e).with_context(|| format!("binding the control API on {want}")),
    };
    let addr = listener.local_addr()?;
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow!("the OS random generator: {e}"))?;
    // 64 hexadecimal digits, spelled as a content id spells its bytes.
    let token = ContentId::from_bytes(secret).to_string();
    let dir = &shared.config.data_dir;
    write_private(&dir.join("control.token"), token.as_bytes())?;
    write_private(&dir.join("control.addr"), addr.to_string().as_bytes())?;
    let token = Arc::new(token);
    let openai = crate::api::openai::OpenAi::new(shared.clone(), token.clone());
    let public = match shared.config.api_listen {
        Some(at) => {
            let l = tokio::net::TcpListener::bind(at)
                .await
                .with_context(|| format!("binding the OpenAI API on {at} (api_listen)"))?;
            let bound = l.local_addr()?;
            write_private(&dir.join("api.addr"), bound.to_string().as_bytes())?;
            tracing::info!("the OpenAI API also listens on {bound} (api_listen; the key is required)");
            Some((l, openai.router(false)))
        }
        None => {
            let _ = std::fs::remove_file(dir.join("api.addr"));
            None
        }
    };
    let openai = openai.router(true);
    let api = Api { shared, jobs, token };
    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/peers", get(peers))
        .route("/v1/blobs", get(list_blobs).post(add_blob))
        .route("/v1/blobs/{id}/fetch", post(fetch_blob))
        .route("/v1/blobs/{id}/export", post(export_blob))
        .route("/v1/gc", post(gc))
        .route("/v1/jobs", get(list_jobs))
        .route("/v1/jobs/{id}", get(job_status))
        .route("/v1/jobs/{id}/events", get(job_events))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/infer", post(infer))
        .route("/v1/dashboard", get(dashboard))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .route(
            "/v1/jobs",
            post(submit_job).layer(axum::extract::DefaultBodyLimit::max(MAX_SPEC_BYTES)),
        )
        .with_state(api)
        .merge(openai)
        .merge(crate::api::dashboard::router())
        // Every route: a Host (and Origin) that names this machine, so a
        // page on another name that resolves here (DNS rebinding) cannot
        // use the node even where it needs no key.
        .layer(axum::middleware::from_fn(loopback_names_only));
    let task = tokio::spawn(async move {
        let mut stop2 = stop.clone();
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let control = async move {
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                tracing::error!("control API: {e}");
            }
        };
        let public = async move {
            if let Some((l, router)) = public {
                let shutdown = async move {
                    let _ = stop2.wait_for(|s| *s).await;
                };
                if let Err(e) = axum::serve(l, router).with_graceful_shutdown(shutdown).await {
                    tracing::error!("OpenAI API on api_listen: {e}");
                }
            }
        };
        tokio::join!(control, public);
    });
    Ok((addr, task))
}

async fn loopback_names_only(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match crate::api::openai::local_host(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/dashboard`: what the web dashboard shows, in one answer.
async fn dashboard(State(api): State<Api>, headers: HeaderMap) -> ApiResult<crate::api::dashboard::View> {
    authorize(&api, &headers)?;
    let info = api.shared.net.info().await?;
    Ok(Json(crate::api::dashboard::view(
        &api.shared,
        &api.jobs,
        info,
        crate::clock::now_ms(),
    )))
}

async fn status(State(api): State<Api>, headers: HeaderMap) -> ApiResult<Status> {
    authorize(&api, &headers)?;
    let s = &api.shared;
    let info = s.net.info().await?;
    let blobs = s.store.list();
    let known = s.peer_entries().len();
    let followed = s.follow.lock().followed();
    Ok(Json(Status {
        version: env!("CARGO_PKG_VERSION").into(),
        peer_id: info.peer_id,
        public_key: s.key.public().to_string(),
        listen_addrs: info.listen_addrs,
        connected_peers: info.connected.len(),
        connections: info.connections,
        nat: info.nat,
        relays: info.relays,
        bytes_in: info.bytes_in,
        bytes_out: info.bytes_out,
        known_peers: known,
        advert_shards: followed.0,
        advert_shards_followed: followed.len(),
        blobs: blobs.len(),
        blob_bytes: blobs.iter().map(|b| b.1).sum(),
        active_tasks: s.worker.active_tasks.load(std::sync::atomic::Ordering::Relaxed),
        compute: s.backend.name(),
        power: {
            let (power, a) = &*s.availability.lock();
            a.describe(*power)
        },
        paused: s.worker.paused.borrow().clone(),
        tasks: s.worker.running.lock().values().cloned().collect(),
        stats: serde_json::to_value(s.stats.lock().clone()).unwrap_or_default(),
    }))
}

async fn peers(State(api): State<Api>, headers: HeaderMap) -> ApiResult<serde_json::Value> {
    authorize(&api, &headers)?;
    let rows: Vec<_> = api
        .shared
        .peer_entries()
        .into_iter()
        .map(|(k, e)| {
            serde_json::json!({
                "public_key": k,
                "peer_id": crate::identity::peer_id(&k).map(|p| p.to_string()).unwrap_or_default(),
                "entry": e,
            })
        })
        .collect();
    Ok(Json(serde_json::Value::Array(rows)))
}

async fn list_blobs(State(api): State<Api>, headers: HeaderMap) -> ApiResult<serde_json::Value> {
    authorize(&api, &headers)?;
    let pins = api.shared.store.pins();
    let rows: Vec<_> = api
        .shared
        .store
        .list()
        .into_iter()
        .map(|(id, size)| serde_json::json!({ "id": id, "size": size, "pinned": pins.contains(&id) }))
        .collect();
    Ok(Json(serde_json::Value::Array(rows)))
}

async fn add_blob(
    State(api): State<Api>,
    headers: HeaderMap,
    Json(req): Json<AddBlob>,
) -> ApiResult<crate::store::Imported> {
    authorize(&api, &headers)?;
    let store = api.shared.store.clone();
    let imported = tokio::task::spawn_blocking(move || {
        let i = store.import(&req.path)?;
        store.pin(&i.id)?;
        anyhow::Ok(i)
    })
    .await
    .map_err(|e| anyhow!("import: {e}"))??;
    api.shared.net.provide(imported.id.as_bytes().to_vec()).await;
    Ok(Json(imported))
}

async fn fetch_blob(
    State(api): State<Api>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<serde_json::Value> {
    authorize(&api, &headers)?;
    let id = parse_id(&id)?;
    fetch::fetch(&api.shared.blobs, &id, &[]).await?;
    // A directory manifest brings its files along.
    if let Some(size) = api.shared.store.size(&id)
        && size <= 16 << 20
        && let Ok(m) = protocol::DirManifest::decode(&api.shared.store.read(&id)?)
    {
        for e in m.entries() {
            fetch::fetch(&api.shared.blobs, &e.id, &[])
                .await
                .with_context(|| format!("fetching {}", e.path))?;
        }
    }
    api.shared.net.provide(id.as_bytes().to_vec()).await;
    Ok(Json(
        serde_json::json!({ "id": id, "size": api.shared.store.size(&id) }),
    ))
}

async fn export_blob(
    State(api): State<Api>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    Json(req): Json<Export>,
) -> ApiResult<serde_json::Value> {
    authorize(&api, &headers)?;
    let id = parse_id(&id)?;
    let store = api.shared.store.clone();
    let out = req.out.clone();
    tokio::task::spawn_blocking(move || store.export(&id, &out))
        .await
        .map_err(|e| anyhow!("export: {e}"))??;
    Ok(Json(serde_json::json!({ "id": id, "out": req.out })))
}

/// `POST /v1/jobs`: runs a fine-tune in the daemon (resumes it when it
/// ran before). Its inputs must be in the store or fetchable.
async fn submit_job(
    State(api): State<Api>,
    headers: HeaderMap,
    Json(spec): Json<JobSpec>,
) -> ApiResult<serde_json::Value> {
    authorize(&api, &headers)?;
    let id = api.jobs.submit(spec)?;
    Ok(Json(serde_json::json!({ "job": id })))
}

/// `GET /v1/jobs`.
async fn list_jobs(State(api): State<Api>, headers: HeaderMap) -> ApiResult<serde_json::Value> {
    authorize(&api, &headers)?;
    let dir = &api.shared.config.data_dir;
    let rows = api
        .jobs
        .list()
        .into_iter()
        .map(|(id, run)| {
            let s = JobState::load(dir, &id).ok();
            serde_json::json!({
                "job": id,
                "status": run,
                "round": s.as_ref().map(|s| s.round),
                "rounds": s.as_ref().map(|s| s.spec.rounds),
                "accepted": s.as_ref().map(|s| s.accepted.len()),
                "adapter": s.as_ref().map(JobState::result),
            })
        })
        .collect();
    Ok(Json(serde_json::Value::Array(rows)))
}

/// `GET /v1/jobs/{id}`: where it stands and its state.
async fn job_status(
    State(api): State<Api>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<serde_json::Value> {
    authorize(&api, &headers)?;
    let id = parse_id(&id)?;
    let run = api.jobs.run_of(&id);
    let state = JobState::load(&api.shared.config.data_dir, &id)
        .ok()
        .map(JobState::shown);
    if run.is_none() && state.is_none() {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no job {id}")));
    }
    Ok(Json(serde_json::json!({ "status": run, "state": state })))
}

/// `GET /v1/jobs/{id}/events`: the job's events as JSON lines while it
/// runs; the stream ends with the job.
async fn job_events(
    State(api): State<Api>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> std::result::Result<Response, ApiError> {
    authorize(&api, &headers)?;
    let id = parse_id(&id)?;
    let Some(rx) = api.jobs.subscribe(&id) else {
        return Err(match api.jobs.run_of(&id) {
            Some(run) => ApiError(StatusCode::CONFLICT, format!("job {id} is not running: {run:?}")),
            None => ApiError(StatusCode::NOT_FOUND, format!("no job {id} runs here")),
        });
    };
    let lines = futures::stream::unfold(rx, |mut rx| async move {
        use tokio::sync::broadcast::error::RecvError;
        // A quiet job (a long round) still sends a line now and then, so a
        // watcher tells a daemon that stopped answering from one at work.
        let line = match tokio::time::timeout(HEARTBEAT, rx.recv()).await {
            Err(_) => serde_json::json!({ "event": "heartbeat" }).to_string(),
            Ok(Ok(e)) => serde_json::to_string(&e).unwrap_or_default(),
            Ok(Err(RecvError::Lagged(n))) => serde_json::json!({ "event": "lagged", "missed": n }).to_string(),
            Ok(Err(RecvError::Closed)) => return None,
        };
        Some((Ok::<_, std::convert::Infallible>(format!("{line}\n")), rx))
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response())
}

/// `POST /v1/infer`: a generation computed by a capable peer and checked
/// here ([`crate::job::infer::infer`]), as `tern submit infer` asks.
#[derive(Debug, Deserialize)]
struct InferRequest {
    model: ContentId,
    prompt: String,
    #[serde(default = "default_max_tokens")]
    max_tokens: u32,
    /// 0 is greedy.
    #[serde(default)]
    temperature: f32,
    #[serde(default)]
    top_k: u32,
    #[serde(default = "one")]
    top_p: f32,
    #[serde(default)]
    seed: u64,
}

fn default_max_tokens() -> u32 {
    32
}

fn one() -> f32 {
    1.0
}

async fn infer(
    State(api): State<Api>,
    headers: HeaderMap,
    Json(req): Json<InferRequest>,
) -> ApiResult<serde_json::Value> {
    authorize(&api, &headers)?;
    let client = api.shared.client.clone();
    let model = req.model;
    if !client.blobs.store.has(&model) {
        fetch::fetch(&client.blobs, &model, &[])
            .await
            .with_context(|| format!("model {model}: nobody holds it"))?;
    }
    let path = client.blobs.store.path(&model);
    let prompt_text = req.prompt.clone();
    let (tok, prompt) = tokio::task::spawn_blocking(move || {
        let tok = kernels::model::load(&path)
            .context("the model blob is not a model")?
            .tokenizer;
        let prompt = tok.encode(&prompt_text, true)?;
        anyhow::Ok((tok, prompt))
    })
    .await
    .map_err(|e| anyhow!("tokenizing: {e}"))??;
    let sampling = protocol::Sampling {
        temperature: req.temperature,
        top_k: req.top_k,
        top_p: req.top_p,
        seed: req.seed,
    };
    let say = |m: &str| tracing::info!(%model, "infer: {m}");
    let answer = crate::job::infer::infer(&client, model, prompt, req.max_tokens, sampling, &say).await?;
    let text = tok.decode(&answer.tokens, true).map_err(anyhow::Error::from)?;
    Ok(Json(serde_json::json!({ "text": text, "answer": answer })))
}

/// `POST /v1/jobs/{id}/cancel`: stops the job; it is not resumed.
async fn cancel_job(
    State(api): State<Api>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<serde_json::Value> {
    authorize(&api, &headers)?;
    let id = parse_id(&id)?;
    api.jobs.cancel(&id)?;
    Ok(Json(serde_json::json!({ "job": id, "status": Run::Cancelled })))
}

async fn gc(State(api): State<Api>, headers: HeaderMap) -> ApiResult<crate::store::GcReport> {
    authorize(&api, &headers)?;
    let store = api.shared.store.clone();
    Ok(Json(
        tokio::task::spawn_blocking(move || store.gc())
            .await
            .map_err(|e| anyhow!("gc: {e}"))??,
    ))
}

/// The CLI's side: reads the address and token from the data directory.
#[derive(Debug)]
pub struct ControlClient {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl ControlClient {
    /// Connects to the daemon whose data directory is `data_dir`.
    pub fn new(data_dir: &Path) -> Result<Self> {
        let read = |f: &str| {
            std::fs::read_to_string(data_dir.join(f)).with_context(|| {
                format!(
                    "reading {} (is `tern node` running with --data-dir {}?)",
                    data_dir.join(f).display(),
                    data_dir.display()
                )
            })
        };
        let addr = read("control.addr")?;
        let token = read("control.token")?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_send_request(Some(SHORT_TIMEOUT))
            .timeout_recv_response(Some(LONG_TIMEOUT))
            .build()
            .into();
        Ok(Self {
            base: format!("http://{}", addr.trim()),
            token: token.trim().to_string(),
            agent,
        })
    }

    /// The daemon's base URL (`http://127.0.0.1:PORT`) and its token.
    pub fn endpoint(&self) -> (&str, &str) {
        (&self.base, &self.token)
    }

    fn finish(
        &self,
        resp: std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<serde_json::Value> {
        let mut resp =
            resp.with_context(|| format!("the daemon at {} does not answer; is `tern node` running?", self.base))?;
        let status = resp.status();
        let body: serde_json::Value = resp.body_mut().read_json().unwrap_or_default();
        if !status.is_success() {
            bail!(
                "{}",
                body.get("error").and_then(|e| e.as_str()).unwrap_or(status.as_str())
            );
        }
        Ok(body)
    }

    /// An authorized `GET` of a path.
    fn get_request(&self, path: &str) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        self.agent
            .get(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {}", self.token))
    }

    /// `GET` a path: a short answer.
    pub fn get(&self, path: &str) -> Result<serde_json::Value> {
        let r = self
            .get_request(path)
            .config()
            .timeout_global(Some(SHORT_TIMEOUT))
            .build()
            .call();
        self.finish(r)
    }

    /// `GET` a stream of JSON lines from a path, calling `each` on every
    /// line until it returns false or the stream ends.
    pub fn stream(&self, path: &str, mut each: impl FnMut(serde_json::Value) -> bool) -> Result<()> {
        use std::io::BufRead as _;
        let req = self
            .get_request(path)
            .config()
            .timeout_recv_response(Some(SHORT_TIMEOUT))
            .timeout_recv_body(None)
            .timeout_per_read(Some(STREAM_READ_TIMEOUT))
            .build();
        let resp = match req.call() {
            Ok(r) if r.status().is_success() => r,
            // No answer, or an error the daemon explains.
            other => return self.finish(other).map(drop),
        };
        let reader = std::io::BufReader::new(resp.into_body().into_reader());
        for line in reader.lines() {
            let line = line.context("reading the daemon's stream")?;
            if line.is_empty() {
                continue;
            }
            let v = serde_json::from_str(&line).with_context(|| format!("a line from the daemon: {line:?}"))?;
            if !each(v) {
                break;
            }
        }
        Ok(())
    }

    /// `POST` JSON to a path: a submission or a cancellation, answered
    /// at once.
    pub fn post(&self, path: &str, body: serde_json::Value) -> Result<serde_json::Value> {
        self.post_within(path, body, SHORT_TIMEOUT)
    }

    /// `POST` JSON to a path whose answer may take long: an import, a
    /// fetch, an inference.
    pub fn post_long(&self, path: &str, body: serde_json::Value) -> Result<serde_json::Value> {
        self.post_within(path, body, LONG_TIMEOUT)
    }

    fn post_within(&self, path: &str, body: serde_json::Value, within: Duration) -> Result<serde_json::Value> {
        let r = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {}", self.token))
            .config()
            .timeout_global(Some(within))
            .build()
            .send_json(body);
        self.finish(r)
    }
}
