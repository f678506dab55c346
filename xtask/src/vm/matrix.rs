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
    /// When the run that wrote it ended (`YYYY-MM-DD HH:MM UTC`): a merged matrix
    /// ([`Merged`]) holds cells of several runs.
    #[serde(default)]
    pub date: String,
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
        date: String::new(),
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

/// The README's copy of the matrix: the runs its cells come from, both tables (a failed
/// or skipped cell says only that), then every failure and skip with its reason, each
/// distinct reason once with the scenarios, runtimes and kernels it applies to (the pass
/// details stay in `matrix.md`).
pub fn render_readme(merged: &Merged, kernels: &[String]) -> String {
    let rows = &merged.rows;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Merged from these runs of `cargo xtask e2e` (their cells: `{MERGED_FILE}`):\n"
    );
    for run in &merged.runs {
        let _ = writeln!(
            out,
            "- {}: `{}` ({}; {})",
            run.date,
            run.command,
            run.accel,
            run.guests.join("; ")
        );
    }
    let _ = writeln!(out);
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

/// Where the merged matrix is kept, from the workspace root: in git, so runs on other
/// days and machines add to it.
pub const MERGED_FILE: &str = "vm/matrix.json";

/// One `cargo xtask e2e` run, as the merged matrix names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// When it ended; its rows carry the same [`Row::date`].
    pub date: String,
    /// The command line, as a user would type it again.
    pub command: String,
    /// `tcg via QEMU`, `kvm via virtme-ng`.
    pub accel: String,
    /// How each guest ended (`5.10: 5.10.0-32-amd64 — guest finished (job exit code 0)
    /// in 1637.4 s`).
    pub guests: Vec<String>,
}

/// The cells of several runs, the newest per (kernel, scenario, runtime): the README
/// matrix's source ([`MERGED_FILE`]), so `--all` may be run in parts (`--kernel`,
/// `--scenario`), on several days or machines. Each run also writes its own
/// (`target/e2e/run.json`), which `cargo xtask matrix --add` merges.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Merged {
    pub runs: Vec<Run>,
    pub rows: Vec<Row>,
}

/// Longest reason a merged cell keeps (what the README's notes show); the run's own
/// `matrix.json` keeps all of it, and its `matrix.md` the pass details.
const MERGED_REASON_CHARS: usize = 300;

impl Merged {
    /// Adds `run`'s `rows`. A cell of the same (kernel, scenario, runtime) is replaced
    /// where it stands; every other earlier cell of a kernel in `whole` (run without a
    /// scenario filter) goes, so renamed or removed scenarios leave no stale rows. Rows
    /// keep the order the runs met them in: a new (scenario, runtime) goes after the one
    /// the run had before it.
    pub fn add(&mut self, run: Run, rows: &[Row], whole: &[String]) {
        let key = |r: &Row| (r.scenario.clone(), r.runtime.clone());
        self.rows.retain(|old| {
            !whole.contains(&old.kernel) || rows.iter().any(|new| same_cell(old, new))
        });
        let mut previous: Option<(String, String)> = None;
        for new in rows {
            let mut row = new.clone();
            row.date.clone_from(&run.date);
            row.detail.clear();
            row.reason = cut(&row.reason, MERGED_REASON_CHARS);
            let before = previous.replace(key(&row));
            if let Some(old) = self.rows.iter_mut().find(|old| same_cell(old, &row)) {
                *old = row;
                continue;
            }
            let at = self
                .rows
                .iter()
                .rposition(|r| key(r) == key(&row))
                .or_else(|| {
                    before
                        .as_ref()
                        .and_then(|p| self.rows.iter().rposition(|r| &key(r) == p))
                })
                .map_or(self.rows.len(), |i| i + 1);
            self.rows.insert(at, row);
        }
        self.runs.retain(|r| r.date != run.date);
        self.runs.push(run);
        let rows = &self.rows;
        self.runs
            .retain(|r| rows.iter().any(|row| row.date == r.date));
    }

    /// The kernels with cells, in `order` (kernels.toml's) first, others as met.
    pub fn kernels(&self, order: &[String]) -> Vec<String> {
        let with_cells = order
            .iter()
            .map(String::as_str)
            .filter(|k| self.rows.iter().any(|r| r.kernel == *k));
        ordered(with_cells.chain(self.rows.iter().map(|r| r.kernel.as_str())))
            .into_iter()
            .map(String::from)
            .collect()
    }
}

fn same_cell(a: &Row, b: &Row) -> bool {
    a.kernel == b.kernel && a.scenario == b.scenario && a.runtime == b.runtime
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
            date: String::new(),
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
        let section = render_readme(&merged(&rows), &["6.12".into()]);
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
        assert!(new.starts_with(&format!("# x\n\n{README_BEGIN}\nMerged from")));
        assert!(section.contains(
            "- 2026-11-27 15:00 UTC: `cargo xtask e2e` (tcg via QEMU; 6.12: guest killed)\n"
        ));
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
        let section = render_readme(&merged(&rows), &kernels);
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

    /// `rows` as the one run of a merged matrix.
    fn merged(rows: &[Row]) -> Merged {
        let mut m = Merged::default();
        m.add(run("2026-11-27 15:00 UTC"), rows, &[]);
        m
    }

    fn run(date: &str) -> Run {
        Run {
            date: date.into(),
            command: "cargo xtask e2e".into(),
            accel: "tcg via QEMU".into(),
            guests: vec!["6.12: guest killed".into()],
        }
    }

    #[test]
    fn merging_runs_keeps_the_newest_cell_and_replaces_whole_kernels() {
        let six = parse_results("6.12", GUEST, None);
        let five = parse_results("5.10", GUEST, None);
        let mut m = Merged::default();
        m.add(run("d1"), &[six.clone(), five.clone()].concat(), &[]);
        assert_eq!(m.rows.len(), 6);
        let at = |m: &Merged, k: &str, s: &str| {
            m.rows.iter().position(|r| r.kernel == k && r.scenario == s)
        };
        let cs_before = at(&m, "5.10", "containerd_starts").unwrap();
        // A part: one 5.10 cell again (it failed this time), and a new row after boot.
        let mut part = vec![five[1].clone()];
        part[0].result = Verdict::Fail;
        part[0].reason = "x".repeat(400);
        part[0].detail = "log".into();
        let mut new = five[0].clone();
        new.scenario = "late_boot".into();
        part.insert(0, five[0].clone());
        part.insert(1, new);
        m.add(run("d2"), &part, &[]);
        let cell = |m: &Merged, k: &str, s: &str| {
            m.rows
                .iter()
                .find(|r| r.kernel == k && r.scenario == s)
                .cloned()
        };
        let replaced = cell(&m, "5.10", "containerd_starts").unwrap();
        assert_eq!(
            (replaced.result, replaced.date.as_str()),
            (Verdict::Fail, "d2")
        );
        assert_eq!(replaced.reason.chars().count(), MERGED_REASON_CHARS + 1);
        assert!(
            replaced.detail.is_empty(),
            "details stay in the run's matrix.md"
        );
        assert_eq!(cell(&m, "6.12", "containerd_starts").unwrap().date, "d1");
        assert_eq!(m.rows.len(), 7);
        // Replaced where it stood (one row, late_boot, went in before it).
        assert_eq!(at(&m, "5.10", "containerd_starts"), Some(cs_before + 1));
        let order = ordered(m.rows.iter().map(|r| r.scenario.as_str()));
        assert_eq!(
            order,
            ["boot", "late_boot", "containerd_starts", "agent_starts"]
        );
        assert_eq!(
            m.runs.iter().map(|r| r.date.as_str()).collect::<Vec<_>>(),
            ["d1", "d2"]
        );
        // A whole 6.12 run replaces its column; d1 keeps only 5.10's agent_starts.
        m.add(run("d3"), &six[..1], &["6.12".into()]);
        assert!(cell(&m, "6.12", "agent_starts").is_none());
        assert_eq!(cell(&m, "5.10", "agent_starts").unwrap().date, "d1");
        m.add(run("d4"), &five, &["5.10".into()]);
        assert_eq!(
            m.runs.iter().map(|r| r.date.as_str()).collect::<Vec<_>>(),
            ["d3", "d4"],
            "a run with no cell left is no longer named"
        );
        assert_eq!(
            m.kernels(&["6.12".into(), "5.10".into(), "7.2".into()]),
            ["6.12", "5.10"]
        );
        let back: Merged = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
    }
}
