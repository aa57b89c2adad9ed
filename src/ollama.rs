//! `--model ollama:NAME[:TAG]`: the GGUF file of a model Ollama already
//! pulled on this machine, found through Ollama's own manifest (under
//! `$OLLAMA_MODELS`, else `~/.ollama/models`), so users reuse what they have.

use std::path::{Path, PathBuf};

/// The layer of an Ollama manifest that holds the weights.
const MODEL_LAYER: &str = "application/vnd.ollama.image.model";

pub fn models_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("OLLAMA_MODELS") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".ollama/models")
}

/// `qwen3`, `qwen3:8b`, `me/mine:q4`, `host.example/ns/m:tag` -> the manifest's
/// path under `manifests/`, as Ollama lays it out.
fn manifest_path(name: &str) -> PathBuf {
    let (model, tag) = match name.rsplit_once(':') {
        Some((m, t)) if !t.contains('/') && !t.is_empty() => (m, t),
        _ => (name, "latest"),
    };
    let parts: Vec<&str> = model.split('/').collect();
    let full = match parts.as_slice() {
        [m] => format!("registry.ollama.ai/library/{m}"),
        [ns, m] => format!("registry.ollama.ai/{ns}/{m}"),
        _ => model.to_string(),
    };
    PathBuf::from(full).join(tag)
}

/// The GGUF blob of Ollama model `name` in `root` (Ollama's models folder).
pub fn resolve_in(root: &Path, name: &str) -> Result<PathBuf, String> {
    let manifest = root.join("manifests").join(manifest_path(name));
    let text = std::fs::read_to_string(&manifest).map_err(|_| {
        let have = list(root);
        if have.is_empty() {
            format!("Ollama has no model {name:?} (no models under {})", root.display())
        } else {
            format!("Ollama has no model {name:?}; it has: {}", have.join(", "))
        }
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("cannot read Ollama's manifest {}: {e}", manifest.display()))?;
    let digest = v["layers"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["mediaType"] == MODEL_LAYER))
        .and_then(|l| l["digest"].as_str())
        .ok_or_else(|| format!("Ollama's manifest {} names no model weights", manifest.display()))?;
    let blob = root.join("blobs").join(digest.replace(':', "-"));
    if !blob.is_file() {
        return Err(format!("Ollama's weights for {name:?} are missing ({}): pull the model again", blob.display()));
    }
    Ok(blob)
}

/// The models Ollama has, as `name:tag` (library models without their prefix).
pub fn list(root: &Path) -> Vec<String> {
    let base = root.join("manifests");
    let mut out = Vec::new();
    let mut stack = vec![base.clone()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(&base) {
                let rel = rel.to_string_lossy().to_string();
                let rel = rel.strip_prefix("registry.ollama.ai/").unwrap_or(&rel);
                let rel = rel.strip_prefix("library/").unwrap_or(rel);
                if let Some((model, tag)) = rel.rsplit_once('/') {
                    out.push(format!("{model}:{tag}"));
                }
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_are_found_and_missing_names_list_what_exists() {
        let root = std::env::temp_dir().join(format!("pensieve-ollama-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let lib = root.join("manifests/registry.ollama.ai/library/smollm2");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::create_dir_all(root.join("blobs")).unwrap();
        std::fs::write(root.join("blobs/sha256-abc"), b"GGUF").unwrap();
        let manifest = serde_json::json!({"layers": [
            {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:t"},
            {"mediaType": MODEL_LAYER, "digest": "sha256:abc"}]});
        std::fs::write(lib.join("135m"), manifest.to_string()).unwrap();
        assert_eq!(resolve_in(&root, "smollm2:135m").unwrap(), root.join("blobs/sha256-abc"));
        let e = resolve_in(&root, "qwen3").unwrap_err();
        assert!(e.contains("it has: smollm2:135m"), "{e}");
        assert_eq!(manifest_path("me/mine:q4"), PathBuf::from("registry.ollama.ai/me/mine/q4"));
        assert_eq!(manifest_path("qwen3"), PathBuf::from("registry.ollama.ai/library/qwen3/latest"));
        let _ = std::fs::remove_dir_all(&root);
    }
}
