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
use std::time::Duration;

use anyhow::{Context, Result, bail};
use protocol::ContentId;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::{Client, Event, Job, JobSpec, JobState};

/// Events a slow watcher may fall behind by before it misses some (it is
/// told how many, and can read the state file's summary).
const EVENT_BUFFER: usize = 1024;
/// Most jobs the daemon records (running or not).
pub const MAX_JOBS: usize = 256;
/// Longest spec a submission may be, as JSON (a spec names up to 1024
/// shards by id).
pub const MAX_SPEC_BYTES: usize = 1 << 20;

/// Runs of a job that may fail before the daemon gives it up (until it is
/// submitted again). Volunteers come and go, so a job that found no
/// capable peer, or lost them all, is run again after a wait: 30 s, then
/// doubled per failure up to [`MAX_BACKOFF`]. The count is kept across
/// daemon restarts, so a job that cannot succeed is not retried forever.
pub const MAX_ATTEMPTS: u32 = 6;
/// The longest wait between two runs of a failing job.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30 * 60);

/// The wait after the `failures`-th failure in a row.
pub fn backoff(failures: u32) -> Duration {
    let first = Duration::from_secs(30);
    first
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

/// What the daemon keeps of a submission.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    spec: JobSpec,
    #[serde(default)]
    cancelled: bool,
    /// Runs that ended in an error since the job was last submitted.
    #[serde(default)]
    failures: u32,
    #[serde(default)]
    last_error: String,
}

/// Where a daemon job stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "run")]
pub enum Run {
    /// Running (or about to).
    Running,
    Finished,
    /// Stopped by an error, to run again at `retry_at_ms` (ms since the
    /// Unix epoch) unless cancelled.
    Retrying {
        error: String,
        attempt: u32,
        retry_at_ms: u64,
    },
    /// Stopped by errors [`MAX_ATTEMPTS`] times; submitting it again
    /// resumes it.
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
    client: Arc<Client>,
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
    pub fn start(client: Arc<Client>) -> Result<Self> {
        let jobs = Self {
            client,
            entries: Arc::new(Mutex::new(HashMap::new())),
        };
        let dir = jobs.client.config.data_dir.join("jobs");
        let Ok(read) = std::fs::read_dir(&dir) else {
            return Ok(jobs);
        };
        for e in read.flatten().take(MAX_JOBS) {
            let Ok(id) = e.file_name().to_string_lossy().parse::<ContentId>() else {
                continue;
            };
            let path = record_path(&jobs.client.config.data_dir, &id);
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
            let state = JobState::load(&jobs.client.config.data_dir, &id).ok();
            let run = if r.cancelled {
                Run::Cancelled
            } else if state.as_ref().is_some_and(|s| s.finished) {
                Run::Finished
            } else if r.failures >= MAX_ATTEMPTS {
                Run::Failed { error: r.last_error }
            } else {
                tracing::info!(job = %id, failures = r.failures, "resuming");
                let mut entries = jobs.lock();
                jobs.spawn(&mut entries, id, r.spec, r.failures);
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
        if entries
            .get(&id)
            .is_some_and(|e| matches!(e.run, Run::Running | Run::Retrying { .. }))
        {
            return Ok(id);
        }
        if !entries.contains_key(&id) && entries.len() >= MAX_JOBS {
            bail!("the daemon holds {MAX_JOBS} jobs already");
        }
        write_record(
            &self.client.config.data_dir,
            &id,
            &Record {
                spec: spec.clone(),
                cancelled: false,
                failures: 0,
                last_error: String::new(),
            },
        )?;
        self.spawn(&mut entries, id, spec, 0);
        Ok(id)
    }

    /// Starts job `id`, which failed `failures` times before; `entries`
    /// is held, so the entry is in place before the task can end and
    /// update it. A run that fails is run again after [`backoff`], up to
    /// [`MAX_ATTEMPTS`] runs in all; watchers follow every run on one
    /// event stream.
    fn spawn(&self, entries: &mut HashMap<ContentId, Entry>, id: ContentId, spec: JobSpec, failures: u32) {
        let (tx, _) = broadcast::channel(EVENT_BUFFER);
        let (client, all, events) = (self.client.clone(), self.entries.clone(), tx.clone());
        let entries_of = all.clone();
        let set = move |run: Run, ended: bool| {
            let mut all = entries_of.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(entry) = all.get_mut(&id) {
                entry.run = run;
                if ended {
                    // Watchers see the stream end once the job's own sender goes too.
                    entry.events = None;
                    entry.task = None;
                }
            }
        };
        let task = tokio::spawn(async move {
            let mut failures = failures;
            loop {
                let ev = events.clone();
                let on = move |e: &Event| {
                    // No watcher is fine.
                    let _ = ev.send(e.clone());
                };
                let r = async { Job::open(&client, spec.clone()).await?.run(&on).await }.await;
                let error = match r {
                    Ok(_) => break set(Run::Finished, true),
                    Err(e) => format!("{e:#}"),
                };
                failures += 1;
                tracing::warn!(job = %id, failures, "stopped: {error}");
                let dir = &client.config.data_dir;
                // Under the jobs' lock, as a cancellation writes the record.
                let recorded = {
                    let _all = all.lock().unwrap_or_else(|e| e.into_inner());
                    read_record(&record_path(dir, &id), &id).and_then(|mut r| {
                        r.failures = failures;
                        r.last_error = error.clone();
                        write_record(dir, &id, &r)
                    })
                };
                if let Err(e) = recorded {
                    tracing::warn!(job = %id, "its failure is not recorded: {e:#}");
                }
                if failures >= MAX_ATTEMPTS {
                    break set(Run::Failed { error }, true);
                }
                let wait = backoff(failures);
                let _ = events.send(Event::Retrying {
                    attempt: failures,
                    error: error.clone(),
                    in_secs: wait.as_secs(),
                });
                set(
                    Run::Retrying {
                        error,
                        attempt: failures,
                        retry_at_ms: crate::clock::now_ms() + wait.as_millis() as u64,
                    },
                    false,
                );
                tokio::time::sleep(wait).await;
                set(Run::Running, false);
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
        let path = record_path(&self.client.config.data_dir, id);
        let mut entries = self.lock();
        let mut r = read_record(&path, id).with_context(|| format!("no daemon job {id}"))?;
        r.cancelled = true;
        write_record(&self.client.config.data_dir, id, &r)?;
        if let Some(e) = entries.get_mut(id) {
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
