//! Feeds arbitrary scripts to a session through the deterministic driver:
//! no input may panic the core, and cutting the input differently must not
//! change what the gateway sends or does.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../harness.rs"]
mod harness;

fuzz_target!(|data: &[u8]| {
    harness::check(data);
});
