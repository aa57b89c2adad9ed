//! The Python shim's pure parts, tested in the project venv.

mod common;

#[test]
fn shim_splitter_handles_each_model_familys_tool_format() {
    common::run_checks("shim_splitter_test.py", &[]);
}

/// A character split across tokens never reaches a stream half-made.
#[test]
fn streamed_text_never_splits_a_character() {
    common::run_checks("shim_stream_text_test.py", &[&common::random_model_dir().to_string_lossy()]);
}
