//! The daemon's jobs: fine-tunes submitted through the control API run
//! here, in the daemon, and outlive the CLI that submitted them.
//!
//! A submission is recorded first (`<data_dir>/jobs/<id>/daemon.json`: the
//! spec, and whether it was cancelled, replaced atomically), then run as a
//! task on the daemon's runtime. Its progress goes to the job's state file
//! as before (so nothing verified is lost) and to a bounded broadcast
//! channel that `GET /v1/jobs/{id}/events` streams. When the daemon starts
//! it resumes every recorded job that has neither finished nor been
//! cancelled.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use protocol::ContentId;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::{Event, Job, JobSpec, JobState};
use crate::daemon::Shared;

/// Events a slow watcher may fall behind by before it misses some (it is
/// told how many, and can read the state file's summary).
const EVENT_BUFFER: usize = 1024;
/// Most jobs the daemon records (running or not).
pub const MAX_JOBS: usize = 256;
/// Longest spec a submission may be, as JSON (a spec names up to 1024
/// shards by id).
pub const MAX_SPEC_BYTES: usize = 1 << 20;

/// What the daemon keeps of a submission.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    spec: JobSpec,
    #[serde(default)]
    cancelled: bool,
}

/// Where a daemon job stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "run")]
pub enum Run {
    /// Running (or about to).
    Running,
    Finished,
    /// Stopped by an error; submitting it again resumes it.
    Failed {
        error: String,
    },
    Cancelled,
}

struct Entry {
    run: Run,
    /// Present while the job runs: watchers subscribe to it.
    events: Option<broadcast::Sender<Event>>,
    task: Option<JoinHandle<()>>,
}

/// The daemon's jobs.
#[derive(Clone)]
pub struct Jobs {
    shared: Arc<Shared>,
    entries: Arc<Mutex<HashMap<ContentId, Entry>>>,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs").finish_non_exhaustive()
    }
}

fn record_path(data_dir: &Path, id: &ContentId) -> PathBuf {
    data_dir.join("jobs").join(id.to_string()).join("daemon.json")
}

impl Jobs {
    /// The daemon's jobs, with every recorded job that has not finished
    /// and was not cancelled resumed.
    pub fn start(shared: Arc<Shared>) -> Result<Self> {
        let jobs = Self {
            shared,
            entries: Arc::new(Mutex::new(HashMap::new())),
        };
        let dir = jobs.shared.config.data_dir.join("jobs");
        let Ok(read) = std::fs::read_dir(&dir) else {
            return Ok(jobs);
        };
        for e in read.flatten().take(MAX_JOBS) {
            let Ok(id) = e.file_name().to_string_lossy().parse::<ContentId>() else {
                continue;
            };
            let path = record_path(&jobs.shared.config.data_dir, &id);
            if !path.exists() {
                // A job a client node ran itself (`tern submit --foreground`).
                continue;
            }
            let r = match read_record(&path, &id) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(job = %id, "not resumed: {e:#}");
                    continue;
                }
            };
            let state = JobState::load(&jobs.shared.config.data_dir, &id).ok();
            let run = if r.cancelled {
                Run::Cancelled
            } else if state.as_ref().is_some_and(|s| s.finished) {
                Run::Finished
            } else {
                tracing::info!(job = %id, "resuming");
                let mut entries = jobs.lock();
                jobs.spawn(&mut entries, id, r.spec);
                continue;
            };
            jobs.lock().insert(
                id,
                Entry {
                    run,
                    events: None,
                    task: None,
                },
            );
        }
        Ok(jobs)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ContentId, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records and starts job `spec` (resumes it when it ran before);
    /// returns its id. A job already running is left as it is.
    pub fn submit(&self, spec: JobSpec) -> Result<ContentId> {
        spec.validate()?;
        let id = spec.id();
        let mut entries = self.lock();
        if entries.get(&id).is_some_and(|e| e.run == Run::Running) {
            return Ok(id);
        }
        if !entries.contains_key(&id) && entries.len() >= MAX_JOBS {
            bail!("the daemon holds {MAX_JOBS} jobs already");
        }
        write_record(
            &self.shared.config.data_dir,
            &id,
            &Record {
                spec: spec.clone(),
                cancelled: false,
            },
        )?;
        self.spawn(&mut entries, id, spec);
        Ok(id)
    }

    /// Starts job `id`; `entries` is held, so the entry is in place before
    /// the task can end and update it.
    fn spawn(&self, entries: &mut HashMap<ContentId, Entry>, id: ContentId, spec: JobSpec) {
        let (tx, _) = broadcast::channel(EVENT_BUFFER);
        let (shared, all, events) = (self.shared.clone(), self.entries.clone(), tx.clone());
        let task = tokio::spawn(async move {
            let on = move |e: &Event| {
                // No watcher is fine.
                let _ = events.send(e.clone());
            };
            let r = async { Job::open(&shared, spec).await?.run(&on).await }.await;
            let run = match r {
                Ok(_) => Run::Finished,
                Err(e) => {
                    tracing::warn!(job = %id, "stopped: {e:#}");
                    Run::Failed {
                        error: format!("{e:#}"),
                    }
                }
            };
            let mut all = all.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(entry) = all.get_mut(&id) {
                entry.run = run;
                // Watchers see the stream end once the job's own sender goes too.
                entry.events = None;
                entry.task = None;
            }
        });
        entries.insert(
            id,
            Entry {
                run: Run::Running,
                events: Some(tx),
                task: Some(task),
            },
        );
    }

    /// Stops job `id` and records that it was cancelled: it is not resumed
    /// (submitting it again does). Its verified progress stays saved.
    pub fn cancel(&self, id: &ContentId) -> Result<()> {
        let path = record_path(&self.shared.config.data_dir, id);
        let mut r = read_record(&path, id).with_context(|| format!("no daemon job {id}"))?;
        r.cancelled = true;
        write_record(&self.shared.config.data_dir, id, &r)?;
        if let Some(e) = self.lock().get_mut(id) {
            if let Some(t) = e.task.take() {
                t.abort();
            }
            e.events = None;
            e.run = Run::Cancelled;
        }
        Ok(())
    }

    /// Where job `id` stands, if the daemon holds it.
    pub fn run_of(&self, id: &ContentId) -> Option<Run> {
        self.lock().get(id).map(|e| e.run.clone())
    }

    /// Every job the daemon holds, by id.
    pub fn list(&self) -> Vec<(ContentId, Run)> {
        let mut v: Vec<_> = self.lock().iter().map(|(k, e)| (*k, e.run.clone())).collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }

    /// Job `id`'s events from now on, while it runs.
    pub fn subscribe(&self, id: &ContentId) -> Option<broadcast::Receiver<Event>> {
        self.lock().get(id)?.events.as_ref().map(broadcast::Sender::subscribe)
    }

    /// Stops every running job (their progress is saved; the daemon
    /// resumes them when it starts again).
    pub async fn stop(&self) {
        let tasks: Vec<JoinHandle<()>> = self.lock().values_mut().filter_map(|e| e.task.take()).collect();
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
    }
}

fn read_record(path: &Path, id: &ContentId) -> Result<Record> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    // The record is the spec and one flag.
    if len > (MAX_SPEC_BYTES + 64) as u64 {
        bail!("{} is {len} bytes, more than a job's record may be", path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let r: Record = serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
    if r.spec.id() != *id {
        bail!("{} is not job {id}'s record", path.display());
    }
    Ok(r)
}

fn write_record(data_dir: &Path, id: &ContentId, r: &Record) -> Result<()> {
    let path = record_path(data_dir, id);
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let bytes = serde_json::to_vec(r)?;
    kernels::model::write_atomic(&path, |f| std::io::Write::write_all(f, &bytes))
        .with_context(|| format!("writing {}", path.display()))
}
