//! Toolchain and package bootstrap, done by the project itself and safe to repeat.
//!
//! Each step checks first and installs only what is missing, printing one line either way, so a
//! second run installs nothing and takes seconds. What it sets up:
//! - Debian packages the build, the lab and the tests use;
//! - the `nightly` toolchain (checked against the pinned version) with `rust-src`, which
//!   aya-build uses to build the eBPF crate with `-Z build-std=core`;
//! - `bpf-linker`, built against the nightly toolchain's own LLVM because the machine has no
//!   system LLVM (the default `cargo install bpf-linker` fails here). The build lands in
//!   `$CARGO_HOME/bin` and its LLVM link directory in `$CARGO_HOME/weir-llvm`, so the cache
//!   survives between runs.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

/// The nightly that builds the eBPF crate. Only toolchains already on the machine can be used
/// (nothing is downloaded), so this is a check, not an install: see
/// docs/decisions/0001-toolchains-and-aya.md. `WEIR_ALLOW_OTHER_NIGHTLY=1` downgrades a
/// mismatch to a warning.
const PINNED_NIGHTLY: &str = "1.97.0-nightly (e50aa6fba 2026-05-19)";
/// The bpf-linker release built by `setup`.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages used by the build, `cargo xtask run` and the tests.
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "curl",
    "ethtool",
    "procps",
    "bpftool",
    // The health-check tests black-hole a server with a firewall rule.
    "nftables",
    // The metrics test scrapes weir with a real Prometheus and checks the exposition with
    // promtool.
    "prometheus",
    // The dashboard test loads the page in headless Chromium.
    "chromium",
    // The BGP test runs BIRD as the node's speaker and as the router.
    "bird2",
    // The TLS tests drive weir with `openssl s_client` and `s_time`, serve passthrough origins
    // with `openssl s_server`, and make RSA keys with `openssl genpkey`.
    "openssl",
    // The L7 test of how a connection's last response leaves captures its segments.
    "tcpdump",
];

/// What setup found, for commands that run tools afterwards.
pub struct Toolchain {
    /// PATH with `$CARGO_HOME/bin` first, so aya-build finds the bpf-linker built here.
    pub path: OsString,
}

impl Toolchain {
    /// `cargo` (the pinned userspace toolchain) with the PATH setup prepared.
    pub fn cargo(&self) -> Command {
        let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.env("PATH", &self.path);
        cmd
    }
}

pub fn run() -> Result<Toolchain> {
    println!("setup: checking the toolchain and packages");
    ensure_packages(APT_PACKAGES)?;
    let nightly = nightly_toolchain()?;
    rust_src()?;
    let cargo_home = cargo_home()?;
    bpf_linker(&cargo_home, &nightly)?;
    let bin = cargo_home.join("bin");
    let path = env::join_paths(std::iter::once(bin.clone()).chain(
        env::split_paths(&env::var_os("PATH").unwrap_or_default()).filter(|dir| *dir != bin),
    ))?;
    println!("setup: all present");
    Ok(Toolchain { path })
}

/// Installs whichever of `packages` (Debian) are missing; says what it found.
pub fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|pkg| !dpkg_installed(pkg))
        .collect();
    if missing.is_empty() {
        println!("  ok   packages: {}", packages.join(" "));
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "missing Debian packages {}: run `apt-get install -y {}` as root",
            missing.join(" "),
            missing.join(" ")
        );
    }
    println!("  get  packages: {}", missing.join(" "));
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// The facts about the nightly toolchain that the bpf-linker build depends on.
struct Nightly {
    /// `<toolchain>/lib`, which holds the toolchain's `libLLVM.so.NN...`.
    lib_dir: PathBuf,
    /// Major version of the LLVM the toolchain ships.
    llvm_major: u32,
}

fn nightly_toolchain() -> Result<Nightly> {
    let verbose = output(Command::new("rustc").args(["+nightly", "-vV"]))
        .context("the `nightly` toolchain is not installed (rustup toolchain list)")?;
    let field = |key: &str| {
        verbose
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .map(str::trim)
    };
    let version = verbose.lines().next().unwrap_or_default();
    let version = version.strip_prefix("rustc ").unwrap_or(version);
    if version != PINNED_NIGHTLY {
        let msg = format!("nightly is `{version}`, weir pins `{PINNED_NIGHTLY}`");
        if env::var_os("WEIR_ALLOW_OTHER_NIGHTLY").is_some() {
            println!("  warn {msg} (allowed by WEIR_ALLOW_OTHER_NIGHTLY)");
        } else {
            bail!("{msg}; set WEIR_ALLOW_OTHER_NIGHTLY=1 to build with it anyway");
        }
    }
    let llvm = field("LLVM version:").context("rustc +nightly -vV has no LLVM version")?;
    let llvm_major = llvm
        .split('.')
        .next()
        .and_then(|major| major.parse().ok())
        .with_context(|| format!("cannot read the LLVM major version from `{llvm}`"))?;
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    println!("  ok   nightly {version}, LLVM {llvm}");
    Ok(Nightly {
        lib_dir: PathBuf::from(sysroot.trim()).join("lib"),
        llvm_major,
    })
}

fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if installed.lines().any(|line| line.starts_with("rust-src")) {
        println!("  ok   rust-src on nightly");
        return Ok(());
    }
    println!("  get  rust-src on nightly");
    run_cmd(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home));
    }
    let home = env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

fn bpf_linker(cargo_home: &Path, nightly: &Nightly) -> Result<()> {
    let linker = cargo_home.join("bin").join("bpf-linker");
    // `--version` also proves the binary still loads the LLVM it was linked against (a nightly
    // update would remove that library and make the old build unusable).
    let expected = format!("bpf-linker {BPF_LINKER_VERSION}");
    if let Ok(version) = output(Command::new(&linker).arg("--version"))
        && version.trim() == expected
    {
        println!("  ok   {expected} ({})", linker.display());
        return Ok(());
    }
    println!(
        "  get  {expected}, built against nightly's LLVM {} (about a minute)",
        nightly.llvm_major
    );
    let llvm_so = find_libllvm(&nightly.lib_dir, nightly.llvm_major)?;
    // llvm-sys links `-lLLVM`, so it needs a `libLLVM.so` name; the toolchain ships only the
    // versioned file. The link directory lives under CARGO_HOME with the build cache.
    let link_dir = cargo_home.join("weir-llvm");
    fs::create_dir_all(&link_dir)?;
    let link = link_dir.join("libLLVM.so");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm_so, &link)
        .with_context(|| format!("symlink {} -> {}", link.display(), llvm_so.display()))?;
    let rustflags = format!(
        "-L {} -C link-arg=-Wl,-rpath,{}",
        link_dir.display(),
        nightly.lib_dir.display()
    );
    run_cmd(
        Command::new("cargo")
            .args(["+nightly", "install", "bpf-linker", "--locked", "--force"])
            .args(["--version", BPF_LINKER_VERSION, "--no-default-features"])
            .args(["--features", &format!("llvm-{}", nightly.llvm_major)])
            .env("RUSTFLAGS", rustflags),
    )?;
    let version = output(Command::new(&linker).arg("--version"))?;
    if version.trim() != expected {
        bail!("installed bpf-linker reports `{}`", version.trim());
    }
    Ok(())
}

/// The toolchain's `libLLVM.so.<major>.*-rust-*` (the file, not the `libLLVM-NN-rust` alias).
fn find_libllvm(lib_dir: &Path, major: u32) -> Result<PathBuf> {
    let prefix = format!("libLLVM.so.{major}.");
    fs::read_dir(lib_dir)
        .with_context(|| format!("read {}", lib_dir.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(&prefix) && name.contains("-rust-"))
        })
        .with_context(|| format!("no {prefix}*-rust-* in {}", lib_dir.display()))
}

/// Runs a command to completion, its output going to ours; fails on a non-zero exit.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout; fails on a non-zero exit.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    Ok(String::from_utf8(out.stdout)?)
}
