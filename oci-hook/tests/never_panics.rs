//! Property tests: whatever the runtime passes (stdin state, config.json, cgroupsPath,
//! annotations, CEL), parsing and the whole invocation never panic, and the exit code is
//! always one of the documented ones.
use proptest::prelude::*;
use rthooks_oci_hook::container::cgroup::{self, CgroupPath, CgroupsPath};
use rthooks_oci_hook::{config, hook, policy, state};

fn json_like() -> impl Strategy<Value = String> {
    // Mix of valid JSON documents of the right shape with odd values, and garbage.
    let leaf = prop_oneof![
        Just("null".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        "[a-zA-Z0-9_./:-]{0,40}".prop_map(|s| format!("{s:?}")),
        any::<bool>().prop_map(|b| b.to_string()),
    ];
    let value = leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec(("[a-zA-Z.]{0,12}", inner), 0..4).prop_map(|kv| {
                let body: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
                format!("{{{}}}", body.join(","))
            }),
        ]
    });
    prop_oneof![
        value.clone(),
        (value.clone(), "[a-z0-9:/._-]{0,60}", value).prop_map(|(ann, cg, root)| format!(
            r#"{{"ociVersion":"1.0.2","root":{{"path":{root}}},"linux":{{"cgroupsPath":{cg:?}}},"annotations":{ann}}}"#
        )),
        ".{0,200}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    #[test]
    fn state_bytes(b in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = state::parse_state(&b);
    }

    #[test]
    fn state_json(s in json_like()) {
        let _ = state::parse_state(s.as_bytes());
    }

    #[test]
    fn spec_bytes(b in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = state::parse_spec(&b);
    }

    #[test]
    fn spec_json(s in json_like()) {
        let _ = state::parse_spec(s.as_bytes());
    }

    #[test]
    fn cgroups_paths(s in "\\PC{0,80}", t in "[a-z0-9_:.-]{0,80}") {
        for p in [&s, &t] {
            if let Ok(r) = CgroupsPath::parse(p) {
                let dir = r.dir();
                prop_assert!(!dir.is_root());
                prop_assert!(!dir.components().any(|c| c == ".."));
                let _ = dir.pod_uid();
                let _ = dir.container_id();
                let _ = dir.contains(&s);
            }
            if let Ok(c) = CgroupPath::clean(p) {
                let _ = c.contains(&s);
            }
            let _ = cgroup::unified_path(p);
        }
    }

    #[test]
    fn cel_expressions(s in "\\PC{0,60}") {
        let _ = policy::compile_cel(&s);
    }

    #[test]
    fn config_files(s in json_like()) {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("c.json");
        std::fs::write(&f, &s).unwrap();
        let p = config::parse(["rthooks-oci-hook", "createRuntime", "--config-file", f.to_str().unwrap()]).unwrap();
        // Whatever the file says, a policy can be built from the result.
        let _ = policy::FailurePolicy::from_config(&p.config);
    }

    #[test]
    fn whole_invocation(stdin in json_like(), cfg in json_like(), bundle_in_state in any::<bool>()) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("config.json"), &cfg).unwrap();
        let stdin = if bundle_in_state {
            format!(r#"{{"id":"x","pid":1,"bundle":{:?},"annotations":{}}}"#, d.path().display(), stdin)
        } else {
            stdin
        };
        let log = d.path().join("hook.log");
        let parsed = config::parse([
            "rthooks-oci-hook",
            "createRuntime",
            "--grpc-address",
            "unix:///nonexistent/agent.sock",
            "--grpc-timeout",
            "200ms",
            "--log-fname",
            log.to_str().unwrap(),
            "--config-file",
            "/nonexistent/c.json",
        ]).unwrap();
        let out = hook::run(parsed, stdin.as_bytes(), Some(d.path().to_owned()));
        // Nothing can register (no agent): either allowed by the failure rule or refused.
        prop_assert!(out.exit_code == 0 || out.exit_code == 1, "{:?}", out);
        prop_assert_eq!(out.exit_code == 1, out.stderr.is_some());
        let text = std::fs::read_to_string(&log).unwrap();
        prop_assert_eq!(text.lines().count(), 1);
        serde_json::from_str::<serde_json::Value>(text.trim()).unwrap();
    }
}
