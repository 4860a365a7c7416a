//! Rebuild the programs when the bpf-linker binary changes (cargo cannot track it otherwise),
//! and tell bpf-linker (which does the code generation) what to generate for:
//! - `--cpu=v3`: 32-bit jumps and ALU ops (kernels since 5.1), fewer instructions per packet
//!   than the `generic` (v1) default;
//! - `+allows-misaligned-mem-access`: header fields are read with one load each instead of
//!   byte by byte (an IPv6 source address was 16 loads and 30 shifts and ors). The verifier
//!   only insists on alignment where the CPU lacks efficient unaligned access (not x86-64 or
//!   arm64), and there it refuses the program, which the relay reports and survives.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    println!("cargo:rustc-link-arg-bins=--cpu-features=+allows-misaligned-mem-access");
}
