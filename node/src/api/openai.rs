//! The OpenAI-compatible API, served by the daemon beside its control API
//! (same address and port; the control token is the API key), and, with
//! `api_listen`, alone on an address other machines reach (the key
//! required on every route but `/health`, any Host):
//! `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`
//! (plain JSON, or server-sent events with `"stream": true`), and
//! `GET /health`.
//!
//! A request runs on this node when it holds the model, its one
//! generation slot is free, `api_local` is on and the power policy lets it
//! work; otherwise on the best capable peer, whose
//! answer this node checks with one batched forward pass before sending
//! anything (`job::infer`), as `tern submit infer` does. Every response
//! says where it was computed (`tern.worker`, `tern.local`) and whether it
//! was verified. A client that goes away stops a local generation at the
//! next token. Errors come in OpenAI's `{"error": {...}}` shape.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use kernels::model::chat::Message;
use kernels::model::tokenizer::{EOT, Tokenizer};
use parking_lot::Mutex;
use protocol::ContentId;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};

use super::text::{Finish, TextStream};
use crate::daemon::now_ms;
use crate::daemon::shared::Shared;
use crate::net::fetch;

/// Tokens generated when a request names no `max_tokens`. A peer computes
/// exactly the tokens asked (its answer is checked position by position),
/// so the default stays modest.
pub const DEFAULT_MAX_TOKENS: u32 = 256;

/// Tokenizers kept loaded (one per model).
const TOKENIZERS: usize = 4;

/// The API's state.
#[derive(Clone)]
pub struct OpenAi {
    shared: Arc<Shared>,
    token: Arc<String>,
    /// One local generation at a time: it uses every thread the node has.
    slot: Arc<Semaphore>,
    tokenizers: Arc<Mutex<Tokenizers>>,
}

/// The tokenizers kept loaded, oldest first.
type Tokenizers = Vec<(ContentId, Arc<Tokenizer>)>;

impl std::fmt::Debug for OpenAi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAi").finish_non_exhaustive()
    }
}

impl OpenAi {
    /// The API's state: one generation slot and tokenizer cache, whichever
    /// address a request comes to.
    pub fn new(shared: Arc<Shared>, token: Arc<String>) -> Self {
        Self {
            shared,
            token,
            slot: Arc::new(Semaphore::new(1)),
            tokenizers: Arc::default(),
        }
    }

    /// The routes: for the control address (`loopback`: merged into the
    /// control API's router, whose middleware refuses a Host or Origin
    /// that is not a loopback name), or for `api_listen` (any Host: the
    /// key guards every route but `/health`).
    pub fn router(&self, loopback: bool) -> Router {
        let api = self.clone();
        // The key is checked before a body is read; on `api_listen`, at
        // most `PUBLIC_REQUESTS` run at once.
        let keyed = Router::new()
            .route("/v1/models", get(models))
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .route_layer(axum::middleware::from_fn_with_state(api.clone(), key_first))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST_BYTES));
        let router = keyed.route("/health", get(health)).with_state(api);
        if loopback {
            router
        } else {
            let slots = Arc::new(Semaphore::new(PUBLIC_REQUESTS));
            router.layer(axum::middleware::from_fn(
                move |r: axum::extract::Request, next: axum::middleware::Next| {
                    let slots = slots.clone();
                    async move {
                        let Ok(_slot) = slots.try_acquire_owned() else {
                            return ApiError::new(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "server_error",
                                "too many requests at once; try again",
                            )
                            .into_response();
                        };
                        next.run(r).await
                    }
                },
            ))
        }
    }
}

/// The largest request body: a chat history of about half a million
/// words.
const MAX_REQUEST_BYTES: usize = 4 << 20;

/// Requests `api_listen` serves at once; more are answered 503.
const PUBLIC_REQUESTS: usize = 64;

/// Refuses a request without the key before its body is read.
async fn key_first(
    State(api): State<OpenAi>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match admit(&api, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// An error as OpenAI sends it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            code: None,
            param: None,
        }
    }

    fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    fn body(&self) -> Value {
        json!({ "error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", format!("{e:#}"))
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The key (the control token). On the control address, the Host and
/// Origin were checked before (the control router's middleware).
fn admit(api: &OpenAi, headers: &HeaderMap) -> ApiResult<()> {
    if super::bearer_is(headers, &api.token) {
        Ok(())
    } else {
        let mut e = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "a missing or wrong API key: use the node's control token (`tern api` prints it; it is the file control.token in the node's data directory)",
        );
        e.code = Some("invalid_api_key");
        Err(e)
    }
}

/// Refuses a request whose Host or Origin is not this machine by a
/// loopback name: a web page on another name that resolves to 127.0.0.1
/// (DNS rebinding) cannot use the API.
pub fn local_host(headers: &HeaderMap) -> ApiResult<()> {
    let host_ok = |h: &str| {
        let name = if let Some(rest) = h.strip_prefix('[') {
            rest.split(']').next().unwrap_or_default()
        } else {
            h.rsplit_once(':').map_or(h, |(n, _)| n)
        };
        // Any loopback address the control API may be set to listen on
        // (127.0.1.1 too), or the name `localhost`.
        name == "localhost" || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    };
    let host = headers.get("host").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !host_ok(host) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            format!("Host {host:?} is not this machine (localhost or a loopback address)"),
        ));
    }
    if let Some(origin) = headers.get("origin").and_then(|v| v.to_str().ok()) {
        let h = origin.split_once("://").map_or(origin, |(_, h)| h);
        if !host_ok(h) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                format!("Origin {origin:?} is not this machine"),
            ));
        }
    }
    Ok(())
}

/// The models this node can serve: held here, or advertised by peers.
fn known_models(shared: &Shared) -> Vec<(ContentId, bool, usize)> {
    // Pinned GGUF files of any size (adverts list pinned blobs over 1 MiB
    // as models), then what peers advertise.
    let gguf = |id: &ContentId| {
        use std::io::Read as _;
        let mut magic = [0u8; 4];
        std::fs::File::open(shared.store.path(id))
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
            && &magic == b"GGUF"
    };
    let mut here: Vec<ContentId> = shared.store.pins().into_iter().filter(|id| gguf(id)).collect();
    for m in shared.advert().models {
        if !here.contains(&m) {
            here.push(m);
        }
    }
    let mut out: Vec<(ContentId, bool, usize)> = here.iter().map(|m| (*m, true, 0)).collect();
    let me = shared.key.public();
    for (k, e) in shared.peer_entries() {
        if k == me || e.advert.max_tasks == 0 {
            continue;
        }
        for m in &e.advert.models {
            match out.iter_mut().find(|(id, _, _)| id == m) {
                Some(row) => row.2 += 1,
                None => out.push((*m, false, 1)),
            }
        }
    }
    out
}

/// `GET /v1/models`. Like the completions, it runs after [`key_first`]
/// has checked the key.
async fn models(State(api): State<OpenAi>) -> ApiResult<Json<Value>> {
    let data: Vec<Value> = known_models(&api.shared)
        .into_iter()
        .map(|(id, here, peers)| {
            json!({
                "id": id.to_string(),
                "object": "model",
                "created": 0,
                "owned_by": if here { "this node" } else { "the swarm" },
                "tern": { "held_here": here, "peers": peers },
            })
        })
        .collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

/// `GET /health`: 200 once the node has a model to serve (held here or
/// advertised by a peer), 503 before. Needs no key.
async fn health(State(api): State<OpenAi>) -> Response {
    let n = known_models(&api.shared).len();
    if n > 0 {
        (StatusCode::OK, Json(json!({ "status": "ok", "models": n }))).into_response()
    } else {
        let e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "no model yet: add one (`tern model add`) or wait for peers that hold one",
        );
        (e.status, Json(e.body())).into_response()
    }
}

/// A model named by a request: its content id, or a unique prefix of it
/// (at least 8 hex digits) among the models known.
fn resolve(shared: &Shared, name: &str) -> ApiResult<ContentId> {
    if let Ok(id) = name.parse::<ContentId>() {
        return Ok(id);
    }
    let known = known_models(shared);
    let hits: Vec<_> = if name.len() >= 8 {
        known
            .iter()
            .filter(|(id, _, _)| id.to_string().starts_with(name))
            .collect()
    } else {
        Vec::new()
    };
    match hits.as_slice() {
        [(id, _, _)] => Ok(*id),
        _ => {
            let list: Vec<String> = known.iter().map(|(id, _, _)| id.to_string()).collect();
            let mut e = ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!(
                    "the model {name:?} does not exist here: name one by its content id (GET /v1/models lists {})",
                    if list.is_empty() {
                        "none yet".into()
                    } else {
                        list.join(", ")
                    }
                ),
            );
            e.code = Some("model_not_found");
            e.param = Some("model");
            Err(e)
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// A message's content: a string, or parts of which the text ones count.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// What both endpoints share.
#[derive(Debug, Deserialize)]
struct Common {
    model: String,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    #[serde(flatten)]
    common: Common,
}

/// A request's generation settings, checked.
#[derive(Debug, Clone)]
struct Settings {
    model: ContentId,
    model_name: String,
    max_tokens: u32,
    sampling: protocol::Sampling,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
}

fn settings(shared: &Shared, c: Common) -> ApiResult<Settings> {
    if c.n.unwrap_or(1) != 1 {
        return Err(ApiError::invalid("n", "n must be 1: one choice per request"));
    }
    let max_tokens = c.max_completion_tokens.or(c.max_tokens).unwrap_or(DEFAULT_MAX_TOKENS);
    if max_tokens == 0 || max_tokens > protocol::limits::MAX_GENERATED_TOKENS {
        return Err(ApiError::invalid(
            "max_tokens",
            format!(
                "max_tokens must be between 1 and {}",
                protocol::limits::MAX_GENERATED_TOKENS
            ),
        ));
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid("temperature", "temperature must be between 0 and 2"));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("top_p", "top_p must be above 0 and at most 1"));
    }
    let stops = match c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stops.len() > 4 || stops.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(ApiError::invalid(
            "stop",
            "stop takes at most 4 sequences, each 1 to 256 bytes",
        ));
    }
    let seed = match c.seed {
        Some(s) => s,
        None => {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("the OS random generator: {e}"))?;
            u64::from_le_bytes(b)
        }
    };
    let model = resolve(shared, &c.model)?;
    Ok(Settings {
        model,
        model_name: c.model,
        max_tokens,
        sampling: protocol::Sampling {
            temperature,
            top_k: 0,
            top_p,
            seed,
        },
        stops,
        stream: c.stream,
        include_usage: c.stream_options.unwrap_or_default().include_usage,
    })
}

impl OpenAi {
    /// The model's tokenizer (fetching the model from the swarm first
    /// when no one here holds it: its answer is checked with it anyway).
    async fn tokenizer(&self, model: ContentId) -> ApiResult<Arc<Tokenizer>> {
        if let Some((_, t)) = self.tokenizers.lock().iter().find(|(id, _)| *id == model) {
            return Ok(t.clone());
        }
        let blobs = self.shared.client.blobs.clone();
        if !blobs.store.has(&model) {
            fetch::fetch(&blobs, &model, &[])
                .await
                .with_context(|| format!("model {model}: nobody holds it"))?;
        }
        let path = blobs.store.path(&model);
        let tok = tokio::task::spawn_blocking(move || {
            kernels::model::load(&path)
                .map(|m| m.tokenizer)
                .context("the model blob is not a model tern can load")
        })
        .await
        .map_err(|e| anyhow::anyhow!("loading the tokenizer: {e}"))??;
        let tok = Arc::new(tok);
        let mut cache = self.tokenizers.lock();
        if cache.len() >= TOKENIZERS {
            cache.remove(0);
        }
        cache.push((model, tok.clone()));
        Ok(tok)
    }
}

/// The tokens that end an answer: the model's end-of-sequence tokens and
/// the chat end-of-turn token when it has one.
fn stop_ids(tok: &Tokenizer) -> Vec<u32> {
    let mut v = tok.eos().to_vec();
    if let Some(e) = tok.token_id(EOT) {
        v.push(e);
    }
    v
}

/// What a generation sends the handler.
#[derive(Debug)]
enum Event2 {
    Token(u32),
    Done,
    Failed(String),
}

/// Where a generation runs, and what the response says of it.
#[derive(Debug, Clone)]
struct Origin {
    worker: String,
    local: bool,
    /// The worker's signed result, for a peer's answer.
    evidence: Option<String>,
}

impl Origin {
    fn json(&self) -> Value {
        json!({
            "worker": self.worker,
            "local": self.local,
            "verified": true,
            "how": if self.local {
                "computed by this node"
            } else {
                "computed by a peer and replayed by this node in one forward pass"
            },
            "evidence": self.evidence,
        })
    }
}

/// Starts the generation: on this node when it holds the model and the
/// slot is free, else on a peer (verified before any token is sent).
/// Tokens arrive on the receiver; dropping it stops a local generation.
async fn start(
    api: &OpenAi,
    s: &Settings,
    prompt: Vec<u32>,
    stops: Vec<u32>,
) -> ApiResult<(mpsc::Receiver<Event2>, Origin)> {
    let ctx_check = |m: &kernels::model::Model| {
        let max = m.config().max_position_embeddings;
        if prompt.len() >= max {
            Err(ApiError::invalid(
                "messages",
                format!("the prompt has {} tokens; this model's context is {max}", prompt.len()),
            ))
        } else {
            Ok(())
        }
    };
    let held =
        api.shared.store.has(&s.model) && api.shared.config.api_local && api.shared.worker.paused.borrow().is_none();
    let permit = if held {
        match api.slot.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                let size = api.shared.store.size(&s.model).unwrap_or(0);
                let peers = crate::job::capable_peers(&api.shared.client, &s.model, size, &[]);
                if peers.is_empty() {
                    // No one else can: wait for the slot here.
                    Some(
                        api.slot
                            .clone()
                            .acquire_owned()
                            .await
                            .map_err(|_| anyhow::anyhow!("the node is stopping"))?,
                    )
                } else {
                    None
                }
            }
        }
    } else {
        None
    };
    let (tx, rx) = mpsc::channel(64);
    if let Some(permit) = permit {
        let shared = api.shared.clone();
        let id = s.model;
        let model = tokio::task::spawn_blocking(move || shared.models.get(&id))
            .await
            .map_err(|e| anyhow::anyhow!("loading the model: {e}"))??;
        ctx_check(&model)?;
        let (max_tokens, sampling) = (s.max_tokens as usize, s.sampling);
        let stats = api.shared.stats.clone();
        stats.lock().api_local += 1;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut sampler = match crate::task::sampler(&sampling) {
                Ok(x) => x,
                Err(e) => {
                    let _ = tx.blocking_send(Event2::Failed(format!("{e:#}")));
                    return;
                }
            };
            let mut gone = false;
            let r = model.generate(&prompt, max_tokens, &mut sampler, &stops, |t| {
                // The receiver is gone: the client left, or a stop
                // sequence ended the answer.
                gone = tx.blocking_send(Event2::Token(t)).is_err();
                !gone
            });
            if gone {
                stats.lock().api_stopped_early += 1;
            }
            let _ = tx.blocking_send(match r {
                Ok(_) => Event2::Done,
                Err(e) => Event2::Failed(format!("{e:#}")),
            });
        });
        let origin = Origin {
            worker: api.shared.key.public().to_string(),
            local: true,
            evidence: None,
        };
        return Ok((rx, origin));
    }
    let say = |m: &str| tracing::info!("api: {m}");
    let answer = crate::job::infer::infer(&api.shared.client, s.model, prompt, s.max_tokens, s.sampling, &say)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                format!("no peer could compute it: {e:#}"),
            )
        })?;
    api.shared.stats.lock().api_remote += 1;
    let origin = Origin {
        worker: answer.worker.to_string(),
        local: false,
        evidence: Some(answer.evidence.to_string()),
    };
    tokio::spawn(async move {
        for t in answer.tokens {
            if tx.send(Event2::Token(t)).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Event2::Done).await;
    });
    Ok((rx, origin))
}

/// Reads a generation to its end: the answer, why it ended, tokens used.
async fn collect(
    mut rx: mpsc::Receiver<Event2>,
    tok: &Tokenizer,
    stop_ids: &[u32],
    stops: &[String],
) -> ApiResult<(String, Finish, usize)> {
    let mut text = TextStream::new(tok, stop_ids, stops);
    while let Some(ev) = rx.recv().await {
        match ev {
            Event2::Token(t) => {
                text.push(t)?;
                if text.finished().is_some() {
                    break;
                }
            }
            Event2::Done => {
                text.finish(Finish::Length)?;
                break;
            }
            Event2::Failed(e) => return Err(anyhow::anyhow!("generation failed: {e}").into()),
        }
    }
    let why = text.finished().unwrap_or(Finish::Length);
    Ok((text.text().to_string(), why, text.tokens()))
}

fn completion_id(prefix: &str) -> String {
    let mut b = [0u8; 12];
    let _ = getrandom::fill(&mut b);
    format!("{prefix}-{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>())
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// `POST /v1/chat/completions`.
async fn chat(State(api): State<OpenAi>, body: axum::body::Bytes) -> ApiResult<Response> {
    let req: ChatRequest = parse(&body)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        let role = match m.role.as_str() {
            "developer" => "system",
            r @ ("system" | "user" | "assistant") => r,
            other => {
                return Err(ApiError::invalid(
                    "messages",
                    format!("the role {other:?} is not supported (system, developer, user, assistant)"),
                ));
            }
        };
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                    return Err(ApiError::invalid(
                        "messages",
                        format!("content parts of type {:?} are not supported (text only)", p.kind),
                    ));
                }
                parts.iter().map(|p| p.text.as_str()).collect()
            }
        };
        messages.push(Message::new(role, &content));
    }
    let s = settings(&api.shared, req.common)?;
    let tok = api.tokenizer(s.model).await?;
    let prompt = {
        let text = tok.render_chat(&messages, true).map_err(anyhow::Error::from)?;
        tok.encode(&text, false).map_err(anyhow::Error::from)?
    };
    respond(api, s, tok, prompt, Kind::Chat).await
}

/// `POST /v1/completions`.
async fn completions(State(api): State<OpenAi>, body: axum::body::Bytes) -> ApiResult<Response> {
    let req: CompletionRequest = parse(&body)?;
    let prompt = match req.prompt {
        Prompt::One(p) => p,
        Prompt::Many(v) if v.len() == 1 => v.into_iter().next().unwrap_or_default(),
        Prompt::Many(_) => return Err(ApiError::invalid("prompt", "one prompt per request")),
    };
    let s = settings(&api.shared, req.common)?;
    let tok = api.tokenizer(s.model).await?;
    let ids = tok.encode(&prompt, true).map_err(anyhow::Error::from)?;
    if ids.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt has no tokens"));
    }
    respond(api, s, tok, ids, Kind::Text).await
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("the request body is not a valid request: {e}"),
        )
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

async fn respond(api: OpenAi, s: Settings, tok: Arc<Tokenizer>, prompt: Vec<u32>, kind: Kind) -> ApiResult<Response> {
    if prompt.len() > protocol::limits::MAX_PROMPT_TOKENS {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "the prompt has {} tokens, more than {}",
                prompt.len(),
                protocol::limits::MAX_PROMPT_TOKENS
            ),
        ));
    }
    let stops = stop_ids(&tok);
    let prompt_tokens = prompt.len();
    let (rx, origin) = start(&api, &s, prompt, stops.clone()).await?;
    let id = completion_id(if kind == Kind::Chat { "chatcmpl" } else { "cmpl" });
    let created = now_ms() / 1000;
    if !s.stream {
        let (text, why, n) = collect(rx, &tok, &stops, &s.stops).await?;
        let choice = match kind {
            Kind::Chat => json!({
                "index": 0,
                "message": { "role": "assistant", "content": text, "refusal": null },
                "logprobs": null,
                "finish_reason": why.as_str(),
            }),
            Kind::Text => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": why.as_str(),
            }),
        };
        let body = json!({
            "id": id,
            "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
            "created": created,
            "model": s.model_name,
            "system_fingerprint": format!("tern-{}", env!("CARGO_PKG_VERSION")),
            "choices": [choice],
            "usage": usage(prompt_tokens, n),
            "tern": origin.json(),
        });
        return Ok(Json(body).into_response());
    }
    let stream = chunks(rx, tok, stops, s, kind, id, created, prompt_tokens, origin);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// The server-sent events of a streamed answer: the role first (chat),
/// the text as it comes, the finish reason, the usage when asked, then
/// `[DONE]`. Every chunk has the same id.
#[allow(clippy::too_many_arguments)]
fn chunks(
    mut rx: mpsc::Receiver<Event2>,
    tok: Arc<Tokenizer>,
    stop_ids: Vec<u32>,
    s: Settings,
    kind: Kind,
    id: String,
    created: u64,
    prompt_tokens: usize,
    origin: Origin,
) -> impl Stream<Item = Result<Event, Infallible>> {
    async_stream(move |tx| async move {
        let object = if kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let usage_field = s.include_usage.then_some(Value::Null);
        let chunk = |choice: Value| {
            let mut c = json!({
                "id": id,
                "object": object,
                "created": created,
                "model": s.model_name,
                "system_fingerprint": format!("tern-{}", env!("CARGO_PKG_VERSION")),
                "choices": [choice],
                "tern": origin.json(),
            });
            if let Some(u) = &usage_field {
                c["usage"] = u.clone();
            }
            Event::default().data(c.to_string())
        };
        let piece = |text: String, finish: Option<Finish>| match kind {
            Kind::Chat => {
                let delta = if text.is_empty() {
                    json!({})
                } else {
                    json!({ "content": text })
                };
                json!({ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish.map(Finish::as_str) })
            }
            Kind::Text => {
                json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": finish.map(Finish::as_str) })
            }
        };
        if kind == Kind::Chat
            && tx
                .send(chunk(json!({
                    "index": 0,
                    "delta": { "role": "assistant", "content": "" },
                    "logprobs": null,
                    "finish_reason": null,
                })))
                .await
                .is_err()
        {
            return;
        }
        let mut text = TextStream::new(&tok, &stop_ids, &s.stops);
        let mut failed = None;
        while let Some(ev) = rx.recv().await {
            let p = match ev {
                Event2::Token(t) => text.push(t),
                Event2::Done => text.finish(Finish::Length),
                Event2::Failed(e) => {
                    failed = Some(e);
                    break;
                }
            };
            match p {
                Ok(p) if !p.is_empty() => {
                    if tx.send(chunk(piece(p, None))).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    failed = Some(format!("{e:#}"));
                    break;
                }
            }
            if text.finished().is_some() {
                break;
            }
        }
        drop(rx);
        if let Some(e) = failed {
            let err = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e);
            let _ = tx.send(Event::default().data(err.body().to_string())).await;
            return;
        }
        let why = text.finished().unwrap_or(Finish::Length);
        if tx.send(chunk(piece(String::new(), Some(why)))).await.is_err() {
            return;
        }
        if s.include_usage {
            let u = json!({
                "id": id,
                "object": object,
                "created": created,
                "model": s.model_name,
                "system_fingerprint": format!("tern-{}", env!("CARGO_PKG_VERSION")),
                "choices": [],
                "usage": usage(prompt_tokens, text.tokens()),
            });
            if tx.send(Event::default().data(u.to_string())).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    })
}

/// A stream fed by an async body through a bounded channel: the body
/// ends (its sends fail) when the stream is dropped.
fn async_stream<F, Fut>(body: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Event>(16);
    tokio::spawn(body(tx));
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn only_loopback_hosts_and_origins_pass() {
        for host in [
            "127.0.0.1:8080",
            "localhost:1",
            "[::1]:9",
            "localhost",
            "127.0.1.1:7447",
        ] {
            assert!(local_host(&headers(&[("host", host)])).is_ok(), "{host}");
        }
        for host in ["evil.example:8080", "127.0.0.1.evil.example", "", "192.168.1.2:80"] {
            assert!(local_host(&headers(&[("host", host)])).is_err(), "{host}");
        }
        assert!(
            local_host(&headers(&[
                ("host", "127.0.0.1:1"),
                ("origin", "http://localhost:3000")
            ]))
            .is_ok()
        );
        let e = local_host(&headers(&[("host", "127.0.0.1:1"), ("origin", "https://evil.example")])).unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        assert_eq!(e.body()["error"]["type"], "invalid_request_error");
    }
}
