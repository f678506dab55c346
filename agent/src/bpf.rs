//! Loading the eBPF programs, choosing the enforcement mode, pinning maps and links, and
//! writing the maps (the [`MapSink`] behind the model in `state`).
//!
//! Everything is pinned under the pin directory (default `/sys/fs/bpf/rthooks`): maps by
//! name, links under `links/`. A pinned link keeps its program attached after the agent
//! exits, so enforcement continues while the agent is down or restarting. A new agent
//! attaches its freshly loaded programs first and then renames the new link pin over the
//! old one: there is never a moment without an attached program.
use std::collections::HashMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{links::FdLink, Lsm, RawTracePoint};
use aya::{Ebpf, EbpfLoader};
use rthooks_common::{
    pins, programs, BinaryRules, ContainerPolicies, KernelOffsets, PolicySet, Settings,
    MAX_BINARIES, MAX_CONTAINERS,
};

use crate::btf::Btf;
use crate::error::Error;
use crate::state::MapSink;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The compiled eBPF object, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rthooks"));

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// LSM `bprm_check_security`: a denied exec fails with EPERM.
    Lsm,
    /// Tracepoint `sched_process_exec` + SIGKILL before the first instruction.
    Sigkill,
}

impl Mode {
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Lsm => "lsm",
            Mode::Sigkill => "sigkill",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RequestedMode {
    /// LSM when the kernel runs BPF LSM programs, otherwise sigkill.
    Auto,
    Lsm,
    Sigkill,
}

/// Is `bpf` among the active LSMs? On kernels booted without it (5.10's default), an LSM
/// program loads and attaches without error but is never called, so attaching is no proof.
pub fn bpf_lsm_active() -> Result<bool, String> {
    let path = "/sys/kernel/security/lsm";
    if !Path::new(path).exists() && Path::new("/sys/kernel/security").is_dir() {
        // SAFETY: constant C strings; failure is reported through the read below.
        unsafe {
            libc::mount(
                c"securityfs".as_ptr(),
                c"/sys/kernel/security".as_ptr(),
                c"securityfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
    }
    std::fs::read_to_string(path)
        .map(|s| s.trim().split(',').any(|l| l == "bpf"))
        .map_err(|e| format!("cannot read {path}: {e} (is securityfs mounted?)"))
}

fn is_bpffs(dir: &Path) -> bool {
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Mounts the BPF file system at /sys/fs/bpf when nothing is mounted there yet (as
/// Cilium does): hosts that never ran a BPF tool often lack it, and pins need it.
fn ensure_bpffs(dir: &Path) {
    let default = Path::new("/sys/fs/bpf");
    if dir.starts_with(default) && default.is_dir() && !is_bpffs(default) {
        let r = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c"/sys/fs/bpf".as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if r == 0 {
            tracing::info!("mounted the BPF file system at /sys/fs/bpf");
        } else {
            tracing::warn!(error = %std::io::Error::last_os_error(), "mounting /sys/fs/bpf failed");
        }
    }
}

/// Verifier logs run to megabytes: keep the head and the end, where the reason is.
fn bpf_err<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> Error + '_ {
    move |e| {
        let text = e.to_string();
        let lines: Vec<&str> = text.lines().collect();
        let text = if lines.len() > 40 {
            format!(
                "{}\n  [... {} lines ...]\n{}",
                lines[..5].join("\n"),
                lines.len() - 25,
                lines[lines.len() - 20..].join("\n")
            )
        } else {
            text
        };
        Error::Bpf(format!("{what}: {text}"))
    }
}

/// Loaded programs and the maps the agent writes.
pub struct Enforcer {
    _ebpf: Ebpf,
    pub mode: Mode,
    pub mode_reason: String,
    pub pin_dir: PathBuf,
    containers: BpfHashMap<MapData, u64, ContainerPolicies>,
    binaries: BpfHashMap<MapData, u64, BinaryRules>,
    settings: Array<MapData, Settings>,
    drops: PerCpuArray<MapData, u64>,
    events: Option<RingBuf<MapData>>,
}

impl Enforcer {
    pub fn load(pin_dir: &Path, requested: RequestedMode) -> Result<Enforcer, Error> {
        if OBJECT.is_empty() {
            return Err(Error::Bpf(
                "this agent was built without its eBPF object (AYA_BUILD_SKIP?)".into(),
            ));
        }
        let parent = pin_dir.parent().unwrap_or(Path::new("/"));
        ensure_bpffs(parent);
        if !is_bpffs(parent) && !is_bpffs(pin_dir) {
            return Err(Error::Bpf(format!(
                "{} is not on a BPF file system (mount -t bpf bpf /sys/fs/bpf)",
                parent.display()
            )));
        }
        std::fs::create_dir_all(pin_dir.join("links")).map_err(|e| Error::io(pin_dir, e))?;
        let btf = Btf::from_sys_fs()?;
        let offsets = btf.kernel_offsets()?;
        let aya_btf = aya::Btf::from_sys_fs().map_err(bpf_err("reading kernel BTF"))?;

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(OBJECT)
            .map_err(|e| {
                Error::Bpf(format!(
                    "loading the eBPF object (if a pinned map in {} has an older layout, remove the directory): {e}",
                    pin_dir.display()
                ))
            })?;

        // Offsets before any program runs: with `valid == 0` the programs do nothing.
        let mut offsets_map: Array<MapData, KernelOffsets> = Array::try_from(
            ebpf.take_map(pins::OFFSETS)
                .ok_or_else(|| Error::Bpf("no OFFSETS map".into()))?,
        )
        .map_err(bpf_err("OFFSETS"))?;
        offsets_map
            .set(0, offsets, 0)
            .map_err(bpf_err("writing OFFSETS"))?;

        let (mode, mode_reason) = Self::attach_exec(&mut ebpf, &aya_btf, pin_dir, requested)?;

        let rmdir: &mut RawTracePoint = ebpf
            .program_mut(programs::CGROUP_RMDIR)
            .ok_or_else(|| Error::Bpf("no cgroup_rmdir program".into()))?
            .try_into()
            .map_err(bpf_err("cgroup_rmdir"))?;
        rmdir.load().map_err(bpf_err("loading cgroup_rmdir"))?;
        let link = rmdir
            .attach("cgroup_rmdir")
            .map_err(bpf_err("attaching cgroup_rmdir"))?;
        let link: FdLink = rmdir
            .take_link(link)
            .map_err(bpf_err("cgroup_rmdir link"))?
            .into();
        pin_link(link, pin_dir, programs::CGROUP_RMDIR)?;

        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| Error::Bpf(format!("no map {name}")))
        };
        let containers = BpfHashMap::try_from(take(&mut ebpf, pins::CONTAINERS)?)
            .map_err(bpf_err("CONTAINERS"))?;
        let binaries =
            BpfHashMap::try_from(take(&mut ebpf, pins::BINARIES)?).map_err(bpf_err("BINARIES"))?;
        let settings =
            Array::try_from(take(&mut ebpf, pins::SETTINGS)?).map_err(bpf_err("SETTINGS"))?;
        let drops =
            PerCpuArray::try_from(take(&mut ebpf, pins::DROPS)?).map_err(bpf_err("DROPS"))?;
        let events =
            RingBuf::try_from(take(&mut ebpf, pins::EVENTS)?).map_err(bpf_err("EVENTS"))?;
        Ok(Enforcer {
            _ebpf: ebpf,
            mode,
            mode_reason,
            pin_dir: pin_dir.to_path_buf(),
            containers,
            binaries,
            settings,
            drops,
            events: Some(events),
        })
    }

    fn attach_exec(
        ebpf: &mut Ebpf,
        btf: &aya::Btf,
        pin_dir: &Path,
        requested: RequestedMode,
    ) -> Result<(Mode, String), Error> {
        let lsm_reason = match (requested, bpf_lsm_active()) {
            (RequestedMode::Sigkill, _) => Some("sigkill mode requested".to_string()),
            (_, Ok(true)) => None,
            (_, Ok(false)) => Some("bpf is not in the active LSM list (/sys/kernel/security/lsm); boot with lsm=...,bpf".to_string()),
            (_, Err(e)) => Some(e),
        };
        let lsm_error = match lsm_reason {
            Some(reason) => reason,
            None => match Self::attach_lsm(ebpf, btf, pin_dir) {
                Ok(()) => {
                    remove_link_pin(pin_dir, programs::EXEC_SIGKILL);
                    return Ok((
                        Mode::Lsm,
                        "bpf LSM is active and the program attached".into(),
                    ));
                }
                Err(e) => format!("the LSM program was refused: {e}"),
            },
        };
        if requested == RequestedMode::Lsm {
            return Err(Error::Bpf(format!(
                "lsm mode requested but unavailable: {lsm_error}"
            )));
        }
        let prog: &mut RawTracePoint = ebpf
            .program_mut(programs::EXEC_SIGKILL)
            .ok_or_else(|| Error::Bpf("no sched_process_exec program".into()))?
            .try_into()
            .map_err(bpf_err("sched_process_exec"))?;
        prog.load()
            .map_err(bpf_err("loading the sched_process_exec program"))?;
        let link = prog
            .attach("sched_process_exec")
            .map_err(bpf_err("attaching sched_process_exec"))?;
        let link: FdLink = prog
            .take_link(link)
            .map_err(bpf_err("sched_process_exec link"))?
            .into();
        pin_link(link, pin_dir, programs::EXEC_SIGKILL)?;
        remove_link_pin(pin_dir, programs::EXEC_LSM);
        Ok((Mode::Sigkill, lsm_error))
    }

    fn attach_lsm(ebpf: &mut Ebpf, btf: &aya::Btf, pin_dir: &Path) -> Result<(), Error> {
        let prog: &mut Lsm = ebpf
            .program_mut(programs::EXEC_LSM)
            .ok_or_else(|| Error::Bpf("no LSM program".into()))?
            .try_into()
            .map_err(bpf_err("lsm"))?;
        prog.load("bprm_check_security", btf)
            .map_err(bpf_err("loading"))?;
        let link = prog.attach().map_err(bpf_err("attaching"))?;
        let link: FdLink = prog.take_link(link).map_err(bpf_err("link"))?.into();
        pin_link(link, pin_dir, programs::EXEC_LSM)
    }

    /// What the maps hold now (after a restart, the previous agent's entries).
    pub fn map_contents(&self) -> (HashMap<u64, PolicySet>, HashMap<u64, BinaryRules>, u64) {
        let containers = self
            .containers
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k, v.policies))
            .collect();
        let binaries = self.binaries.iter().filter_map(Result::ok).collect();
        let levels = self
            .settings
            .get(&0, 0)
            .map(|s| s.cgroup_levels)
            .unwrap_or(0);
        (containers, binaries, levels)
    }

    pub fn ring_buffer_drops(&self) -> u64 {
        self.drops.get(&0, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    pub fn capacities() -> (u32, u32) {
        (MAX_CONTAINERS, MAX_BINARIES)
    }

    /// Removes every pin: programs detach, maps go away once unused. For uninstalling and
    /// tests; a normal agent exit keeps the pins so enforcement continues.
    pub fn unpin_all(pin_dir: &Path) -> std::io::Result<()> {
        match std::fs::remove_dir_all(pin_dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
}

fn link_pin(pin_dir: &Path, name: &str) -> PathBuf {
    pin_dir.join("links").join(name)
}

fn remove_link_pin(pin_dir: &Path, name: &str) {
    let _ = std::fs::remove_file(link_pin(pin_dir, name));
}

/// Pins `link` as `links/<name>`, replacing an older pin atomically (rename on bpffs), so
/// the previous program stays attached until the new one is.
fn pin_link(link: FdLink, pin_dir: &Path, name: &str) -> Result<(), Error> {
    let path = link_pin(pin_dir, name);
    // bpffs refuses names with '.', hence the suffix style.
    let tmp = link_pin(pin_dir, &format!("{name}_new"));
    let _ = std::fs::remove_file(&tmp);
    let pinned = link
        .pin(&tmp)
        .map_err(|e| Error::Bpf(format!("pinning link at {}: {e:?}", tmp.display())))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    // Dropping the PinnedLink closes our fd; the pin keeps the link alive.
    drop(pinned);
    Ok(())
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |e| Error::Map {
        map,
        reason: e.to_string(),
    }
}

impl MapSink for Enforcer {
    fn set_container(&mut self, cgroup_id: u64, policies: PolicySet) -> Result<(), Error> {
        self.containers
            .insert(cgroup_id, ContainerPolicies { policies }, 0)
            .map_err(map_err("containers"))
    }

    fn remove_container(&mut self, cgroup_id: u64) -> Result<(), Error> {
        match self.containers.remove(&cgroup_id) {
            // Already gone: the cgroup_rmdir program removed it.
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            r => r.map_err(map_err("containers")),
        }
    }

    fn set_binary(&mut self, hash: u64, rules: BinaryRules) -> Result<(), Error> {
        self.binaries
            .insert(hash, rules, 0)
            .map_err(map_err("binaries"))
    }

    fn remove_binary(&mut self, hash: u64) -> Result<(), Error> {
        match self.binaries.remove(&hash) {
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            r => r.map_err(map_err("binaries")),
        }
    }

    fn set_cgroup_levels(&mut self, levels: u64) -> Result<(), Error> {
        self.settings
            .set(
                0,
                Settings {
                    cgroup_levels: levels,
                },
                0,
            )
            .map_err(map_err("settings"))
    }
}
