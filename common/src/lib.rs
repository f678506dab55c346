//! The one definition of every map layout shared by the eBPF programs (`bpf/`) and the
//! agent. Everything here is `#[repr(C)]`, plain old data and `no_std`, because the same
//! bytes cross the user/kernel boundary; a layout changed here changes on both sides.
//!
//! The filter is built so that the per-exec cost does not grow with the number of
//! containers or policies:
//!
//! 1. `SETTINGS.cgroup_levels` says at which cgroup depths containers are registered
//!    (usually one or two depths on a node). For each such depth the program asks the
//!    kernel for the current task's ancestor cgroup id at that depth and looks it up in
//!    `CONTAINERS`. Looking up *ancestors* (not just the current cgroup) is what makes a
//!    container's identity cover every cgroup created below it: crun's single child
//!    cgroup, or a process that makes a nested cgroup to step out of a policy.
//! 2. The hit gives a [`PolicySet`]: a bitmap of the policy slots that select this
//!    container. An empty result ends the check (the common case for host processes).
//! 3. The executed file's path, resolved by the kernel, is hashed ([`path_hash`]) and
//!    looked up in `BINARIES`, which gives per-action bitmaps of the policies that name
//!    this binary. ANDing them with the container's set yields the decision.
#![no_std]

/// How many policies can be loaded at once (Tetragon's limit is 128 as well).
pub const MAX_POLICIES: usize = 128;
/// `u64` words in a [`PolicySet`].
pub const POLICY_WORDS: usize = MAX_POLICIES / 64;
/// Capacity of the `CONTAINERS` map (cgroups with at least one policy).
pub const MAX_CONTAINERS: u32 = 65_536;
/// Capacity of the `BINARIES` map (distinct binary paths over all policies).
pub const MAX_BINARIES: u32 = 16_384;
/// Deepest cgroup level the filter looks at (levels 0..MAX_CGROUP_LEVELS).
pub const MAX_CGROUP_LEVELS: u32 = 32;
/// Path components the kernel-side path walk follows before it gives up.
pub const MAX_PATH_COMPONENTS: u32 = 40;
/// Longest file name component (NAME_MAX).
pub const MAX_NAME_LEN: usize = 255;

/// Names under which maps and links are pinned in the agent's bpffs directory.
pub mod pins {
    pub const CONTAINERS: &str = "RTHOOKS_CONTAINERS";
    pub const BINARIES: &str = "RTHOOKS_BINARIES";
    pub const SETTINGS: &str = "RTHOOKS_SETTINGS";
    pub const OFFSETS: &str = "RTHOOKS_OFFSETS";
    pub const EVENTS: &str = "RTHOOKS_EVENTS";
    pub const DROPS: &str = "RTHOOKS_DROPS";
}

/// Program names (the Rust function names in `bpf/`).
pub mod programs {
    pub const EXEC_SIGKILL: &str = "rthooks_exec_sigkill";
    pub const EXEC_LSM: &str = "rthooks_exec_lsm";
    pub const EXEC_FENTRY: &str = "rthooks_exec_fentry";
    pub const EXEC_KPROBE: &str = "rthooks_exec_kprobe";
    pub const CGROUP_RMDIR: &str = "rthooks_cgroup_rmdir";
}

/// The kernel function the fentry and kprobe programs attach to: the LSM framework's own
/// entry for `bprm_check_security`, called whether or not the bpf LSM is active, once for
/// the executed file and again for each interpreter (`#!`, binfmt_misc) before it loads.
pub const BPRM_CHECK_FUNCTION: &str = "security_bprm_check";

/// `vfsmount.mnt_flags` bit of mounts the kernel made for itself (`kern_mount`: the tmpfs
/// behind memfd and SysV shm, pipes, sockets). Files there have no path anyone resolved.
pub const MNT_INTERNAL: u32 = 0x4000;

/// A bitmap of policy slots (slot = index of a loaded policy, 0..MAX_POLICIES).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq, Hash)]
pub struct PolicySet {
    pub words: [u64; POLICY_WORDS],
}

impl PolicySet {
    pub const EMPTY: PolicySet = PolicySet {
        words: [0; POLICY_WORDS],
    };

    #[inline(always)]
    pub fn insert(&mut self, slot: usize) {
        self.words[(slot / 64) % POLICY_WORDS] |= 1u64 << (slot % 64);
    }

    #[inline(always)]
    pub fn remove(&mut self, slot: usize) {
        self.words[(slot / 64) % POLICY_WORDS] &= !(1u64 << (slot % 64));
    }

    #[inline(always)]
    pub fn contains(&self, slot: usize) -> bool {
        slot < MAX_POLICIES && self.words[slot / 64] & (1u64 << (slot % 64)) != 0
    }

    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0
    }

    #[inline(always)]
    pub fn and(&self, other: &PolicySet) -> PolicySet {
        PolicySet {
            words: [
                self.words[0] & other.words[0],
                self.words[1] & other.words[1],
            ],
        }
    }

    #[inline(always)]
    pub fn or(&self, other: &PolicySet) -> PolicySet {
        PolicySet {
            words: [
                self.words[0] | other.words[0],
                self.words[1] | other.words[1],
            ],
        }
    }

    /// Slots in ascending order.
    pub fn slots(&self) -> impl Iterator<Item = usize> + '_ {
        (0..MAX_POLICIES).filter(move |s| self.contains(*s))
    }
}

/// Value of `CONTAINERS` (key: cgroup id, `u64`): the policies that select the container.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct ContainerPolicies {
    pub policies: PolicySet,
}

/// Value of `BINARIES` (key: [`path_hash`] of the binary's absolute path): for each
/// action, the policies that name this binary with that action.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct BinaryRules {
    pub deny: PolicySet,
    pub kill: PolicySet,
    pub audit: PolicySet,
}

/// `SETTINGS[0]`: small global knobs the agent changes at run time.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Bit `n` set: at least one registered container cgroup sits at depth `n`.
    pub cgroup_levels: u64,
}

/// `OFFSETS[0]`: kernel struct member offsets, read from the running kernel's BTF by the
/// agent before it attaches anything. aya's Rust programs get no CO-RE relocations, so
/// the agent supplies the layout instead; a zero `valid` makes the programs do nothing.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    pub valid: u32,
    pub _pad: u32,
    pub binprm_file: u64,
    pub file_f_path: u64,
    pub path_mnt: u64,
    pub path_dentry: u64,
    pub dentry_d_parent: u64,
    pub dentry_d_name: u64,
    pub qstr_len: u64,
    pub qstr_name: u64,
    pub vfsmount_mnt_root: u64,
    pub vfsmount_mnt_flags: u64,
    pub mount_mnt: u64,
    pub mount_mnt_parent: u64,
    pub mount_mnt_mountpoint: u64,
    pub task_fs: u64,
    pub fs_struct_root: u64,
    pub cgroup_kn: u64,
    pub cgroup_root: u64,
    pub kernfs_node_id: u64,
    pub cgroup_root_hierarchy_id: u64,
    pub task_cgroups: u64,
    pub css_set_dfl_cgrp: u64,
    pub cgroup_level: u64,
    pub cgroup_self: u64,
    pub css_parent: u64,
}

/// What the kernel did about an exec.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Audit = 1,
    Kill = 2,
    Deny = 3,
}

impl Action {
    pub fn from_u32(v: u32) -> Option<Action> {
        match v {
            1 => Some(Action::Audit),
            2 => Some(Action::Kill),
            3 => Some(Action::Deny),
            _ => None,
        }
    }
}

/// Event kinds in the ring buffer.
pub const EVENT_EXEC: u32 = 1;
pub const EVENT_CGROUP_REMOVED: u32 = 2;

/// One ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    pub kind: u32,
    /// [`Action`] as `u32` (exec events).
    pub action: u32,
    pub pid: u32,
    pub tgid: u32,
    /// The task's own cgroup id (exec) or the removed cgroup's id.
    pub cgroup_id: u64,
    /// The registered container cgroup (an ancestor or the cgroup itself) that matched.
    pub container_cgroup_id: u64,
    pub path_hash: u64,
    pub ktime_ns: u64,
    pub deny: PolicySet,
    pub kill: PolicySet,
    pub audit: PolicySet,
    pub comm: [u8; 16],
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    unsafe impl aya::Pod for PolicySet {}
    unsafe impl aya::Pod for ContainerPolicies {}
    unsafe impl aya::Pod for BinaryRules {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for KernelOffsets {}
}

/// Path hash scheme. The kernel walks dentries from the leaf up, so the hash folds the
/// path's components leaf first ("/usr/bin/curl": "curl", then "bin", then "usr"); each
/// component is zero-padded to [`PATH_HASH_WORDS`] little-endian 8-byte words, all of
/// which are folded, followed by its length. A fixed number of words means the kernel-side
/// loop has no data-dependent branch: the verifier sees one straight path per component
/// instead of one per possible name length, which keeps the walk within its limits.
pub const PATH_HASH_SEED: u64 = 0xcbf2_9ce4_8422_2325;
pub const PATH_HASH_MUL: u64 = 0x9e37_79b9_7f4a_7c15;
/// Words per component: NAME_MAX (255) bytes rounded up.
pub const PATH_HASH_WORDS: usize = (MAX_NAME_LEN + 1) / 8;

#[inline(always)]
pub fn path_hash_word(hash: u64, word: u64) -> u64 {
    let h = (hash ^ word).wrapping_mul(PATH_HASH_MUL);
    h ^ (h >> 29)
}

/// Folds one component (at most [`MAX_NAME_LEN`] bytes) into `hash`.
pub fn path_hash_component(mut hash: u64, component: &[u8]) -> u64 {
    let mut padded = [0u8; PATH_HASH_WORDS * 8];
    let len = component.len().min(MAX_NAME_LEN);
    padded[..len].copy_from_slice(&component[..len]);
    for chunk in padded.chunks(8) {
        hash = path_hash_word(hash, u64::from_le_bytes(chunk.try_into().unwrap()));
    }
    path_hash_word(hash, len as u64)
}

/// Userspace form of the kernel's path hash. `path` must be absolute and normalised
/// (no `.`/`..`); empty components (repeated `/`) are skipped.
pub fn path_hash(path: &[u8]) -> u64 {
    path.rsplit(|b| *b == b'/')
        .filter(|c| !c.is_empty())
        .fold(PATH_HASH_SEED, path_hash_component)
}

#[cfg(test)]
extern crate std;

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    #[test]
    fn path_hash_is_order_sensitive_and_ignores_repeated_slashes() {
        assert_eq!(path_hash(b"/usr/bin/curl"), path_hash(b"//usr/bin//curl"));
        assert_ne!(path_hash(b"/usr/bin/curl"), path_hash(b"/bin/usr/curl"));
        assert_ne!(path_hash(b"/usr/bin/curl"), path_hash(b"/usr/bin/cur"));
        assert_eq!(path_hash(b"/"), PATH_HASH_SEED);
    }

    #[test]
    fn path_hash_matches_leaf_first_word_fold() {
        let mut h = PATH_HASH_SEED;
        for (name, len) in [
            (*b"curl\0\0\0\0", 4),
            (*b"bin\0\0\0\0\0", 3),
            (*b"usr\0\0\0\0\0", 3),
        ] {
            h = path_hash_word(h, u64::from_le_bytes(name));
            for _ in 1..PATH_HASH_WORDS {
                h = path_hash_word(h, 0);
            }
            h = path_hash_word(h, len);
        }
        assert_eq!(path_hash(b"/usr/bin/curl"), h);
        // Component boundaries matter even when the bytes are the same.
        assert_ne!(path_hash(b"/ab/c"), path_hash(b"/a/bc"));
        assert_ne!(
            path_hash(b"/a/b"),
            path_hash(b"/a/b/"[..4].as_ref()).wrapping_add(1)
        );
    }

    #[test]
    fn policy_set_ops() {
        let mut a = PolicySet::EMPTY;
        a.insert(3);
        a.insert(127);
        assert!(a.contains(3) && a.contains(127) && !a.contains(4));
        assert!(!a.contains(128));
        let mut b = PolicySet::EMPTY;
        b.insert(127);
        assert_eq!(a.and(&b), b);
        a.remove(127);
        assert!(a.and(&b).is_empty());
        assert_eq!(a.or(&b).slots().collect::<Vec<_>>(), [3, 127]);
    }
}
