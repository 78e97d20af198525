#![no_main]
//! Fuzz target: see `volshadow_cow::fuzzing::journal`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| volshadow_cow::fuzzing::journal(data));
