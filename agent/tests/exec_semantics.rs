//! Which file an exec is matched by: one test per row of the README's table ("Which file
//! an exec is matched by"), on the running kernel in whatever mode the agent chose here
//! (`RTHOOKS_ENFORCEMENT` forces one). Each proves by a side effect (a file the program
//! writes) whether the program ran, and asserts the outcome the table documents for this
//! mode: rows the tracepoint cannot see are the sigkill mode's documented limitation.
mod common;

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::fcntl::OFlag;
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::stat::Mode;

const WAIT: Duration = Duration::from_secs(20);

/// Files of one test in a directory of their own (canonical: the kernel reports resolved
/// paths): `bin/victim` (a copy of touch: it creates the file named by its argument),
/// `bin/vsh` (a copy of sh), `bin/script` (`#!` vsh, writes the file named by `$1`).
struct Files {
    _dir: tempfile::TempDir,
    root: PathBuf,
    victim: PathBuf,
    vsh: PathBuf,
    script: PathBuf,
}

impl Files {
    fn new() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let bin = root.join("bin");
        std::fs::create_dir(&bin).unwrap();
        let victim = bin.join("victim");
        std::fs::copy(system_binary("touch"), &victim).unwrap();
        let vsh = bin.join("vsh");
        std::fs::copy(system_binary("sh"), &vsh).unwrap();
        let script = bin.join("script");
        write_script(&script, &vsh);
        std::os::unix::fs::symlink(&script, root.join("script-link")).unwrap();
        Files {
            _dir: dir,
            root,
            victim,
            vsh,
            script,
        }
    }

    /// A fresh path for a side effect.
    fn marker(&self) -> PathBuf {
        self.root.join(unique("ran"))
    }
}

fn system_binary(name: &str) -> PathBuf {
    ["/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no {name} in /usr/bin or /bin"))
        .canonicalize()
        .unwrap()
}

/// A `#!interpreter` script that creates the file named by its first argument.
fn write_script(path: &Path, interpreter: &Path) {
    write_executable(path, &format!("#!{}\n: > \"$1\"\n", interpreter.display()));
}

fn write_executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// An agent, a pod cgroup registered as app=web, and a Deny policy on `binaries`.
fn deny_in_pod(binaries: &[&Path]) -> (Agent, Cgroup) {
    let agent = Agent::start(&["--trust-label-annotation"]);
    for (i, b) in binaries.iter().enumerate() {
        agent
            .add_policy(&policy_yaml(&format!("deny-{i}"), "web", b, "Deny"))
            .unwrap();
    }
    let pod = Cgroup::new("rthooks-exec");
    agent
        .runtime_hook(hook_request(&pod, "c-exec", r#"{"app":"web"}"#))
        .unwrap();
    (agent, pod)
}

/// Runs `program args... marker` in `cgroup`: the outcome, and whether it ran.
fn run_marked(
    cgroup: &Cgroup,
    cwd: &Path,
    program: &Path,
    args: &[&str],
    marker: &Path,
) -> (Outcome, bool) {
    let mut all: Vec<&str> = args.to_vec();
    all.push(marker.to_str().unwrap());
    let outcome = run_in(cgroup, cwd, program.to_str().unwrap(), &all);
    (outcome, marker.exists())
}

fn assert_stopped(agent: &Agent, what: &str, (outcome, ran): (Outcome, bool)) {
    assert!(
        agent.denied(&outcome) && !ran,
        "{what}: expected a Deny ({} mode), got {outcome:?}, ran: {ran}",
        agent.mode()
    );
}

fn assert_ran(what: &str, (outcome, ran): (Outcome, bool)) {
    assert!(
        outcome.succeeded() && ran,
        "{what}: expected it to run, got {outcome:?}, ran: {ran}"
    );
}

/// A row the exec tracepoint cannot see (it only gets the last interpreter): stopped in
/// lsm, fentry and kprobe mode, run in sigkill mode, its documented limitation.
fn assert_stopped_unless_tracepoint(agent: &Agent, what: &str, result: (Outcome, bool)) {
    if agent.mode() == "sigkill" {
        assert_ran(
            &format!("{what} (sigkill mode sees only the interpreter)"),
            result,
        );
    } else {
        assert_stopped(agent, what, result);
    }
}

/// The binaries named by this agent's exec events so far.
fn event_binaries(agent: &Agent, at_least: usize) -> Vec<String> {
    wait_for("events", WAIT, || {
        let e = agent.events();
        (e.len() >= at_least).then_some(e)
    })
    .iter()
    .map(|e| e["binary"].as_str().unwrap_or_default().to_string())
    .collect()
}

/// Prints the mode for the guest suite (`--nocapture`), and checks it is one the kernel
/// can honour and the one forced through `RTHOOKS_ENFORCEMENT`, if any.
#[test]
fn the_chosen_mode_is_reported_with_its_reason() {
    if !kernel_tests_possible() {
        return;
    }
    let agent = Agent::start(&[]);
    let status = agent.status();
    let (mode, reason) = (status.enforcement_mode, status.enforcement_reason);
    println!("rthooks enforcement mode: {mode} ({reason})");
    assert!(
        ["lsm", "fentry", "kprobe", "sigkill"].contains(&mode.as_str()),
        "{mode}"
    );
    assert!(!reason.is_empty());
    let lsm_active = std::fs::read_to_string("/sys/kernel/security/lsm")
        .map(|l| l.trim().split(',').any(|m| m == "bpf"))
        .unwrap_or(false);
    assert!(
        mode != "lsm" || lsm_active,
        "lsm mode without the bpf LSM: {reason}"
    );
    match std::env::var("RTHOOKS_ENFORCEMENT").as_deref() {
        Ok("auto") | Err(_) => {
            // Everything before the chosen mode in the order was passed over, with a reason.
            let order = ["lsm", "fentry", "kprobe", "sigkill"];
            let chosen = order.iter().position(|m| *m == mode).unwrap();
            for skipped in &order[..chosen] {
                assert!(reason.contains(&format!("not {skipped}:")), "{reason}");
            }
        }
        Ok(forced) => assert_eq!(mode, forced, "{reason}"),
    }
    let pin = agent
        .pin_dir
        .join("links")
        .join(format!("rthooks_exec_{mode}"));
    assert!(pin.exists(), "{} is not pinned", pin.display());
}

/// `#!` script: matched by the script itself (absolute, through a symlink, relative), as
/// lsm mode sees it first; the interpreter is not what the rule named, so another script
/// with the same interpreter runs.
#[test]
fn a_script_is_matched_by_its_own_path() {
    if !kernel_tests_possible() {
        return;
    }
    let f = Files::new();
    let (agent, pod) = deny_in_pod(&[&f.script]);
    let ways: [(&str, &Path, PathBuf); 3] = [
        ("absolute", &f.root, f.script.clone()),
        ("symlink", &f.root, f.root.join("script-link")),
        ("relative", &f.root.join("bin"), PathBuf::from("./script")),
    ];
    for (how, cwd, program) in &ways {
        let marker = f.marker();
        let result = run_marked(&pod, cwd, program, &[], &marker);
        assert_stopped_unless_tracepoint(&agent, &format!("script, {how}"), result);
    }
    let other = f.root.join("bin/other-script");
    write_script(&other, &f.vsh);
    assert_ran(
        "another script with the same interpreter",
        run_marked(&pod, &f.root, &other, &[], &f.marker()),
    );
    if agent.mode() != "sigkill" {
        let binaries = event_binaries(&agent, ways.len());
        assert!(
            binaries.iter().all(|b| b == f.script.to_str().unwrap()),
            "events must name the script: {binaries:?}"
        );
    }
}

/// `#!` script whose interpreter is denied: every mode sees the interpreter (lsm, fentry
/// and kprobe after the script, the tracepoint only it), so the script never runs.
#[test]
fn a_denied_interpreter_stops_its_scripts() {
    if !kernel_tests_possible() {
        return;
    }
    let f = Files::new();
    let (agent, pod) = deny_in_pod(&[&f.vsh]);
    assert_stopped(
        &agent,
        "script of a denied interpreter",
        run_marked(&pod, &f.root, &f.script, &[], &f.marker()),
    );
    let marker = f.marker();
    let inline = format!(": > {}", marker.display());
    let outcome = run_in(&pod, &f.root, f.vsh.to_str().unwrap(), &["-c", &inline]);
    assert_stopped(&agent, "the interpreter itself", (outcome, marker.exists()));
}

/// execveat(fd, "", AT_EMPTY_PATH), what fexecve does, of a file open at `fd`. The fd
/// is inherited by the child, which joins `cgroup` and then makes that exec itself.
fn run_fd_in(cgroup: &Cgroup, fd: &OwnedFd, args: &[&str]) -> Outcome {
    let argv: Vec<CString> = std::iter::once("fd-exec")
        .chain(args.iter().copied())
        .map(|a| CString::new(a).unwrap())
        .collect();
    assert!(argv.len() < 8);
    let raw = fd.as_raw_fd();
    // Never exec'd: the step below execs the descriptor or returns its error.
    let mut cmd = Command::new("/");
    join_before_exec(&mut cmd, cgroup);
    // SAFETY: the step builds its pointer array on the stack from strings made before
    // the fork, and only calls execveat(2). Raw libc on purpose: nix's `execveat` collects
    // the arguments into a new Vec, and between fork and exec nothing may allocate (other
    // test threads may hold the allocator's lock at the fork).
    unsafe {
        cmd.pre_exec(move || {
            let mut ptrs = [std::ptr::null::<libc::c_char>(); 8];
            for (p, a) in ptrs.iter_mut().zip(&argv) {
                *p = a.as_ptr();
            }
            let envp = [std::ptr::null::<libc::c_char>()];
            libc::syscall(
                libc::SYS_execveat,
                raw,
                c"".as_ptr(),
                ptrs.as_ptr(),
                envp.as_ptr(),
                libc::AT_EMPTY_PATH,
            );
            Err(std::io::Error::last_os_error())
        });
    }
    outcome_of(&mut cmd)
}

fn open_fd(path: &Path, flags: OFlag) -> OwnedFd {
    let fd = nix::fcntl::open(path, flags, Mode::empty())
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: a descriptor just opened, owned only by the returned OwnedFd.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// fexecve/execveat of an open descriptor: matched by the path the file was opened by
/// (the kernel resolved it then), an ELF binary in every mode, a script where the mode
/// sees scripts.
#[test]
fn an_exec_of_an_open_descriptor_is_matched_by_the_opened_path() {
    if !kernel_tests_possible() {
        return;
    }
    let f = Files::new();
    let (agent, pod) = deny_in_pod(&[&f.victim, &f.script]);
    let fd = open_fd(&f.victim, OFlag::O_RDONLY | OFlag::O_CLOEXEC);
    let marker = f.marker();
    let outcome = run_fd_in(&pod, &fd, &[marker.to_str().unwrap()]);
    assert_stopped(
        &agent,
        "ELF binary by descriptor",
        (outcome, marker.exists()),
    );
    let path_fd = open_fd(&f.victim, OFlag::O_PATH | OFlag::O_CLOEXEC);
    let marker = f.marker();
    let outcome = run_fd_in(&pod, &path_fd, &[marker.to_str().unwrap()]);
    assert_stopped(
        &agent,
        "ELF binary by O_PATH descriptor",
        (outcome, marker.exists()),
    );
    // Not close-on-exec: the interpreter opens the script again as /dev/fd/N.
    let script_fd = open_fd(&f.script, OFlag::O_RDONLY);
    let marker = f.marker();
    let outcome = run_fd_in(&pod, &script_fd, &[marker.to_str().unwrap()]);
    assert_stopped_unless_tracepoint(&agent, "script by descriptor", (outcome, marker.exists()));
}

/// The binfmt_misc registrations of one test, removed on drop.
struct Binfmt {
    entry: PathBuf,
}

const BINFMT_DIR: &str = "/proc/sys/fs/binfmt_misc";

impl Binfmt {
    /// Registers `handler` for files starting with `magic`. `Ok(None)` only when this
    /// kernel has no binfmt_misc at all (the row cannot exist there); any other failure is
    /// an error, so that a kernel that has it (the guests load the module) runs the row
    /// instead of skipping it unnoticed.
    fn register(magic: &str, handler: &Path) -> Result<Option<Binfmt>, String> {
        let register = Path::new(BINFMT_DIR).join("register");
        if !register.exists() {
            match mount(
                Some("binfmt_misc"),
                BINFMT_DIR,
                Some("binfmt_misc"),
                MsFlags::empty(),
                None::<&str>,
            ) {
                Ok(()) => {}
                Err(nix::errno::Errno::ENODEV) => return Ok(None),
                Err(e) => return Err(format!("cannot mount binfmt_misc: {e}")),
            }
        }
        let name = unique("rthooks");
        std::fs::write(
            &register,
            format!(":{name}:M::{magic}::{}:", handler.display()),
        )
        .map_err(|e| format!("registering with binfmt_misc: {e}"))?;
        Ok(Some(Binfmt {
            entry: Path::new(BINFMT_DIR).join(name),
        }))
    }
}

impl Drop for Binfmt {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.entry, "-1");
    }
}

/// binfmt_misc: the file is matched by itself where the mode sees it (lsm, fentry,
/// kprobe: before its handler), and its handler by the handler's path in every mode.
#[test]
fn binfmt_misc_files_and_their_handler() {
    if !kernel_tests_possible() {
        return;
    }
    let f = Files::new();
    let magic = format!("RTHK{}", std::process::id());
    let denied = f.root.join("bin/denied.rthk");
    let allowed = f.root.join("bin/allowed.rthk");
    for file in [&denied, &allowed] {
        write_executable(file, &format!("{magic}\n"));
    }
    // The handler runs as `victim FILE MARKER`: touch creates the marker.
    let _binfmt = match Binfmt::register(&magic, &f.victim) {
        Ok(Some(b)) => b,
        Ok(None) => {
            eprintln!("SKIPPED: this kernel has no binfmt_misc (ENODEV)");
            return;
        }
        Err(why) => panic!("{why}"),
    };
    let (agent, pod) = deny_in_pod(&[&denied]);
    assert_stopped_unless_tracepoint(
        &agent,
        "binfmt_misc file",
        run_marked(&pod, &f.root, &denied, &[], &f.marker()),
    );
    assert_ran(
        "another file of the same handler",
        run_marked(&pod, &f.root, &allowed, &[], &f.marker()),
    );
    agent
        .add_policy(&policy_yaml("deny-handler", "web", &f.victim, "Deny"))
        .unwrap();
    assert_stopped(
        &agent,
        "file of a denied handler",
        run_marked(&pod, &f.root, &allowed, &[], &f.marker()),
    );
}

/// A file on an overlay (a container's rootfs is one): matched by its path on the
/// overlay as the exec resolved it, not by the path of the layer it comes from.
#[test]
fn an_overlay_file_is_matched_by_its_overlay_path() {
    if !kernel_tests_possible() {
        return;
    }
    let f = Files::new();
    let (lower, empty, merged) = (
        f.root.join("lower"),
        f.root.join("empty"),
        f.root.join("merged"),
    );
    for d in [&lower, &empty, &merged] {
        std::fs::create_dir(d).unwrap();
    }
    for name in ["a", "b"] {
        std::fs::copy(&f.victim, lower.join(name)).unwrap();
    }
    let (agent, pod) = deny_in_pod(&[&merged.join("a"), &lower.join("b")]);
    // Read-only overlay (two lower layers), mounted in the child's own mount namespace
    // so that nothing outlives it.
    let run_on_overlay = |name: &str| {
        let marker = f.marker();
        let target = CString::new(merged.to_str().unwrap()).unwrap();
        let options =
            CString::new(format!("lowerdir={}:{}", lower.display(), empty.display())).unwrap();
        let mut cmd = Command::new(merged.join(name));
        cmd.arg(&marker);
        join_before_exec(&mut cmd, &pod);
        // SAFETY: unshare(2) and mount(2) with C strings made before the fork (nix
        // passes a `CStr` through without allocating).
        unsafe {
            cmd.pre_exec(move || {
                unshare(CloneFlags::CLONE_NEWNS)?;
                mount(
                    None::<&CStr>,
                    c"/",
                    None::<&CStr>,
                    MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                    None::<&CStr>,
                )?;
                mount(
                    Some(c"overlay"),
                    target.as_c_str(),
                    Some(c"overlay"),
                    MsFlags::empty(),
                    Some(options.as_c_str()),
                )?;
                Ok(())
            });
        }
        let outcome = outcome_of(&mut cmd);
        (outcome, marker.exists())
    };
    assert_stopped(
        &agent,
        "overlay path named by the rule",
        run_on_overlay("a"),
    );
    assert_ran(
        "overlay file whose layer path is named",
        run_on_overlay("b"),
    );
    assert_stopped(
        &agent,
        "the layer's file by its own path",
        run_marked(&pod, &f.root, &lower.join("b"), &[], &f.marker()),
    );
}

/// What no mode matches by path: a copy under another name, the same bytes exec'd from a
/// memfd (whatever its name), and `ld.so BINARY` (the kernel execs the loader, which maps
/// the binary itself). What a user can do about the last: deny the loader, which stops
/// only direct invocations of it (the kernel loads a binary's interpreter without an
/// exec check).
#[test]
fn copies_memfds_and_the_loader_are_not_matched_by_the_binary_path() {
    if !kernel_tests_possible() {
        return;
    }
    let f = Files::new();
    let memfd_path = PathBuf::from("/memfd:victim");
    let (agent, pod) = deny_in_pod(&[&f.victim, &memfd_path]);
    assert_stopped(
        &agent,
        "the denied binary itself",
        run_marked(&pod, &f.root, &f.victim, &[], &f.marker()),
    );

    let copy = f.root.join("bin/renamed");
    std::fs::copy(&f.victim, &copy).unwrap();
    assert_ran(
        "a copy under another name",
        run_marked(&pod, &f.root, &copy, &[], &f.marker()),
    );

    let memfd = memfd_create(c"victim", MemFdCreateFlag::MFD_CLOEXEC).expect("memfd_create");
    std::fs::write(
        format!("/proc/self/fd/{}", memfd.as_raw_fd()),
        std::fs::read(&f.victim).unwrap(),
    )
    .unwrap();
    let marker = f.marker();
    let outcome = run_fd_in(&pod, &memfd, &[marker.to_str().unwrap()]);
    assert_ran(
        "the binary from a memfd named like it",
        (outcome, marker.exists()),
    );

    let loader = ["/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1"]
        .iter()
        .map(Path::new)
        .find(|p| p.exists())
        .map(|p| p.canonicalize().unwrap());
    let Some(loader) = loader else {
        eprintln!("SKIPPED (ld.so rows): no known dynamic loader here");
        return;
    };
    let victim = f.victim.to_str().unwrap();
    assert_ran(
        "ld.so BINARY",
        run_marked(&pod, &f.root, &loader, &[victim], &f.marker()),
    );
    agent
        .add_policy(&policy_yaml("deny-loader", "web", &loader, "Deny"))
        .unwrap();
    assert_stopped(
        &agent,
        "ld.so BINARY with the loader denied",
        run_marked(&pod, &f.root, &loader, &[victim], &f.marker()),
    );
    assert_ran(
        "a dynamically linked binary with the loader denied",
        run_marked(&pod, &f.root, &copy, &[], &f.marker()),
    );
}
