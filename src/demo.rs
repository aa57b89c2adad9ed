//! The built-in demo model, embedded in the binary.
//!
//! A tiny llama trained by `python/train_demo.py` (see models/pensieve-demo/
//! TRAINING.md) to answer in a toy weather domain and to call a
//! `get_weather(city)` tool. On first use its files are written to the cache
//! folder (atomically) and it is loaded through `mlx_lm.load` like any model.

use std::path::{Path, PathBuf};

const FILES: &[(&str, &[u8])] = &[
    ("config.json", include_bytes!("../models/pensieve-demo/config.json")),
    ("model.safetensors", include_bytes!("../models/pensieve-demo/model.safetensors")),
    ("tokenizer.json", include_bytes!("../models/pensieve-demo/tokenizer.json")),
    ("tokenizer_config.json", include_bytes!("../models/pensieve-demo/tokenizer_config.json")),
];

/// FNV-1a over the files: names the cache folder, so a retrained model never
/// meets a stale copy.
fn fingerprint() -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for (name, bytes) in FILES {
        for b in name.as_bytes().iter().chain(bytes.iter()) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    format!("{h:016x}")
}

/// Writes the model into `cache_root` unless it is there; returns its folder.
pub fn materialize(cache_root: &Path) -> std::io::Result<PathBuf> {
    let dest = cache_root.join(format!("demo-{}", &fingerprint()[..12]));
    if dest.join(".complete").exists() {
        return Ok(dest);
    }
    std::fs::create_dir_all(cache_root)?;
    let tmp = cache_root.join(format!(".demo-tmp-{}-{:?}", std::process::id(), std::thread::current().id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    for (name, bytes) in FILES {
        std::fs::write(tmp.join(name), bytes)?;
    }
    std::fs::write(tmp.join(".complete"), b"")?;
    if std::fs::rename(&tmp, &dest).is_err() {
        // Another process or thread got there first; theirs is identical.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn materializes_once_and_completely() {
        let root = std::env::temp_dir().join(format!("pensieve-demo-test-{}", std::process::id()));
        let a = materialize(&root).unwrap();
        let b = materialize(&root).unwrap();
        assert_eq!(a, b);
        for (name, bytes) in FILES {
            assert_eq!(std::fs::read(a.join(name)).unwrap().len(), bytes.len());
        }
        let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(a.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["model_type"], "llama");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
