//! The prefix-cache folder holds conversations (each entry stores its token
//! ids), so it is kept private: created 0700, its folders tightened to 0700
//! and its files to 0600 whatever the umask, and refused outright when
//! another user owns it or could write to it (they could read what is saved
//! or plant entries).

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` if missing and makes sure only this user can use it.
/// Returns how many folders and files had their permissions tightened.
pub fn prepare(dir: &Path) -> anyhow::Result<usize> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| anyhow::anyhow!("cannot create the prompt-cache folder {}: {e}", dir.display()))?;
    }
    let meta = std::fs::metadata(dir).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", dir.display()))?;
    refuse_unsafe(dir, &meta)?;
    let mut tightened = 0;
    tighten(dir, &meta, &mut tightened)?;
    // One level of model folders, each holding entry files.
    for entry in std::fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        let Ok(m) = std::fs::symlink_metadata(&path) else { continue };
        if m.file_type().is_symlink() || m.uid() != euid() {
            continue; // never followed nor trusted at restore
        }
        tighten(&path, &m, &mut tightened)?;
        if m.is_dir() {
            for file in std::fs::read_dir(&path)?.flatten() {
                let p = file.path();
                if let Ok(fm) = std::fs::symlink_metadata(&p) {
                    if !fm.file_type().is_symlink() && fm.uid() == euid() {
                        tighten(&p, &fm, &mut tightened)?;
                    }
                }
            }
        }
    }
    Ok(tightened)
}

fn refuse_unsafe(dir: &Path, meta: &std::fs::Metadata) -> anyhow::Result<()> {
    let fix = "fix its owner and mode (chmod 700), or pick another folder with --prompt-cache-dir (or run with --no-prompt-cache-persist)";
    if !meta.is_dir() {
        anyhow::bail!("the prompt-cache folder {} is not a folder", dir.display());
    }
    if meta.uid() != euid() {
        anyhow::bail!(
            "the prompt-cache folder {} belongs to uid {}, not to this user (uid {}): it would hold this user's conversations; {fix}",
            dir.display(),
            meta.uid(),
            euid()
        );
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        anyhow::bail!(
            "the prompt-cache folder {} is writable by group or others (mode {mode:o}): another user could read or plant entries; {fix}",
            dir.display()
        );
    }
    Ok(())
}

fn tighten(path: &Path, meta: &std::fs::Metadata, count: &mut usize) -> anyhow::Result<()> {
    let want = if meta.is_dir() { 0o700 } else { 0o600 };
    if meta.permissions().mode() & 0o777 != want {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(want))
            .map_err(|e| anyhow::anyhow!("cannot restrict {} to mode {want:o}: {e}", path.display()))?;
        *count += 1;
    }
    Ok(())
}

fn euid() -> u32 {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn created_private_loose_ones_tightened_writable_ones_refused() {
        let base = std::env::temp_dir().join(format!("pensieve-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let fresh = base.join("a/b");
        prepare(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);

        let loose = base.join("loose");
        std::fs::create_dir_all(loose.join("model")).unwrap();
        std::fs::write(loose.join("model/000000.safetensors"), b"x").unwrap();
        for (p, m) in [(&loose, 0o755), (&loose.join("model"), 0o755)] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        }
        std::fs::set_permissions(loose.join("model/000000.safetensors"), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(prepare(&loose).unwrap(), 3);
        assert_eq!(mode(&loose), 0o700);
        assert_eq!(mode(&loose.join("model")), 0o700);
        assert_eq!(mode(&loose.join("model/000000.safetensors")), 0o600);

        let shared = base.join("shared");
        std::fs::create_dir_all(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = prepare(&shared).unwrap_err().to_string();
        assert!(e.contains("writable by group or others"), "{e}");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o770)).unwrap();
        assert!(prepare(&shared).is_err());

        if euid() == 0 {
            let theirs = base.join("theirs");
            std::fs::create_dir_all(&theirs).unwrap();
            std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            let e = prepare(&theirs).unwrap_err().to_string();
            assert!(e.contains("belongs to uid 65534"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&base);
    }
}
