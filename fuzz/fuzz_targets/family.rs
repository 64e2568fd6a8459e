#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| virtio_fuzz_logic::family::run(data));
