//! Runs every file of the fuzz corpora (`fuzz/corpus/*`) through the same
//! functions the fuzz targets call, on stable, as an ordinary test.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let d = std::fs::read(&p).unwrap();
            (p, d)
        })
        .collect()
}

#[test]
fn superblock_corpus() {
    for (_, d) in corpus("superblock") {
        volshadow_cow::fuzzing::superblock(&d);
    }
}

#[test]
fn journal_corpus() {
    for (_, d) in corpus("journal") {
        volshadow_cow::fuzzing::journal(&d);
    }
}

#[test]
fn engine_ops_corpus() {
    for (_, d) in corpus("engine_ops") {
        volshadow_cow::fuzzing::engine(&d);
    }
}
