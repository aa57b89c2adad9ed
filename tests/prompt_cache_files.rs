//! The prefix cache on disk holds conversations: it is private to its user
//! whatever the umask, and what is restored from it is checked (the real
//! binary, restarted over planted and tampered files).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::binary::{command, signal, spawn_with, wait_exit};
use serde_json::{json, Value};

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

fn conversation() -> Value {
    json!({"model": "m", "max_tokens": 4, "temperature": 0,
           "system": "You keep secrets. ".repeat(20),
           "messages": [{"role": "user", "content": "the password is hunter2; remember it"}]})
}

async fn ask(addr: &str) -> Value {
    let r = reqwest::Client::new().post(format!("http://{addr}/v1/messages")).json(&conversation()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Rewrites the `tokens` metadata of a saved entry.
fn with_tokens(src: &Path, dst: &Path, tokens: &Value) {
    let bytes = std::fs::read(src).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["__metadata__"]["0.tokens"] = json!(tokens.to_string());
    let mut h = header.to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(dst, out).unwrap();
}

fn saved_tokens(file: &Path) -> Vec<u64> {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    serde_json::from_str(header["__metadata__"]["0.tokens"].as_str().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saved_conversations_are_private_and_restores_are_checked() {
    let dir: PathBuf = std::env::temp_dir().join(format!("pensieve-private-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_arg = dir.to_string_lossy().to_string();
    let args = ["--prompt-cache-dir", dir_arg.as_str()];

    // 1. Saved under umask 000: still 0700 folders and 0600 files.
    let (mut s, _) = spawn_with(&args, Some(0));
    let first = ask(&s.addr).await;
    assert_eq!(first["usage"]["cache_read_input_tokens"], 0);
    signal(&s, libc::SIGTERM);
    assert_eq!(tokio::task::spawn_blocking(move || wait_exit(&mut s, 60).code()).await.unwrap(), Some(0));
    let model_dir = std::fs::read_dir(&dir).unwrap().next().unwrap().unwrap().path();
    let entry = model_dir.join("000000.safetensors");
    assert_eq!((mode(&dir), mode(&model_dir), mode(&entry)), (0o700, 0o700, 0o600));

    // 2. Planted and tampered entries; loosened permissions.
    let tokens = saved_tokens(&entry);
    with_tokens(&entry, &model_dir.join("000001.safetensors"), &json!(tokens.iter().map(|t| t + 1_000_000).collect::<Vec<_>>()));
    with_tokens(&entry, &model_dir.join("000002.safetensors"), &json!(tokens[..tokens.len() - 3]));
    with_tokens(&entry, &model_dir.join("000003.safetensors"), &json!(["not", "ids"]));
    let fifo = std::ffi::CString::new(model_dir.join("000004.safetensors").to_string_lossy().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    std::os::unix::fs::symlink(&entry, model_dir.join("000005.safetensors")).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o644)).unwrap();

    // 3. The restart comes up (a FIFO is never opened), skips each bad entry
    // with a warning that names it, restores the good one, tightens modes.
    let (mut s, log) = spawn_with(&args, Some(0));
    let log = log.join("\n");
    for (file, why) in [
        ("000001", "integers in [0,"),
        ("000002", "cached positions"),
        ("000003", "integers in [0,"),
        ("000004", "not a regular file"),
        ("000005", "not a regular file"),
    ] {
        let line = log
            .lines()
            .find(|l| l.contains(&format!("{file}.safetensors")))
            .unwrap_or_else(|| panic!("no warning for {file}:\n{log}"));
        assert!(line.contains(why), "{line}");
    }
    assert!(log.contains("restored 1 entries"), "{log}");
    assert_eq!((mode(&dir), mode(&entry)), (0o700, 0o600));
    let again = ask(&s.addr).await;
    assert!(again["usage"]["cache_read_input_tokens"].as_u64().unwrap() > 0, "{again}");
    signal(&s, libc::SIGTERM);
    tokio::task::spawn_blocking(move || wait_exit(&mut s, 60)).await.unwrap();

    // 4. A folder others may write to is refused before the port opens.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let owned = dir_arg.clone();
    let out = tokio::task::spawn_blocking(move || {
        let mut c = command(&["--prompt-cache-dir", owned.as_str()]);
        c.stdin(std::process::Stdio::null());
        let child = c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("writable by group or others"), "{text}");
    assert!(!text.contains("serving"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
