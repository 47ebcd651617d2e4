//! [`TernaryMatrix`]: tern's packed compute layout for ternary weights.
//!
//! A matrix of `rows x cols` weights in {-1, 0, +1} with one per-tensor scale,
//! as BitNet b1.58 defines a BitLinear weight (`rows` = output features,
//! `cols` = input features). Each row is split into groups of [`GROUP`]
//! columns, and each group is stored in [`GROUP_BYTES`] bytes with the x86
//! interleave of bitnet.cpp's `I2_S`: byte `p` of a group holds the codes of
//! columns `p`, `p + 32`, `p + 64` and `p + 96` in bits 7:6, 5:4, 3:2 and 1:0.
//! Codes are `weight + 1` (0 = -1, 1 = 0, 2 = +1); 3 never occurs.
//!
//! Why this layout: one 32-byte load, a shift and a mask give the codes of
//! 32 consecutive columns as bytes, exactly the operand that `vpdpbusd`
//! (unsigned codes times signed int8 activations) or `vpmaddubsw` wants, and
//! four consecutive columns of one row are the same bit pair of four
//! consecutive bytes, which makes packing panels for GEMM a shift and a mask
//! of one `u32`. A row whose length is not a multiple of [`GROUP`] is padded
//! with code 1 (weight 0), so padding never changes a result.

use std::ops::{Deref, Range};
use std::path::PathBuf;
use std::sync::Arc;

use crate::{Error, Result};

/// Immutable bytes that clone without copying: an owned buffer, or a window
/// into something larger that outlives every clone (a memory-mapped file).
#[derive(Clone)]
pub struct SharedBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
    /// Set when the owner is a read-only map of this whole file (from
    /// offset 0): resident pages can then be dropped and read again (see
    /// [`SharedBytes::release`]), and the bytes can be read with `pread`
    /// without mapping them at all ([`SharedBytes::detached`]).
    file: Option<Arc<MappedFile>>,
}

/// The file behind a memory map, for reads that bypass the map.
pub(crate) struct MappedFile {
    pub(crate) file: std::fs::File,
    pub(crate) path: PathBuf,
}

impl SharedBytes {
    /// A window `range` into `owner`.
    pub fn new(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, range: Range<usize>) -> Result<Self> {
        let total = (*owner).as_ref().len();
        if range.start > range.end || range.end > total {
            return Err(Error::Length {
                what: "shared byte range",
                expected: total,
                actual: range.end,
            });
        }
        Ok(Self {
            owner,
            start: range.start,
            len: range.end - range.start,
            file: None,
        })
    }

    /// Marks these bytes as a window into a read-only memory map of the
    /// whole of `file`, starting at its offset 0 (which the caller
    /// guarantees), so that [`SharedBytes::release`] may drop their
    /// resident pages and [`SharedBytes::detached`] may read them from the
    /// file instead.
    pub(crate) fn mark_mapped(mut self, file: Arc<MappedFile>) -> Self {
        self.file = Some(file);
        self
    }

    /// Whether these bytes are a window of a file map.
    pub fn is_mapped(&self) -> bool {
        self.file.is_some()
    }

    /// An owned copy of these bytes that shares nothing with a file map:
    /// for a window of a map they are read from the file with positioned
    /// reads, so the map's pages never enter the process's resident set
    /// (they go through the OS page cache, which is not charged to the
    /// process); other bytes are shared as they are, without a copy.
    ///
    /// Training streams each block's weights through this: the resident
    /// cost of the model is then one block's copy, whatever the page cache
    /// does with the map (where large folios are mapped 2 MiB at a time,
    /// `madvise` could not reliably drop them).
    pub fn detached(&self) -> Result<Self> {
        let Some(f) = &self.file else {
            return Ok(self.clone());
        };
        #[cfg(any(unix, windows))]
        {
            let mut buf = vec![0u8; self.len];
            read_at(f, self.start, &mut buf)?;
            Ok(buf.into())
        }
        #[cfg(not(any(unix, windows)))]
        {
            let _ = f;
            Ok(self.to_vec().into())
        }
    }

    /// Tells the OS that the process no longer needs these bytes resident:
    /// for a file map, the pages leave the process's resident set (the page
    /// cache keeps them; the next read maps them again, from disk if they
    /// were evicted). Owned buffers are untouched. Loading calls this after
    /// validating a tensor, and training once before it starts streaming
    /// (see [`SharedBytes::detached`]).
    ///
    /// The range released is the window rounded *out* to 2 MiB, clamped to
    /// the map: the kernel maps a file's large folios whole when one of
    /// their pages is read (one embedding row brings in up to 2 MiB around
    /// it), and releasing only the window's own pages would leave the rest
    /// mapped. Dropping a neighbour's pages is harmless: the map is
    /// read-only and they come back on their next read.
    pub fn release(&self) {
        #[cfg(unix)]
        if self.file.is_some() && self.len > 0 {
            const SPAN: usize = 2 << 20;
            let whole: &[u8] = (*self.owner).as_ref();
            let (map_start, map_end) = (whole.as_ptr() as usize, whole.as_ptr() as usize + whole.len());
            // SAFETY: sysconf has no preconditions.
            let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
            let begin = map_start + self.start;
            let start = (begin / SPAN * SPAN).max(map_start).next_multiple_of(page);
            let end = ((begin + self.len).next_multiple_of(SPAN)).min(map_end) / page * page;
            if end > start {
                // SAFETY: [start, end) lies inside a read-only file mapping
                // that outlives `self` (memory maps are page-aligned, so
                // rounding to pages stays inside it); MADV_DONTNEED on such a
                // mapping only drops page-table entries, and later reads see
                // the file's bytes again, so no data changes.
                unsafe {
                    libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
                }
            }
        }
    }
}

/// Fills `buf` from `f` at byte `offset`, without the map.
#[cfg(unix)]
fn read_at(f: &MappedFile, offset: usize, buf: &mut [u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    f.file
        .read_exact_at(buf, offset as u64)
        .map_err(|e| Error::io(&f.path, e))
}

/// Fills `buf` from `f` at byte `offset`, without the map.
#[cfg(windows)]
fn read_at(f: &MappedFile, offset: usize, buf: &mut [u8]) -> Result<()> {
    use std::os::windows::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match f.file.seek_read(&mut buf[done..], (offset + done) as u64) {
            Ok(0) => {
                return Err(Error::io(
                    &f.path,
                    std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                ));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(&f.path, e)),
        }
    }
    Ok(())
}

impl SharedBytes {
    /// A sub-window `range` of these bytes, sharing the owner.
    pub fn slice(&self, range: Range<usize>) -> Result<Self> {
        if range.start > range.end || range.end > self.len {
            return Err(Error::Length {
                what: "shared byte range",
                expected: self.len,
                actual: range.end,
            });
        }
        Ok(Self {
            owner: self.owner.clone(),
            start: self.start + range.start,
            len: range.end - range.start,
            file: self.file.clone(),
        })
    }
}

impl From<Vec<u8>> for SharedBytes {
    fn from(v: Vec<u8>) -> Self {
        let len = v.len();
        Self {
            owner: Arc::new(v),
            start: 0,
            len,
            file: None,
        }
    }
}

impl Deref for SharedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedBytes({} bytes)", self.len)
    }
}

/// Columns per packed group.
pub const GROUP: usize = 128;
/// Bytes per packed group (2 bits per weight).
pub const GROUP_BYTES: usize = GROUP / 4;
/// The code of a zero weight, used for padding.
pub(crate) const ZERO_CODE: u8 = 1;
/// A packed group of zero weights.
const ZERO_BYTE: u8 = 0b0101_0101;

/// A ternary weight matrix in tern's packed layout, with a per-tensor scale.
/// Cloning shares the packed bytes.
#[derive(Clone)]
pub struct TernaryMatrix {
    rows: usize,
    cols: usize,
    scale: f32,
    data: SharedBytes,
}

impl PartialEq for TernaryMatrix {
    fn eq(&self, other: &Self) -> bool {
        self.rows == other.rows && self.cols == other.cols && self.scale == other.scale && *self.data == *other.data
    }
}

impl std::fmt::Debug for TernaryMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TernaryMatrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("scale", &self.scale)
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// Checks that a scale is finite and not negative.
pub(crate) fn check_scale(what: &'static str, scale: f32) -> Result<()> {
    if scale.is_finite() && scale >= 0.0 {
        Ok(())
    } else {
        Err(Error::Scale { what, value: scale })
    }
}

/// Bytes of one packed row of `cols` columns.
pub const fn row_bytes(cols: usize) -> usize {
    cols.div_ceil(GROUP) * GROUP_BYTES
}

/// Where column `col` lives inside a packed row: (byte index, right shift).
#[inline]
pub(crate) const fn locate(col: usize) -> (usize, u32) {
    let group = col / GROUP;
    let within = col % GROUP;
    (
        group * GROUP_BYTES + within % GROUP_BYTES,
        6 - 2 * (within / GROUP_BYTES) as u32,
    )
}

impl TernaryMatrix {
    /// Packs row-major weights in {-1, 0, +1}.
    pub fn from_trits(rows: usize, cols: usize, trits: &[i8], scale: f32) -> Result<Self> {
        check_shape(rows, cols)?;
        check_scale("ternary matrix", scale)?;
        let expected = rows.checked_mul(cols).ok_or_else(|| overflow(rows, cols))?;
        if trits.len() != expected {
            return Err(Error::Length {
                what: "ternary matrix weights",
                expected,
                actual: trits.len(),
            });
        }
        if let Some(index) = trits.iter().position(|t| !(-1..=1).contains(t)) {
            return Err(Error::Code {
                what: "ternary matrix weights",
                index,
                value: trits[index].into(),
            });
        }
        let stride = row_bytes(cols);
        let mut data = vec![0u8; rows * stride];
        for (row, packed) in trits.chunks_exact(cols.max(1)).zip(data.chunks_exact_mut(stride)) {
            pack_row(row, packed);
        }
        Ok(Self {
            rows,
            cols,
            scale,
            data: data.into(),
        })
    }

    /// Takes bytes already in tern's layout, checking length and codes.
    pub fn from_packed(rows: usize, cols: usize, mut data: Vec<u8>, scale: f32) -> Result<Self> {
        check_packed(rows, cols, &data, scale)?;
        clear_padding(&mut data, cols);
        Ok(Self {
            rows,
            cols,
            scale,
            data: data.into(),
        })
    }

    /// Like [`TernaryMatrix::from_packed`] but without a copy where it can:
    /// the bytes stay where they are (a memory map) unless ragged rows carry
    /// padding codes that must be cleared.
    pub fn from_shared(rows: usize, cols: usize, data: SharedBytes, scale: f32) -> Result<Self> {
        check_packed(rows, cols, &data, scale)?;
        // Checking read every page; a mapped file's pages need not stay
        // resident until a product reads them (loading a model then costs
        // no more memory than its largest tensor).
        data.release();
        if !cols.is_multiple_of(GROUP) {
            return Self::from_packed(rows, cols, data.to_vec(), scale);
        }
        Ok(Self {
            rows,
            cols,
            scale,
            data,
        })
    }
}

fn check_packed(rows: usize, cols: usize, data: &[u8], scale: f32) -> Result<()> {
    check_shape(rows, cols)?;
    check_scale("ternary matrix", scale)?;
    let stride = row_bytes(cols);
    let expected = rows.checked_mul(stride).ok_or_else(|| overflow(rows, cols))?;
    if data.len() != expected {
        return Err(Error::Length {
            what: "packed ternary matrix",
            expected,
            actual: data.len(),
        });
    }
    if let Some(index) = data.iter().position(|&b| has_code3(b)) {
        return Err(Error::Code {
            what: "packed ternary matrix",
            index: index * 4,
            value: 3,
        });
    }
    Ok(())
}

impl TernaryMatrix {
    /// A matrix of zeros.
    pub fn zeros(rows: usize, cols: usize, scale: f32) -> Result<Self> {
        check_shape(rows, cols)?;
        check_scale("ternary matrix", scale)?;
        let len = rows.checked_mul(row_bytes(cols)).ok_or_else(|| overflow(rows, cols))?;
        Ok(Self {
            rows,
            cols,
            scale,
            data: vec![ZERO_BYTE; len].into(),
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The per-tensor scale: a weight's value is `trit * scale`.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Bytes of one packed row (a multiple of [`GROUP_BYTES`]).
    pub fn row_stride(&self) -> usize {
        row_bytes(self.cols)
    }

    /// The packed bytes, row after row.
    pub fn as_bytes(&self) -> &[u8] {
        &self.data
    }

    /// One packed row.
    pub fn row(&self, r: usize) -> &[u8] {
        let s = self.row_stride();
        &self.data[r * s..(r + 1) * s]
    }

    /// The weight at (`row`, `col`) as -1, 0 or +1.
    pub fn get(&self, row: usize, col: usize) -> i8 {
        assert!(row < self.rows && col < self.cols, "index out of bounds");
        let (byte, shift) = locate(col);
        ((self.row(row)[byte] >> shift) & 3) as i8 - 1
    }

    /// All weights, row-major, as -1, 0 or +1.
    pub fn to_trits(&self) -> Vec<i8> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            let row = self.row(r);
            out.extend((0..self.cols).map(|c| {
                let (byte, shift) = locate(c);
                ((row[byte] >> shift) & 3) as i8 - 1
            }));
        }
        out
    }

    /// Replaces the scale.
    pub fn with_scale(mut self, scale: f32) -> Result<Self> {
        check_scale("ternary matrix", scale)?;
        self.scale = scale;
        Ok(self)
    }

    /// Drops the packed bytes from the resident set where they are a window
    /// of a file map (see [`SharedBytes::release`]).
    pub fn release(&self) {
        self.data.release();
    }

    /// The packed bytes as shared storage.
    pub fn shared_bytes(&self) -> &SharedBytes {
        &self.data
    }

    /// The same matrix over a private copy of its bytes, read from the file
    /// where they are a window of a file map (see [`SharedBytes::detached`]);
    /// the bytes were checked when the matrix was made.
    pub fn detached(&self) -> Result<Self> {
        Ok(Self {
            data: self.data.detached()?,
            ..self.clone()
        })
    }
}

/// Sets every padding code to zero weight, so equal matrices have equal bytes.
fn clear_padding(data: &mut [u8], cols: usize) {
    let stride = row_bytes(cols);
    if cols.is_multiple_of(GROUP) {
        return;
    }
    for row in data.chunks_exact_mut(stride) {
        for c in cols..stride * 4 {
            let (byte, shift) = locate(c);
            row[byte] = (row[byte] & !(3 << shift)) | (ZERO_CODE << shift);
        }
    }
}

/// Packs one row of trits into `packed` (which has [`row_bytes`] bytes).
fn pack_row(trits: &[i8], packed: &mut [u8]) {
    packed.fill(ZERO_BYTE);
    for (c, &t) in trits.iter().enumerate() {
        let (byte, shift) = locate(c);
        packed[byte] = (packed[byte] & !(3 << shift)) | (((t + 1) as u8) << shift);
    }
}

fn has_code3(b: u8) -> bool {
    // A 2-bit field is 3 when both of its bits are set.
    (b & (b >> 1) & 0b0101_0101) != 0
}

fn check_shape(rows: usize, cols: usize) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Err(Error::Shape {
            what: "ternary matrix",
            reason: format!("{rows} x {cols} has no elements"),
        });
    }
    Ok(())
}

fn overflow(rows: usize, cols: usize) -> Error {
    Error::Shape {
        what: "ternary matrix",
        reason: format!("{rows} x {cols} overflows memory"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_i2s_interleave() {
        // Column 0 at bits 7:6, 32 at 5:4, 64 at 3:2, 96 at 1:0 of byte 0.
        let mut trits = vec![0i8; 130];
        trits[0] = 1; // code 2
        trits[32] = -1; // code 0
        trits[96] = 1; // code 2
        trits[129] = -1; // second group, byte 1, bits 7:6
        let m = TernaryMatrix::from_trits(1, 130, &trits, 1.0).unwrap();
        assert_eq!(m.row_stride(), 64);
        assert_eq!(m.as_bytes()[0], 0b10_00_01_10);
        assert_eq!(m.as_bytes()[33], 0b00_01_01_01);
        // Padding columns 130.. hold zero codes.
        assert_eq!(m.as_bytes()[34], ZERO_BYTE);
        assert_eq!(m.to_trits(), trits);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            TernaryMatrix::from_trits(2, 2, &[0, 1, 2, 0], 1.0),
            Err(Error::Code { index: 2, .. })
        ));
        assert!(matches!(
            TernaryMatrix::from_trits(2, 2, &[0, 1, 0], 1.0),
            Err(Error::Length { .. })
        ));
        assert!(matches!(
            TernaryMatrix::from_trits(1, 1, &[0], f32::NAN),
            Err(Error::Scale { .. })
        ));
        assert!(matches!(
            TernaryMatrix::from_trits(0, 4, &[], 1.0),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            TernaryMatrix::from_packed(1, 128, vec![0xff; 32], 1.0),
            Err(Error::Code { value: 3, .. })
        ));
    }

    #[test]
    fn from_packed_canonicalises_padding() {
        let m = TernaryMatrix::from_packed(1, 1, vec![0; 32], 0.5).unwrap();
        assert_eq!(m.to_trits(), vec![-1]);
        assert_eq!(m, TernaryMatrix::from_trits(1, 1, &[-1], 0.5).unwrap());
    }
}
