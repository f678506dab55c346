//! containerd's side: its TOML configuration (edited with toml_edit, keeping every other
//! setting and comment), the runtime's `base_runtime_spec`, and NRI for containerd 1.7.
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value as Json};
use toml_edit::{DocumentMut, Item, Table};

use crate::error::{Error, Result};
use crate::journal::Tx;
use crate::{install_binary, BaseSpecArgs, NriArgs};

/// Writes containerd's config back with the mode it had; containerd reads it at start.
fn write_config(mut tx: Tx, path: &Path, doc: &DocumentMut) -> Result<Vec<String>> {
    let mode = file_mode(path).unwrap_or(0o644);
    tx.write(path, doc.to_string().as_bytes(), mode, false)?;
    tx.note("restart containerd to apply".into());
    Ok(tx.finish())
}

fn parse_toml(path: &Path, text: &str) -> Result<DocumentMut> {
    text.parse().map_err(|source| Error::Toml {
        path: path.to_owned(),
        source,
    })
}

/// containerd config version: 2 (1.x) or 3 (2.x); version 1 is not supported.
pub fn containerd_config_version(doc: &DocumentMut) -> Result<i64> {
    match doc.get("version").and_then(Item::as_integer) {
        Some(v @ (2 | 3)) => Ok(v),
        Some(v) => Err(Error::Refused(format!("containerd config version {v} is not supported (2 or 3)"))),
        None => Err(Error::Refused(
            "containerd config has no `version` (version 1 is not supported; use `containerd config migrate`)".into(),
        )),
    }
}

/// The table path of a CRI runtime for a config version.
pub fn runtime_table_path(version: i64, runtime: &str) -> [String; 5] {
    let plugin = if version >= 3 {
        "io.containerd.cri.v1.runtime"
    } else {
        "io.containerd.grpc.v1.cri"
    };
    [
        "plugins".into(),
        plugin.into(),
        "containerd".into(),
        "runtimes".into(),
        runtime.into(),
    ]
}

/// Walks to (creating as needed) a table; intermediate tables are created implicit so the
/// output gains one `[a.b.c]` header rather than one per level.
fn table_at<'a>(
    doc: &'a mut DocumentMut,
    path: &[String],
) -> Result<&'a mut dyn toml_edit::TableLike> {
    let mut cur: &mut dyn toml_edit::TableLike = doc.as_table_mut();
    for (i, key) in path.iter().enumerate() {
        let last = i + 1 == path.len();
        if cur.get(key).is_none() {
            let mut t = Table::new();
            t.set_implicit(!last);
            cur.insert(key, Item::Table(t));
        }
        let item = cur.get_mut(key).expect("inserted above");
        cur = item.as_table_like_mut().ok_or_else(|| {
            Error::Refused(format!(
                "`{}` in containerd's config is not a table",
                path[..=i].join(".")
            ))
        })?;
    }
    Ok(cur)
}

fn get_str_at(doc: &DocumentMut, path: &[String], key: &str) -> Option<String> {
    let mut cur: &dyn toml_edit::TableLike = doc.as_table();
    for k in path {
        cur = cur.get(k)?.as_table_like()?;
    }
    cur.get(key)?.as_str().map(str::to_owned)
}

/// Sets a key, keeping the surrounding whitespace/comments of an existing value.
fn set_value(t: &mut dyn toml_edit::TableLike, key: &str, v: impl Into<toml_edit::Value>) -> bool {
    let mut v: toml_edit::Value = v.into();
    if let Some(old) = t.get(key).and_then(Item::as_value) {
        if old.to_string().trim() == v.to_string().trim() {
            return false;
        }
        *v.decor_mut() = old.decor().clone();
    }
    t.insert(key, Item::Value(v));
    true
}

/// Adds (or replaces) our hook in a spec's `hooks.createRuntime`, keeping everything
/// else, including other hooks.
pub fn add_hook_to_spec(
    spec: &mut Json,
    stage: &str,
    binary: &Path,
    argv: &[String],
    timeout: u32,
) -> Result<()> {
    let obj = spec
        .as_object_mut()
        .ok_or_else(|| Error::Refused("the base spec is not a JSON object".into()))?;
    let hooks = obj.entry("hooks").or_insert_with(|| json!({}));
    let hooks = hooks
        .as_object_mut()
        .ok_or_else(|| Error::Refused("`hooks` in the base spec is not an object".into()))?;
    let list = hooks.entry(stage).or_insert_with(|| json!([]));
    let list = list
        .as_array_mut()
        .ok_or_else(|| Error::Refused(format!("`hooks.{stage}` in the base spec is not a list")))?;
    let ours = json!({ "path": binary, "args": argv, "timeout": timeout });
    let bin = binary.to_string_lossy();
    match list
        .iter()
        .position(|h| h.get("path").and_then(Json::as_str) == Some(&bin))
    {
        Some(i) => list[i] = ours,
        None => list.push(ours),
    }
    Ok(())
}

fn default_spec(a: &BaseSpecArgs) -> Result<Vec<u8>> {
    if let Some(p) = &a.spec_from {
        return std::fs::read(p).map_err(|e| Error::io("reading --spec-from", p, e));
    }
    let out = std::process::Command::new(&a.ctr)
        .args(["oci", "spec"])
        .output()
        .map_err(|e| Error::io("running `ctr oci spec` (or give --spec-from)", &a.ctr, e))?;
    if !out.status.success() {
        return Err(Error::Ctr {
            ctr: a.ctr.clone(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

pub(crate) fn install_base_spec(a: &BaseSpecArgs) -> Result<Vec<String>> {
    let c = &a.common;
    let cfg_bytes = std::fs::read(&a.containerd_config).map_err(|e| {
        Error::io(
            "reading containerd's config (create it with `containerd config default`)",
            &a.containerd_config,
            e,
        )
    })?;
    let cfg_text = String::from_utf8(cfg_bytes).map_err(|source| Error::NotUtf8 {
        path: a.containerd_config.clone(),
        source,
    })?;
    let mut doc = parse_toml(&a.containerd_config, &cfg_text)?;
    let version = containerd_config_version(&doc)?;
    if a.runtimes.is_empty() {
        return Err(Error::Refused("no --runtime given".into()));
    }

    // Start from the spec the runtime uses today: ours (re-install), another base spec an
    // admin configured, or the runtime's built-in default.
    let ours = a.base_spec.to_string_lossy().into_owned();
    let mut configured: Vec<String> = a
        .runtimes
        .iter()
        .filter_map(|r| get_str_at(&doc, &runtime_table_path(version, r), "base_runtime_spec"))
        .filter(|s| !s.is_empty())
        .collect();
    configured.dedup();
    let start_from = match configured.as_slice() {
        [] => None,
        [one] => Some(PathBuf::from(one)),
        many => {
            return Err(Error::Refused(format!(
                "the runtimes use different base specs ({}); install for one at a time",
                many.join(", ")
            )))
        }
    };
    let mut tx = Tx::open(&c.state_dir(), "containerd-base-spec")?;
    let spec_bytes = match &start_from {
        Some(p) if *p == a.base_spec && !a.base_spec.exists() => default_spec(a)?,
        Some(p) => std::fs::read(p)
            .map_err(|e| Error::io("reading the configured base_runtime_spec", p, e))?,
        None => default_spec(a)?,
    };
    if let Some(p) = start_from.as_deref().filter(|p| *p != a.base_spec) {
        tx.note(format!(
            "starting from the configured base spec {}",
            p.display()
        ));
    }
    let mut spec: Json = serde_json::from_slice(&spec_bytes).map_err(|source| Error::Json {
        what: "the default spec".into(),
        source,
    })?;
    install_binary(&mut tx, c)?;
    let mut stages = vec!["createRuntime"];
    if a.poststop {
        stages.push("poststop");
    }
    for stage in stages {
        add_hook_to_spec(
            &mut spec,
            stage,
            &c.installed_binary(),
            &c.hook_argv(stage)?,
            c.hook_timeout,
        )?;
    }
    let mut text = serde_json::to_string_pretty(&spec).expect("serialisable");
    text.push('\n');
    // containerd reads it as root; 0644 matches its own files.
    tx.write(&a.base_spec, text.as_bytes(), 0o644, false)?;

    for r in &a.runtimes {
        let path = runtime_table_path(version, r);
        let t = table_at(&mut doc, &path)?;
        if t.get("runtime_type").is_none() {
            set_value(t, "runtime_type", "io.containerd.runc.v2");
        }
        set_value(t, "base_runtime_spec", ours.as_str());
    }
    write_config(tx, &a.containerd_config, &doc)
}

/// NRI defaults of containerd 1.7 (`containerd config default`), with `disable = false`.
const NRI_TABLE: &[(&str, NriVal)] = &[
    ("disable", NriVal::B(false)),
    ("disable_connections", NriVal::B(false)),
    ("plugin_config_path", NriVal::S("/etc/nri/conf.d")),
    ("plugin_path", NriVal::S("/opt/nri/plugins")),
    ("plugin_registration_timeout", NriVal::S("5s")),
    ("plugin_request_timeout", NriVal::S("2s")),
    ("socket_path", NriVal::S("/var/run/nri/nri.sock")),
];

enum NriVal {
    B(bool),
    S(&'static str),
}

pub(crate) fn install_nri(a: &NriArgs) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(&a.containerd_config)
        .map_err(|e| Error::io("reading containerd's config", &a.containerd_config, e))?;
    let mut doc = parse_toml(&a.containerd_config, &text)?;
    let version = containerd_config_version(&doc)?;
    let mut tx = Tx::open(&a.state_dir, "containerd-nri")?;
    let path = ["plugins".to_owned(), "io.containerd.nri.v1.nri".to_owned()];
    let exists = get_table_like(&doc, &path).is_some();
    if !exists && version >= 3 {
        tx.note("containerd 2.x enables NRI by default; nothing to change".into());
        return Ok(tx.finish());
    }
    let t = table_at(&mut doc, &path)?;
    if exists {
        set_value(t, "disable", false);
    } else {
        for (k, v) in NRI_TABLE {
            match v {
                NriVal::B(b) => set_value(t, k, *b),
                NriVal::S(s) => set_value(t, k, *s),
            };
        }
    }
    write_config(tx, &a.containerd_config, &doc)
}

fn get_table_like<'a>(
    doc: &'a DocumentMut,
    path: &[String],
) -> Option<&'a dyn toml_edit::TableLike> {
    let mut cur: &dyn toml_edit::TableLike = doc.as_table();
    for k in path {
        cur = cur.get(k)?.as_table_like()?;
    }
    Some(cur)
}

pub(crate) fn file_mode(p: &Path) -> Option<u32> {
    std::fs::metadata(p)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

/// Convenience for tests: the table of a runtime in a parsed config.
pub fn runtime_settings(
    doc: &DocumentMut,
    version: i64,
    runtime: &str,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(t) = get_table_like(doc, &runtime_table_path(version, runtime)) {
        for (k, v) in t.iter() {
            if let Some(v) = v.as_value() {
                out.insert(k.to_owned(), v.to_string().trim().to_owned());
            }
        }
    }
    out
}
