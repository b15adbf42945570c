//! Opening a data directory made of arbitrary bytes, or of a valid log with arbitrary
//! damage, gives Ok or a typed error: never a panic, a hang or an unbounded allocation; and
//! so does `repair` of a directory that failed to open, and the open after it.
#![no_main]

use std::path::Path;
use std::sync::{Arc, OnceLock};

use halfmq_store::io::Storage;
use halfmq_store::sim::SimStorage;
use halfmq_store::{Append, Store};
use libfuzzer_sys::fuzz_target;

#[path = "../recovery_setup.rs"]
mod recovery_setup;

use recovery_setup::{config, CHECKPOINT, DIR, SEGMENT};

/// Every file of a small valid data directory: two segments, indexes, checkpoints.
fn valid_image() -> &'static Vec<(String, Vec<u8>)> {
    static IMAGE: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let disk = SimStorage::new();
        let (store, _) = Store::open(Arc::new(disk.clone()), Path::new(DIR), config(), &mut |_| {})
            .expect("open a fresh store");
        let q = store.queue("t", 0).expect("queue");
        for i in 0..120u32 {
            let body = vec![i as u8; 200 + (i as usize % 300)];
            store
                .append(Append::message(&q, "k", &body, 1))
                .expect("append");
        }
        store.close().expect("close");
        drop(store);
        disk.files()
            .into_iter()
            .filter_map(|p| Some((p.to_str()?.to_owned(), disk.durable_bytes(&p)?)))
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let disk = SimStorage::new();
    if mode & 1 == 0 {
        // A data directory of arbitrary bytes: the newest segment, and maybe a checkpoint.
        let (seg, cp) = rest.split_at(rest.len() * 3 / 4);
        disk.put_bytes(Path::new(SEGMENT), seg.to_vec());
        if mode & 2 != 0 {
            disk.put_bytes(Path::new(CHECKPOINT), cp.to_vec());
        }
    } else {
        // A valid directory with damage: (file index, offset, byte) triples.
        let image = valid_image();
        let mut files = image.clone();
        for chunk in rest.chunks_exact(4) {
            let f = chunk[0] as usize % files.len();
            let bytes = &mut files[f].1;
            if bytes.is_empty() {
                continue;
            }
            let at = u16::from_le_bytes([chunk[1], chunk[2]]) as usize % bytes.len();
            bytes[at] = chunk[3];
        }
        if mode & 2 != 0 && !rest.is_empty() {
            // Also cut one file short.
            let f = rest[0] as usize % files.len();
            let cut = rest.len() * 97 % (files[f].1.len() + 1);
            files[f].1.truncate(cut);
        }
        for (p, b) in files {
            disk.put_bytes(Path::new(&p), b);
        }
    }
    let storage: Arc<dyn Storage> = Arc::new(disk.clone());
    match Store::open(storage.clone(), Path::new(DIR), config(), &mut |_| {}) {
        Ok((store, _)) => read_all(&store),
        Err(_) => {
            // Repair copes with the same bytes (a report or a typed error), and what it
            // leaves opens, or fails with a typed error, the same way.
            if halfmq_store::repair::repair(&disk, Path::new(DIR), false).is_ok() {
                if let Ok((store, _)) = Store::open(storage, Path::new(DIR), config(), &mut |_| {}) {
                    read_all(&store);
                }
            }
        }
    }
});

/// Whatever opened must be readable without panics.
fn read_all(store: &Store) {
    for q in store.queues() {
        let _ = store.read_messages(&q, 0, 1000);
    }
    let _ = store.close();
}
