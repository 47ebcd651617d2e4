//! Signed envelopes: keys, sealing, opening and replay protection.
//!
//! An envelope signs the exact bytes of its body with the domain-separation
//! prefix [`SIGNING_CONTEXT`]. [`open`] checks sizes, verifies the signature
//! strictly over the received bytes and only then decodes the body and its
//! payload into validated domain types. Freshness (issue and expiry times)
//! and replays are separate checks, [`Opened::check_fresh`] and
//! [`ReplayGuard`], because signed evidence must stay checkable after it
//! expires.

use std::collections::HashMap;
use std::fmt;

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use prost::Message as _;

use crate::limits::{MAX_CLOCK_SKEW_MS, MAX_ENVELOPE_BYTES, MAX_ENVELOPE_TTL_MS};
use crate::{Advert, ContentId, Error, Result, Task, TaskResult, budget, wire};

/// Prefixed to the body bytes before signing, so a tern signature can never
/// be replayed as a signature over some other protocol's message.
pub const SIGNING_CONTEXT: &[u8] = b"tern/envelope/v1\0";

/// A node's ed25519 key pair. The secret is zeroized on drop and never shown
/// by `Debug`.
#[derive(Clone)]
pub struct Keypair(SigningKey);

impl Keypair {
    /// The key pair of a 32-byte secret seed (generate it from a CSPRNG).
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&secret))
    }

    /// The 32-byte secret seed, for storing in a 0600 file.
    pub fn secret(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    fn sign(&self, body: &[u8]) -> [u8; 64] {
        let mut msg = Vec::with_capacity(SIGNING_CONTEXT.len() + body.len());
        msg.extend_from_slice(SIGNING_CONTEXT);
        msg.extend_from_slice(body);
        self.0.sign(&msg).to_bytes()
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keypair({}, secret redacted)", self.public())
    }
}

/// An ed25519 public key: who signed an envelope, who a task is for.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// A key from its 32 bytes, refusing bytes that are not a valid point.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| Error::invalid("public key", format!("{} bytes, expected 32", bytes.len())))?;
        VerifyingKey::from_bytes(&arr).map_err(|_| Error::invalid("public key", "not a valid ed25519 point"))?;
        Ok(Self(arr))
    }

    /// The 32 bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Verifies `signature` over `SIGNING_CONTEXT || body`, strictly
    /// (no small-order keys, canonical `s`).
    pub fn verify(&self, body: &[u8], signature: &[u8]) -> Result<()> {
        let sig: [u8; 64] = signature.try_into().map_err(|_| Error::BadSignature)?;
        let key = VerifyingKey::from_bytes(&self.0).map_err(|_| Error::BadSignature)?;
        let mut msg = Vec::with_capacity(SIGNING_CONTEXT.len() + body.len());
        msg.extend_from_slice(SIGNING_CONTEXT);
        msg.extend_from_slice(body);
        key.verify_strict(&msg, &ed25519_dalek::Signature::from_bytes(&sig))
            .map_err(|_| Error::BadSignature)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for PublicKey {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let id: ContentId = s
            .parse()
            .map_err(|_| Error::invalid("public key", "expected 64 hexadecimal digits"))?;
        Self::from_bytes(id.as_bytes())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.to_string();
        write!(f, "PublicKey({}..)", &s[..12])
    }
}

/// What an envelope carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// A hardware advert (gossip).
    Advert(Advert),
    /// A task for a worker.
    Task(Task),
    /// A worker's answer.
    TaskResult(TaskResult),
}

impl Payload {
    fn kind(&self) -> wire::PayloadKind {
        match self {
            Payload::Advert(_) => wire::PayloadKind::Advert,
            Payload::Task(_) => wire::PayloadKind::Task,
            Payload::TaskResult(_) => wire::PayloadKind::TaskResult,
        }
    }

    fn encode(&self) -> Vec<u8> {
        match self {
            Payload::Advert(a) => wire::Advert::from(a).encode_to_vec(),
            Payload::Task(t) => wire::Task::from(t).encode_to_vec(),
            Payload::TaskResult(r) => wire::TaskResult::from(r).encode_to_vec(),
        }
    }
}

/// When an envelope was issued and for how long it is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Random per envelope.
    pub nonce: u64,
    /// Milliseconds since the Unix epoch.
    pub issued_at_ms: u64,
    /// Milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
}

impl Validity {
    /// Valid from `now_ms` for `ttl_ms`.
    pub fn new(nonce: u64, now_ms: u64, ttl_ms: u64) -> Self {
        Self {
            nonce,
            issued_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(ttl_ms),
        }
    }
}

/// Signs `payload` and returns the encoded envelope.
pub fn seal(key: &Keypair, payload: &Payload, validity: Validity) -> Vec<u8> {
    seal_bytes(key, payload.kind() as i32, payload.encode(), validity)
}

/// Signs arbitrary payload bytes under a kind number: what a buggy or
/// hostile peer can send. For tests and tools; nodes use [`seal`].
pub fn seal_bytes(key: &Keypair, kind: i32, payload: Vec<u8>, validity: Validity) -> Vec<u8> {
    let body = wire::EnvelopeBody {
        kind,
        nonce: validity.nonce,
        issued_at_ms: validity.issued_at_ms,
        expires_at_ms: validity.expires_at_ms,
        payload,
    }
    .encode_to_vec();
    let signature = key.sign(&body);
    wire::Envelope {
        signer: key.public().0.to_vec(),
        signature: signature.to_vec(),
        body,
    }
    .encode_to_vec()
}

/// An envelope whose signature verified and whose payload is valid.
#[derive(Debug, Clone, PartialEq)]
pub struct Opened {
    /// Who signed it.
    pub signer: PublicKey,
    /// Its nonce and times.
    pub validity: Validity,
    /// The content id of the signed body bytes: names this exact message
    /// (a task's id, the evidence a verdict cites).
    pub body_id: ContentId,
    /// What it carries.
    pub payload: Payload,
}

/// Verifies and decodes an envelope. Refuses oversized input before
/// decoding, and verifies the signature over the exact body bytes before
/// the body is decoded. Does not check times; see [`Opened::check_fresh`].
pub fn open(bytes: &[u8]) -> Result<Opened> {
    if bytes.len() > MAX_ENVELOPE_BYTES {
        return Err(Error::TooLarge {
            what: "envelope",
            len: bytes.len(),
            max: MAX_ENVELOPE_BYTES,
        });
    }
    let env = wire::Envelope::decode(bytes).map_err(|e| Error::decode("envelope", e))?;
    let signer = PublicKey::from_bytes(&env.signer).map_err(|_| Error::BadSignature)?;
    signer.verify(&env.body, &env.signature)?;
    let body_id = ContentId::of(&env.body);
    let body = wire::EnvelopeBody::decode(env.body.as_slice()).map_err(|e| Error::decode("envelope body", e))?;
    // The payload is decoded next; the signed copy of it is no longer needed.
    drop(env);
    let validity = Validity {
        nonce: body.nonce,
        issued_at_ms: body.issued_at_ms,
        expires_at_ms: body.expires_at_ms,
    };
    let payload = match wire::PayloadKind::try_from(body.kind) {
        Ok(wire::PayloadKind::Advert) => Payload::Advert(
            wire::Advert::decode(budget::checked(&body.payload, &budget::ADVERT)?)
                .map_err(|e| Error::decode("advert", e))?
                .try_into()?,
        ),
        Ok(wire::PayloadKind::Task) => Payload::Task(
            wire::Task::decode(budget::checked(&body.payload, &budget::TASK)?)
                .map_err(|e| Error::decode("task", e))?
                .try_into()?,
        ),
        Ok(wire::PayloadKind::TaskResult) => Payload::TaskResult(
            wire::TaskResult::decode(budget::checked(&body.payload, &budget::TASK_RESULT)?)
                .map_err(|e| Error::decode("task result", e))?
                .try_into()?,
        ),
        Ok(wire::PayloadKind::Unspecified) | Err(_) => {
            return Err(Error::invalid(
                "envelope",
                format!("unknown payload kind {}", body.kind),
            ));
        }
    };
    Ok(Opened {
        signer,
        validity,
        body_id,
        payload,
    })
}

impl Opened {
    /// Refuses an envelope that has expired, was issued too far in the
    /// future, or claims a validity longer than [`MAX_ENVELOPE_TTL_MS`].
    pub fn check_fresh(&self, now_ms: u64) -> Result<()> {
        let v = self.validity;
        if v.expires_at_ms <= now_ms {
            return Err(Error::Expired {
                expired_ms_ago: now_ms - v.expires_at_ms,
            });
        }
        if v.issued_at_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(Error::invalid(
                "envelope",
                format!("issued {} ms in the future", v.issued_at_ms - now_ms),
            ));
        }
        if v.expires_at_ms.saturating_sub(v.issued_at_ms) > MAX_ENVELOPE_TTL_MS {
            return Err(Error::invalid(
                "envelope",
                format!(
                    "valid for {} ms, more than {MAX_ENVELOPE_TTL_MS}",
                    v.expires_at_ms - v.issued_at_ms
                ),
            ));
        }
        Ok(())
    }
}

/// Remembers (signer, nonce) of fresh envelopes until they expire, and
/// refuses a second one.
///
/// Bounded three ways, so that no one signer can fill it for everyone
/// else: at most `capacity` live entries in all, at most `per_signer` for
/// one key, and no envelope valid for longer than `max_ttl_ms` (the
/// receiver's cap, which bounds how long an entry is held). When full it
/// refuses new envelopes rather than forget one that could then be
/// replayed. A node keeps one guard per kind of message (tasks and
/// adverts never share a budget).
#[derive(Debug)]
pub struct ReplayGuard {
    seen: HashMap<(PublicKey, u64), u64>,
    per_signer_live: HashMap<PublicKey, usize>,
    capacity: usize,
    per_signer: usize,
    max_ttl_ms: u64,
    next_prune_ms: u64,
}

impl ReplayGuard {
    /// A guard holding at most `capacity` live envelopes, at most
    /// `per_signer` of them from one key, each valid for at most
    /// `max_ttl_ms`.
    pub fn new(capacity: usize, per_signer: usize, max_ttl_ms: u64) -> Self {
        Self {
            seen: HashMap::new(),
            per_signer_live: HashMap::new(),
            capacity: capacity.max(1),
            per_signer: per_signer.clamp(1, capacity.max(1)),
            max_ttl_ms: max_ttl_ms.min(MAX_ENVELOPE_TTL_MS),
            next_prune_ms: 0,
        }
    }

    fn prune(&mut self, now_ms: u64) {
        let per_signer = &mut self.per_signer_live;
        self.seen.retain(|(signer, _), expires| {
            let live = *expires > now_ms;
            if !live && let Some(n) = per_signer.get_mut(signer) {
                *n = n.saturating_sub(1);
            }
            live
        });
        per_signer.retain(|_, n| *n > 0);
        self.next_prune_ms = now_ms + 1000;
    }

    /// Checks freshness, the receiver's validity cap and that this
    /// envelope was not seen before, then remembers it.
    pub fn admit(&mut self, opened: &Opened, now_ms: u64) -> Result<()> {
        opened.check_fresh(now_ms)?;
        let v = opened.validity;
        let ttl = v.expires_at_ms.saturating_sub(v.issued_at_ms);
        if ttl > self.max_ttl_ms {
            return Err(Error::invalid(
                "envelope",
                format!(
                    "valid for {ttl} ms, more than the {} ms this node accepts",
                    self.max_ttl_ms
                ),
            ));
        }
        let key = (opened.signer, v.nonce);
        let signer_full = |g: &Self| g.per_signer_live.get(&opened.signer).copied().unwrap_or(0) >= g.per_signer;
        if now_ms >= self.next_prune_ms || self.seen.len() >= self.capacity || signer_full(self) {
            self.prune(now_ms);
        }
        if self.seen.contains_key(&key) {
            return Err(Error::Replayed);
        }
        if signer_full(self) {
            return Err(Error::Busy("this signer's replay quota is full"));
        }
        if self.seen.len() >= self.capacity {
            return Err(Error::Busy("replay cache full"));
        }
        self.seen.insert(key, v.expires_at_ms);
        *self.per_signer_live.entry(opened.signer).or_default() += 1;
        Ok(())
    }

    /// Live entries.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no envelope is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{InferParams, Sampling, TaskParams};

    fn key(seed: u8) -> Keypair {
        Keypair::from_secret([seed; 32])
    }

    fn task(worker: PublicKey) -> Payload {
        let model = ContentId::of(b"model");
        Payload::Task(Task {
            worker,
            inputs: vec![model],
            max_work: 100,
            params: TaskParams::Infer(InferParams {
                model,
                prompt: vec![1, 2, 3],
                max_tokens: 8,
                sampling: Sampling::greedy(),
            }),
        })
    }

    #[test]
    fn seal_then_open_round_trips() {
        let k = key(1);
        let p = task(key(2).public());
        let bytes = seal(&k, &p, Validity::new(7, 1000, 5000));
        let o = open(&bytes).unwrap();
        assert_eq!(o.signer, k.public());
        assert_eq!(o.payload, p);
        assert_eq!(
            o.validity,
            Validity {
                nonce: 7,
                issued_at_ms: 1000,
                expires_at_ms: 6000
            }
        );
        o.check_fresh(1000).unwrap();
    }

    #[test]
    fn any_flipped_bit_is_refused() {
        let bytes = seal(&key(1), &task(key(2).public()), Validity::new(7, 1000, 5000));
        for i in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut b = bytes.clone();
                b[i] ^= bit;
                assert!(open(&b).is_err(), "flipping bit {bit:#x} of byte {i} was accepted");
            }
        }
    }

    #[test]
    fn a_signature_from_another_key_is_refused() {
        let bytes = seal(&key(1), &task(key(2).public()), Validity::new(7, 1000, 5000));
        let mut env = wire::Envelope::decode(bytes.as_slice()).unwrap();
        env.signer = key(3).public().0.to_vec();
        assert_eq!(open(&env.encode_to_vec()), Err(Error::BadSignature));
    }

    #[test]
    fn freshness() {
        let t0 = 100_000;
        let o = open(&seal(&key(1), &task(key(2).public()), Validity::new(7, t0, 5000))).unwrap();
        o.check_fresh(t0).unwrap();
        o.check_fresh(t0 - MAX_CLOCK_SKEW_MS).unwrap();
        assert!(matches!(o.check_fresh(t0 + 5000), Err(Error::Expired { .. })));
        assert!(o.check_fresh(t0 - MAX_CLOCK_SKEW_MS - 1).is_err(), "from the future");
        let long = open(&seal(
            &key(1),
            &task(key(2).public()),
            Validity::new(7, 0, MAX_ENVELOPE_TTL_MS + 1),
        ))
        .unwrap();
        assert!(long.check_fresh(1).is_err());
    }

    #[test]
    fn replays_are_refused_until_expiry_and_the_guard_is_bounded() {
        let k = key(1);
        let p = task(key(2).public());
        let mut guard = ReplayGuard::new(2, 2, MAX_ENVELOPE_TTL_MS);
        let a = open(&seal(&k, &p, Validity::new(1, 0, 1000))).unwrap();
        guard.admit(&a, 0).unwrap();
        assert_eq!(guard.admit(&a, 10), Err(Error::Replayed));
        let b = open(&seal(&k, &p, Validity::new(2, 0, 5000))).unwrap();
        guard.admit(&b, 10).unwrap();
        let c = open(&seal(&key(3), &p, Validity::new(3, 0, 5000))).unwrap();
        assert_eq!(guard.admit(&c, 20), Err(Error::Busy("replay cache full")));
        // Once `a` expires its slot is free, and `a` itself is refused as expired.
        guard.admit(&c, 1000).unwrap();
        assert!(matches!(guard.admit(&a, 1000), Err(Error::Expired { .. })));
        assert_eq!(guard.len(), 2);
    }

    #[test]
    fn one_signer_cannot_fill_the_guard_for_others() {
        let (flooder, honest) = (key(1), key(4));
        let p = task(key(2).public());
        let mut guard = ReplayGuard::new(100, 10, 60_000);
        let mut refused = 0;
        for nonce in 0..1000 {
            let o = open(&seal(&flooder, &p, Validity::new(nonce, 0, 60_000))).unwrap();
            if guard.admit(&o, 5).is_err() {
                refused += 1;
            }
        }
        assert_eq!(refused, 990, "the flooder keeps exactly its quota");
        assert_eq!(guard.len(), 10);
        for nonce in 0..10 {
            let o = open(&seal(&honest, &p, Validity::new(nonce, 0, 60_000))).unwrap();
            guard.admit(&o, 5).unwrap();
        }
        // The flooder's quota frees as its envelopes expire.
        let later = open(&seal(&flooder, &p, Validity::new(5000, 60_000, 60_000))).unwrap();
        guard.admit(&later, 60_001).unwrap();
    }

    #[test]
    fn the_receiver_caps_validity() {
        let p = task(key(2).public());
        let mut guard = ReplayGuard::new(100, 10, 60_000);
        let long = open(&seal(&key(1), &p, Validity::new(1, 0, 60_001))).unwrap();
        let err = guard.admit(&long, 1).unwrap_err();
        assert!(err.to_string().contains("more than the 60000 ms"), "{err}");
        assert!(guard.is_empty());
    }

    #[test]
    fn oversized_input_is_refused_before_decoding() {
        let big = vec![0u8; MAX_ENVELOPE_BYTES + 1];
        assert!(matches!(open(&big), Err(Error::TooLarge { .. })));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let k = key(9);
        let shown = format!("{k:?}");
        assert!(shown.contains("redacted"));
        assert!(!shown.contains("0909090909"));
    }
}
