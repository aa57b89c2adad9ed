//! The Python shim's pure parts, tested in the project venv.

mod common;

#[test]
fn shim_splitter_handles_each_model_familys_tool_format() {
    let out = std::process::Command::new(format!("{}/bin/python", env!("PENSIEVE_VENV")))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/shim_splitter_test.py"))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/python"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}

/// A character split across tokens never reaches a stream half-made.
#[test]
fn streamed_text_never_splits_a_character() {
    let out = std::process::Command::new(common::venv_python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/shim_stream_text_test.py"))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/python"))
        .arg(common::random_model_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    println!("{stdout}");
}
