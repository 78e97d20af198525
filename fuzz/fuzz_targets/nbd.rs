#![no_main]
//! Fuzz target: a whole NBD client session (`volshadow_nbd::fuzzing::session`).

libfuzzer_sys::fuzz_target!(|data: &[u8]| volshadow_nbd::fuzzing::session(data));
