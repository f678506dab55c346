//! rthooks eBPF programs.
//!
//! * `rthooks_exec_sigkill` (raw tracepoint `sched_process_exec`): runs after the kernel
//!   committed to the new binary, before the task returns to user space. Deny and Kill
//!   become `bpf_send_signal(SIGKILL)`: the signal is delivered on the way out of the
//!   kernel, so not one instruction of the new binary runs. Used where LSM programs
//!   cannot load.
//! * `rthooks_exec_lsm` (LSM `bprm_check_security`): Deny makes the exec fail with EPERM.
//! * `rthooks_exec_fentry` (fentry) and `rthooks_exec_kprobe` (kprobe) on
//!   `security_bprm_check`, the function that calls the LSM hook: for kernels where the
//!   bpf LSM is not active. They see what the LSM program sees (the script, then its
//!   interpreter), but cannot make the exec fail: Deny and Kill become SIGKILL, which the
//!   task takes on its way back to user space, before the file or its interpreter has
//!   run an instruction.
//! * `rthooks_cgroup_rmdir` (raw tracepoint `cgroup_rmdir`): drops a removed cgroup's entry
//!   and tells the agent, so the maps cannot fill with dead cgroups.
//!
//! Raw tracepoints, LSM and fentry programs are attached through BPF links, which can be
//! pinned on every kernel of the matrix (5.7+), so enforcement survives an agent restart;
//! kprobes get a pinnable link from 5.15 on.
//!
//! Kernel structs are read with `bpf_probe_read_kernel` at offsets the agent took from the
//! running kernel's BTF (`OFFSETS`); Rust programs get no CO-RE relocations.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_current_task, bpf_probe_read_kernel, bpf_send_signal,
        },
    },
    macros::{fentry, kprobe, lsm, map, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{FEntryContext, LsmContext, ProbeContext, RawTracePointContext},
    EbpfContext,
};
use rthooks_common::{
    path_hash_word, Action, BinaryRules, ContainerPolicies, Event, KernelOffsets, PolicySet,
    Settings, EVENT_CGROUP_REMOVED, EVENT_EXEC, MAX_BINARIES, MAX_CGROUP_LEVELS, MAX_CONTAINERS,
    MAX_NAME_LEN, MAX_PATH_COMPONENTS, MNT_INTERNAL, PATH_HASH_SEED, PATH_HASH_WORDS,
};

#[map(name = "RTHOOKS_CONTAINERS")]
static CONTAINERS: HashMap<u64, ContainerPolicies> =
    HashMap::pinned(MAX_CONTAINERS, BPF_F_NO_PREALLOC);

#[map(name = "RTHOOKS_BINARIES")]
static BINARIES: HashMap<u64, BinaryRules> = HashMap::pinned(MAX_BINARIES, BPF_F_NO_PREALLOC);

#[map(name = "RTHOOKS_SETTINGS")]
static SETTINGS: Array<Settings> = Array::pinned(1, 0);

#[map(name = "RTHOOKS_OFFSETS")]
static OFFSETS: Array<KernelOffsets> = Array::pinned(1, 0);

#[map(name = "RTHOOKS_EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(1 << 20, 0);

/// Events that did not fit in the ring buffer (the agent reports them as drops).
#[map(name = "RTHOOKS_DROPS")]
static DROPS: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

/// Scratch space for one file name component (too big for the 512-byte stack).
#[map]
static NAME_BUF: PerCpuArray<[u64; PATH_HASH_WORDS]> = PerCpuArray::with_max_entries(1, 0);

const EPERM: i32 = 1;
const SIGKILL: u32 = 9;

#[inline(always)]
unsafe fn read_ptr(base: u64, offset: u64) -> u64 {
    let mut value: u64 = 0;
    let r = bpf_probe_read_kernel(
        &mut value as *mut u64 as *mut _,
        8,
        (base + offset) as *const _,
    );
    if r != 0 {
        return 0;
    }
    value
}

#[inline(always)]
unsafe fn read_u32(base: u64, offset: u64) -> u32 {
    let mut value: u32 = 0;
    let r = bpf_probe_read_kernel(
        &mut value as *mut u32 as *mut _,
        4,
        (base + offset) as *const _,
    );
    if r != 0 {
        return 0;
    }
    value
}

/// Which policies apply to the current task, and the registered cgroup that carried them.
///
/// Walks from the task's cgroup (unified hierarchy, as `bpf_get_current_cgroup_id`) up to
/// the root and looks up only the depths where containers are registered: one lookup per
/// depth in use, independent of how many containers or policies exist. The walk reads
/// `css.parent` rather than calling `bpf_get_current_ancestor_cgroup_id`, which tracing
/// programs only gained after 5.10.
#[inline(always)]
unsafe fn current_policies(off: &KernelOffsets) -> Option<(u64, PolicySet)> {
    let settings = SETTINGS.get(0)?;
    let levels = settings.cgroup_levels;
    if levels == 0 {
        return None;
    }
    let task = bpf_get_current_task();
    let css_set = read_ptr(task, off.task_cgroups);
    let mut cgrp = read_ptr(css_set, off.css_set_dfl_cgrp);
    let mut level = read_u32(cgrp, off.cgroup_level);
    let mut found = PolicySet::EMPTY;
    let mut container = 0u64;
    let mut step = 0u32;
    while step < MAX_CGROUP_LEVELS {
        step += 1;
        if cgrp == 0 || level >= MAX_CGROUP_LEVELS {
            break;
        }
        if levels & (1u64 << level) != 0 {
            let kn = read_ptr(cgrp, off.cgroup_kn);
            let id = read_ptr(kn, off.kernfs_node_id);
            if let Some(entry) = CONTAINERS.get(&id) {
                found = found.or(&entry.policies);
                if container == 0 {
                    container = id;
                }
            }
        }
        if level == 0 {
            break;
        }
        // cgroup.self is the cgroup's own css; its parent css is the parent cgroup's.
        let parent_css = read_ptr(cgrp, off.cgroup_self + off.css_parent);
        cgrp = if parent_css == 0 {
            0
        } else {
            parent_css - off.cgroup_self
        };
        level -= 1;
    }
    if found.is_empty() {
        None
    } else {
        Some((container, found))
    }
}

/// Hash of the absolute path of `file` as seen from the current task's root, following
/// mount points like `d_path` does; see `rthooks_common::path_hash` for the scheme.
#[inline(always)]
unsafe fn file_path_hash(off: &KernelOffsets, file: u64) -> Option<u64> {
    let buf = NAME_BUF.get_ptr_mut(0)?;
    let task = bpf_get_current_task();
    let fs = read_ptr(task, off.task_fs);
    let root_mnt = read_ptr(fs, off.fs_struct_root + off.path_mnt);
    let root_dentry = read_ptr(fs, off.fs_struct_root + off.path_dentry);

    let mut vfsmnt = read_ptr(file, off.file_f_path + off.path_mnt);
    let mut dentry = read_ptr(file, off.file_f_path + off.path_dentry);
    if vfsmnt == 0 || dentry == 0 {
        return None;
    }
    // A memfd (or any file on a mount the kernel made for itself) was never reached by a
    // path: its "name" is whatever its creator chose, so no rule may match it.
    if read_u32(vfsmnt, off.vfsmount_mnt_flags) & MNT_INTERNAL != 0 {
        return None;
    }
    let mut hash = PATH_HASH_SEED;
    let mut step = 0u32;
    while step < MAX_PATH_COMPONENTS {
        step += 1;
        if dentry == root_dentry && vfsmnt == root_mnt {
            return Some(hash);
        }
        let mnt_root = read_ptr(vfsmnt, off.vfsmount_mnt_root);
        if dentry == mnt_root {
            // Top of this mount: continue from where it is mounted in its parent.
            let mount = vfsmnt - off.mount_mnt;
            let parent = read_ptr(mount, off.mount_mnt_parent);
            if parent == 0 || parent == mount {
                return Some(hash);
            }
            dentry = read_ptr(mount, off.mount_mnt_mountpoint);
            vfsmnt = parent + off.mount_mnt;
            continue;
        }
        let parent = read_ptr(dentry, off.dentry_d_parent);
        if parent == 0 || parent == dentry {
            return Some(hash);
        }
        let name = read_ptr(dentry, off.dentry_d_name + off.qstr_name);
        let len = read_u32(dentry, off.dentry_d_name + off.qstr_len) as usize & MAX_NAME_LEN;
        // Zero first so that the words past the name are zero (see PATH_HASH_WORDS).
        // Volatile stores: LLVM would otherwise turn the loop into a byte-wise memset,
        // 256 iterations the verifier has to walk for every component.
        let words = buf as *mut u64;
        let mut i = 0usize;
        while i < PATH_HASH_WORDS {
            core::ptr::write_volatile(words.add(i), 0);
            i += 1;
        }
        if bpf_probe_read_kernel(buf as *mut _, len as u32, name as *const _) != 0 {
            return None;
        }
        let words = &*buf;
        let mut i = 0usize;
        while i < PATH_HASH_WORDS {
            hash = path_hash_word(hash, words[i]);
            i += 1;
        }
        hash = path_hash_word(hash, len as u64);
        dentry = parent;
    }
    // Deeper than we follow: no rule can match a path we could not hash.
    None
}

/// The decision for an exec of `file` by the current task, with its event written.
#[inline(always)]
unsafe fn decide(file: u64) -> Option<Action> {
    let off = OFFSETS.get(0)?;
    if off.valid == 0 {
        return None;
    }
    let (container, policies) = current_policies(off)?;
    let hash = file_path_hash(off, file)?;
    let rules = BINARIES.get(&hash)?;
    let deny = rules.deny.and(&policies);
    let kill = rules.kill.and(&policies);
    let audit = rules.audit.and(&policies);
    let action = if !deny.is_empty() {
        Action::Deny
    } else if !kill.is_empty() {
        Action::Kill
    } else if !audit.is_empty() {
        Action::Audit
    } else {
        return None;
    };
    match EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            let pid_tgid = bpf_get_current_pid_tgid();
            entry.write(Event {
                kind: EVENT_EXEC,
                action: action as u32,
                pid: pid_tgid as u32,
                tgid: (pid_tgid >> 32) as u32,
                cgroup_id: bpf_get_current_cgroup_id(),
                container_cgroup_id: container,
                path_hash: hash,
                ktime_ns: bpf_ktime_get_ns(),
                deny,
                kill,
                audit,
                comm: bpf_get_current_comm().unwrap_or([0; 16]),
            });
            entry.submit(0);
        }
        None => count_drop(),
    }
    Some(action)
}

#[inline(always)]
fn count_drop() {
    if let Some(drops) = DROPS.get_ptr_mut(0) {
        unsafe { *drops += 1 };
    }
}

/// raw_tracepoint/sched_process_exec(struct task_struct *p, pid_t old_pid,
/// struct linux_binprm *bprm)
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn rthooks_exec_sigkill(ctx: RawTracePointContext) -> i32 {
    unsafe { kill_if_denied(ctx.arg(2)) };
    0
}

/// lsm/bprm_check_security(struct linux_binprm *bprm)
#[lsm(hook = "bprm_check_security")]
pub fn rthooks_exec_lsm(ctx: LsmContext) -> i32 {
    unsafe {
        // The argument is a BTF-typed pointer in LSM programs, and the verifier forbids
        // arithmetic on it with run-time offsets: read it as a plain number instead.
        let bprm = read_ptr(ctx.as_ptr() as u64, 0);
        let Some(off) = OFFSETS.get(0) else { return 0 };
        let file = read_ptr(bprm, off.binprm_file);
        if file == 0 {
            return 0;
        }
        match decide(file) {
            Some(Action::Deny) => -EPERM,
            Some(Action::Kill) => {
                bpf_send_signal(SIGKILL);
                0
            }
            _ => 0,
        }
    }
}

/// Where the exec cannot be refused, Deny is carried out as Kill.
#[inline(always)]
unsafe fn kill_if_denied(bprm: u64) {
    let Some(off) = OFFSETS.get(0) else { return };
    let file = read_ptr(bprm, off.binprm_file);
    if file == 0 {
        return;
    }
    if let Some(Action::Deny | Action::Kill) = decide(file) {
        bpf_send_signal(SIGKILL);
    }
}

/// fentry/security_bprm_check(struct linux_binprm *bprm)
#[fentry(function = "security_bprm_check")]
pub fn rthooks_exec_fentry(ctx: FEntryContext) -> i32 {
    unsafe {
        // A BTF-typed pointer, as in the LSM program: read it as a plain number.
        kill_if_denied(read_ptr(ctx.as_ptr() as u64, 0));
    }
    0
}

/// kprobe/security_bprm_check(struct linux_binprm *bprm)
#[kprobe(function = "security_bprm_check")]
pub fn rthooks_exec_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(bprm) = ctx.arg::<u64>(0) {
        unsafe { kill_if_denied(bprm) };
    }
    0
}

/// raw_tracepoint/cgroup_rmdir(struct cgroup *cgrp, const char *path)
#[raw_tracepoint(tracepoint = "cgroup_rmdir")]
pub fn rthooks_cgroup_rmdir(ctx: RawTracePointContext) -> i32 {
    let cgrp: u64 = ctx.arg(0);
    unsafe {
        let Some(off) = OFFSETS.get(0) else { return 0 };
        if off.valid == 0 {
            return 0;
        }
        // Only the unified (v2) hierarchy has id 0; v1 hierarchies number their cgroups
        // independently, so their ids could collide with registered v2 cgroups.
        let root = read_ptr(cgrp, off.cgroup_root);
        if root == 0 || read_u32(root, off.cgroup_root_hierarchy_id) != 0 {
            return 0;
        }
        let kn = read_ptr(cgrp, off.cgroup_kn);
        let id = read_ptr(kn, off.kernfs_node_id);
        if id == 0 || CONTAINERS.remove(&id).is_err() {
            return 0;
        }
        match EVENTS.reserve::<Event>(0) {
            Some(mut entry) => {
                entry.write(Event {
                    kind: EVENT_CGROUP_REMOVED,
                    action: 0,
                    pid: 0,
                    tgid: 0,
                    cgroup_id: id,
                    container_cgroup_id: id,
                    path_hash: 0,
                    ktime_ns: bpf_ktime_get_ns(),
                    deny: PolicySet::EMPTY,
                    kill: PolicySet::EMPTY,
                    audit: PolicySet::EMPTY,
                    comm: [0; 16],
                });
                entry.submit(0);
            }
            None => count_drop(),
        }
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
