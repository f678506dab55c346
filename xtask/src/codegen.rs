//! `cargo xtask codegen`: files generated from Rust types and kept in git. Today the policy
//! CRDs (deploy/crds/, from rthooks-policy); `policy/tests/crds.rs` fails when they drift.
use anyhow::{Context, Result};

use crate::util::workspace_root;

pub fn codegen() -> Result<()> {
    let dir = workspace_root().join(rthooks_policy::resources::CRD_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let files = rthooks_policy::resources::crd_files();
    // Files of CRDs the types no longer define go too.
    for entry in std::fs::read_dir(&dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !files.iter().any(|(n, _)| *n == name) {
            std::fs::remove_file(entry.path())?;
            println!("removed {}", entry.path().display());
        }
    }
    for (name, text) in files {
        let path = dir.join(&name);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
