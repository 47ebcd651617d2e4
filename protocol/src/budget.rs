//! Allocation budgets for decoding blobs from peers.
//!
//! A blob of `n` bytes may cost at most `FACTOR * n + SLACK` bytes of heap
//! to decode ([`limit`]: 8x plus 4 KiB). prost decodes a
//! whole message before anything checks it, and small wire fields become
//! large values (a two-byte empty `TrainSequence` is a 48-byte struct in a
//! `Vec` that doubles), so each decoder first walks the wire bytes without
//! allocating (`check` with the blob's `Schema`): it checks their
//! structure as prost would, refuses a repeated field with more elements
//! than its limit in [`crate::limits`], and refuses the blob when the heap
//! prost would take for it (capacity included) is over the budget. Only
//! then does prost run.
//!
//! A schema describes the generated types in [`crate::wire`]; a field it
//! does not list is skipped as prost skips unknown fields, and charged
//! nothing. Keep each schema in step with `proto/` (the tests in
//! `tests/alloc.rs` measure every decoder against the budget).

use crate::limits::{
    MAX_ADAPTER_PARAMS, MAX_ADDRS, MAX_ADVERT_BLOBS, MAX_CPU_FEATURES, MAX_DIR_ENTRIES, MAX_GENERATED_TOKENS, MAX_GPUS,
    MAX_MODELS, MAX_PROMPT_TOKENS, MAX_TASK_INPUTS,
};
use crate::{Error, Result, wire};

/// Heap bytes a decoder may take per byte of its input.
pub const FACTOR: usize = 8;
/// Heap bytes a decoder may take whatever its input.
pub const SLACK: usize = 4096;

/// The most heap bytes decoding a blob of `input_len` bytes may take.
pub fn limit(input_len: usize) -> usize {
    input_len.saturating_mul(FACTOR).saturating_add(SLACK)
}

/// prost's limit on nested messages and groups.
const RECURSION_LIMIT: u32 = 100;

/// Protobuf wire types.
pub(crate) const VARINT: u8 = 0;
pub(crate) const FIXED64: u8 = 1;
pub(crate) const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
pub(crate) const FIXED32: u8 = 5;

/// A cursor over protobuf wire bytes that never allocates. Its errors are
/// the reasons prost gives for the same bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wire<'a> {
    buf: &'a [u8],
}

impl<'a> Wire<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// A base-128 varint of at most 10 bytes, as prost reads it.
    pub(crate) fn varint(&mut self) -> Result<u64, &'static str> {
        let mut value = 0u64;
        for (i, &b) in self.buf.iter().take(10).enumerate() {
            if i == 9 && b > 1 {
                return Err("invalid varint");
            }
            value |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                self.buf = &self.buf[i + 1..];
                return Ok(value);
            }
        }
        Err("invalid varint")
    }

    /// A field key: its tag and wire type.
    pub(crate) fn key(&mut self) -> Result<(u32, u8), &'static str> {
        let key = self.varint()?;
        let key = u32::try_from(key).map_err(|_| "invalid key value")?;
        let wire_type = (key & 7) as u8;
        if wire_type > FIXED32 {
            return Err("invalid wire type value");
        }
        if key >> 3 == 0 {
            return Err("invalid tag value: 0");
        }
        Ok((key >> 3, wire_type))
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], &'static str> {
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.buf.len())
            .ok_or("buffer underflow")?;
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// The payload of a length-delimited field.
    pub(crate) fn len_delimited(&mut self) -> Result<&'a [u8], &'static str> {
        let n = self.varint()?;
        self.take(n)
    }

    /// The value of a field of wire type `wire_type`, skipped: what prost
    /// does with a field it does not know.
    pub(crate) fn skip(&mut self, tag: u32, wire_type: u8, depth: u32) -> Result<(), &'static str> {
        if depth == 0 {
            return Err("recursion limit reached");
        }
        match wire_type {
            VARINT => self.varint().map(drop),
            FIXED64 => self.take(8).map(drop),
            FIXED32 => self.take(4).map(drop),
            LEN => self.len_delimited().map(drop),
            START_GROUP => loop {
                let (inner, t) = self.key()?;
                if t == END_GROUP {
                    if inner != tag {
                        return Err("unexpected end group tag");
                    }
                    return Ok(());
                }
                self.skip(inner, t, depth - 1)?;
            },
            _ => Err("unexpected end group tag"),
        }
    }

    /// The elements of a repeated scalar field of wire type `scalar`,
    /// packed (`wire_type` is [`LEN`]) or not: how many there are.
    pub(crate) fn scalars(&mut self, scalar: u8, wire_type: u8) -> Result<usize, &'static str> {
        if wire_type != LEN {
            check_wire_type(scalar, wire_type)?;
            self.scalar(scalar)?;
            return Ok(1);
        }
        let mut run = Wire::new(self.len_delimited()?);
        let width = match scalar {
            FIXED32 => 4,
            FIXED64 => 8,
            _ => {
                let mut n = 0;
                while !run.is_empty() {
                    run.varint().map_err(|_| "delimited length exceeded")?;
                    n += 1;
                }
                return Ok(n);
            }
        };
        if !run.buf.len().is_multiple_of(width) {
            return Err("delimited length exceeded");
        }
        Ok(run.buf.len() / width)
    }

    fn scalar(&mut self, scalar: u8) -> Result<(), &'static str> {
        match scalar {
            FIXED32 => self.take(4).map(drop),
            FIXED64 => self.take(8).map(drop),
            _ => self.varint().map(drop),
        }
    }
}

pub(crate) fn check_wire_type(expected: u8, actual: u8) -> Result<(), &'static str> {
    if expected == actual {
        Ok(())
    } else {
        Err("invalid wire type")
    }
}

/// A structural error in blob `what`, as [`Error::Decode`].
pub(crate) fn malformed(what: &'static str, reason: &str) -> Error {
    Error::Decode {
        what,
        reason: reason.to_string(),
    }
}

/// The wire shape of one message type and what prost allocates for it.
#[derive(Debug)]
pub(crate) struct Schema {
    /// The blob, for errors.
    pub what: &'static str,
    /// What the budget error names.
    pub decoded: &'static str,
    pub fields: &'static [Field],
}

/// One field of a [`Schema`].
#[derive(Debug)]
pub(crate) struct Field {
    pub tag: u32,
    /// What a count error names.
    pub name: &'static str,
    pub kind: Kind,
    /// Most elements of a repeated field (bytes of a bytes field) in one
    /// message.
    pub max: usize,
}

/// How a field is encoded and held.
#[derive(Debug)]
pub(crate) enum Kind {
    /// A singular scalar of this wire type: held inline.
    Scalar(u8),
    /// `bytes` or `string`: a `Vec<u8>` of its length.
    Bytes,
    /// A repeated scalar of this wire type: a `Vec` of `size`-byte elements.
    Repeated { scalar: u8, size: usize },
    /// A singular message, held inline; occurrences merge into one.
    Message(&'static Schema),
    /// A repeated message: a `Vec` of `size`-byte elements.
    Messages { schema: &'static Schema, size: usize },
    /// `repeated bytes` or `repeated string`: a `Vec` of vectors, each
    /// holding its element's length.
    BytesList,
}

/// Most fields in a schema.
const MAX_FIELDS: usize = 8;

/// Checks blob `bytes` against `schema` without allocating: its structure,
/// each field's element count against its limit, and the heap prost would
/// take to decode it against [`limit`]. Returns that estimate.
pub(crate) fn check(bytes: &[u8], schema: &Schema) -> Result<usize> {
    let estimate = scan(Wire::new(bytes), schema, true, RECURSION_LIMIT)?;
    let max = limit(bytes.len());
    if estimate > max {
        return Err(Error::TooLarge {
            what: schema.decoded,
            len: estimate,
            max,
        });
    }
    Ok(estimate)
}

/// `bytes`, once [`check`] passed them: for a decode call.
pub(crate) fn checked<'a>(bytes: &'a [u8], schema: &Schema) -> Result<&'a [u8]> {
    check(bytes, schema)?;
    Ok(bytes)
}

/// The heap prost takes for one message of `schema` in `w`. `exact`: the
/// message is decoded once into a fresh value (the top level, an element
/// of a repeated field), so the growth of its vectors is known; otherwise
/// (a singular message, whose occurrences merge) each occurrence is
/// charged an upper bound that also holds for their sum.
fn scan(mut w: Wire<'_>, schema: &Schema, exact: bool, depth: u32) -> Result<usize> {
    let bad = |reason: &str| malformed(schema.what, reason);
    debug_assert!(schema.fields.len() <= MAX_FIELDS);
    // Per field: elements of a repeated field, or a bytes field's capacity.
    let mut state = [0usize; MAX_FIELDS];
    let mut heap = 0usize;
    while !w.is_empty() {
        let (tag, wire_type) = w.key().map_err(bad)?;
        let Some(i) = schema.fields.iter().position(|f| f.tag == tag) else {
            w.skip(tag, wire_type, depth).map_err(bad)?;
            continue;
        };
        let f = &schema.fields[i];
        match f.kind {
            Kind::Scalar(scalar) => {
                check_wire_type(scalar, wire_type).map_err(bad)?;
                w.scalar(scalar).map_err(bad)?;
            }
            Kind::Bytes => {
                check_wire_type(LEN, wire_type).map_err(bad)?;
                let len = w.len_delimited().map_err(bad)?.len();
                if len > f.max {
                    return Err(Error::TooLarge {
                        what: f.name,
                        len,
                        max: f.max,
                    });
                }
                // prost clears the vector and reserves the new length.
                if exact {
                    if len > state[i] {
                        state[i] = len.max(2 * state[i]).max(8);
                    }
                } else if len > 0 {
                    heap = heap.saturating_add(len.saturating_mul(2).max(8));
                }
            }
            Kind::Repeated { scalar, .. } => {
                state[i] += w.scalars(scalar, wire_type).map_err(bad)?;
            }
            Kind::Message(inner) => {
                check_wire_type(LEN, wire_type).map_err(bad)?;
                if depth == 0 {
                    return Err(bad("recursion limit reached"));
                }
                let body = w.len_delimited().map_err(bad)?;
                heap = heap.saturating_add(scan(Wire::new(body), inner, false, depth - 1)?);
            }
            Kind::Messages { schema: inner, .. } => {
                check_wire_type(LEN, wire_type).map_err(bad)?;
                if depth == 0 {
                    return Err(bad("recursion limit reached"));
                }
                let body = w.len_delimited().map_err(bad)?;
                state[i] += 1;
                if state[i] > f.max {
                    return Err(Error::TooLarge {
                        what: f.name,
                        len: state[i],
                        max: f.max,
                    });
                }
                heap = heap.saturating_add(scan(Wire::new(body), inner, true, depth - 1)?);
            }
            Kind::BytesList => {
                check_wire_type(LEN, wire_type).map_err(bad)?;
                let len = w.len_delimited().map_err(bad)?.len();
                state[i] += 1;
                if state[i] > f.max {
                    return Err(Error::TooLarge {
                        what: f.name,
                        len: state[i],
                        max: f.max,
                    });
                }
                // Each element is a fresh vector that reserves its length.
                if len > 0 {
                    heap = heap.saturating_add(len.max(8));
                }
            }
        }
    }
    for (f, &n) in schema.fields.iter().zip(&state) {
        let size = match f.kind {
            Kind::Bytes if exact => {
                heap = heap.saturating_add(n);
                continue;
            }
            Kind::Repeated { size, .. } | Kind::Messages { size, .. } => size,
            Kind::BytesList => size::<Vec<u8>>(),
            _ => continue,
        };
        if n > f.max {
            return Err(Error::TooLarge {
                what: f.name,
                len: n,
                max: f.max,
            });
        }
        heap = heap.saturating_add(pushed(n, size, exact).saturating_mul(size));
    }
    Ok(heap)
}

/// The capacity of a `Vec` of `size`-byte elements after `n` pushes onto
/// an empty one (`exact`), or a bound on it that adds up over merged
/// occurrences.
pub(crate) fn pushed(n: usize, size: usize, exact: bool) -> usize {
    if n == 0 {
        return 0;
    }
    // The standard library's smallest non-zero capacity.
    let min = match size {
        1 => 8,
        2..=1024 => 4,
        _ => 1,
    };
    if exact {
        n.checked_next_power_of_two().unwrap_or(usize::MAX).max(min)
    } else {
        n.saturating_mul(2).max(min)
    }
}

const fn size<T>() -> usize {
    std::mem::size_of::<T>()
}

const LAYOUT: Field = bytes(1, "adapter layout", usize::MAX);

const fn floats(tag: u32, name: &'static str) -> Field {
    Field {
        tag,
        name,
        kind: Kind::Repeated {
            scalar: FIXED32,
            size: 4,
        },
        max: MAX_ADAPTER_PARAMS,
    }
}

const fn message(tag: u32, name: &'static str, schema: &'static Schema) -> Field {
    Field {
        tag,
        name,
        kind: Kind::Message(schema),
        max: 0,
    }
}

const fn bytes(tag: u32, name: &'static str, max: usize) -> Field {
    Field {
        tag,
        name,
        kind: Kind::Bytes,
        max,
    }
}

const fn bytes_list(tag: u32, name: &'static str, max: usize) -> Field {
    Field {
        tag,
        name,
        kind: Kind::BytesList,
        max,
    }
}

/// [`wire::AdapterParams`].
pub(crate) static ADAPTER_PARAMS: Schema = Schema {
    what: "adapter parameters",
    decoded: "adapter parameters decoded",
    fields: &[LAYOUT, floats(2, "adapter parameters")],
};

/// [`wire::OptimizerState`].
pub(crate) static OPTIMIZER_STATE: Schema = Schema {
    what: "optimizer state",
    decoded: "optimizer state decoded",
    fields: &[
        LAYOUT,
        Field {
            tag: 2,
            name: "optimizer step",
            kind: Kind::Scalar(VARINT),
            max: 0,
        },
        floats(3, "first moment"),
        floats(4, "second moment"),
    ],
};

/// [`wire::LoraShardOutput`].
pub(crate) static LORA_SHARD_OUTPUT: Schema = Schema {
    what: "shard output",
    decoded: "shard output decoded",
    fields: &[
        LAYOUT,
        floats(2, "shard delta"),
        Field {
            tag: 3,
            name: "shard tokens",
            kind: Kind::Scalar(VARINT),
            max: 0,
        },
        Field {
            tag: 4,
            name: "shard loss",
            kind: Kind::Scalar(FIXED64),
            max: 0,
        },
        Field {
            tag: 5,
            name: "shard steps",
            kind: Kind::Scalar(VARINT),
            max: 0,
        },
        message(6, "optimizer state", &OPTIMIZER_STATE),
    ],
};

/// [`wire::InferOutput`].
pub(crate) static INFER_OUTPUT: Schema = Schema {
    what: "infer output",
    decoded: "infer output decoded",
    fields: &[Field {
        tag: 1,
        name: "infer output",
        kind: Kind::Repeated {
            scalar: VARINT,
            size: 4,
        },
        max: MAX_GENERATED_TOKENS as usize,
    }],
};

static DIR_ENTRY: Schema = Schema {
    what: "manifest",
    decoded: "manifest decoded",
    fields: &[
        bytes(1, "manifest path", usize::MAX),
        bytes(2, "manifest entry id", usize::MAX),
        Field {
            tag: 3,
            name: "manifest entry size",
            kind: Kind::Scalar(VARINT),
            max: 0,
        },
    ],
};

/// [`wire::DirManifest`].
pub(crate) static DIR_MANIFEST: Schema = Schema {
    what: "manifest",
    decoded: "manifest decoded",
    fields: &[Field {
        tag: 1,
        name: "manifest",
        kind: Kind::Messages {
            schema: &DIR_ENTRY,
            size: size::<wire::DirEntry>(),
        },
        max: MAX_DIR_ENTRIES,
    }],
};

/// [`wire::Outline`]: at most one chaining value per group of the largest
/// blob.
pub(crate) static OUTLINE: Schema = Schema {
    what: "outline",
    decoded: "outline decoded",
    fields: &[
        Field {
            tag: 1,
            name: "outline size",
            kind: Kind::Scalar(VARINT),
            max: 0,
        },
        bytes(
            2,
            "outline chaining values",
            (crate::limits::MAX_BLOB_BYTES / crate::blob::GROUP_LEN * 32) as usize,
        ),
    ],
};

/// The envelope payloads list only the fields that allocate; prost holds
/// scalars inline. Element counts are refused here at the limits (and
/// with the names) the domain conversions use after decoding; the lengths
/// of ids and strings are left to those conversions, the budget bounding
/// what they take.
static CPU: Schema = Schema {
    what: "advert",
    decoded: "advert decoded",
    fields: &[
        bytes(2, "cpu arch", usize::MAX),
        bytes_list(3, "cpu feature", MAX_CPU_FEATURES),
    ],
};

static GPU: Schema = Schema {
    what: "advert",
    decoded: "advert decoded",
    fields: &[
        bytes(1, "gpu name", usize::MAX),
        bytes(2, "gpu vendor", usize::MAX),
        bytes(3, "gpu device type", usize::MAX),
        bytes(4, "gpu api", usize::MAX),
    ],
};

static BENCH_SCORE: Schema = Schema {
    what: "advert",
    decoded: "advert decoded",
    fields: &[bytes(2, "benchmark output hash", usize::MAX)],
};

/// [`wire::Advert`].
pub(crate) static ADVERT: Schema = Schema {
    what: "advert",
    decoded: "advert decoded",
    fields: &[
        bytes(1, "advert version", usize::MAX),
        bytes_list(2, "listen address", MAX_ADDRS),
        message(3, "advert cpu", &CPU),
        Field {
            tag: 4,
            name: "advert gpus",
            kind: Kind::Messages {
                schema: &GPU,
                size: size::<wire::Gpu>(),
            },
            max: MAX_GPUS,
        },
        bytes_list(7, "advert models", MAX_MODELS),
        bytes_list(8, "advert blobs", MAX_ADVERT_BLOBS),
        message(12, "advert score", &BENCH_SCORE),
        message(13, "advert availability", &AVAILABILITY),
    ],
};

static AVAILABILITY: Schema = Schema {
    what: "advert",
    decoded: "advert decoded",
    fields: &[bytes(4, "paused reason", usize::MAX)],
};

static INFER_PARAMS: Schema = Schema {
    what: "task",
    decoded: "task decoded",
    fields: &[
        bytes(1, "infer model", usize::MAX),
        Field {
            tag: 2,
            name: "infer prompt",
            kind: Kind::Repeated {
                scalar: VARINT,
                size: 4,
            },
            max: MAX_PROMPT_TOKENS,
        },
    ],
};

static LORA_SHARD_PARAMS: Schema = Schema {
    what: "task",
    decoded: "task decoded",
    fields: &[
        bytes(1, "shard model", usize::MAX),
        bytes(2, "shard adapter", usize::MAX),
        bytes(3, "shard data", usize::MAX),
        bytes(7, "shard optimizer", usize::MAX),
    ],
};

/// [`wire::Task`]. Both arms of the `params` oneof are charged when both
/// appear (prost keeps the last).
pub(crate) static TASK: Schema = Schema {
    what: "task",
    decoded: "task decoded",
    fields: &[
        bytes(2, "task worker", usize::MAX),
        bytes_list(3, "task inputs", MAX_TASK_INPUTS),
        message(10, "infer parameters", &INFER_PARAMS),
        message(11, "shard parameters", &LORA_SHARD_PARAMS),
    ],
};

/// [`wire::TaskResult`].
pub(crate) static TASK_RESULT: Schema = Schema {
    what: "task result",
    decoded: "task result decoded",
    fields: &[
        bytes(1, "result task", usize::MAX),
        bytes_list(2, "result inputs", MAX_TASK_INPUTS),
        bytes(4, "result output", usize::MAX),
        bytes(6, "result error", usize::MAX),
    ],
};

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    #[test]
    fn varints_and_keys_read_as_prost_reads_them() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            prost::encoding::encode_varint(v, &mut b);
            let mut w = Wire::new(&b);
            assert_eq!(w.varint(), Ok(v));
            assert!(w.is_empty());
        }
        // Eleven bytes, and a tenth byte over 1, are not varints.
        assert!(Wire::new(&[0xff; 11]).varint().is_err());
        let mut ten = [0xff; 10];
        ten[9] = 2;
        assert!(Wire::new(&ten).varint().is_err());
        assert!(Wire::new(&[0x80]).varint().is_err());
        assert!(Wire::new(&[0x00]).key().is_err(), "tag 0");
        assert!(Wire::new(&[0x0e]).key().is_err(), "wire type 6");
        assert_eq!(Wire::new(&[0x0a]).key(), Ok((1, LEN)));
    }

    #[test]
    fn groups_are_skipped_to_their_end_within_the_recursion_limit() {
        // Field 5 as a group holding field 1 (varint), then its end.
        let mut w = Wire::new(&[0x2b, 0x08, 0x01, 0x2c]);
        let (tag, t) = w.key().unwrap();
        w.skip(tag, t, RECURSION_LIMIT).unwrap();
        assert!(w.is_empty());
        assert!(
            Wire::new(&[0x2b, 0x34]).skip(5, START_GROUP, 10).is_err(),
            "wrong end tag"
        );
        let deep = [[0x2bu8].repeat(200), [0x2c].repeat(200)].concat();
        let mut w = Wire::new(&deep[1..]);
        assert!(w.skip(5, START_GROUP, RECURSION_LIMIT).is_err());
    }

    #[test]
    fn the_estimate_covers_prost_on_honest_blobs() {
        let a = wire::AdapterParams {
            layout: vec![1; 32],
            values: vec![0.5; 1000],
        };
        let bytes = a.encode_to_vec();
        let e = check(&bytes, &ADAPTER_PARAMS).unwrap();
        assert!(e >= 32 + 1000 * 4 && e <= limit(bytes.len()), "{e}");
        let m = wire::DirManifest {
            entries: vec![
                wire::DirEntry {
                    path: "a".into(),
                    id: vec![0; 32],
                    size: 1,
                };
                5
            ],
        };
        let e = check(&m.encode_to_vec(), &DIR_MANIFEST).unwrap();
        assert_eq!(e, 8 * size::<wire::DirEntry>() + 5 * (8 + 32));
    }

    #[test]
    fn counts_over_a_limit_are_refused_by_name() {
        let big = wire::InferOutput {
            tokens: vec![1; MAX_GENERATED_TOKENS as usize + 1],
        };
        let e = check(&big.encode_to_vec(), &INFER_OUTPUT).unwrap_err();
        assert!(
            matches!(
                e,
                Error::TooLarge {
                    what: "infer output",
                    ..
                }
            ),
            "{e}"
        );
        let empty = [0x0a, 0x00].repeat(MAX_DIR_ENTRIES + 1);
        let e = check(&empty, &DIR_MANIFEST).unwrap_err();
        assert!(matches!(e, Error::TooLarge { what: "manifest", .. }), "{e}");
        let e = check(&[0x0a, 0x00].repeat(1000), &DIR_MANIFEST).unwrap_err();
        assert!(
            matches!(
                e,
                Error::TooLarge {
                    what: "manifest decoded",
                    ..
                }
            ),
            "{e}"
        );
    }
}
