use which::which;

/// Building this crate depends on the `bpf-linker` binary, which cargo cannot express as a
/// dependency (artifact dependencies are unstable). Re-run when the linker on PATH changes, so a
/// rebuilt linker rebuilds the object. `cargo xtask setup` installs it.
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!(
            "cargo:warning=bpf-linker not found on PATH: run `cargo xtask setup` to install it"
        ),
    }
}
