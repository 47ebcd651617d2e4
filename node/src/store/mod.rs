//! The content-addressed blob store.
//!
//! Layout under the store's root:
//! - `blobs/ab/abcd…`: the blob named by its blake3 id, read-only;
//! - `blobs/ab/abcd….outline`: its group chaining values (see
//!   [`protocol::Outline`]), so serving a transfer never rehashes it;
//! - `partial/abcd…` and `.have`: a fetch in progress (resumable);
//! - `pins/abcd…`: pinned blobs, which garbage collection keeps;
//! - `tmp/`: files being written.
//!
//! Every write goes to `tmp/`, is fsynced, then renamed into place, so a
//! crash never leaves a corrupt blob under a valid name.

use std::fs::{self, File};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result, bail};
use protocol::blob::{GROUP_LEN, group_chaining_value, group_count, group_range};
use protocol::{ContentId, DirEntry, DirManifest, Outline};

/// A blob store rooted at a directory.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

/// What [`BlobStore::import`] stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Imported {
    /// The id to use: the file's, or the directory manifest's.
    pub id: ContentId,
    /// Whether it was a directory.
    pub dir: bool,
    /// Files stored.
    pub files: usize,
    /// Bytes stored.
    pub bytes: u64,
}

/// What garbage collection removed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GcReport {
    /// Blobs removed.
    pub removed: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Blobs kept.
    pub kept: usize,
}

impl BlobStore {
    /// Opens (creating) a store, and clears files a crash left in `tmp/`.
    pub fn open(root: &Path) -> Result<Self> {
        for d in ["blobs", "partial", "pins", "tmp", "unlisted"] {
            fs::create_dir_all(root.join(d)).with_context(|| format!("creating {}", root.join(d).display()))?;
        }
        for e in fs::read_dir(root.join("tmp"))?.flatten() {
            let _ = fs::remove_file(e.path());
        }
        expire_partials(&root.join("partial"), PARTIAL_TTL);
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// Where blob `id` lives (it may not exist).
    pub fn path(&self, id: &ContentId) -> PathBuf {
        let hex = id.to_string();
        self.root.join("blobs").join(&hex[..2]).join(hex)
    }

    fn outline_path(&self, id: &ContentId) -> PathBuf {
        self.path(id).with_extension("outline")
    }

    /// Whether the store holds `id`.
    pub fn has(&self, id: &ContentId) -> bool {
        self.path(id).is_file()
    }

    /// Size of blob `id`, if held.
    pub fn size(&self, id: &ContentId) -> Option<u64> {
        fs::metadata(self.path(id)).ok().map(|m| m.len())
    }

    fn temp(&self) -> Result<(PathBuf, File)> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let p = self
            .root
            .join("tmp")
            .join(format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let f = File::create(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok((p, f))
    }

    /// Moves a complete, fsynced temporary file into place as `id`.
    fn commit(&self, tmp: &Path, id: &ContentId, outline: &Outline) -> Result<()> {
        let dest = self.path(id);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        self.write_outline(id, outline)?;
        fs::rename(tmp, &dest).with_context(|| format!("storing {}", dest.display()))?;
        if let Some(parent) = dest.parent() {
            sync_dir(parent)?;
        }
        Ok(())
    }

    fn write_outline(&self, id: &ContentId, outline: &Outline) -> Result<()> {
        let bytes = prost::Message::encode_to_vec(&outline.to_wire());
        let (tmp, mut f) = self.temp()?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        let dest = self.outline_path(id);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::rename(&tmp, dest)?;
        Ok(())
    }

    /// Stores bytes held in memory.
    pub fn put(&self, bytes: &[u8]) -> Result<ContentId> {
        let id = ContentId::of(bytes);
        if self.has(&id) {
            return Ok(id);
        }
        let (tmp, mut f) = self.temp()?;
        f.write_all(bytes)?;
        f.sync_all()?;
        self.commit(&tmp, &id, &Outline::of(bytes))?;
        Ok(id)
    }

    /// Stores bytes held in memory and keeps them through garbage
    /// collection (a job's adapters, results and evidence).
    pub fn put_pinned(&self, bytes: &[u8]) -> Result<ContentId> {
        let id = self.put(bytes)?;
        self.pin(&id)?;
        Ok(id)
    }

    /// Copies a file into the store, hashing it as it goes.
    pub fn import_file(&self, path: &Path) -> Result<(ContentId, u64)> {
        let mut src = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let (tmp, mut dst) = self.temp()?;
        let mut buf = vec![0u8; GROUP_LEN as usize];
        let mut cvs = Vec::new();
        let mut whole = blake3::Hasher::new();
        let mut size = 0u64;
        loop {
            let n = read_full(&mut src, &mut buf)?;
            if n == 0 {
                break;
            }
            let group = &buf[..n];
            dst.write_all(group)?;
            cvs.push(group_chaining_value(size / GROUP_LEN, group));
            if cvs.len() == 1 {
                whole.update(group);
            }
            size += n as u64;
            if n < buf.len() {
                break;
            }
        }
        dst.sync_all()?;
        let outline = if group_count(size) == 1 {
            Outline::new(size, Vec::new())
        } else {
            Outline::new(size, cvs)
        };
        let id = match outline.root() {
            Some(root) => root,
            None => whole.finalize().into(),
        };
        if self.has(&id) {
            fs::remove_file(&tmp)?;
        } else {
            self.commit(&tmp, &id, &outline)?;
        }
        Ok((id, size))
    }

    /// Imports a file, or a directory as one manifest blob naming its files.
    pub fn import(&self, path: &Path) -> Result<Imported> {
        let meta = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        if meta.is_file() {
            let (id, bytes) = self.import_file(path)?;
            return Ok(Imported {
                id,
                dir: false,
                files: 1,
                bytes,
            });
        }
        if !meta.is_dir() {
            bail!("{} is neither a file nor a directory", path.display());
        }
        let mut entries = Vec::new();
        let mut bytes = 0;
        walk(path, path, &mut |rel, full| {
            let (id, size) = self.import_file(full)?;
            bytes += size;
            entries.push(DirEntry { path: rel, id, size });
            Ok(())
        })?;
        let files = entries.len();
        let manifest = DirManifest::new(entries).context("building the directory manifest")?;
        let id = self.put(&manifest.encode())?;
        Ok(Imported {
            id,
            dir: true,
            files,
            bytes,
        })
    }

    /// The whole of a (small) blob.
    pub fn read(&self, id: &ContentId) -> Result<Vec<u8>> {
        fs::read(self.path(id)).with_context(|| format!("reading blob {id}"))
    }

    /// The outline of a held blob.
    pub fn outline(&self, id: &ContentId) -> Result<Outline> {
        if let Ok(bytes) = fs::read(self.outline_path(id))
            && let Ok(o) = Outline::decode(&bytes, id)
        {
            return Ok(o);
        }
        // Missing or damaged: recompute from the blob.
        let bytes = self.read(id)?;
        let outline = Outline::of(&bytes);
        self.write_outline(id, &outline)?;
        Ok(outline)
    }

    /// Appends the bytes of group `index` of a held blob to `out`, reading
    /// straight into its spare capacity; `header` first appends whatever
    /// goes before them, given their length.
    pub fn read_group_into(
        &self,
        id: &ContentId,
        index: u64,
        out: &mut Vec<u8>,
        header: impl FnOnce(u64, &mut Vec<u8>),
    ) -> Result<()> {
        let mut f = File::open(self.path(id)).with_context(|| format!("blob {id} not held"))?;
        let size = f.metadata()?.len();
        if index >= group_count(size) {
            bail!("group {index} is past the end of blob {id}");
        }
        let range = group_range(size, index);
        let len = range.end - range.start;
        header(len, out);
        out.reserve_exact(len as usize);
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(range.start))?;
        let got = f.take(len).read_to_end(out)?;
        if got as u64 != len {
            bail!("blob {id} ended {} bytes early", len - got as u64);
        }
        Ok(())
    }

    /// Every held blob with its size.
    pub fn list(&self) -> Vec<(ContentId, u64)> {
        let mut out = Vec::new();
        for shard in fs::read_dir(self.root.join("blobs")).into_iter().flatten().flatten() {
            for e in fs::read_dir(shard.path()).into_iter().flatten().flatten() {
                let name = e.file_name();
                if let Some(id) = name.to_str().and_then(|n| n.parse::<ContentId>().ok()) {
                    out.push((id, e.metadata().map(|m| m.len()).unwrap_or(0)));
                }
            }
        }
        out.sort();
        out
    }

    /// Bytes on disk: every held blob and every partial download.
    pub fn used_bytes(&self) -> u64 {
        let blobs: u64 = self.list().iter().map(|(_, n)| n).sum();
        let partial: u64 = fs::read_dir(self.root.join("partial"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        blobs + partial
    }

    /// Keeps `id` out of this node's adverts and provider records: task
    /// outputs and the signed results that name them. Honest workers'
    /// outputs of one task are the same bytes, so an output id that leaked
    /// before a lazy worker answered would let it answer without computing;
    /// the submitter fetches an output straight from its worker instead.
    pub fn unlist(&self, id: &ContentId) -> Result<()> {
        fs::write(self.root.join("unlisted").join(id.to_string()), b"")?;
        Ok(())
    }

    /// The ids kept out of adverts and provider records.
    pub fn unlisted(&self) -> std::collections::HashSet<ContentId> {
        fs::read_dir(self.root.join("unlisted"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect()
    }

    /// Keeps `id` through garbage collection.
    pub fn pin(&self, id: &ContentId) -> Result<()> {
        fs::write(self.root.join("pins").join(id.to_string()), b"")?;
        Ok(())
    }

    /// Lets garbage collection remove `id`.
    pub fn unpin(&self, id: &ContentId) -> Result<()> {
        match fs::remove_file(self.root.join("pins").join(id.to_string())) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// The pinned ids.
    pub fn pins(&self) -> Vec<ContentId> {
        let mut v: Vec<ContentId> = fs::read_dir(self.root.join("pins"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect();
        v.sort();
        v
    }

    /// Removes every blob that is neither pinned nor named by a pinned
    /// directory manifest.
    pub fn gc(&self) -> Result<GcReport> {
        self.gc_keeping(&Default::default(), std::time::Duration::ZERO)
    }

    /// [`BlobStore::gc`], also keeping `keep` (what running tasks use) and
    /// every blob written within `fresh` (outputs whose submitters have yet
    /// to fetch them): what the store runs when a fetch would pass its disk
    /// limit.
    pub fn gc_keeping(
        &self,
        keep: &std::collections::HashSet<ContentId>,
        fresh: std::time::Duration,
    ) -> Result<GcReport> {
        let mut keep: std::collections::HashSet<ContentId> = keep.iter().copied().chain(self.pins()).collect();
        for pin in self.pins() {
            if let Ok(bytes) = self.read(&pin)
                && let Ok(m) = DirManifest::decode(&bytes)
            {
                keep.extend(m.entries().iter().map(|e| e.id));
            }
        }
        let mut report = GcReport::default();
        for (id, size) in self.list() {
            let young = !fresh.is_zero()
                && fs::metadata(self.path(&id))
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_none_or(|age| age < fresh);
            if keep.contains(&id) || young {
                report.kept += 1;
                continue;
            }
            fs::remove_file(self.path(&id))?;
            let _ = fs::remove_file(self.outline_path(&id));
            let _ = fs::remove_file(self.root.join("unlisted").join(id.to_string()));
            report.removed += 1;
            report.bytes += size;
        }
        Ok(report)
    }

    /// Writes blob `id` to `out`: a file atomically, or a directory manifest
    /// as the directory it names.
    pub fn export(&self, id: &ContentId, out: &Path) -> Result<()> {
        let bytes_if_manifest = match self.size(id) {
            None => bail!("blob {id} is not held"),
            Some(n) if n <= 16 << 20 => {
                let b = self.read(id)?;
                DirManifest::decode(&b).ok()
            }
            Some(_) => None,
        };
        match bytes_if_manifest {
            Some(m) => {
                for e in m.entries() {
                    if !self.has(&e.id) {
                        bail!("{} ({}) is not held", e.path, e.id);
                    }
                    let dest = out.join(&e.path);
                    copy_atomic(&self.path(&e.id), &dest)?;
                }
                Ok(())
            }
            None => copy_atomic(&self.path(id), out),
        }
    }

    /// A fetch of `id` in progress, resumed if one was interrupted.
    pub fn partial(&self, id: &ContentId, outline: &Outline) -> Result<Partial> {
        Partial::open(self, id, outline, true)
    }
}

/// Removes partial downloads (and their bitmaps) untouched for `ttl`.
fn expire_partials(dir: &Path, ttl: std::time::Duration) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > ttl);
        if old {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Makes a rename in `dir` durable (the directory entry itself is flushed;
/// a no-op where directories cannot be opened, as on Windows).
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The bitmap file's header: which outline its bits are for. A partial
/// blob left by a fetch against another outline (another size) starts over
/// instead of trusting groups that belong to a different layout.
fn outline_digest(outline: &Outline) -> [u8; 32] {
    *blake3::hash(&prost::Message::encode_to_vec(&outline.to_wire())).as_bytes()
}

/// How long a task's result envelope stays valid, and so how long garbage
/// collection under disk pressure keeps a fresh output (written unlisted)
/// for its submitter to fetch.
pub const RESULT_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// How long an unfinished fetch's partial file is kept for resuming.
pub const PARTIAL_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

fn read_full(r: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn walk(root: &Path, dir: &Path, f: &mut dyn FnMut(String, &Path) -> Result<()>) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let ty = e.file_type()?;
        if ty.is_dir() {
            walk(root, &p, f)?;
        } else if ty.is_file() {
            let rel = p.strip_prefix(root)?;
            let parts: Option<Vec<&str>> = rel.components().map(|c| c.as_os_str().to_str()).collect();
            let Some(parts) = parts else {
                bail!("{} is not valid UTF-8", p.display())
            };
            f(parts.join("/"), &p)?;
        }
    }
    Ok(())
}

/// Copies `src` to `dest` atomically (kernels' temporary file, fsync, rename).
fn copy_atomic(src: &Path, dest: &Path) -> Result<()> {
    if let Some(parent) = dest.parent()
        && !parent.as_os_str().is_empty()
    {
        fs::create_dir_all(parent)?;
    }
    let mut from = File::open(src).with_context(|| format!("reading {}", src.display()))?;
    kernels::model::write_atomic(dest, |w| std::io::copy(&mut from, w).map(drop))?;
    Ok(())
}

/// A blob being fetched: verified groups written in place, with a bitmap of
/// those present so an interrupted fetch resumes.
///
/// Groups are written through a [`GroupWriter`], which several threads use
/// at once; [`Partial::mark_written`] then records them.
#[derive(Debug)]
pub struct Partial {
    id: ContentId,
    outline: Outline,
    writer: Arc<GroupWriter>,
    data: PathBuf,
    have_path: PathBuf,
    have: Vec<bool>,
    unsynced: usize,
    store: BlobStore,
}

/// Groups written between fsyncs of a partial blob and its bitmap.
const SYNC_EVERY: usize = 64;

impl Partial {
    fn open(store: &BlobStore, id: &ContentId, outline: &Outline, direct: bool) -> Result<Self> {
        let data = store.root.join("partial").join(id.to_string());
        let have_path = data.with_extension("have");
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data)?;
        file.set_len(outline.size())?;
        let groups = outline.groups() as usize;
        let mut have = vec![false; groups];
        let digest = outline_digest(outline);
        if let Ok(saved) = fs::read(&have_path)
            && saved.len() == 32 + groups
            && saved[..32] == digest
        {
            for (h, b) in have.iter_mut().zip(&saved[32..]) {
                *h = *b == 1;
            }
        }
        let direct = if direct { direct::open(&data) } else { None };
        Ok(Self {
            id: *id,
            outline: outline.clone(),
            writer: Arc::new(GroupWriter {
                file,
                direct,
                refused: Default::default(),
                size: outline.size(),
                spare: std::sync::Mutex::new(Vec::new()),
            }),
            data,
            have_path,
            have,
            unsynced: 0,
            store: store.clone(),
        })
    }

    /// Groups still missing.
    pub fn missing(&self) -> Vec<u64> {
        (0..self.have.len() as u64)
            .filter(|&i| !self.have[i as usize])
            .collect()
    }

    /// The outline being fetched against.
    pub fn outline(&self) -> &Outline {
        &self.outline
    }

    /// Writes groups in place; shared by the threads that write at once.
    pub fn writer(&self) -> Arc<GroupWriter> {
        self.writer.clone()
    }

    /// Verifies group `index` and writes it.
    pub fn write_group(&mut self, index: u64, bytes: &[u8]) -> Result<()> {
        self.outline.check_group(&self.id, index, bytes)?;
        self.writer.write(index, bytes)?;
        self.mark_written(index)
    }

    /// Records group `index`, which the caller checked against this blob's
    /// outline and wrote through [`Partial::writer`]. Every
    /// [`SYNC_EVERY`] groups the data and the bitmap are made durable, so the
    /// bitmap never names a group that a crash could lose.
    pub fn mark_written(&mut self, index: u64) -> Result<()> {
        let Some(h) = self.have.get_mut(index as usize) else {
            bail!("group {index} is out of range");
        };
        if !*h {
            *h = true;
            self.unsynced += 1;
        }
        if self.unsynced >= SYNC_EVERY {
            self.sync()?;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        // One inode: this also flushes what went through the direct handle.
        self.writer.file.sync_data()?;
        let mut bits = outline_digest(&self.outline).to_vec();
        bits.extend(self.have.iter().map(|&h| u8::from(h)));
        let tmp = self.have_path.with_extension("have.tmp");
        fs::write(&tmp, bits)?;
        fs::rename(&tmp, &self.have_path)?;
        self.unsynced = 0;
        Ok(())
    }

    /// Moves the complete blob into the store, once the whole file has been
    /// checked again: its length is the outline's and its blake3 root is the
    /// id. Groups were verified as they arrived; this catches what no group
    /// check can (a file of another length left by a crash or an earlier
    /// fetch, a write the disk lost). A file that fails is removed, so the
    /// next fetch starts clean.
    pub fn finish(self) -> Result<()> {
        if !self.missing().is_empty() {
            bail!("blob {} is missing {} groups", self.id, self.missing().len());
        }
        self.writer.file.sync_all()?;
        let len = self.writer.file.metadata()?.len();
        let root = if len == self.outline.size() {
            let mut h = blake3::Hasher::new();
            h.update_mmap_rayon(&self.data)?;
            Some(ContentId::from_bytes(*h.finalize().as_bytes()))
        } else {
            None
        };
        if root != Some(self.id) {
            let _ = fs::remove_file(&self.data);
            let _ = fs::remove_file(&self.have_path);
            bail!(
                "the fetched file of blob {} is {len} bytes with root {}; expected {} bytes with that root: discarded",
                self.id,
                root.map_or_else(|| "unchecked".to_string(), |r| r.to_string()),
                self.outline.size()
            );
        }
        self.store.commit(&self.data, &self.id, &self.outline)?;
        let _ = fs::remove_file(&self.have_path);
        Ok(())
    }
}

/// Writes the groups of one partial blob at their offsets; any number of
/// threads may write different groups at once.
///
/// Whole groups bypass the page cache where the platform and filesystem
/// allow it (Linux `O_DIRECT`). A fetched blob is written once and read
/// later, so caching it on the way in only costs: copying every byte into
/// newly allocated cache pages took 30% of a 1 GiB loopback fetch's CPU
/// time and twice as long as the network side, and it evicts what the
/// machine's owner had cached. The short last group, and every group where
/// direct writes are refused, goes through the page cache.
#[derive(Debug)]
pub struct GroupWriter {
    file: File,
    /// The same file opened for direct I/O.
    direct: Option<File>,
    /// Set when the filesystem refused a direct write: later groups go
    /// through the page cache without trying again.
    refused: std::sync::atomic::AtomicBool,
    size: u64,
    /// Aligned buffers that direct writes copy groups into, kept for reuse.
    spare: std::sync::Mutex<Vec<direct::Buffer>>,
}

impl GroupWriter {
    /// Writes group `index` (which must be that group's exact bytes).
    pub fn write(&self, index: u64, bytes: &[u8]) -> Result<()> {
        let range = group_range(self.size, index);
        if range.end - range.start != bytes.len() as u64 {
            bail!(
                "group {index} is {} bytes, not {}",
                bytes.len(),
                range.end - range.start
            );
        }
        if let Some(direct) = &self.direct
            && bytes.len() as u64 == GROUP_LEN
            && !self.refused.load(Ordering::Relaxed)
        {
            if self.write_direct(direct, bytes, range.start)? {
                return Ok(());
            }
            tracing::debug!("direct writes refused here; writing through the page cache");
            self.refused.store(true, Ordering::Relaxed);
        }
        write_at(&self.file, bytes, range.start)?;
        Ok(())
    }

    /// Writes a whole group through the direct handle; `false` when the
    /// filesystem refuses direct writes (the caller writes it cached).
    fn write_direct(&self, direct: &File, bytes: &[u8], offset: u64) -> Result<bool> {
        let spare = self.spare.lock().ok().and_then(|mut s| s.pop());
        let mut buf = match spare {
            Some(b) => b,
            None => direct::Buffer::new(GROUP_LEN as usize)?,
        };
        let aligned = buf.as_mut_slice();
        aligned.copy_from_slice(bytes);
        let wrote = match write_at(direct, aligned, offset) {
            Ok(()) => true,
            // Opened, but this filesystem does not take direct writes.
            Err(e) if e.raw_os_error() == Some(direct::REFUSED) => false,
            Err(e) => return Err(e.into()),
        };
        if let Ok(mut spare) = self.spare.lock() {
            spare.push(buf);
        }
        Ok(wrote)
    }
}

/// Direct I/O: opening a file for it, and the aligned buffers it needs.
mod direct {
    use std::fs::File;
    use std::path::Path;

    /// Alignment of a direct write's buffer, offset and length: the largest
    /// logical block size in use (4 KiB), which covers 512-byte devices too.
    pub(super) const ALIGN: usize = 4096;
    // Whole groups start and end on aligned offsets.
    const _: () = assert!((protocol::blob::GROUP_LEN as usize).is_multiple_of(ALIGN));

    /// The error a filesystem gives for a direct write it does not support.
    #[cfg(unix)]
    pub(super) const REFUSED: i32 = libc::EINVAL;
    #[cfg(not(unix))]
    pub(super) const REFUSED: i32 = -1;

    /// `path` opened for writes that bypass the page cache, or `None` where
    /// the platform or filesystem (tmpfs, say) has no such thing.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    pub(super) fn open(path: &Path) -> Option<File> {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    pub(super) fn open(_: &Path) -> Option<File> {
        None
    }

    /// A zeroed heap buffer aligned to [`ALIGN`].
    #[derive(Debug)]
    pub(super) struct Buffer {
        ptr: std::ptr::NonNull<u8>,
        layout: std::alloc::Layout,
    }

    // SAFETY: the buffer owns its allocation outright, like a `Box<[u8]>`.
    unsafe impl Send for Buffer {}

    impl Buffer {
        pub(super) fn new(len: usize) -> anyhow::Result<Self> {
            let layout = std::alloc::Layout::from_size_align(len.max(1), ALIGN)?;
            // SAFETY: the layout's size is not zero.
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            let ptr =
                std::ptr::NonNull::new(ptr).ok_or_else(|| anyhow::anyhow!("out of memory for a {len}-byte buffer"))?;
            Ok(Self { ptr, layout })
        }

        pub(super) fn as_mut_slice(&mut self) -> &mut [u8] {
            // SAFETY: `ptr` is a live, initialized allocation of
            // `layout.size()` bytes that only `self` reaches.
            unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
        }
    }

    impl Drop for Buffer {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with this layout, freed once.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
        }
    }
}

#[cfg(unix)]
fn write_at(f: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(f, bytes, offset)
}

#[cfg(windows)]
fn write_at(f: &File, mut bytes: &[u8], mut offset: u64) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let n = std::os::windows::fs::FileExt::seek_write(f, bytes, offset)?;
        bytes = &bytes[n..];
        offset += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (PathBuf, BlobStore) {
        let d = std::env::temp_dir().join(format!(
            "tern-store-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        let s = BlobStore::open(&d).unwrap();
        (d, s)
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 253) as u8).collect()
    }

    #[test]
    fn files_and_directories_import_under_their_blake3_ids() {
        let (d, s) = store();
        let src = d.join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        let big = data(3 * GROUP_LEN as usize + 11);
        fs::write(src.join("model.gguf"), &big).unwrap();
        fs::write(src.join("sub/tokenizer.json"), b"{}").unwrap();
        let (id, size) = s.import_file(&src.join("model.gguf")).unwrap();
        assert_eq!(id, ContentId::of(&big));
        assert_eq!(size, big.len() as u64);
        assert_eq!(s.read(&id).unwrap(), big);
        assert_eq!(s.outline(&id).unwrap(), Outline::of(&big));
        let mut group = b"header".to_vec();
        s.read_group_into(&id, 3, &mut group, |len, out| out.extend_from_slice(&len.to_le_bytes()))
            .unwrap();
        let tail = &big[3 * GROUP_LEN as usize..];
        assert_eq!(
            group,
            [b"header", &(tail.len() as u64).to_le_bytes()[..], tail].concat()
        );
        assert!(
            s.read_group_into(&id, 4, &mut group, |_, _| {}).is_err(),
            "a group past the end"
        );

        let imported = s.import(&src).unwrap();
        assert!(imported.dir);
        assert_eq!(imported.files, 2);
        let m = DirManifest::decode(&s.read(&imported.id).unwrap()).unwrap();
        let paths: Vec<&str> = m.entries().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["model.gguf", "sub/tokenizer.json"]);

        let out = d.join("out");
        s.export(&imported.id, &out).unwrap();
        assert_eq!(fs::read(out.join("model.gguf")).unwrap(), big);
        assert_eq!(fs::read(out.join("sub/tokenizer.json")).unwrap(), b"{}");
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn garbage_collection_keeps_pins_and_what_pinned_manifests_name() {
        let (d, s) = store();
        let src = d.join("dir");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("a"), b"a").unwrap();
        let dir = s.import(&src).unwrap().id;
        let loose = s.put(b"loose").unwrap();
        let pinned = s.put(b"pinned").unwrap();
        s.pin(&dir).unwrap();
        s.pin(&pinned).unwrap();
        let r = s.gc().unwrap();
        assert_eq!(r.removed, 1);
        assert!(!s.has(&loose) && s.has(&pinned) && s.has(&dir) && s.has(&ContentId::of(b"a")));
        s.unpin(&dir).unwrap();
        assert_eq!(s.gc().unwrap().removed, 2);
        fs::remove_dir_all(d).unwrap();
    }

    /// One fetch: a bad group refused, a good one kept across an
    /// interruption, the rest written from several threads at once.
    fn partial_fetch(direct: bool) {
        let (d, s) = store();
        let big = data(4 * GROUP_LEN as usize + 5);
        let id = ContentId::of(&big);
        let outline = Outline::of(&big);
        let group = |i: u64| {
            let r = group_range(big.len() as u64, i);
            &big[r.start as usize..r.end as usize]
        };
        let mut p = Partial::open(&s, &id, &outline, direct).unwrap();
        assert_eq!(p.writer.direct.is_some(), direct && direct::open(&p.data).is_some());
        let mut bad = group(1).to_vec();
        bad[0] ^= 1;
        assert!(p.write_group(1, &bad).is_err());
        assert!(
            p.writer().write(1, &group(1)[1..]).is_err(),
            "a group of the wrong length"
        );
        assert!(p.mark_written(5).is_err(), "a group past the end");
        p.write_group(1, group(1)).unwrap();
        p.sync().unwrap();
        drop(p);
        // A new fetch resumes with group 1 already there.
        let mut p = Partial::open(&s, &id, &outline, direct).unwrap();
        assert_eq!(p.missing(), [0, 2, 3, 4]);
        let writer = p.writer();
        std::thread::scope(|scope| {
            for g in [0, 2, 3, 4] {
                let (w, bytes) = (writer.clone(), group(g));
                scope.spawn(move || w.write(g, bytes).unwrap());
            }
        });
        for g in [0, 2, 3, 4] {
            p.mark_written(g).unwrap();
        }
        drop(writer);
        p.finish().unwrap();
        assert_eq!(s.read(&id).unwrap(), big);
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn partial_fetches_verify_each_group_and_resume_writing_directly() {
        partial_fetch(true);
    }

    #[test]
    fn partial_fetches_verify_each_group_and_resume_through_the_page_cache() {
        partial_fetch(false);
    }
}
