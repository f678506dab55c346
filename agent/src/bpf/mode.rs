//! The enforcement mode: from which kernel hook point a denied exec is stopped. The
//! candidates are tried in [`EXEC_HOOKS`] order; the first that the request admits and the
//! kernel accepts is pinned, and the pins of every other candidate are removed.
use aya::programs::{links::FdLink, FEntry, KProbe, Lsm};
use aya::Ebpf;
use rthooks_common::{programs, BPRM_CHECK_FUNCTION};

use super::fs::bpf_lsm_active;
use super::programs::{attach_program, attach_raw_tracepoint, pin_link, remove_link_pin};
use crate::error::Error;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// LSM `bprm_check_security`: a denied exec fails with EPERM.
    Lsm,
    /// fentry on `security_bprm_check` (BPF trampoline) + SIGKILL: sees the script, not
    /// only its interpreter, where the bpf LSM is not active.
    Fentry,
    /// kprobe on `security_bprm_check` + SIGKILL: the same, where trampolines are refused.
    Kprobe,
    /// Tracepoint `sched_process_exec` + SIGKILL before the first instruction.
    Sigkill,
}

impl Mode {
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Lsm => "lsm",
            Mode::Fentry => "fentry",
            Mode::Kprobe => "kprobe",
            Mode::Sigkill => "sigkill",
        }
    }

    /// Only the LSM program can make an exec fail; the others carry a Deny out as a kill.
    pub fn refuses_exec(&self) -> bool {
        *self == Mode::Lsm
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RequestedMode {
    /// The first of lsm, fentry, kprobe, sigkill that this kernel runs (lsm only when bpf
    /// is an active LSM).
    Auto,
    /// LSM `bprm_check_security`: Deny = EPERM. Needs `bpf` in the active LSM list.
    Lsm,
    /// fentry on `security_bprm_check` + SIGKILL. Needs BPF trampolines.
    Fentry,
    /// kprobe on `security_bprm_check` + SIGKILL. Needs kprobes and, to pin it, 5.15+.
    Kprobe,
    /// Tracepoint `sched_process_exec` + SIGKILL: sees a `#!` script's interpreter only.
    Sigkill,
}

impl RequestedMode {
    fn admits(self, mode: Mode) -> bool {
        match self {
            RequestedMode::Auto => true,
            RequestedMode::Lsm => mode == Mode::Lsm,
            RequestedMode::Fentry => mode == Mode::Fentry,
            RequestedMode::Kprobe => mode == Mode::Kprobe,
            RequestedMode::Sigkill => mode == Mode::Sigkill,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            RequestedMode::Auto => "auto",
            RequestedMode::Lsm => "lsm",
            RequestedMode::Fentry => "fentry",
            RequestedMode::Kprobe => "kprobe",
            RequestedMode::Sigkill => "sigkill",
        }
    }
}

/// One hook point from which exec can be enforced.
pub struct ExecHook {
    /// The program's name in the object, also its link pin's name.
    pub program: &'static str,
    pub mode: Mode,
    /// Why the hook point cannot work on this kernel even if its program attaches, or
    /// `None` to try it.
    unusable: fn() -> Option<String>,
    /// Loads and attaches the program.
    attach: fn(&mut Ebpf, &aya::Btf) -> Result<FdLink, Error>,
    /// The reason reported when it is the first candidate and is chosen.
    chosen: &'static str,
    /// Says which candidate an attach error comes from.
    refused: &'static str,
}

/// Best first.
pub const EXEC_HOOKS: &[ExecHook] = &[
    ExecHook {
        program: programs::EXEC_LSM,
        mode: Mode::Lsm,
        unusable: lsm_unusable,
        attach: attach_lsm,
        chosen: "bpf LSM is active and the program attached",
        refused: "the LSM program was refused",
    },
    // The function that calls the LSM hook, called whether or not the bpf LSM is active:
    // it sees a script, then its interpreter, as the LSM program does.
    ExecHook {
        program: programs::EXEC_FENTRY,
        mode: Mode::Fentry,
        unusable: || None,
        attach: attach_fentry,
        chosen: "fentry on security_bprm_check attached (Deny is carried out as SIGKILL)",
        refused: "the fentry program was refused",
    },
    ExecHook {
        program: programs::EXEC_KPROBE,
        mode: Mode::Kprobe,
        unusable: || None,
        attach: attach_kprobe,
        chosen: "kprobe on security_bprm_check attached (Deny is carried out as SIGKILL)",
        refused: "the kprobe was refused (are kprobes built in?)",
    },
    ExecHook {
        program: programs::EXEC_SIGKILL,
        mode: Mode::Sigkill,
        unusable: || None,
        attach: attach_exec_tracepoint,
        chosen: "the sched_process_exec tracepoint attached (Deny is carried out as SIGKILL; a #! script is seen as its interpreter)",
        refused: "the sched_process_exec program was refused",
    },
];

fn lsm_unusable() -> Option<String> {
    match bpf_lsm_active() {
        Ok(true) => None,
        Ok(false) => Some(
            "bpf is not in the active LSM list (/sys/kernel/security/lsm); boot with lsm=...,bpf"
                .into(),
        ),
        Err(e) => Some(e),
    }
}

fn attach_lsm(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<FdLink, Error> {
    let link = attach_program!(
        ebpf,
        Lsm,
        programs::EXEC_LSM,
        load("bprm_check_security", btf),
        attach()
    );
    Ok(link.into())
}

fn attach_fentry(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<FdLink, Error> {
    let link = attach_program!(
        ebpf,
        FEntry,
        programs::EXEC_FENTRY,
        load(BPRM_CHECK_FUNCTION, btf),
        attach()
    );
    Ok(link.into())
}

fn attach_kprobe(ebpf: &mut Ebpf, _: &aya::Btf) -> Result<FdLink, Error> {
    let link = attach_program!(
        ebpf,
        KProbe,
        programs::EXEC_KPROBE,
        load(),
        attach(BPRM_CHECK_FUNCTION, 0)
    );
    // Before 5.15 a kprobe is attached through its perf event, not a BPF link: nothing
    // to pin, and enforcement would end with this process.
    FdLink::try_from(link).map_err(|_| Error::Unpinnable {
        program: programs::EXEC_KPROBE,
        why: "this kernel attaches kprobes without a BPF link (those came in 5.15)",
    })
}

fn attach_exec_tracepoint(ebpf: &mut Ebpf, _: &aya::Btf) -> Result<FdLink, Error> {
    attach_raw_tracepoint(ebpf, programs::EXEC_SIGKILL, "sched_process_exec")
}

/// Attaches and pins the best hook point `requested` admits; returns its mode and why
/// it was chosen (the reasons the better ones were passed over).
pub fn attach_exec(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    pin_dir: &std::path::Path,
    requested: RequestedMode,
) -> Result<(Mode, String), Error> {
    // Why each better candidate was not taken, for the chosen one's reason.
    let mut passed_over: Vec<String> = Vec::new();
    // Only of candidates the request admits, for the error when none works.
    let mut refusals: Vec<String> = Vec::new();
    let mut last_error = None;
    for hook in EXEC_HOOKS {
        let why_not = if !requested.admits(hook.mode) {
            format!("{} mode requested", requested.as_str())
        } else if let Some(reason) = (hook.unusable)() {
            format!("not {}: {reason}", hook.mode.as_str())
        } else {
            match (hook.attach)(ebpf, btf).and_then(|link| pin_link(link, pin_dir, hook.program)) {
                Ok(()) => {
                    for other in EXEC_HOOKS.iter().filter(|h| h.program != hook.program) {
                        remove_link_pin(pin_dir, other.program);
                    }
                    passed_over.push(format!("{}: {}", hook.mode.as_str(), hook.chosen));
                    return Ok((hook.mode, passed_over.join("; ")));
                }
                Err(e) => {
                    let why_not = match e {
                        Error::Unpinnable { .. } => format!("not {}: {e}", hook.mode.as_str()),
                        _ => format!("not {}: {}: {e}", hook.mode.as_str(), hook.refused),
                    };
                    last_error = Some(e);
                    why_not
                }
            }
        };
        if requested.admits(hook.mode) {
            refusals.push(why_not.clone());
        }
        if !passed_over.contains(&why_not) {
            passed_over.push(why_not);
        }
    }
    match (requested, last_error) {
        // The last resort's own error is the cause worth showing.
        (RequestedMode::Auto, Some(e)) => Err(e),
        _ => Err(Error::ModeUnavailable {
            mode: requested.as_str(),
            reason: refusals.join("; "),
        }),
    }
}
