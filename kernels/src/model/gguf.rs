//! GGUF v3 (llama.cpp's model file): a reader that maps the file and checks
//! every count, length and offset before use, and a writer.
//!
//! Layout: magic `GGUF`, version (u32), tensor count and metadata count
//! (u64), the metadata key-value pairs, the tensor infos (name, dims with the
//! fastest-varying first, type, offset), padding to `general.alignment`
//! (32 by default), then the tensor data.
//!
//! Parsing is bounded by the file: every count is checked against the
//! bytes left before anything is allocated for it, arrays are held as
//! vectors of their item type (a U8 array costs a byte an item), and what
//! each allocation will take is charged first against a budget of
//! `BUDGET_PER_BYTE` (4) bytes per byte of the file plus `BUDGET_SLACK`
//! (64 KiB); a file whose metadata and tensor table would take more is
//! refused.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use crate::model::write_atomic;
use crate::ternary::MappedFile;
use crate::{Error, Result, SharedBytes};

/// ggml type ids of the tensors tern reads and writes.
pub mod ggml_type {
    pub const F32: u32 = 0;
    pub const F16: u32 = 1;
    pub const Q4_0: u32 = 2;
    pub const Q8_0: u32 = 8;
    pub const Q4_K: u32 = 12;
    pub const Q6_K: u32 = 14;
    pub const BF16: u32 = 30;
    pub const TQ1_0: u32 = 34;
    pub const TQ2_0: u32 = 35;
    /// bitnet.cpp's fork of ggml.
    pub const I2_S: u32 = 36;

    /// A name for messages.
    pub fn name(t: u32) -> String {
        match t {
            F32 => "F32".into(),
            F16 => "F16".into(),
            Q4_0 => "Q4_0".into(),
            Q8_0 => "Q8_0".into(),
            Q4_K => "Q4_K".into(),
            Q6_K => "Q6_K".into(),
            BF16 => "BF16".into(),
            TQ1_0 => "TQ1_0".into(),
            TQ2_0 => "TQ2_0".into(),
            I2_S => "I2_S".into(),
            other => format!("type {other}"),
        }
    }
}

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Bounds that no real model file reaches, so a corrupted count cannot make
/// the reader allocate without limit.
const MAX_TENSORS: u64 = 1 << 20;
const MAX_KV: u64 = 1 << 20;
const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array. A GGUF array has one item type, so it is held as a
/// vector of that type: a U8 array of `n` items takes `n` bytes, not `n`
/// [`Value`]s.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    Str(Vec<String>),
    /// Arrays of arrays (nested once at most).
    Array(Vec<Array>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// The value as an unsigned integer, whatever its integer type.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, whatever its numeric type.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl Array {
    /// The GGUF type id of the items.
    fn item_type(&self) -> u32 {
        match self {
            Array::U8(_) => 0,
            Array::I8(_) => 1,
            Array::U16(_) => 2,
            Array::I16(_) => 3,
            Array::U32(_) => 4,
            Array::I32(_) => 5,
            Array::F32(_) => 6,
            Array::Bool(_) => 7,
            Array::Str(_) => 8,
            Array::Array(_) => 9,
            Array::U64(_) => 10,
            Array::I64(_) => 11,
            Array::F64(_) => 12,
        }
    }

    /// Items.
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::Str(v) => v.len(),
            Array::Array(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The items of a string array.
    pub fn as_strs(&self) -> Option<&[String]> {
        match self {
            Array::Str(v) => Some(v),
            _ => None,
        }
    }

    /// Item `i` as an unsigned integer, whatever the integer type.
    pub fn u64_at(&self, i: usize) -> Option<u64> {
        match self {
            Array::U8(v) => v.get(i).map(|&x| x.into()),
            Array::U16(v) => v.get(i).map(|&x| x.into()),
            Array::U32(v) => v.get(i).map(|&x| x.into()),
            Array::U64(v) => v.get(i).copied(),
            Array::I8(v) => v.get(i).and_then(|&x| u64::try_from(x).ok()),
            Array::I16(v) => v.get(i).and_then(|&x| u64::try_from(x).ok()),
            Array::I32(v) => v.get(i).and_then(|&x| u64::try_from(x).ok()),
            Array::I64(v) => v.get(i).and_then(|&x| u64::try_from(x).ok()),
            _ => None,
        }
    }
}

/// Bytes an item of metadata type `t` takes in the file at least, and in
/// memory as an [`Array`] item; `None` for an unknown type.
fn item_sizes(t: u32) -> Option<(usize, usize)> {
    Some(match t {
        0 | 1 | 7 => (1, 1),
        2 | 3 => (2, 2),
        4..=6 => (4, 4),
        8 => (8, std::mem::size_of::<String>()),
        9 => (12, std::mem::size_of::<Array>()),
        10..=12 => (8, 8),
        _ => return None,
    })
}

/// One tensor's description.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, fastest-varying first (`[cols, rows]` for a matrix).
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Byte offset in the file.
    pub offset: usize,
    /// Byte length.
    pub len: usize,
}

impl TensorInfo {
    /// Elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// `(rows, cols)` of a matrix, or `(1, n)` of a vector.
    pub fn matrix(&self) -> Result<(usize, usize)> {
        let d = &self.dims;
        let (rows, cols) = match d.as_slice() {
            [n] => (1, *n),
            [c, r] => (*r, *c),
            [c, r, rest @ ..] if rest.iter().all(|&x| x == 1) => (*r, *c),
            _ => return Err(Error::format(&self.name, format!("expected a matrix, got dims {d:?}"))),
        };
        Ok((
            usize::try_from(rows).unwrap_or(usize::MAX),
            usize::try_from(cols).unwrap_or(usize::MAX),
        ))
    }
}

/// Bytes of a tensor of `elements` (fastest row `cols`) in a ggml type.
pub fn tensor_bytes(ggml_type: u32, cols: u64, elements: u64) -> Option<u64> {
    let blocks = |block: u64, bytes: u64| cols.is_multiple_of(block).then(|| elements / block * bytes);
    match ggml_type {
        ggml_type::F32 => elements.checked_mul(4),
        ggml_type::F16 | ggml_type::BF16 => elements.checked_mul(2),
        ggml_type::Q4_0 => blocks(32, 18),
        ggml_type::Q8_0 => blocks(32, 34),
        ggml_type::Q4_K => blocks(256, 144),
        ggml_type::Q6_K => blocks(256, 210),
        ggml_type::TQ1_0 => blocks(256, 54),
        ggml_type::TQ2_0 => blocks(256, 66),
        // 2 bits a weight in 128-element groups, then a 32-byte scale tail.
        ggml_type::I2_S => cols.is_multiple_of(128).then(|| elements / 4 + 32),
        _ => None,
    }
}

/// A parsed GGUF file whose tensor data stays in the (mapped) bytes.
#[derive(Clone)]
pub struct GgufFile {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    bytes: Arc<dyn AsRef<[u8]> + Send + Sync>,
    /// Indices of `tensors`, sorted by name.
    index: Vec<usize>,
    /// `bytes` is a read-only map of a file.
    mapped: Option<Arc<MappedFile>>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Heap a parse may take: [`BUDGET_PER_BYTE`] per byte of the file plus
/// [`BUDGET_SLACK`]. Every count is first checked against the bytes left
/// in the file (an item takes at least its smallest encoding), and then
/// what it will allocate is charged here before it is allocated.
const BUDGET_PER_BYTE: usize = 4;
const BUDGET_SLACK: usize = 64 << 10;
/// Smallest metadata entry (empty key, type, one byte) and tensor info
/// (empty name, one dimension, type, offset) in the file.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
const MIN_TENSOR_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    what: &'a str,
    /// Heap bytes the parse may still allocate.
    budget: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len()).ok_or_else(|| {
            Error::format(
                self.what,
                format!("truncated: needs {n} bytes at offset {} of {}", self.pos, self.b.len()),
            )
        })?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn left(&self) -> u64 {
        (self.b.len() - self.pos) as u64
    }

    /// Charges `n` items of `size` bytes against the budget, before they
    /// are allocated.
    fn charge(&mut self, n: usize, size: usize) -> Result<()> {
        match n.checked_mul(size).filter(|&bytes| bytes <= self.budget) {
            Some(bytes) => {
                self.budget -= bytes;
                Ok(())
            }
            None => Err(Error::format(
                self.what,
                format!(
                    "its metadata and tensor table would take more than {BUDGET_PER_BYTE} bytes of memory per byte of the file"
                ),
            )),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count of items that take at least `per_item` bytes each, checked
    /// against the bytes left.
    fn len(&mut self, per_item: usize) -> Result<usize> {
        let n = self.u64()?;
        if n.saturating_mul(per_item as u64) > self.left() {
            return Err(Error::format(
                self.what,
                format!(
                    "a length of {n} at offset {} runs past the end of the file",
                    self.pos - 8
                ),
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String> {
        let n = self.len(1)?;
        self.charge(n, 1)?;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| Error::format(self.what, "a string is not UTF-8"))
    }

    /// A string, skipped.
    fn skip_string(&mut self) -> Result<()> {
        let n = self.len(1)?;
        self.take(n).map(drop)
    }

    fn value(&mut self, type_id: u32) -> Result<Value> {
        Ok(match type_id {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => {
                let [b] = self.array::<1>()?;
                Value::Bool(self.bool(b)?)
            }
            8 => Value::Str(self.string()?),
            9 => Value::Array(self.items(false)?),
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            t => return Err(Error::format(self.what, format!("unknown metadata type {t}"))),
        })
    }

    fn bool(&self, b: u8) -> Result<bool> {
        match b {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(Error::format(self.what, format!("bool value {b}"))),
        }
    }

    /// An array's item type, count and items; `nested`: it is an item of
    /// another array, so it may not hold arrays itself.
    fn items(&mut self, nested: bool) -> Result<Array> {
        let item = self.u32()?;
        let (min, size) =
            item_sizes(item).ok_or_else(|| Error::format(self.what, format!("unknown metadata type {item}")))?;
        let n = self.len(min)?;
        self.charge(n, size)?;
        fn fixed<const N: usize, T>(b: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
            b.chunks_exact(N).map(|c| f(c.try_into().unwrap_or([0; N]))).collect()
        }
        Ok(match item {
            0 => Array::U8(self.take(n)?.to_vec()),
            1 => Array::I8(self.take(n)?.iter().map(|&b| b as i8).collect()),
            2 => Array::U16(fixed(self.take(2 * n)?, u16::from_le_bytes)),
            3 => Array::I16(fixed(self.take(2 * n)?, i16::from_le_bytes)),
            4 => Array::U32(fixed(self.take(4 * n)?, u32::from_le_bytes)),
            5 => Array::I32(fixed(self.take(4 * n)?, i32::from_le_bytes)),
            6 => Array::F32(fixed(self.take(4 * n)?, f32::from_le_bytes)),
            7 => {
                let b = self.take(n)?;
                if let Some(&bad) = b.iter().find(|&&x| x > 1) {
                    return Err(Error::format(self.what, format!("bool value {bad}")));
                }
                Array::Bool(b.iter().map(|&x| x == 1).collect())
            }
            8 => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.string()?);
                }
                Array::Str(v)
            }
            9 => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    if nested {
                        return Err(Error::format(self.what, "arrays nested too deeply"));
                    }
                    v.push(self.items(true)?);
                }
                Array::Array(v)
            }
            10 => Array::U64(fixed(self.take(8 * n)?, u64::from_le_bytes)),
            11 => Array::I64(fixed(self.take(8 * n)?, i64::from_le_bytes)),
            _ => Array::F64(fixed(self.take(8 * n)?, f64::from_le_bytes)),
        })
    }
}

impl GgufFile {
    /// Maps and parses a file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; tern never writes model files in
        // place (writes go to a temporary file that is renamed), so the bytes
        // do not change under the map unless another program truncates the
        // file, which memory maps cannot guard against.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        super::small_pages(&map);
        let mut f = Self::parse(Arc::new(map), &path.display().to_string())?;
        f.mapped = Some(Arc::new(MappedFile {
            file,
            path: path.to_path_buf(),
        }));
        Ok(f)
    }

    /// Parses bytes that hold a whole GGUF file.
    pub fn parse(bytes: Arc<dyn AsRef<[u8]> + Send + Sync>, what: &str) -> Result<Self> {
        let b: &[u8] = (*bytes).as_ref();
        let mut r = Reader {
            b,
            pos: 0,
            what,
            budget: b.len().saturating_mul(BUDGET_PER_BYTE).saturating_add(BUDGET_SLACK),
        };
        if r.take(4)
            .map_err(|_| Error::format(what, "too short for a GGUF header"))?
            != MAGIC
        {
            return Err(Error::format(what, "not a GGUF file (wrong magic)"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(Error::format(
                what,
                format!("GGUF version {version} is not supported (2 or 3 are)"),
            ));
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        if n_tensors > MAX_TENSORS || n_kv > MAX_KV {
            return Err(Error::format(
                what,
                format!("{n_tensors} tensors and {n_kv} metadata entries"),
            ));
        }
        if n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_BYTES > r.left() {
            return Err(Error::format(
                what,
                format!(
                    "{n_tensors} tensors and {n_kv} metadata entries do not fit in the file's {} bytes: truncated?",
                    b.len()
                ),
            ));
        }
        r.charge(n_kv as usize, std::mem::size_of::<(String, Value)>())?;
        let mut metadata = Vec::with_capacity(n_kv as usize);
        for _ in 0..n_kv {
            let key = r.string()?;
            let t = r.u32()?;
            let v = r.value(t)?;
            metadata.push((key, v));
        }
        let alignment = metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .unwrap_or(DEFAULT_ALIGNMENT);
        if alignment == 0 || !alignment.is_power_of_two() || alignment > 1 << 16 {
            return Err(Error::format(what, format!("general.alignment {alignment}")));
        }
        // The tensor infos are read twice: first to find where they end
        // (the data starts after them), then into their final vectors.
        let infos_at = r.pos;
        for _ in 0..n_tensors {
            r.skip_string()?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(Error::format(what, format!("a tensor of {n_dims} dimensions")));
            }
            r.take(8 * n_dims as usize + 4 + 8)?;
        }
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        r.pos = infos_at;
        r.charge(
            n_tensors as usize,
            std::mem::size_of::<TensorInfo>() + std::mem::size_of::<usize>(),
        )?;
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            r.charge(n_dims, 8)?;
            let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
            let ggml_type = r.u32()?;
            let offset = r.u64()?;
            let elements = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d).filter(|_| d > 0))
                .ok_or_else(|| Error::format(&name, format!("invalid dims {dims:?}")))?;
            let len = tensor_bytes(ggml_type, dims[0], elements).ok_or_else(|| {
                Error::format(
                    &name,
                    format!(
                        "{} with dims {dims:?} is not a supported tensor",
                        ggml_type::name(ggml_type)
                    ),
                )
            })?;
            if !offset.is_multiple_of(alignment) {
                return Err(Error::format(
                    &name,
                    format!("offset {offset} is not aligned to {alignment}"),
                ));
            }
            let start = data_start.checked_add(offset);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(s), Some(e)) if e <= b.len() as u64 => {
                    tensors.push(TensorInfo {
                        name,
                        dims,
                        ggml_type,
                        offset: s as usize,
                        len: len as usize,
                    });
                }
                _ => {
                    return Err(Error::format(
                        what,
                        format!(
                            "tensor {name} ({len} bytes at data offset {offset}) runs past the end of the file ({} bytes): truncated?",
                            b.len()
                        ),
                    ));
                }
            }
        }
        let mut index: Vec<usize> = (0..tensors.len()).collect();
        index.sort_unstable_by(|&x, &y| tensors[x].name.cmp(&tensors[y].name));
        if let Some(w) = index.windows(2).find(|w| tensors[w[0]].name == tensors[w[1]].name) {
            return Err(Error::format(&tensors[w[1]].name, "tensor name appears twice"));
        }
        Ok(Self {
            version,
            metadata,
            tensors,
            bytes,
            index,
            mapped: None,
        })
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A tensor's description.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        let i = self
            .index
            .binary_search_by(|&i| self.tensors[i].name.as_str().cmp(name))
            .ok()?;
        Some(&self.tensors[self.index[i]])
    }

    /// A tensor's bytes, without a copy.
    pub fn data(&self, t: &TensorInfo) -> Result<SharedBytes> {
        let b = SharedBytes::new(self.bytes.clone(), t.offset..t.offset + t.len)?;
        Ok(match &self.mapped {
            Some(f) => b.mark_mapped(f.clone()),
            None => b,
        })
    }

    /// The whole file's bytes.
    pub fn file_bytes(&self) -> &[u8] {
        (*self.bytes).as_ref()
    }
}

/// A tensor to write.
#[derive(Debug)]
pub struct TensorOut {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub data: SharedBytes,
}

/// Writes a GGUF v3 file atomically (temporary file, fsync, rename).
pub fn write(path: &Path, metadata: &[(String, Value)], tensors: &[TensorOut]) -> Result<()> {
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for t in tensors {
        let elements: u64 = t.dims.iter().product();
        let len = tensor_bytes(t.ggml_type, t.dims[0], elements);
        if len != Some(t.data.len() as u64) {
            return Err(Error::format(
                &t.name,
                format!(
                    "{} bytes do not hold a {} tensor of dims {:?}",
                    t.data.len(),
                    ggml_type::name(t.ggml_type),
                    t.dims
                ),
            ));
        }
        offsets.push(offset);
        offset = (offset + t.data.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
    }
    write_atomic(path, |w| {
        let mut head = Vec::new();
        head.extend_from_slice(MAGIC);
        head.extend(3u32.to_le_bytes());
        head.extend((tensors.len() as u64).to_le_bytes());
        head.extend((metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut head, k);
            head.extend(v.type_id().to_le_bytes());
            put_value(&mut head, v);
        }
        for (t, off) in tensors.iter().zip(&offsets) {
            put_str(&mut head, &t.name);
            head.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                head.extend(d.to_le_bytes());
            }
            head.extend(t.ggml_type.to_le_bytes());
            head.extend(off.to_le_bytes());
        }
        let pad = (head.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT - head.len() as u64;
        head.resize(head.len() + pad as usize, 0);
        w.write_all(&head)?;
        let mut written = 0u64;
        for (t, off) in tensors.iter().zip(&offsets) {
            w.write_all(&vec![0u8; (off - written) as usize])?;
            w.write_all(&t.data)?;
            written = off + t.data.len() as u64;
        }
        Ok(())
    })
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::Str(s) => put_str(out, s),
        Value::Array(a) => put_array(out, a),
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
    }
}

fn put_array(out: &mut Vec<u8>, a: &Array) {
    out.extend(a.item_type().to_le_bytes());
    out.extend((a.len() as u64).to_le_bytes());
    match a {
        Array::U8(v) => out.extend_from_slice(v),
        Array::I8(v) => out.extend(v.iter().map(|&x| x as u8)),
        Array::U16(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        Array::I16(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        Array::U32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        Array::I32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        Array::F32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        Array::Bool(v) => out.extend(v.iter().map(|&x| u8::from(x))),
        Array::Str(v) => v.iter().for_each(|s| put_str(out, s)),
        Array::Array(v) => v.iter().for_each(|a| put_array(out, a)),
        Array::U64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        Array::I64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        Array::F64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Vec<(String, Value)>, Vec<TensorOut>) {
        let meta = vec![
            ("general.architecture".to_string(), Value::Str("bitnet".into())),
            ("bitnet.block_count".to_string(), Value::U32(2)),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::Array(Array::Str(vec!["a".into(), "b".into()])),
            ),
            ("x.types".to_string(), Value::Array(Array::I32(vec![1, -3, 5]))),
            ("x.bytes".to_string(), Value::Array(Array::U8(vec![0, 255]))),
            ("x.flags".to_string(), Value::Array(Array::Bool(vec![true, false]))),
            (
                "x.nested".to_string(),
                Value::Array(Array::Array(vec![
                    Array::U64(vec![1, 2]),
                    Array::Str(vec![]),
                    Array::F64(vec![0.5]),
                ])),
            ),
            ("x.f".to_string(), Value::F32(0.5)),
            ("x.b".to_string(), Value::Bool(true)),
        ];
        let tensors = vec![
            TensorOut {
                name: "norm".into(),
                dims: vec![3],
                ggml_type: ggml_type::F32,
                data: vec![1u8; 12].into(),
            },
            TensorOut {
                name: "w".into(),
                dims: vec![256, 2],
                ggml_type: ggml_type::TQ2_0,
                data: vec![0x55u8; 132].into(),
            },
        ];
        (meta, tensors)
    }

    #[test]
    fn writes_and_reads_back() {
        let dir = tempdir();
        let path = dir.join("m.gguf");
        let (meta, tensors) = sample();
        write(&path, &meta, &tensors).unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.metadata, meta);
        let w = f.tensor("w").unwrap();
        assert_eq!(w.matrix().unwrap(), (2, 256));
        assert_eq!(&*f.data(w).unwrap(), &[0x55u8; 132][..]);
        assert!(w.offset.is_multiple_of(32));
    }

    #[test]
    fn corrupt_files_are_errors_not_panics() {
        let dir = tempdir();
        let path = dir.join("m.gguf");
        let (meta, tensors) = sample();
        write(&path, &meta, &tensors).unwrap();
        let good = std::fs::read(&path).unwrap();
        let parse = |b: Vec<u8>| GgufFile::parse(Arc::new(b), "test");
        assert!(parse(good.clone()).is_ok());
        // Every truncation fails cleanly.
        for cut in 0..good.len() {
            assert!(parse(good[..cut].to_vec()).is_err(), "cut at {cut}");
        }
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(parse(bad).unwrap_err().to_string().contains("magic"));
        // Flip every byte of the header: an error or a valid parse, never a panic.
        let header_end = good.len() - 132 - 12;
        for i in 0..header_end {
            let mut b = good.clone();
            b[i] ^= 0xA5;
            let _ = parse(b);
        }
    }

    fn tempdir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "tern-gguf-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
