//! Verified blob transfer: outlines of 1 MiB groups checked against the
//! blake3 root, and directory manifests.
//!
//! A blob's id is plain `blake3(bytes)`. blake3 is a Merkle tree over 1 KiB
//! chunks, and every aligned run of 1024 chunks (one 1 MiB *group*) is a
//! subtree of it. A blob's [`Outline`] lists the chaining value of each
//! group; merging them up the tree gives the root, so an outline is checked
//! against the id alone, and then each group is checked against its own
//! chaining value as it arrives, from any peer, in any order.

use blake3::hazmat::{ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root};
use prost::Message as _;

use crate::limits::{MAX_BLOB_BYTES, MAX_DIR_ENTRIES, MAX_PATH};
use crate::{ContentId, Error, Result, wire};

/// Bytes per group: 1024 blake3 chunks.
pub const GROUP_LEN: u64 = 1 << 20;

/// Number of groups of a blob of `size` bytes (an empty blob has one, empty).
pub fn group_count(size: u64) -> u64 {
    size.div_ceil(GROUP_LEN).max(1)
}

/// Byte range of group `index` in a blob of `size` bytes.
pub fn group_range(size: u64, index: u64) -> std::ops::Range<u64> {
    let start = index.saturating_mul(GROUP_LEN).min(size);
    start..(start.saturating_add(GROUP_LEN)).min(size)
}

/// The chaining value of group `index`, whose bytes are `bytes`, in a blob
/// of more than one group.
pub fn group_chaining_value(index: u64, bytes: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index * GROUP_LEN);
    h.update(bytes);
    h.finalize_non_root()
}

/// A blob's size and per-group chaining values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outline {
    size: u64,
    cvs: Vec<ChainingValue>,
}

impl Outline {
    /// The outline of a blob from its groups' chaining values, in order
    /// (none when the blob is a single group).
    pub fn new(size: u64, cvs: Vec<ChainingValue>) -> Self {
        Self { size, cvs }
    }

    /// The outline of bytes held in memory.
    pub fn of(bytes: &[u8]) -> Self {
        let size = bytes.len() as u64;
        let cvs = if group_count(size) == 1 {
            Vec::new()
        } else {
            bytes
                .chunks(GROUP_LEN as usize)
                .enumerate()
                .map(|(i, g)| group_chaining_value(i as u64, g))
                .collect()
        };
        Self { size, cvs }
    }

    /// Blob size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of groups.
    pub fn groups(&self) -> u64 {
        group_count(self.size)
    }

    /// Decodes a wire outline and checks it against `id`.
    pub fn from_wire(w: wire::Outline, id: &ContentId) -> Result<Self> {
        if w.size > MAX_BLOB_BYTES {
            return Err(Error::invalid(
                "outline",
                format!("blob of {} bytes is over the limit", w.size),
            ));
        }
        let groups = group_count(w.size);
        let expected = if groups == 1 { 0 } else { groups as usize * 32 };
        if w.chaining_values.len() != expected {
            return Err(Error::invalid(
                "outline",
                format!(
                    "{} bytes of chaining values for {groups} groups",
                    w.chaining_values.len()
                ),
            ));
        }
        let cvs = w
            .chaining_values
            .chunks_exact(32)
            .map(|c| c.try_into().unwrap_or([0; 32]))
            .collect();
        let outline = Self { size: w.size, cvs };
        outline.verify(id)?;
        Ok(outline)
    }

    /// Decodes an encoded [`wire::Outline`] and checks it against `id`,
    /// refusing more chaining values than the largest blob has (or more
    /// heap than the [`budget`](crate::budget)) before allocating.
    pub fn decode(bytes: &[u8], id: &ContentId) -> Result<Self> {
        crate::budget::check(bytes, &crate::budget::OUTLINE)?;
        let w = wire::Outline::decode(bytes).map_err(|e| Error::decode("outline", e))?;
        Self::from_wire(w, id)
    }

    /// The wire form.
    pub fn to_wire(&self) -> wire::Outline {
        wire::Outline {
            size: self.size,
            chaining_values: self.cvs.concat(),
        }
    }

    /// The content id the chaining values merge to; `None` for a
    /// single-group blob, whose id is the plain hash of its bytes.
    pub fn root(&self) -> Option<ContentId> {
        if self.groups() == 1 || self.cvs.len() as u64 != self.groups() {
            return None;
        }
        let (left, right) = split(&self.cvs);
        Some(merge_subtrees_root(&merge(left), &merge(right), Mode::Hash).into())
    }

    /// Checks that the chaining values merge to `id`. A single-group
    /// outline carries nothing to check; its one group is checked whole.
    pub fn verify(&self, id: &ContentId) -> Result<()> {
        if self.groups() == 1 {
            return Ok(());
        }
        if self.root().as_ref() != Some(id) {
            return Err(Error::BlobMismatch { what: "outline".into() });
        }
        Ok(())
    }

    /// The blob's size as the bytes of its last group prove it.
    ///
    /// The chaining values bind every group's bytes but not the length of
    /// the last group within its 1 MiB: an outline whose size lies inside
    /// the last group (or any size up to 1 MiB for a one-group blob) still
    /// merges to the id, and honest providers' groups would then look
    /// wrong. Bytes that hash, at their own length, to the last group's
    /// chaining value (to the id for a one-group blob) fix the size: no one
    /// can make other bytes that do.
    pub fn proven_size(&self, id: &ContentId, bytes: &[u8]) -> Result<u64> {
        let last = self.groups() - 1;
        let ok = bytes.len() as u64 <= GROUP_LEN
            && if self.groups() == 1 {
                blake3::hash(bytes).as_bytes() == id.as_bytes()
            } else {
                !bytes.is_empty() && group_chaining_value(last, bytes) == self.cvs[last as usize]
            };
        if !ok {
            return Err(Error::BlobMismatch {
                what: format!("last group ({} bytes)", bytes.len()),
            });
        }
        Ok(last * GROUP_LEN + bytes.len() as u64)
    }

    /// The same chaining values for a blob of `size` bytes, when that is
    /// one of the sizes they allow (see [`Outline::proven_size`]).
    pub fn with_size(&self, size: u64) -> Option<Self> {
        (group_count(size) == self.groups() && size <= MAX_BLOB_BYTES).then(|| Self {
            size,
            cvs: self.cvs.clone(),
        })
    }

    /// Checks the bytes of group `index` of blob `id`.
    pub fn check_group(&self, id: &ContentId, index: u64, bytes: &[u8]) -> Result<()> {
        let range = group_range(self.size, index);
        if index >= self.groups() || bytes.len() as u64 != range.end - range.start {
            return Err(Error::invalid(
                "blob group",
                format!("group {index} of {} bytes for a blob of {}", bytes.len(), self.size),
            ));
        }
        let ok = if self.groups() == 1 {
            blake3::hash(bytes).as_bytes() == id.as_bytes()
        } else {
            group_chaining_value(index, bytes) == self.cvs[index as usize]
        };
        if ok {
            Ok(())
        } else {
            Err(Error::BlobMismatch {
                what: format!("group {index}"),
            })
        }
    }
}

/// Splits subtrees as blake3 does: the left side takes the largest power of
/// two strictly less than the count.
fn split(cvs: &[ChainingValue]) -> (&[ChainingValue], &[ChainingValue]) {
    debug_assert!(cvs.len() > 1);
    // next_power_of_two is >= len, so half of it is the largest power below.
    cvs.split_at(cvs.len().next_power_of_two() / 2)
}

fn merge(cvs: &[ChainingValue]) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let (l, r) = split(cvs);
    merge_subtrees_non_root(&merge(l), &merge(r), Mode::Hash)
}

/// A directory as one blob: its files' relative paths, ids and sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirManifest {
    entries: Vec<DirEntry>,
}

/// One file of a [`DirManifest`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DirEntry {
    /// Relative path with `/` separators.
    pub path: String,
    /// The file's content id.
    pub id: ContentId,
    /// Its size in bytes.
    pub size: u64,
}

/// Whether `path` is a safe relative path: no root, no `..` or `.`, no empty
/// components, no backslashes or NULs.
fn check_path(path: &str) -> Result<()> {
    let bad = path.is_empty()
        || path.len() > MAX_PATH
        || path.contains('\\')
        || path.contains('\0')
        || path.split('/').any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        Err(Error::invalid(
            "manifest path",
            format!("{:?}", path.chars().take(80).collect::<String>()),
        ))
    } else {
        Ok(())
    }
}

impl DirManifest {
    /// A manifest of these entries, sorted by path; refuses unsafe or
    /// repeated paths.
    pub fn new(mut entries: Vec<DirEntry>) -> Result<Self> {
        if entries.len() > MAX_DIR_ENTRIES {
            return Err(Error::TooLarge {
                what: "manifest",
                len: entries.len(),
                max: MAX_DIR_ENTRIES,
            });
        }
        for e in &entries {
            check_path(&e.path)?;
        }
        entries.sort();
        if entries.windows(2).any(|w| w[0].path == w[1].path) {
            return Err(Error::invalid("manifest", "a path appears twice"));
        }
        Ok(Self { entries })
    }

    /// The entries, sorted by path.
    pub fn entries(&self) -> &[DirEntry] {
        &self.entries
    }

    /// The blob bytes (deterministic: equal directories give equal ids).
    pub fn encode(&self) -> Vec<u8> {
        wire::DirManifest {
            entries: self
                .entries
                .iter()
                .map(|e| wire::DirEntry {
                    path: e.path.clone(),
                    id: e.id.as_bytes().to_vec(),
                    size: e.size,
                })
                .collect(),
        }
        .encode_to_vec()
    }

    /// Decodes and validates blob bytes, refusing more entries than
    /// [`MAX_DIR_ENTRIES`] (or more heap than the
    /// [`budget`](crate::budget)) before allocating for them.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        crate::budget::check(bytes, &crate::budget::DIR_MANIFEST)?;
        let w = wire::DirManifest::decode(bytes).map_err(|e| Error::decode("manifest", e))?;
        let entries = w
            .entries
            .into_iter()
            .map(|e| {
                Ok(DirEntry {
                    path: e.path,
                    id: crate::advert::id("manifest entry", &e.id)?,
                    size: e.size,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let m = Self::new(entries)?;
        if m.encode() != bytes {
            return Err(Error::invalid("manifest", "not in canonical form"));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn outlines_merge_to_the_blake3_root() {
        let g = GROUP_LEN as usize;
        for n in [0, 1, 1024, g - 1, g, g + 1, 2 * g, 3 * g + 5, 4 * g, 5 * g + 1] {
            let data = bytes(n);
            let id = ContentId::of(&data);
            let o = Outline::of(&data);
            o.verify(&id).unwrap_or_else(|e| panic!("{n} bytes: {e}"));
            let o = Outline::from_wire(o.to_wire(), &id).unwrap();
            for i in 0..o.groups() {
                let r = group_range(n as u64, i);
                o.check_group(&id, i, &data[r.start as usize..r.end as usize]).unwrap();
            }
        }
    }

    #[test]
    fn the_last_group_proves_a_size_the_outline_cannot() {
        for len in [1000usize, 3 * GROUP_LEN as usize + 12_345] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let id = ContentId::of(&data);
            let honest = Outline::of(&data);
            // A size that lies within the last group still merges to the id.
            let lie = honest.with_size(len as u64 - 100).unwrap();
            assert!(lie.verify(&id).is_ok(), "the lie is not caught by the chaining values");
            let last = (honest.groups() - 1) as usize * GROUP_LEN as usize;
            let tail = &data[last..];
            assert_eq!(lie.proven_size(&id, tail).unwrap(), len as u64);
            assert_eq!(honest.proven_size(&id, tail).unwrap(), len as u64);
            assert!(lie.proven_size(&id, &tail[..tail.len() - 100]).is_err());
            assert!(lie.proven_size(&id, &[0u8; 5]).is_err());
        }
    }

    #[test]
    fn tampered_outlines_and_groups_are_caught() {
        let g = GROUP_LEN as usize;
        let data = bytes(3 * g + 7);
        let id = ContentId::of(&data);
        let mut w = Outline::of(&data).to_wire();
        w.chaining_values[40] ^= 1;
        assert!(Outline::from_wire(w, &id).is_err());
        let mut w = Outline::of(&data).to_wire();
        w.size += GROUP_LEN;
        assert!(Outline::from_wire(w, &id).is_err(), "size lie accepted");
        // A size lie within the last group passes the outline, but no bytes
        // of that length match the last group's chaining value.
        let mut w = Outline::of(&data).to_wire();
        w.size += 1;
        let liar = Outline::from_wire(w, &id).unwrap();
        let mut last = data[3 * g..].to_vec();
        last.push(0);
        assert!(liar.check_group(&id, 3, &last).is_err());
        let o = Outline::of(&data);
        let mut group = data[g..2 * g].to_vec();
        group[5] ^= 1;
        assert!(matches!(o.check_group(&id, 1, &group), Err(Error::BlobMismatch { .. })));
        // Group 0's bytes are not group 1's, even though the lengths agree.
        assert!(o.check_group(&id, 1, &data[..g]).is_err());
        assert!(o.check_group(&id, 9, &data[..7]).is_err());
        // A single-group blob is checked whole.
        let small = bytes(100);
        let sid = ContentId::of(&small);
        let so = Outline::from_wire(Outline::of(&small).to_wire(), &sid).unwrap();
        assert!(so.check_group(&sid, 0, &bytes(99)).is_err());
        let mut tampered = small.clone();
        tampered[0] ^= 1;
        assert!(so.check_group(&sid, 0, &tampered).is_err());
    }

    #[test]
    fn manifests_are_canonical_and_refuse_unsafe_paths() {
        let e = |p: &str| DirEntry {
            path: p.into(),
            id: ContentId::of(p.as_bytes()),
            size: 1,
        };
        let m = DirManifest::new(vec![e("b/c.json"), e("a.gguf")]).unwrap();
        assert_eq!(m.entries()[0].path, "a.gguf");
        assert_eq!(DirManifest::decode(&m.encode()).unwrap(), m);
        for bad in ["", "/etc/passwd", "../x", "a/../b", "a//b", "./a", "a\\b", "a/"] {
            assert!(DirManifest::new(vec![e(bad)]).is_err(), "{bad:?} accepted");
        }
        assert!(DirManifest::new(vec![e("a"), e("a")]).is_err());
    }
}
