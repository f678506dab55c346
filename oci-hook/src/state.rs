//! The OCI state on stdin and the bundle's `config.json`.
//!
//! Runtimes pass `{ociVersion, id, status, pid, bundle, annotations}` on stdin. Some
//! (older containerd paths, hand-written hook runners) pass nothing, so like Tetragon's
//! hook we fall back to looking for `config.json` relative to the working directory.
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, JsonError, Result};

/// Cap on the state JSON: it holds the spec's annotations, which kubelet limits to 256 KiB.
pub const MAX_STATE_BYTES: u64 = 1 << 20;
/// Cap on `config.json`: real specs are a few KiB; a runaway file must not stall the
/// runtime's create path or exhaust memory.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Where `config.json` may be, relative to the working directory, when the state names no
/// bundle: containerd createRuntime (cwd = bundle), createContainer (cwd = rootfs), CRI-O.
pub const CWD_CONFIG_CANDIDATES: [&str; 3] =
    ["config.json", "../config.json", "../userdata/config.json"];

/// The OCI state as passed on stdin. Every field is optional: a runtime that leaves one out
/// (or gives it an unexpected type) must not make the hook fail for that alone.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct HookState {
    pub oci_version: Option<String>,
    pub id: Option<String>,
    pub status: Option<String>,
    pub pid: Option<i64>,
    pub bundle: Option<PathBuf>,
    pub annotations: HashMap<String, String>,
}

/// Reads the state from `input`. `Ok(None)` means the runtime passed nothing.
pub fn read_state(input: impl Read) -> Result<Option<HookState>> {
    let mut buf = Vec::with_capacity(4096);
    input
        .take(MAX_STATE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(Error::StdinRead)?;
    if buf.len() as u64 > MAX_STATE_BYTES {
        return Err(Error::TooLarge {
            path: "<stdin>".into(),
            limit: MAX_STATE_BYTES,
        });
    }
    parse_state(&buf)
}

/// Parses state bytes; see [`read_state`].
pub fn parse_state(buf: &[u8]) -> Result<Option<HookState>> {
    if buf.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(None);
    }
    let v: Value = serde_json::from_slice(buf).map_err(|e| Error::StateJson(e.into()))?;
    let Value::Object(m) = v else {
        return Err(Error::StateJson(JsonError::NotAnObject));
    };
    let s = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
    Ok(Some(HookState {
        oci_version: s("ociVersion"),
        id: s("id").filter(|s| !s.is_empty()),
        status: s("status"),
        pid: m.get("pid").and_then(Value::as_i64),
        bundle: s("bundle").filter(|s| !s.is_empty()).map(PathBuf::from),
        annotations: string_map(m.get("annotations")),
    }))
}

fn string_map(v: Option<&Value>) -> HashMap<String, String> {
    match v {
        Some(Value::Object(m)) => m
            .iter()
            .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
            .collect(),
        _ => HashMap::new(),
    }
}

/// A mount of the spec, as the agent protocol carries it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SpecMount {
    pub destination: String,
    pub typ: String,
    pub source: String,
    pub options: Vec<String>,
}

/// What the hook needs from `config.json`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SpecView {
    pub annotations: HashMap<String, String>,
    pub cgroups_path: Option<String>,
    pub root_path: Option<PathBuf>,
    pub mounts: Vec<SpecMount>,
}

/// Parses `config.json` bytes with oci-spec; when oci-spec rejects the document (for
/// instance a capability name newer than the crate), falls back to reading only the fields
/// the hook uses, so a runtime upgrade does not turn into refused containers.
pub fn parse_spec(bytes: &[u8]) -> std::result::Result<(SpecView, Option<String>), JsonError> {
    match serde_json::from_slice::<oci_spec::runtime::Spec>(bytes) {
        Ok(spec) => Ok((view_from_oci(&spec), None)),
        Err(strict) => {
            let v: Value = serde_json::from_slice(bytes)?;
            if !v.is_object() {
                return Err(JsonError::NotAnObject);
            }
            Ok((view_from_value(&v), Some(strict.to_string())))
        }
    }
}

fn view_from_oci(spec: &oci_spec::runtime::Spec) -> SpecView {
    SpecView {
        annotations: spec
            .annotations()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        cgroups_path: spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().as_ref())
            .map(|p| p.to_string_lossy().into_owned()),
        root_path: spec.root().as_ref().map(|r| r.path().clone()),
        mounts: spec
            .mounts()
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|m| SpecMount {
                destination: m.destination().to_string_lossy().into_owned(),
                typ: m.typ().clone().unwrap_or_default(),
                source: m
                    .source()
                    .as_ref()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                options: m.options().clone().unwrap_or_default(),
            })
            .collect(),
    }
}

fn view_from_value(v: &Value) -> SpecView {
    let str_at = |p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_owned);
    let mounts = v
        .get("mounts")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|m| SpecMount {
                    destination: m
                        .get("destination")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .into(),
                    typ: m
                        .get("type")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .into(),
                    source: m
                        .get("source")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .into(),
                    options: m
                        .get("options")
                        .and_then(Value::as_array)
                        .map(|o| {
                            o.iter()
                                .filter_map(|s| s.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default();
    SpecView {
        annotations: string_map(v.get("annotations")),
        cgroups_path: str_at("/linux/cgroupsPath"),
        root_path: str_at("/root/path").map(PathBuf::from),
        mounts,
    }
}

/// Reads a file of at most `limit` bytes.
pub fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    // A regular file's size is known: refuse a huge one without reading it, and read a
    // normal one in one go rather than in doubling chunks.
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    if size > limit {
        return Err(Error::TooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    let mut buf = Vec::with_capacity(size as usize + 1);
    f.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
    if buf.len() as u64 > limit {
        return Err(Error::TooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    Ok(buf)
}

/// The loaded bundle: where its config was found and what it says.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub config_path: PathBuf,
    pub spec: SpecView,
    /// The container's root filesystem, absolute.
    pub root_dir: PathBuf,
    /// Set when oci-spec rejected the document and the lenient reader was used.
    pub strict_parse_error: Option<String>,
}

/// Finds and loads `config.json`: from the state's bundle when given, otherwise from the
/// working directory as Tetragon's hook does.
pub fn load_bundle(state: Option<&HookState>, cwd: Option<&Path>) -> Result<Bundle> {
    let (config_path, bundle_dir, rootfs_is_cwd) = match state.and_then(|s| s.bundle.as_deref()) {
        Some(b) => (b.join("config.json"), b.to_owned(), false),
        None => {
            let Some(cwd) = cwd else {
                return Err(Error::NoConfig {
                    bundle: None,
                    cwd: None,
                });
            };
            let found = CWD_CONFIG_CANDIDATES
                .iter()
                .map(|c| (c, cwd.join(c)))
                .find(|(_, p)| p.is_file());
            match found {
                // createRuntime in the bundle: rootfs is spec.root.path below it.
                Some((&"config.json", p)) => (p, cwd.to_owned(), false),
                // Called from inside the rootfs (containerd createContainer, CRI-O).
                Some((_, p)) => (p, cwd.to_owned(), true),
                None => {
                    return Err(Error::NoConfig {
                        bundle: None,
                        cwd: Some(cwd.to_owned()),
                    })
                }
            }
        }
    };
    let bytes = match read_capped(&config_path, MAX_CONFIG_BYTES) {
        Err(Error::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NoConfig {
                bundle: Some(bundle_dir),
                cwd: cwd.map(Path::to_owned),
            })
        }
        r => r?,
    };
    let (spec, strict_parse_error) = parse_spec(&bytes).map_err(|source| Error::SpecJson {
        path: config_path.clone(),
        source,
    })?;
    let root_dir = if rootfs_is_cwd {
        bundle_dir
    } else {
        // An absolute root.path is used as is: joining it below the bundle was one of
        // Tetragon's rootDir bugs.
        match &spec.root_path {
            Some(p) if p.is_absolute() => p.clone(),
            Some(p) => bundle_dir.join(p),
            None => bundle_dir.join("rootfs"),
        }
    };
    Ok(Bundle {
        config_path,
        spec,
        root_dir,
        strict_parse_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_fields() {
        let s = parse_state(
            br#"{"ociVersion":"1.0.2","id":"abc","status":"creating","pid":42,"bundle":"/b","annotations":{"a":"b","n":1}}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.id.as_deref(), Some("abc"));
        assert_eq!(s.pid, Some(42));
        assert_eq!(s.bundle.as_deref(), Some(Path::new("/b")));
        assert_eq!(s.annotations.len(), 1);
    }

    #[test]
    fn empty_and_garbage_state() {
        assert_eq!(parse_state(b"").unwrap(), None);
        assert_eq!(parse_state(b"  \n").unwrap(), None);
        assert!(matches!(parse_state(b"{nope"), Err(Error::StateJson(_))));
        assert!(matches!(parse_state(b"[1,2]"), Err(Error::StateJson(_))));
        // Wrong types are ignored, not fatal.
        let s = parse_state(br#"{"id":5,"bundle":[],"pid":"x"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(s, HookState::default());
    }

    #[test]
    fn huge_state_is_refused() {
        let big = vec![b' '; (MAX_STATE_BYTES + 10) as usize];
        assert!(matches!(read_state(&big[..]), Err(Error::TooLarge { .. })));
    }

    #[test]
    fn lenient_spec_fallback() {
        let j = br#"{"ociVersion":"1.0.2","process":{"capabilities":{"bounding":["CAP_FROM_THE_FUTURE"]}},
            "root":{"path":"rootfs"},"linux":{"cgroupsPath":"/a/b"},"annotations":{"k":"v"}}"#;
        let (v, strict) = parse_spec(j).unwrap();
        assert!(strict.is_some());
        assert_eq!(v.cgroups_path.as_deref(), Some("/a/b"));
        assert_eq!(v.annotations["k"], "v");
    }

    #[test]
    fn bundle_from_state_and_cwd() {
        let d = tempfile::tempdir().unwrap();
        let cfg =
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"linux":{"cgroupsPath":"/x/y"}}"#;
        std::fs::write(d.path().join("config.json"), cfg).unwrap();
        std::fs::create_dir(d.path().join("rootfs")).unwrap();
        let st = HookState {
            bundle: Some(d.path().to_owned()),
            ..Default::default()
        };
        let b = load_bundle(Some(&st), None).unwrap();
        assert_eq!(b.root_dir, d.path().join("rootfs"));
        assert_eq!(b.spec.cgroups_path.as_deref(), Some("/x/y"));
        // Tetragon-style discovery from the bundle and from inside the rootfs.
        let b = load_bundle(None, Some(d.path())).unwrap();
        assert_eq!(b.root_dir, d.path().join("rootfs"));
        let b = load_bundle(None, Some(&d.path().join("rootfs"))).unwrap();
        assert_eq!(b.root_dir, d.path().join("rootfs"));
        // Missing bundle.
        let st = HookState {
            bundle: Some(d.path().join("nope")),
            ..Default::default()
        };
        assert!(matches!(
            load_bundle(Some(&st), None),
            Err(Error::NoConfig { .. })
        ));
    }

    #[test]
    fn absolute_root_path() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("config.json"),
            r#"{"ociVersion":"1.0.2","root":{"path":"/var/lib/x/rootfs"}}"#,
        )
        .unwrap();
        let b = load_bundle(None, Some(d.path())).unwrap();
        assert_eq!(b.root_dir, Path::new("/var/lib/x/rootfs"));
    }
}
