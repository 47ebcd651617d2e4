//! Property tests: no bytes from a peer make decoding panic, and valid
//! messages survive the round trip. Signed garbage reaches the payload
//! decoders, so they are exercised past the signature check.

use proptest::prelude::*;
use protocol::envelope::seal_bytes;
use protocol::{ContentId, DirManifest, Keypair, Outline, Validity, open, wire};

fn key() -> Keypair {
    Keypair::from_secret([42; 32])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_envelope_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = open(&bytes);
    }

    #[test]
    fn signed_arbitrary_payloads_never_panic(
        kind in 0i32..5,
        payload in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let bytes = seal_bytes(&key(), kind, payload, Validity::new(1, 0, 1000));
        if let Ok(o) = open(&bytes) {
            // Whatever decoded must re-seal and open to the same value.
            let again = open(&protocol::seal(&key(), &o.payload, o.validity)).unwrap();
            prop_assert_eq!(again.payload, o.payload);
        }
    }

    #[test]
    fn structured_adverts_round_trip_or_are_refused(
        version in ".{0,300}",
        addrs in proptest::collection::vec(".{0,40}", 0..20),
        models in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 30..34), 0..4),
        power in -1i32..4,
        threads in any::<u32>(),
    ) {
        let w = wire::Advert {
            version,
            listen_addrs: addrs,
            cpu: Some(wire::Cpu { threads, arch: "x86_64".into(), features: vec![] }),
            models,
            power,
            ..Default::default()
        };
        let bytes = seal_bytes(&key(), wire::PayloadKind::Advert as i32, prost::Message::encode_to_vec(&w), Validity::new(1, 0, 1000));
        let _ = open(&bytes);
    }

    #[test]
    fn outline_and_manifest_decoding_never_panic(
        size in any::<u64>(),
        cvs in proptest::collection::vec(any::<u8>(), 0..200),
        manifest in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let id = ContentId::of(b"x");
        let _ = Outline::from_wire(wire::Outline { size, chaining_values: cvs }, &id);
        let _ = DirManifest::decode(&manifest);
    }
}
