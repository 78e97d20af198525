#![no_main]
//! Fuzz target: see `volshadow_cow::fuzzing::superblock`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| volshadow_cow::fuzzing::superblock(data));
