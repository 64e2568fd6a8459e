#!/bin/sh
# RUSTC_WRAPPER for `cargo fuzz` (set by `cargo xtask fuzz`): builds the simulated device
# (virtio-tests) and the rust-vmm crates under it without SanitizerCoverage, AddressSanitizer
# kept. Their edges and comparisons made up much of libFuzzer's per-input bookkeeping and
# tell the fuzzer nothing about the driver code under test. LLVM takes the last
# `-sanitizer-coverage-level`, so the `0` appended here wins over cargo-fuzz's `4`.
rustc="$1"
shift
case " $* " in
*" --crate-name virtio_tests "* | *" --crate-name vm_memory "* | \
*" --crate-name virtio_queue "* | *" --crate-name vmm_sys_util "* | \
*" --crate-name virtio_bindings "* | *" --crate-name serde_json "* | \
*" --crate-name virtio_test_stream "*)
    exec "$rustc" "$@" -Cllvm-args=-sanitizer-coverage-level=0 ;;
*)
    exec "$rustc" "$@" ;;
esac
