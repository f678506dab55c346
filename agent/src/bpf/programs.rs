//! Loading the eBPF object, attaching its programs and pinning their links.
//!
//! Everything is pinned under the pin directory (default `/sys/fs/bpf/rthooks`): maps by
//! name, links under `links/`. A pinned link keeps its program attached after the agent
//! exits, so enforcement continues while the agent is down or restarting. A new agent
//! attaches its freshly loaded programs first and then renames the new link pin over the
//! old one: there is never a moment without an attached program.
use std::path::{Path, PathBuf};

use aya::maps::{Array, Map, MapData};
use aya::programs::{links::FdLink, Program, RawTracePoint};
use aya::{Ebpf, EbpfLoader};
use rthooks_common::{pins, programs, KernelOffsets};

use super::fs::{ensure_bpffs, is_bpffs};
use super::mode::{attach_exec, Mode, RequestedMode};
use crate::btf::Btf;
use crate::error::Error;

/// The compiled eBPF object, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rthooks"));

/// The loaded object with its programs attached and pinned. Its maps are taken out by
/// the map writer (`maps`); keeping this alive keeps the program fds open.
pub struct Programs {
    ebpf: Ebpf,
    pub mode: Mode,
    pub mode_reason: String,
    pub pin_dir: PathBuf,
}

impl Programs {
    /// Loads the object (creating or reusing the pinned maps), hands the programs the
    /// kernel's layout, then attaches the exec program of the best mode `requested`
    /// admits and the cgroup_rmdir program.
    pub fn load(pin_dir: &Path, requested: RequestedMode) -> Result<Programs, Error> {
        if OBJECT.is_empty() {
            return Err(Error::NoObject);
        }
        let parent = pin_dir.parent().unwrap_or(Path::new("/"));
        ensure_bpffs(parent);
        if !is_bpffs(parent) && !is_bpffs(pin_dir) {
            return Err(Error::NotBpffs(parent.to_path_buf()));
        }
        std::fs::create_dir_all(pin_dir.join("links")).map_err(|e| Error::io(pin_dir, e))?;
        let offsets = Btf::from_sys_fs()?.kernel_offsets()?;
        let aya_btf = aya::Btf::from_sys_fs()?;

        drop_stale_offsets_pin(pin_dir);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(OBJECT)
            .map_err(|e| Error::LoadObject {
                pin_dir: pin_dir.to_path_buf(),
                source: Box::new(e),
            })?;

        // Offsets before any program runs: with `valid == 0` the programs do nothing.
        let mut offsets_map: Array<MapData, KernelOffsets> =
            Array::try_from(take_map(&mut ebpf, pins::OFFSETS)?)
                .map_err(Error::map(pins::OFFSETS))?;
        offsets_map
            .set(0, offsets, 0)
            .map_err(Error::map(pins::OFFSETS))?;

        let (mode, mode_reason) = attach_exec(&mut ebpf, &aya_btf, pin_dir, requested)?;
        attach_cgroup_rmdir(&mut ebpf, pin_dir)?;
        Ok(Programs {
            ebpf,
            mode,
            mode_reason,
            pin_dir: pin_dir.to_path_buf(),
        })
    }

    /// Takes one of the object's maps out, for the map writer.
    pub(super) fn take_map(&mut self, name: &'static str) -> Result<Map, Error> {
        take_map(&mut self.ebpf, name)
    }
}

/// OFFSETS is rewritten from BTF by every agent, so a pin left by an agent whose
/// `KernelOffsets` had another layout is replaced rather than reused: reusing it would make
/// the new programs fail verification. The old programs keep their own reference to it.
fn drop_stale_offsets_pin(pin_dir: &Path) {
    let path = pin_dir.join(pins::OFFSETS);
    let Ok(info) = aya::maps::MapInfo::from_pin(&path) else {
        return;
    };
    let want = std::mem::size_of::<KernelOffsets>() as u32;
    if info.value_size() != want {
        tracing::info!(
            old = info.value_size(),
            new = want,
            "replacing the pinned OFFSETS map of an agent with another layout"
        );
        let _ = std::fs::remove_file(&path);
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, Error> {
    ebpf.take_map(name)
        .ok_or(Error::NotInObject { what: "map", name })
}

/// Types program `$name` of the object as `$ty`, loads it with `load(...)`'s arguments,
/// attaches it with `attach(...)`'s and takes its link out: the same steps for every
/// program type, in a macro because aya's program types share no trait for `load` and
/// `attach` (their arguments differ).
macro_rules! attach_program {
    ($ebpf:expr, $ty:ty, $name:expr, load($($load:expr),*), attach($($attach:expr),*)) => {{
        use $crate::error::Error;
        let name: &'static str = $name;
        let prog: &mut $ty = $crate::bpf::programs::program_mut($ebpf, name)?
            .try_into()
            .map_err(Error::program("typing", name))?;
        prog.load($($load),*).map_err(Error::program("loading", name))?;
        let link = prog
            .attach($($attach),*)
            .map_err(Error::program("attaching", name))?;
        prog.take_link(link)
            .map_err(Error::program("taking the link of", name))?
    }};
}
pub(super) use attach_program;

pub(super) fn program_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut Program, Error> {
    ebpf.program_mut(name).ok_or(Error::NotInObject {
        what: "program",
        name,
    })
}

fn attach_cgroup_rmdir(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<(), Error> {
    let link = attach_raw_tracepoint(ebpf, programs::CGROUP_RMDIR, "cgroup_rmdir")?;
    pin_link(link, pin_dir, programs::CGROUP_RMDIR)
}

/// Loads program `name` and attaches it to the raw tracepoint `tracepoint`.
pub(super) fn attach_raw_tracepoint(
    ebpf: &mut Ebpf,
    name: &'static str,
    tracepoint: &str,
) -> Result<FdLink, Error> {
    Ok(attach_program!(ebpf, RawTracePoint, name, load(), attach(tracepoint)).into())
}

/// Removes every pin: programs detach, maps go away once unused. For uninstalling and
/// tests; a normal agent exit keeps the pins so enforcement continues.
pub fn unpin_all(pin_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(pin_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

fn link_pin(pin_dir: &Path, name: &str) -> PathBuf {
    pin_dir.join("links").join(name)
}

pub(super) fn remove_link_pin(pin_dir: &Path, name: &str) {
    let _ = std::fs::remove_file(link_pin(pin_dir, name));
}

/// Pins `link` as `links/<name>`, replacing an older pin atomically (rename on bpffs), so
/// the previous program stays attached until the new one is.
pub(super) fn pin_link(link: FdLink, pin_dir: &Path, name: &str) -> Result<(), Error> {
    let path = link_pin(pin_dir, name);
    // bpffs refuses names with '.', hence the suffix style.
    let tmp = link_pin(pin_dir, &format!("{name}_new"));
    let _ = std::fs::remove_file(&tmp);
    let pinned = link.pin(&tmp).map_err(|source| Error::Pin {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    // Dropping the PinnedLink closes our fd; the pin keeps the link alive.
    drop(pinned);
    Ok(())
}
