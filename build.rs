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
//! 5. On Linux, compiles `pensieve_mlx` (src/kernels/mlx_ops.cpp: the CPU
//!    kernels as MLX primitives) against the venv's mlx and nanobind, into
//!    the venv; again only when its inputs changed (a stamp beside it).

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
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        provision(&python, &venv, &requirements, &nodeps, &stamp, &wanted);
    }
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        build_mlx_extension(&manifest, &venv);
    }
}

/// Compiles the `pensieve_mlx` extension into the venv's site-packages.
/// Without a C++ compiler the server still works, on MLX's own CPU ops
/// (it says so at start and in /health).
fn build_mlx_extension(manifest: &Path, venv: &Path) {
    let source = manifest.join("src/kernels/mlx_ops.cpp");
    println!("cargo:rerun-if-changed=src/kernels/mlx_ops.cpp");
    let py = venv.join("bin/python");
    let probe = Command::new(&py)
        .args([
            "-c",
            "import sysconfig, mlx, nanobind, os; \
             print(sysconfig.get_paths()['include']); print(sysconfig.get_paths()['purelib']); \
             print(sysconfig.get_config_var('EXT_SUFFIX')); print(os.path.dirname(mlx.__file__) if mlx.__file__ else mlx.__path__[0]); \
             print(os.path.dirname(nanobind.__file__)); import importlib.metadata as m; print(m.version('mlx'), m.version('nanobind'))",
        ])
        .output();
    let out = match probe {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).to_string(),
        _ => {
            println!("cargo:warning=pensieve: no mlx/nanobind in {}: the CPU kernels are not built", venv.display());
            return;
        }
    };
    let lines: Vec<&str> = out.lines().collect();
    let [py_include, site, suffix, mlx_dir, nb_dir, versions] = lines[..] else {
        println!("cargo:warning=pensieve: unexpected answer from the venv's python: {out}");
        return;
    };
    let mlx_dir = PathBuf::from(mlx_dir);
    let nb = PathBuf::from(nb_dir);
    let target = PathBuf::from(site).join(format!("pensieve_mlx{suffix}"));
    let ext_stamp = PathBuf::from(site).join("pensieve_mlx.sha256");
    let mut digest = Sha256::new();
    digest.update(std::fs::read(&source).unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", source.display()))));
    digest.update(versions.as_bytes());
    let wanted = hex(&digest.finalize());
    if target.exists() && std::fs::read_to_string(&ext_stamp).ok().as_deref() == Some(wanted.as_str()) {
        return;
    }
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    progress(&format!("compiling the CPU kernels' MLX extension ({versions}) with {cxx}"));
    let started = Instant::now();
    let tmp = target.with_extension("tmp");
    let status = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-fPIC", "-shared", "-fvisibility=hidden", "-DNDEBUG"])
        // The nanobind ABI of mlx's own Python module, so mx.array crosses as itself.
        .arg("-DNB_DOMAIN=mlx")
        .arg(format!("-I{}", mlx_dir.join("include").display()))
        .arg(format!("-I{}", nb.join("include").display()))
        .arg(format!("-I{}", nb.join("ext/robin_map/include").display()))
        .arg(format!("-I{py_include}"))
        .arg(&source)
        .arg(nb.join("src/nb_combined.cpp"))
        .arg(format!("-L{}", mlx_dir.join("lib").display()))
        .arg("-lmlx")
        .arg(format!("-Wl,-rpath,{}", mlx_dir.join("lib").display()))
        .arg("-o")
        .arg(&tmp)
        .status();
    match status {
        Ok(s) if s.success() => {
            std::fs::rename(&tmp, &target).unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", target.display())));
            std::fs::write(&ext_stamp, wanted).unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", ext_stamp.display())));
            progress(&format!("built {} in {:.0?}", target.display(), started.elapsed()));
        }
        _ => {
            let _ = std::fs::remove_file(&tmp);
            println!(
                "cargo:warning=pensieve: could not compile src/kernels/mlx_ops.cpp with {cxx}: the server will run on MLX's own CPU ops (slower)"
            );
        }
    }
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
