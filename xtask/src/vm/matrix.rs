//! Per-scenario results from the guests, and the kernel × scenario matrix.
//!
//! The guest suite writes JSON lines into the results share: first a plan
//! (`{"plan":[{"scenario":…,"runtime":…},…]}`), then one object per scenario. A planned
//! scenario without a result line is reported as failed, with what happened to the guest
//! as the reason, so a guest that dies part way cannot make a run look shorter and green.
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
    Skip,
}

/// One cell of the matrix; the schema of `target/e2e/matrix.json` (issue 5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub kernel: String,
    pub uname: String,
    pub runtime: String,
    pub scenario: String,
    pub result: Verdict,
    pub reason: String,
    pub detail: String,
    pub seconds: f64,
    pub enforcement_mode: String,
}

#[derive(Debug, Deserialize)]
struct GuestLine {
    #[serde(default)]
    plan: Option<Vec<Planned>>,
    #[serde(default)]
    scenario: Option<String>,
    #[serde(default)]
    runtime: String,
    #[serde(default)]
    result: Option<Verdict>,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    detail: String,
    #[serde(default)]
    seconds: f64,
    #[serde(default)]
    enforcement_mode: String,
    #[serde(default)]
    uname: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
struct Planned {
    scenario: String,
    #[serde(default)]
    runtime: String,
}

/// Turns one guest's `results.jsonl` into rows. `guest_problem` says what went wrong
/// with the guest itself (deadline, panic, crash), if anything did.
pub fn parse_results(kernel: &str, text: &str, guest_problem: Option<&str>) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    let mut plan: Vec<Planned> = Vec::new();
    let mut uname = String::new();
    let row = |scenario: &str, runtime: &str, result, reason: String| Row {
        kernel: kernel.to_string(),
        uname: String::new(),
        runtime: runtime.to_string(),
        scenario: scenario.to_string(),
        result,
        reason,
        detail: String::new(),
        seconds: 0.0,
        enforcement_mode: String::new(),
    };
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match serde_json::from_str::<GuestLine>(line) {
            Ok(GuestLine { plan: Some(p), .. }) => plan.extend(p),
            Ok(GuestLine {
                scenario: Some(scenario),
                result: Some(result),
                runtime,
                reason,
                detail,
                seconds,
                enforcement_mode,
                uname: u,
                ..
            }) => {
                if uname.is_empty() {
                    uname = u;
                }
                rows.push(Row {
                    detail,
                    seconds,
                    enforcement_mode,
                    ..row(&scenario, &runtime, result, reason)
                });
            }
            _ => rows.push(row(
                "results",
                "",
                Verdict::Fail,
                format!("unreadable result line: {line}"),
            )),
        }
    }
    let why_missing = guest_problem.unwrap_or("the guest suite ended without reporting it");
    for p in &plan {
        if !rows
            .iter()
            .any(|r| r.scenario == p.scenario && r.runtime == p.runtime)
        {
            rows.push(row(
                &p.scenario,
                &p.runtime,
                Verdict::Fail,
                format!("not reported: {why_missing}"),
            ));
        }
    }
    if rows.is_empty() && guest_problem.is_none() {
        rows.push(row(
            "results",
            "",
            Verdict::Fail,
            "the guest finished but wrote no results".into(),
        ));
    }
    if let Some(problem) = guest_problem {
        let scenario = if plan.is_empty() && rows.is_empty() {
            "boot"
        } else {
            "guest"
        };
        rows.push(row(scenario, "", Verdict::Fail, problem.to_string()));
    }
    for r in &mut rows {
        r.uname.clone_from(&uname);
    }
    rows
}

fn ordered<'a>(items: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

fn cell_text(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// Reasons can carry whole logs; a cell shows their start (matrix.json keeps all of it).
fn short(s: &str) -> String {
    cut(s, 160)
}

fn cut(s: &str, max: usize) -> String {
    let s = s.trim();
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

fn cell(r: &Row) -> String {
    match r.result {
        Verdict::Pass => {
            let mode = if r.enforcement_mode.is_empty() {
                String::new()
            } else {
                format!(" [{}]", r.enforcement_mode)
            };
            format!("pass{mode} {:.1}s", r.seconds)
        }
        Verdict::Fail => format!(
            "**FAIL** {:.1}s: {}",
            r.seconds,
            cell_text(&short(&r.reason))
        ),
        Verdict::Skip => format!("skip: {}", cell_text(&short(&r.reason))),
    }
}

/// `kernels` gives the column order (the kernels.toml names that were run).
pub fn render_md(rows: &[Row], kernels: &[String], generated: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# rthooks e2e kernel matrix\n");
    let _ = writeln!(out, "Generated {generated} by `cargo xtask e2e`.\n");
    tables(&mut out, rows, kernels, cell);
    let details: Vec<&Row> = rows.iter().filter(|r| !r.detail.is_empty()).collect();
    if !details.is_empty() {
        let _ = writeln!(out, "\n## Details\n");
        for r in details {
            let _ = writeln!(out, "- {}: {}", where_(r), cell_text(&cut(&r.detail, 400)));
        }
    }
    out
}

/// The README's copy of the matrix: both tables (a failed or skipped cell says only that),
/// then every failure and skip with its reason, each distinct reason once with the
/// scenarios, runtimes and kernels it applies to (the pass details stay in `matrix.md`).
pub fn render_readme(rows: &[Row], kernels: &[String], generated: &str, guests: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Generated {generated} by `cargo xtask e2e {}--update-readme` ({guests}).\n",
        if kernels.len() > 1 { "--all " } else { "" }
    );
    tables(&mut out, rows, kernels, readme_cell);
    // One note per distinct (verdict, scenario, reason), in the order met.
    struct Note<'a> {
        key: (&'static str, &'a str, String),
        runtimes: Vec<&'a str>,
        kernels: Vec<&'a str>,
    }
    let mut notes: Vec<Note> = Vec::new();
    for r in rows.iter().filter(|r| r.result != Verdict::Pass) {
        let what = if r.result == Verdict::Fail {
            "fail"
        } else {
            "skip"
        };
        let key = (what, r.scenario.as_str(), cell_text(&cut(&r.reason, 300)));
        let at = match notes.iter().position(|n| n.key == key) {
            Some(at) => at,
            None => {
                notes.push(Note {
                    key,
                    runtimes: Vec::new(),
                    kernels: Vec::new(),
                });
                notes.len() - 1
            }
        };
        let note = &mut notes[at];
        if !r.runtime.is_empty() && !note.runtimes.contains(&r.runtime.as_str()) {
            note.runtimes.push(&r.runtime);
        }
        if !note.kernels.contains(&r.kernel.as_str()) {
            note.kernels.push(&r.kernel);
        }
    }
    if !notes.is_empty() {
        let _ = writeln!(out, "\nWhat fails or is skipped, and why:\n");
        for Note {
            key: (what, scenario, reason),
            runtimes,
            kernels: on,
        } in notes
        {
            let runtimes = if runtimes.is_empty() {
                String::new()
            } else {
                format!(" ({})", runtimes.join(", "))
            };
            let on = if kernels.len() > 1 && on.len() == kernels.len() {
                "every kernel".to_string()
            } else {
                on.join(", ")
            };
            let _ = writeln!(out, "- {scenario}{runtimes} on {on} — {what}: {reason}");
        }
    }
    out
}

/// A README cell: the verdict only; reasons follow the table.
fn readme_cell(r: &Row) -> String {
    match r.result {
        Verdict::Pass => cell(r),
        Verdict::Fail => format!("**FAIL** {:.1}s", r.seconds),
        Verdict::Skip => "skip".into(),
    }
}

pub const README_BEGIN: &str = "<!-- e2e-matrix:begin -->";
pub const README_END: &str = "<!-- e2e-matrix:end -->";

/// `readme` with the text between the matrix markers replaced by `section`.
pub fn splice_readme(readme: &str, section: &str) -> Result<String, String> {
    let (Some(b), Some(e)) = (readme.find(README_BEGIN), readme.find(README_END)) else {
        return Err(format!(
            "the README has no `{README_BEGIN}` … `{README_END}` section to update"
        ));
    };
    if e < b {
        return Err("the README's matrix markers are out of order".into());
    }
    let head = &readme[..b + README_BEGIN.len()];
    Ok(format!(
        "{head}\n{}{}",
        section.trim_end_matches('\n').to_string() + "\n",
        &readme[e..]
    ))
}

fn where_(r: &Row) -> String {
    if r.runtime.is_empty() {
        format!("{} / {}", r.kernel, r.scenario)
    } else {
        format!("{} / {} ({})", r.kernel, r.scenario, r.runtime)
    }
}

fn tables(out: &mut String, rows: &[Row], kernels: &[String], cell: fn(&Row) -> String) {
    let _ = writeln!(out, "| kernel | uname | enforcement | pass | fail | skip |");
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for k in kernels {
        let of: Vec<&Row> = rows.iter().filter(|r| &r.kernel == k).collect();
        let uname = of
            .iter()
            .map(|r| r.uname.as_str())
            .find(|u| !u.is_empty())
            .unwrap_or("?");
        let modes = ordered(
            of.iter()
                .map(|r| r.enforcement_mode.as_str())
                .filter(|m| !m.is_empty()),
        );
        let mode = if modes.is_empty() {
            "-".to_string()
        } else {
            modes.join(", ")
        };
        let count = |v| of.iter().filter(|r| r.result == v).count();
        let _ = writeln!(
            out,
            "| {k} | {} | {} | {} | {} | {} |",
            cell_text(uname),
            cell_text(&mode),
            count(Verdict::Pass),
            count(Verdict::Fail),
            count(Verdict::Skip)
        );
    }
    let _ = writeln!(out);
    let _ = write!(out, "| scenario | runtime |");
    for k in kernels {
        let _ = write!(out, " {k} |");
    }
    let _ = write!(out, "\n|---|---|");
    for _ in kernels {
        let _ = write!(out, "---|");
    }
    let _ = writeln!(out);
    let keys = ordered(rows.iter().map(|r| r.scenario.as_str()));
    for scenario in keys {
        let runtimes = ordered(
            rows.iter()
                .filter(|r| r.scenario == scenario)
                .map(|r| r.runtime.as_str()),
        );
        for runtime in runtimes {
            let shown = if runtime.is_empty() { "-" } else { runtime };
            let _ = write!(out, "| {scenario} | {shown} |");
            for k in kernels {
                let c = rows
                    .iter()
                    .find(|r| &r.kernel == k && r.scenario == scenario && r.runtime == runtime)
                    .map(cell)
                    .unwrap_or_else(|| "-".into());
                let _ = write!(out, " {c} |");
            }
            let _ = writeln!(out);
        }
    }
}

pub fn render_json(rows: &[Row]) -> String {
    serde_json::to_string_pretty(rows).expect("rows serialise") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: &str = r#"{"plan":[{"scenario":"boot","runtime":""},{"scenario":"containerd_starts","runtime":"containerd-2.1"},{"scenario":"agent_starts","runtime":""}]}
{"scenario":"boot","runtime":"","result":"pass","reason":"","detail":"btf=yes lsm=lockdown,capability,bpf","seconds":0.1,"enforcement_mode":"","uname":"6.12.117+deb13-amd64"}
{"scenario":"containerd_starts","runtime":"containerd-2.1","result":"pass","reason":"","detail":"2.1.9","seconds":2.5,"enforcement_mode":"","uname":"6.12.117+deb13-amd64"}
"#;

    #[test]
    fn parses_guest_lines_and_reports_missing_planned_scenarios() {
        let rows = parse_results("6.12", GUEST, Some("guest killed at the deadline (600 s)"));
        assert_eq!(rows.len(), 4, "{rows:#?}");
        assert!(rows
            .iter()
            .all(|r| r.kernel == "6.12" && r.uname == "6.12.117+deb13-amd64"));
        assert_eq!(rows[1].seconds, 2.5);
        let agent = rows.iter().find(|r| r.scenario == "agent_starts").unwrap();
        assert_eq!(agent.result, Verdict::Fail);
        assert!(agent.reason.contains("deadline"), "{}", agent.reason);
        assert!(rows
            .iter()
            .any(|r| r.scenario == "guest" && r.result == Verdict::Fail));
    }

    #[test]
    fn a_clean_run_has_no_synthetic_rows() {
        let text = GUEST.to_string()
            + r#"{"scenario":"agent_starts","result":"skip","reason":"rthooks-agent not built","uname":"x"}"#;
        let rows = parse_results("6.12", &text, None);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[2].result, Verdict::Skip);
        assert_eq!(rows[2].runtime, "");
    }

    #[test]
    fn a_guest_that_never_ran_the_suite_is_one_failed_boot() {
        let rows = parse_results("5.10", "", Some("kernel panic: VFS"));
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].scenario.as_str(), rows[0].result),
            ("boot", Verdict::Fail)
        );
        let rows = parse_results("5.10", "", None);
        assert_eq!(
            (rows[0].scenario.as_str(), rows[0].result),
            ("results", Verdict::Fail)
        );
        let rows = parse_results("5.10", "not json\n", None);
        assert_eq!(rows[0].scenario, "results");
        assert!(rows[0].reason.contains("not json"));
    }

    #[test]
    fn long_reasons_are_cut_in_cells() {
        let long = "x".repeat(500);
        assert_eq!(short(&long).chars().count(), 161);
        assert_eq!(short(" ok "), "ok");
        let rows = parse_results(
            "6.1",
            &format!(r#"{{"scenario":"s","result":"fail","reason":"{long}"}}"#),
            None,
        );
        let md = render_md(&rows, &["6.1".into()], "now");
        assert!(md.contains("xxx…"));
        assert!(render_json(&rows).contains(&long));
    }

    #[test]
    fn renders_markdown_and_json() {
        let mut rows = parse_results("6.12", GUEST, None);
        rows.push(Row {
            kernel: "5.10".into(),
            uname: "5.10.0-32-amd64".into(),
            runtime: "".into(),
            scenario: "agent_starts".into(),
            result: Verdict::Pass,
            reason: "".into(),
            detail: "".into(),
            seconds: 1.25,
            enforcement_mode: "sigkill".into(),
        });
        let md = render_md(&rows, &["5.10".into(), "6.12".into()], "2026-01-01T00:00Z");
        assert!(md.contains("| scenario | runtime | 5.10 | 6.12 |"), "{md}");
        assert!(md.contains("| boot | - | - | pass 0.1s |"), "{md}");
        assert!(md.contains("| agent_starts | - | pass [sigkill] 1.2s | **FAIL** 0.0s: not reported: the guest suite ended without reporting it |"), "{md}");
        assert!(
            md.contains("| 5.10 | 5.10.0-32-amd64 | sigkill | 1 | 0 | 0 |"),
            "{md}"
        );
        assert!(
            md.contains("- 6.12 / containerd_starts (containerd-2.1): 2.1.9"),
            "{md}"
        );
        let json: serde_json::Value = serde_json::from_str(&render_json(&rows)).unwrap();
        let first = &json[0];
        for key in [
            "kernel",
            "uname",
            "runtime",
            "scenario",
            "result",
            "reason",
            "detail",
            "seconds",
            "enforcement_mode",
        ] {
            assert!(first.get(key).is_some(), "{key} missing in {first}");
        }
        assert_eq!(first["result"], "pass");
    }

    #[test]
    fn readme_section_lists_failures_and_skips_with_reasons_and_splices_between_markers() {
        let mut rows = parse_results("6.12", GUEST, Some("guest killed at the deadline (600 s)"));
        rows[1].result = Verdict::Skip;
        rows[1].reason = "CRI-O is not obtainable here".into();
        let section = render_readme(&rows, &["6.12".into()], "2026-11-27 15:00 UTC", "tcg");
        assert!(section.contains("| kernel | uname | enforcement | pass | fail | skip |"));
        assert!(
            section.contains("| 6.12 | 6.12.117+deb13-amd64 | - | 1 | 2 | 1 |"),
            "{section}"
        );
        assert!(section.contains(
            "- containerd_starts (containerd-2.1) on 6.12 — skip: CRI-O is not obtainable here"
        ));
        assert!(
            section.contains(
                "- agent_starts on 6.12 — fail: not reported: guest killed at the deadline (600 s)"
            ),
            "{section}"
        );
        // Cells say the verdict; the reason is said once, below the tables.
        assert!(
            section.contains("| containerd_starts | containerd-2.1 | skip |"),
            "{section}"
        );
        assert_eq!(section.matches("CRI-O is not obtainable here").count(), 1);
        assert!(
            !section.contains("btf=yes"),
            "pass details stay in matrix.md"
        );

        let readme = format!("# x\n\n{README_BEGIN}\nold\n{README_END}\n\ntail\n");
        let new = splice_readme(&readme, &section).unwrap();
        assert!(!new.contains("old"));
        assert!(new.starts_with(&format!("# x\n\n{README_BEGIN}\nGenerated 2026-11-27")));
        assert!(new.ends_with(&format!("\n{README_END}\n\ntail\n")));
        // Idempotent: splicing the same section again changes nothing.
        assert_eq!(splice_readme(&new, &section).unwrap(), new);
        assert!(splice_readme("# no markers\n", &section).is_err());
    }

    #[test]
    fn readme_notes_say_each_reason_once_with_where_it_applies() {
        let text = GUEST.replace("]}", r#",{"scenario":"crio","runtime":"crio"}]}"#);
        let mut rows = Vec::new();
        for k in ["5.10", "6.12"] {
            let mut of = parse_results(k, &text, None);
            for r in &mut of {
                if r.scenario == "crio" {
                    r.result = Verdict::Skip;
                    r.reason = "CRI-O not obtainable here".into();
                }
            }
            rows.extend(of);
        }
        rows[1].result = Verdict::Fail;
        rows[1].reason = "shim did not start".into();
        let kernels = ["5.10".to_string(), "6.12".to_string()];
        let section = render_readme(&rows, &kernels, "now", "tcg");
        assert!(
            section.contains("- crio (crio) on every kernel — skip: CRI-O not obtainable here"),
            "{section}"
        );
        assert!(
            section.contains(
                "- containerd_starts (containerd-2.1) on 5.10 — fail: shim did not start"
            ),
            "{section}"
        );
        assert_eq!(section.matches("CRI-O not obtainable").count(), 1);
        assert!(
            section.contains("| crio | crio | skip | skip |"),
            "{section}"
        );
    }
}
