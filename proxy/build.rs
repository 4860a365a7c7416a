//! Builds the XDP programs in `proxy-ebpf` for the BPF target (nightly, `-Z build-std=core`,
//! bpf-linker) and leaves the object in OUT_DIR, where `shield` embeds it with `include_bytes!`.
//! `cargo xtask setup` installs the toolchain this needs.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "proxy-ebpf")
        .ok_or_else(|| anyhow!("workspace package proxy-ebpf not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", ebpf.manifest_path))?;
    let common_dir = root_dir
        .parent()
        .map(|workspace| workspace.join("proxy-common"))
        .ok_or_else(|| anyhow!("{root_dir} has no parent directory"))?;
    println!("cargo:rerun-if-changed={common_dir}");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .context(
        "building the XDP programs failed; `cargo xtask setup` installs the nightly rust-src \
         and bpf-linker this needs",
    )
}
