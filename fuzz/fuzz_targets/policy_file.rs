//! Any text as a policy file: parsed and validated into a policy or an error
//! naming the key, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = breakwater::policy::parse(text, "fuzz.toml", None);
});
