//! Installers on temporary directories: output parsed back and checked, a second install
//! changes nothing, uninstall restores the originals byte for byte.
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use clap::Parser;
use rthooks_setup::{self as install, Cli, Target};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Every file below `dirs`, with its bytes, mode and mtime.
fn snapshot(dirs: &[&Path]) -> BTreeMap<PathBuf, (Vec<u8>, u32, std::time::SystemTime)> {
    fn walk(p: &Path, out: &mut BTreeMap<PathBuf, (Vec<u8>, u32, std::time::SystemTime)>) {
        let Ok(rd) = std::fs::read_dir(p) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                walk(&p, out);
            } else {
                out.insert(
                    p.clone(),
                    (
                        std::fs::read(&p).unwrap(),
                        md.permissions().mode(),
                        md.modified().unwrap(),
                    ),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    for d in dirs {
        walk(d, &mut out);
    }
    out
}

fn target(args: &[&str]) -> Target {
    let mut v = vec!["rthooks-setup", "install"];
    v.extend_from_slice(args);
    match Cli::try_parse_from(v).unwrap().action {
        install::Action::Install { target } | install::Action::Uninstall { target } => target,
    }
}

struct Env {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    bin: PathBuf,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_owned();
        let bin = root.join("src-bin");
        std::fs::write(&bin, b"\x7fELF pretend hook binary").unwrap();
        Env {
            _tmp: tmp,
            root,
            bin,
        }
    }
    fn p(&self, s: &str) -> String {
        self.root.join(s).to_string_lossy().into_owned()
    }
    fn common(&self) -> Vec<String> {
        vec![
            "--install-dir".into(),
            self.p("opt"),
            "--binary".into(),
            self.bin.to_string_lossy().into_owned(),
            "--state-dir".into(),
            self.p("state"),
        ]
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn hooks_d_install_twice_then_uninstall() {
    let e = Env::new();
    let hooks = e.root.join("hooks.d");
    std::fs::create_dir(&hooks).unwrap();
    // Someone else's hook file must survive untouched.
    std::fs::write(hooks.join("other.json"), b"{\"version\":\"1.0.0\"}").unwrap();
    let before = snapshot(&[&hooks, &e.root.join("opt")]);
    let mut args = vec!["hooks-d".to_owned(), "--hooks-dir".into(), e.p("hooks.d")];
    args.extend(e.common());
    args.extend([
        "--hook-arg=--grpc-timeout=1s".to_owned(),
        "--poststop".to_owned(),
    ]);
    let t = target(&strs(&args));

    install::install(&t).unwrap();
    let installed = e.root.join("opt/rthooks-oci-hook");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(&e.bin).unwrap()
    );
    assert_eq!(
        std::fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(hooks.join("rthooks.json")).unwrap()).unwrap();
    assert_eq!(doc["version"], "1.0.0");
    assert_eq!(doc["hook"]["path"], installed.to_str().unwrap());
    assert_eq!(
        doc["hook"]["args"],
        serde_json::json!(["rthooks-oci-hook", "createRuntime", "--grpc-timeout=1s"])
    );
    assert_eq!(doc["hook"]["timeout"], 5);
    assert_eq!(doc["when"]["always"], true);
    assert_eq!(doc["stages"], serde_json::json!(["createRuntime"]));
    let post: serde_json::Value =
        serde_json::from_slice(&std::fs::read(hooks.join("rthooks-poststop.json")).unwrap())
            .unwrap();
    assert_eq!(post["stages"], serde_json::json!(["poststop"]));
    assert_eq!(post["hook"]["args"][1], "poststop");

    let after_first = snapshot(&[&hooks, &e.root.join("opt")]);
    let report = install::install(&t).unwrap();
    assert_eq!(
        snapshot(&[&hooks, &e.root.join("opt")]),
        after_first,
        "second install changed files: {report:?}"
    );

    install::uninstall(&t).unwrap();
    assert_eq!(
        snapshot(&[&hooks, &e.root.join("opt")])
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect::<BTreeMap<_, _>>(),
        before
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect::<BTreeMap<_, _>>()
    );
    assert!(!e.root.join("state").exists(), "state dir cleaned up");
    // Uninstalling again is a no-op.
    install::uninstall(&t).unwrap();
}

#[test]
fn hooks_d_restores_a_preexisting_file_and_refuses_to_clobber_edits() {
    let e = Env::new();
    let hooks = e.root.join("hooks.d");
    std::fs::create_dir(&hooks).unwrap();
    let original = b"{ \"version\": \"1.0.0\", \"hook\": {\"path\": \"/old\"}, \"when\": {\"always\": true}, \"stages\": [\"prestart\"] }\n";
    std::fs::write(hooks.join("rthooks.json"), original).unwrap();
    std::fs::set_permissions(
        hooks.join("rthooks.json"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let mut args = vec!["hooks-d".to_owned(), "--hooks-dir".into(), e.p("hooks.d")];
    args.extend(e.common());
    let t = target(&strs(&args));
    install::install(&t).unwrap();
    assert_ne!(std::fs::read(hooks.join("rthooks.json")).unwrap(), original);

    // An admin edits the file after install: uninstall refuses without --force.
    std::fs::write(hooks.join("rthooks.json"), b"{}").unwrap();
    let err = install::uninstall(&t).unwrap_err().to_string();
    assert!(err.contains("--force"), "{err}");
    args.push("--force".into());
    install::uninstall(&target(&strs(&args))).unwrap();
    assert_eq!(std::fs::read(hooks.join("rthooks.json")).unwrap(), original);
    assert_eq!(
        std::fs::metadata(hooks.join("rthooks.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
}

#[test]
fn bad_hook_args_fail_the_install() {
    let e = Env::new();
    let mut args = vec!["hooks-d".to_owned(), "--hooks-dir".into(), e.p("hooks.d")];
    args.extend(e.common());
    args.push("--hook-arg=--no-such-flag".into());
    assert!(install::install(&target(&strs(&args))).is_err());
    args.pop();
    args.push("--hook-arg=--fail-cel-expr=annotations[[".into());
    let err = install::install(&target(&strs(&args)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("CEL"), "{err}");
    assert!(!e.root.join("hooks.d/rthooks.json").exists());
}

/// `ctr oci spec` from a containerd binary when one is installed, else the fixture.
fn default_spec_args() -> Vec<String> {
    let ctr = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("ctr"))
            .find(|c| c.is_file())
    });
    match ctr {
        Some(c) => {
            eprintln!("using `{} oci spec` for the default spec", c.display());
            vec!["--ctr".into(), c.to_string_lossy().into_owned()]
        }
        None => {
            eprintln!("no ctr on PATH: using the checked-in fixture ctr-2.1-oci-spec.json");
            vec![
                "--spec-from".into(),
                fixture("ctr-2.1-oci-spec.json")
                    .to_string_lossy()
                    .into_owned(),
            ]
        }
    }
}

fn changed_lines(a: &str, b: &str) -> (Vec<String>, Vec<String>) {
    let al: Vec<&str> = a.lines().collect();
    let bl: Vec<&str> = b.lines().collect();
    let removed = al
        .iter()
        .filter(|l| !bl.contains(l))
        .map(|s| s.to_string())
        .collect();
    let added = bl
        .iter()
        .filter(|l| !al.contains(l))
        .map(|s| s.to_string())
        .collect();
    (removed, added)
}

fn base_spec_roundtrip(fixture_name: &str, version: i64) {
    let e = Env::new();
    let cfg = e.root.join("etc/containerd/config.toml");
    std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
    let original = std::fs::read_to_string(fixture(fixture_name)).unwrap();
    std::fs::write(&cfg, &original).unwrap();
    let spec_path = e.root.join("etc/containerd/rthooks-base-spec.json");
    let mut args = vec![
        "containerd-base-spec".to_owned(),
        "--containerd-config".into(),
        cfg.to_string_lossy().into_owned(),
        "--base-spec".into(),
        spec_path.to_string_lossy().into_owned(),
    ];
    args.extend(e.common());
    args.extend(default_spec_args());
    args.push("--poststop".into());
    let t = target(&strs(&args));
    install::install(&t).unwrap();

    // The TOML: only the runc runtime's base_runtime_spec line changed.
    let new = std::fs::read_to_string(&cfg).unwrap();
    let (removed, added) = changed_lines(&original, &new);
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert!(removed[0].trim_start().starts_with("base_runtime_spec"));
    assert_eq!(added.len(), 1, "{added:?}");
    let doc: toml_edit::DocumentMut = new.parse().unwrap();
    let rt = install::runtime_settings(&doc, version, "runc");
    assert_eq!(
        rt["base_runtime_spec"],
        format!("\"{}\"", spec_path.display())
    );
    assert_eq!(
        rt["runtime_type"].trim_matches(['"', '\'']),
        "io.containerd.runc.v2"
    );

    // The spec: a valid OCI spec, the default plus our hook.
    let spec: oci_spec::runtime::Spec =
        serde_json::from_slice(&std::fs::read(&spec_path).unwrap()).unwrap();
    let hooks = spec
        .hooks()
        .as_ref()
        .unwrap()
        .create_runtime()
        .as_ref()
        .unwrap();
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks[0].path(), &e.root.join("opt/rthooks-oci-hook"));
    assert_eq!(hooks[0].args().as_ref().unwrap()[1], "createRuntime");
    assert_eq!(hooks[0].timeout(), Some(5));
    let post = spec.hooks().as_ref().unwrap().poststop().as_ref().unwrap();
    assert_eq!(post[0].args().as_ref().unwrap()[1], "poststop");
    let mut got: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&spec_path).unwrap()).unwrap();
    got.as_object_mut().unwrap().remove("hooks");
    assert!(got["process"].is_object() && got["linux"]["namespaces"].is_array());

    let dirs = [e.root.join("etc"), e.root.join("opt")];
    let dirs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
    let first = snapshot(&dirs);
    install::install(&t).unwrap();
    assert_eq!(snapshot(&dirs), first, "second install changed files");

    install::uninstall(&t).unwrap();
    assert_eq!(
        std::fs::read_to_string(&cfg).unwrap(),
        original,
        "config restored byte for byte"
    );
    assert!(!spec_path.exists());
    assert!(!e.root.join("opt/rthooks-oci-hook").exists());
}

#[test]
fn base_spec_containerd_1_6_v2() {
    base_spec_roundtrip("containerd-1.6-default.toml", 2);
}

#[test]
fn base_spec_containerd_1_7_v2() {
    base_spec_roundtrip("containerd-1.7-default.toml", 2);
}

#[test]
fn base_spec_containerd_2_1_v3() {
    base_spec_roundtrip("containerd-2.1-default.toml", 3);
}

#[test]
fn base_spec_minimal_config_and_existing_base_spec() {
    let e = Env::new();
    let etc = e.root.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    // An admin's own base spec with a hook of theirs: it is the starting point, and
    // their hook stays.
    let custom = etc.join("custom-spec.json");
    let custom_bytes = br#"{"ociVersion":"1.1.0","hooks":{"createRuntime":[{"path":"/usr/bin/theirs"}]},"process":{"cwd":"/"}}"#;
    std::fs::write(&custom, custom_bytes).unwrap();
    let cfg = etc.join("config.toml");
    let original = format!(
        "# managed by hand\nversion = 3\n\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]\n  base_runtime_spec = '{}' # theirs\n  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]\n    SystemdCgroup = true\n",
        custom.display()
    );
    std::fs::write(&cfg, &original).unwrap();
    let spec_path = etc.join("ours.json");
    let mut args = vec![
        "containerd-base-spec".to_owned(),
        "--containerd-config".into(),
        cfg.to_string_lossy().into_owned(),
        "--base-spec".into(),
        spec_path.to_string_lossy().into_owned(),
        "--ctr".into(),
        "/nonexistent/ctr".into(),
    ];
    args.extend(e.common());
    let t = target(&strs(&args));
    install::install(&t).unwrap();
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&spec_path).unwrap()).unwrap();
    let paths: Vec<&str> = spec["hooks"]["createRuntime"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "/usr/bin/theirs",
            e.root.join("opt/rthooks-oci-hook").to_str().unwrap()
        ]
    );
    let new = std::fs::read_to_string(&cfg).unwrap();
    assert!(
        new.contains("# managed by hand")
            && new.contains("SystemdCgroup = true")
            && new.contains("# theirs"),
        "{new}"
    );
    let first = snapshot(&[&etc]);
    install::install(&t).unwrap();
    assert_eq!(snapshot(&[&etc]), first);
    install::uninstall(&t).unwrap();
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), original);
    assert_eq!(std::fs::read(&custom).unwrap(), custom_bytes);

    // A config with only a version gets the runtime table.
    std::fs::write(&cfg, "version = 2\n").unwrap();
    install::install(&t).unwrap_err(); // no ctr and no --spec-from: a clear error
    args.extend([
        "--spec-from".into(),
        fixture("ctr-2.1-oci-spec.json")
            .to_string_lossy()
            .into_owned(),
    ]);
    let t = target(&strs(&args));
    install::install(&t).unwrap();
    let doc: toml_edit::DocumentMut = std::fs::read_to_string(&cfg).unwrap().parse().unwrap();
    let rt = install::runtime_settings(&doc, 2, "runc");
    assert_eq!(rt["runtime_type"], "\"io.containerd.runc.v2\"");
    install::uninstall(&t).unwrap();
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), "version = 2\n");
    // Version 1 configs are refused.
    std::fs::write(&cfg, "[plugins.cri]\n").unwrap();
    assert!(install::install(&t)
        .unwrap_err()
        .to_string()
        .contains("version"));
}

#[test]
fn nri_enable_on_1_7_and_sections() {
    let e = Env::new();
    let cfg = e.root.join("config.toml");
    let state = e.p("state");
    let t = target(&[
        "containerd-nri",
        "--containerd-config",
        cfg.to_str().unwrap(),
        "--state-dir",
        &state,
    ]);

    // 1.7 default: the section exists with disable = true.
    let original = std::fs::read_to_string(fixture("containerd-1.7-default.toml")).unwrap();
    std::fs::write(&cfg, &original).unwrap();
    install::install(&t).unwrap();
    let new = std::fs::read_to_string(&cfg).unwrap();
    let (removed, added) = changed_lines(&original, &new);
    assert_eq!(
        (removed.len(), added.len()),
        (1, 1),
        "{removed:?} {added:?}"
    );
    let doc: toml_edit::DocumentMut = new.parse().unwrap();
    assert_eq!(
        doc["plugins"]["io.containerd.nri.v1.nri"]["disable"].as_bool(),
        Some(false)
    );
    let snap = std::fs::read(&cfg).unwrap();
    install::install(&t).unwrap();
    assert_eq!(std::fs::read(&cfg).unwrap(), snap);
    install::uninstall(&t).unwrap();
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), original);

    // A version 2 config without the section gets containerd's defaults, enabled.
    let original = std::fs::read_to_string(fixture("containerd-1.6-default.toml")).unwrap();
    std::fs::write(&cfg, &original).unwrap();
    install::install(&t).unwrap();
    let doc: toml_edit::DocumentMut = std::fs::read_to_string(&cfg).unwrap().parse().unwrap();
    let nri = &doc["plugins"]["io.containerd.nri.v1.nri"];
    assert_eq!(nri["disable"].as_bool(), Some(false));
    assert_eq!(nri["socket_path"].as_str(), Some("/var/run/nri/nri.sock"));
    assert_eq!(
        doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["snapshotter"].as_str(),
        Some("overlayfs")
    );
    install::uninstall(&t).unwrap();
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), original);

    // containerd 2.x has NRI on: nothing to write.
    let original = std::fs::read(fixture("containerd-2.1-default.toml")).unwrap();
    std::fs::write(&cfg, &original).unwrap();
    install::install(&t).unwrap();
    assert_eq!(std::fs::read(&cfg).unwrap(), original);
}

#[test]
fn shared_binary_outlives_the_first_uninstall() {
    let e = Env::new();
    let etc = e.root.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("config.toml"), "version = 2\n").unwrap();
    let mut hd = vec!["hooks-d".to_owned(), "--hooks-dir".into(), e.p("hooks.d")];
    hd.extend(e.common());
    let mut bs = vec![
        "containerd-base-spec".to_owned(),
        "--containerd-config".into(),
        e.p("etc/config.toml"),
        "--base-spec".into(),
        e.p("etc/spec.json"),
        "--spec-from".into(),
        fixture("ctr-2.1-oci-spec.json")
            .to_string_lossy()
            .into_owned(),
    ];
    bs.extend(e.common());
    let (hd, bs) = (target(&strs(&hd)), target(&strs(&bs)));
    let bin = e.root.join("opt/rthooks-oci-hook");
    install::install(&hd).unwrap();
    install::install(&bs).unwrap();
    install::uninstall(&hd).unwrap();
    assert!(bin.exists(), "still used by containerd-base-spec");
    install::uninstall(&bs).unwrap();
    assert!(!bin.exists());
    // And in the other order.
    install::install(&hd).unwrap();
    install::install(&bs).unwrap();
    install::uninstall(&bs).unwrap();
    assert!(bin.exists());
    install::uninstall(&hd).unwrap();
    assert!(!bin.exists());
}

#[test]
fn symlinked_config_stays_a_symlink() {
    let e = Env::new();
    let real = e.root.join("real.toml");
    let link = e.root.join("config.toml");
    let original = std::fs::read(fixture("containerd-1.7-default.toml")).unwrap();
    std::fs::write(&real, &original).unwrap();
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let state = e.p("state");
    let t = target(&[
        "containerd-nri",
        "--containerd-config",
        link.to_str().unwrap(),
        "--state-dir",
        &state,
    ]);
    install::install(&t).unwrap();
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_ne!(std::fs::read(&real).unwrap(), original);
    install::install(&t).unwrap();
    install::uninstall(&t).unwrap();
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(&real).unwrap(), original);
}

/// deploy/hooks.d/rthooks.json is documented as exactly what `install hooks-d` writes with
/// its defaults: keep it so.
#[test]
fn the_sample_hooks_d_file_in_deploy_is_what_the_installer_writes_by_default() {
    let sample = include_str!("../../deploy/hooks.d/rthooks.json");
    let doc = rthooks_setup::hooks_d_json(
        std::path::Path::new("/opt/rthooks/rthooks-oci-hook"),
        &["rthooks-oci-hook".to_string(), "createRuntime".to_string()],
        5,
        "createRuntime",
    );
    let mut text = serde_json::to_string_pretty(&doc).unwrap();
    text.push('\n');
    assert_eq!(
        sample, text,
        "deploy/hooks.d/rthooks.json drifted from the installer"
    );
}

/// The binary as a DaemonSet runs it: without `--binary` it installs the
/// `rthooks-oci-hook` beside itself, and says so when there is none; errors exit 1 with
/// one `rthooks-setup:` line that keeps the cause.
#[test]
fn the_binary_installs_the_hook_beside_it_by_default() {
    let e = Env::new();
    let release = e.root.join("release");
    std::fs::create_dir(&release).unwrap();
    let setup = release.join("rthooks-setup");
    std::fs::copy(env!("CARGO_BIN_EXE_rthooks-setup"), &setup).unwrap();
    let run = |verb: &str| {
        std::process::Command::new(&setup)
            .args([verb, "hooks-d", "--hooks-dir"])
            .arg(e.root.join("hooks.d"))
            .arg("--install-dir")
            .arg(e.root.join("opt"))
            .output()
            .unwrap()
    };
    let o = run("install");
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(
        err.starts_with("rthooks-setup: no rthooks-oci-hook beside") && err.contains("--binary"),
        "{err}"
    );
    assert!(!e.root.join("hooks.d").exists());

    std::fs::copy(&e.bin, release.join("rthooks-oci-hook")).unwrap();
    let o = run("install");
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        std::fs::read(e.root.join("opt/rthooks-oci-hook")).unwrap(),
        std::fs::read(&e.bin).unwrap()
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(e.root.join("hooks.d/rthooks.json")).unwrap())
            .unwrap();
    assert_eq!(
        doc["hook"]["path"],
        e.root.join("opt/rthooks-oci-hook").to_str().unwrap()
    );
    assert!(run("uninstall").status.success());
    assert!(!e.root.join("hooks.d/rthooks.json").exists());
    assert!(!e.root.join("opt/rthooks-oci-hook").exists());

    // A cause survives into the message: an unreadable containerd config names the file
    // and the OS error.
    let o = std::process::Command::new(&setup)
        .args(["install", "containerd-nri", "--containerd-config"])
        .arg(e.root.join("missing.toml"))
        .arg("--state-dir")
        .arg(e.root.join("state"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(
        err.contains("missing.toml") && err.contains("No such file or directory"),
        "{err}"
    );
}
