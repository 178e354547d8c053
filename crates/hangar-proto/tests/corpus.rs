//! Replays the kept fuzz corpus (`fuzz-corpus/`) through every decoder,
//! and mutates it with proptest: frames, control messages and copy
//! streams from a hostile peer must never panic, hang, allocate without
//! bound, or (for copies) write outside the destination.
//!
//! The corpus holds valid inputs of every kind and each hostile shape we
//! know of; a new crash found by a mutation belongs in it.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic loudly

use std::fs;
use std::path::{Path, PathBuf};

use hangar_proto::transfer::{unpack, TransferError, UnpackOptions};
use hangar_proto::{
    Frame, FrameDecoder, FrameError, FrameKind, GuestMessage, HostMessage, MAX_PAYLOAD,
};
use proptest::prelude::*;

fn corpus(kind: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz-corpus")
        .join(kind);
    let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(&dir)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus in {}", dir.display());
    files
}

/// Every frame the decoder yields from `chunks`, in order.
fn decode(chunks: &[&[u8]]) -> Vec<Frame> {
    let mut decoder = FrameDecoder::default();
    let mut frames = Vec::new();
    for chunk in chunks {
        decoder.push(chunk);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    assert!(frame.payload.len() <= MAX_PAYLOAD as usize);
                    frames.push(frame);
                }
                Ok(None) => break,
                // The decoder skips what it cannot use and goes on.
                Err(FrameError::TooLarge { .. } | FrameError::UnknownKind { .. }) => {}
                Err(other) => panic!("decoder failed: {other}"),
            }
        }
    }
    frames
}

#[test]
fn frames_decode_the_same_however_they_are_split() {
    for (name, bytes) in corpus("frames") {
        let whole = decode(&[&bytes]);
        for cut in 0..=bytes.len() {
            let (a, b) = bytes.split_at(cut);
            assert_eq!(decode(&[a, b]), whole, "{name} split at {cut}");
        }
    }
}

#[test]
fn known_frame_shapes_give_known_results() {
    let by_name: std::collections::BTreeMap<_, _> = corpus("frames").into_iter().collect();
    let frames = |name: &str| decode(&[&by_name[name]]);
    assert_eq!(frames("valid-hello").len(), 1);
    assert_eq!(frames("every-kind").len(), 5);
    assert!(frames("truncated-header").is_empty());
    assert!(frames("truncated-payload").is_empty());
    assert_eq!(frames("garbage-then-valid")[0].payload, b"out");
    // An impossible length is skipped; the frame after it still arrives.
    assert_eq!(frames("oversized-length").last().unwrap().payload, b"after");
    assert_eq!(
        frames("unknown-kind").last().unwrap().kind,
        FrameKind::Stderr
    );
    assert_eq!(frames("zero-length").len(), 2);
}

#[test]
fn control_messages_never_panic_and_bad_ones_are_errors() {
    let bad = [
        "deep-nesting.json",
        "empty.json",
        "not-utf8.json",
        "unknown-type.json",
        "exec-unknown-field.json",
        "resize-overflow.json",
        "signal-huge.json",
        "copy-out-null.json",
    ];
    for (name, payload) in corpus("messages") {
        for kind in [FrameKind::Host, FrameKind::Guest] {
            let frame = Frame {
                kind,
                stream: 0,
                payload: payload.clone(),
            };
            let host = HostMessage::from_frame(&frame);
            let guest = GuestMessage::from_frame(&frame);
            if bad.contains(&name.as_str()) {
                assert!(host.is_err() && guest.is_err(), "{name} must be refused");
            }
        }
    }
    let hello = corpus("messages")
        .into_iter()
        .find(|(name, _)| name == "hello.json")
        .unwrap()
        .1;
    let frame = Frame {
        kind: FrameKind::Host,
        stream: 0,
        payload: hello,
    };
    assert!(matches!(
        HostMessage::from_frame(&frame),
        Ok(HostMessage::Hello { .. })
    ));
}

/// Unpacks `bytes` into `<tmp>/dest`; returns the result and every path in
/// `<tmp>` other than `dest` afterwards.
fn unpack_isolated(bytes: &[u8]) -> (Result<(), TransferError>, Vec<PathBuf>) {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    let result = unpack(bytes, &dest, UnpackOptions::default()).map(|_| ());
    let outside = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p != &dest)
        .collect();
    (result, outside)
}

#[test]
fn copy_streams_from_the_corpus() {
    for (name, bytes) in corpus("transfer") {
        let (result, outside) = unpack_isolated(&bytes);
        assert!(outside.is_empty(), "{name} wrote outside: {outside:?}");
        let should_work = matches!(name.as_str(), "valid-tree" | "long-names");
        assert_eq!(result.is_ok(), should_work, "{name}: {result:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Corrupted copy streams: errors are fine, panics and writes outside
    /// the destination are not.
    #[test]
    fn mutated_copy_streams_stay_inside(
        pick in 0usize..64,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..16),
        cut in any::<usize>(),
    ) {
        let files = corpus("transfer");
        let (_, original) = &files[pick % files.len()];
        let mut bytes = original.clone();
        if !bytes.is_empty() {
            for (at, value) in flips {
                let len = bytes.len();
                bytes[at % len] = value;
            }
            bytes.truncate(cut % (bytes.len() + 1));
        }
        let (_, outside) = unpack_isolated(&bytes);
        prop_assert!(outside.is_empty(), "wrote outside: {:?}", outside);
    }

    /// Corrupted frame streams decode without panic or unbounded frames.
    #[test]
    fn mutated_frames_never_panic(
        pick in 0usize..64,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        let files = corpus("frames");
        let (_, original) = &files[pick % files.len()];
        let mut bytes = original.clone();
        if !bytes.is_empty() {
            for (at, value) in flips {
                let len = bytes.len();
                bytes[at % len] = value;
            }
        }
        decode(&[&bytes]);
    }
}
