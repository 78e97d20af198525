#![no_main]
//! Fuzz target: engine operations against a model (`volshadow_cow::fuzzing::engine`).

libfuzzer_sys::fuzz_target!(|data: &[u8]| volshadow_cow::fuzzing::engine(data));
