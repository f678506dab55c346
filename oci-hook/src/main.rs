//! `rthooks-oci-hook <stage> [flags]`, run by the container runtime. The installers are
//! `rthooks-setup`.
use std::io::{IsTerminal, Write};
use std::process::ExitCode;

// musl's malloc spent a third of the hook's kernel time mapping and unmapping pages; see
// the module's documentation.
#[cfg(not(any(feature = "alloc-system", feature = "alloc-mimalloc")))]
#[global_allocator]
static ALLOC: rthooks_oci_hook::alloc::OneShotAlloc = rthooks_oci_hook::alloc::OneShotAlloc::new();
#[cfg(feature = "alloc-mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match args.get(1).and_then(|a| a.to_str()) {
        // The old spelling: say where the installers went rather than "unknown stage".
        Some(verb @ ("install" | "uninstall")) => {
            eprintln!(
                "rthooks-oci-hook: the installers are a separate binary now: run `rthooks-setup {verb} \
                 <hooks-d|containerd-base-spec|containerd-nri> [flags]` (same flags; see `rthooks-setup --help`)"
            );
            ExitCode::from(2)
        }
        _ => hook(args),
    }
}

fn hook(args: Vec<std::ffi::OsString>) -> ExitCode {
    let parsed = match rthooks_oci_hook::config::parse(args) {
        Ok(p) => p,
        Err(e) => e.exit(),
    };
    // A terminal on stdin means someone runs the hook by hand: do not wait for a state.
    let stdin = std::io::stdin();
    let input: Box<dyn std::io::Read> = if stdin.is_terminal() {
        Box::new(std::io::empty())
    } else {
        Box::new(stdin.lock())
    };
    let cwd = std::env::current_dir().ok();
    let out = rthooks_oci_hook::hook::run(parsed, input, cwd);
    if let Some(s) = &out.stdout {
        let _ = std::io::stdout().write_all(s.as_bytes());
    }
    if let Some(s) = &out.stderr {
        let _ = writeln!(std::io::stderr(), "{s}");
    }
    ExitCode::from(u8::try_from(out.exit_code).unwrap_or(1))
}
