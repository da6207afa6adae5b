#![no_main]
// The check lives in the library (outpost::fuzzing) so the corpus replay
// in the test suite runs exactly what the fuzzer runs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost::fuzzing::admin_request(data));
