//! The Python shim's parts, tested in the project venv: its unit tests
//! (python/tests, pytest) and the engine's per-token text path.

mod common;

/// python/tests (pytest): the output splitter in several model families'
/// tool-call formats, and the scheduling policy, without MLX or HTTP.
#[test]
fn python_unit_tests_pass() {
    let out = std::process::Command::new(common::venv_python())
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", concat!(env!("CARGO_MANIFEST_DIR"), "/python/tests")])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(" passed") && !stdout.contains("failed"), "{stdout}");
    println!("{stdout}");
}

/// A character split across tokens never reaches a stream half-made.
#[test]
fn streamed_text_never_splits_a_character() {
    common::run_checks("shim_stream_text_test.py", &[&common::random_model_dir().to_string_lossy()]);
}
