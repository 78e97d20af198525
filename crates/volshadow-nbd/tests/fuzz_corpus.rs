//! Runs every file of `fuzz/corpus/nbd` through the NBD fuzz entry point.
#![allow(clippy::unwrap_used)]

#[test]
fn nbd_corpus() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/nbd");
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let data = std::fs::read(e.unwrap().path()).unwrap();
        volshadow_nbd::fuzzing::session(&data);
        n += 1;
    }
    assert!(n > 0);
}
