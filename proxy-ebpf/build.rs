//! Rebuild the programs when the bpf-linker binary changes (cargo cannot track it otherwise),
//! and let bpf-linker (which does the code generation) read header fields with one load each:
//! with `+allows-misaligned-mem-access` LLVM no longer assumes packet fields may not be read
//! unaligned, and stops assembling each one from byte loads, shifts and ors (an IPv6 source
//! address took 16 loads). The verifier insists on alignment for packet and map memory only
//! where the CPU lacks efficient unaligned access (not x86-64 or arm64); there it refuses the
//! program, which the relay reports before falling back to its userspace gate. On the stack it
//! always does: see the LPM keys in `police.rs`.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    println!("cargo:rustc-link-arg-bins=--cpu-features=+allows-misaligned-mem-access");
}
