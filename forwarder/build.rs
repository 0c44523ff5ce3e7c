//! Builds the eBPF object (`ebpf` crate, target `bpfel-unknown-none`) with aya-build, so a plain
//! `cargo build` rebuilds it whenever it changes; the daemon embeds it from `OUT_DIR`.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|cargo_metadata::Package { name, .. }| name.as_str() == "weir-ebpf")
        .ok_or_else(|| anyhow!("weir-ebpf package not found"))?;
    let cargo_metadata::Package {
        name,
        manifest_path,
        ..
    } = ebpf_package;
    let ebpf_package = aya_build::Package {
        name: name.as_str(),
        root_dir: manifest_path
            .parent()
            .ok_or_else(|| anyhow!("no parent for {manifest_path}"))?
            .as_str(),
        ..Default::default()
    };
    // aya-build replays every line the nested cargo prints as a `cargo:warning`, so each build
    // of the daemon would show its "Compiling …" progress as warnings: keep the nested cargo
    // quiet (its errors and real warnings still come through).
    // SAFETY: the build script is single-threaded here; nothing reads the environment at the
    // same time.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf([ebpf_package], Toolchain::default())
}
