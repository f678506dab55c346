//! Just enough of a BTF reader to find kernel struct member offsets.
//!
//! aya's Rust eBPF programs get no CO-RE relocations, so the agent reads the running
//! kernel's layout from `/sys/kernel/btf/vmlinux` and hands the offsets to the programs in
//! the `OFFSETS` map before attaching them.
use std::collections::HashMap;

use rthooks_common::KernelOffsets;

use crate::error::Error;

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
}

struct Type {
    name_off: u32,
    kind: u32,
    /// Referenced type for modifiers/typedefs.
    type_id: u32,
    members: Vec<Member>,
}

pub struct Btf {
    types: Vec<Type>, // index = type id; 0 is void
    strings: Vec<u8>,
    structs_by_name: HashMap<String, u32>,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, Error> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
        .ok_or_else(|| Error::Btf("truncated".into()))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Btf, Error> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Btf::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Btf, Error> {
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != BTF_MAGIC {
            return Err(Error::Btf(
                "bad magic (only little-endian BTF is read)".into(),
            ));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types_data = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or_else(|| Error::Btf("type section out of bounds".into()))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or_else(|| Error::Btf("string section out of bounds".into()))?
            .to_vec();
        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            type_id: 0,
            members: vec![],
        }];
        let mut pos = 0usize;
        while pos < types_data.len() {
            let name_off = u32_at(types_data, pos)?;
            let info = u32_at(types_data, pos + 4)?;
            let size_or_type = u32_at(types_data, pos + 8)?;
            pos += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => pos += 4,
                KIND_ARRAY => pos += 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let base = pos + i * 12;
                        let offset = u32_at(types_data, base + 8)?;
                        members.push(Member {
                            name_off: u32_at(types_data, base)?,
                            type_id: u32_at(types_data, base + 4)?,
                            bit_offset: if kind_flag {
                                offset & 0x00ff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                    pos += vlen * 12;
                }
                KIND_ENUM => pos += vlen * 8,
                KIND_FUNC_PROTO => pos += vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => pos += vlen * 12,
                _ => {}
            }
            types.push(Type {
                name_off,
                kind,
                type_id: size_or_type,
                members,
            });
        }
        let mut btf = Btf {
            types,
            strings,
            structs_by_name: HashMap::new(),
        };
        for (id, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && !t.members.is_empty() {
                let name = btf.name(t.name_off).to_string();
                btf.structs_by_name.entry(name).or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        let end = s.iter().position(|b| *b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    fn skip_modifiers(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.type_id
                }
                _ => break,
            }
        }
        id
    }

    /// Bit offset of `member` in the struct/union `type_id`, looking through anonymous
    /// structs and unions as C does.
    fn member_bits(&self, type_id: u32, member: &str, depth: u32) -> Option<u32> {
        let t = self.types.get(self.skip_modifiers(type_id) as usize)?;
        for m in &t.members {
            if self.name(m.name_off) == member {
                return Some(m.bit_offset);
            }
        }
        if depth > 4 {
            return None;
        }
        t.members
            .iter()
            .filter(|m| m.name_off == 0 || self.name(m.name_off).is_empty())
            .find_map(|m| {
                self.member_bits(m.type_id, member, depth + 1)
                    .map(|inner| m.bit_offset + inner)
            })
    }

    /// Byte offset of `member` in `struct name`.
    pub fn offset(&self, name: &str, member: &str) -> Result<u64, Error> {
        let id = *self
            .structs_by_name
            .get(name)
            .ok_or_else(|| Error::Btf(format!("no struct {name}")))?;
        let bits = self
            .member_bits(id, member, 0)
            .ok_or_else(|| Error::Btf(format!("struct {name} has no member {member}")))?;
        Ok(u64::from(bits / 8))
    }

    /// Every offset the programs read.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, Error> {
        Ok(KernelOffsets {
            valid: 1,
            _pad: 0,
            binprm_file: self.offset("linux_binprm", "file")?,
            file_f_path: self.offset("file", "f_path")?,
            path_mnt: self.offset("path", "mnt")?,
            path_dentry: self.offset("path", "dentry")?,
            dentry_d_parent: self.offset("dentry", "d_parent")?,
            dentry_d_name: self.offset("dentry", "d_name")?,
            qstr_len: self.offset("qstr", "len")?,
            qstr_name: self.offset("qstr", "name")?,
            vfsmount_mnt_root: self.offset("vfsmount", "mnt_root")?,
            vfsmount_mnt_flags: self.offset("vfsmount", "mnt_flags")?,
            mount_mnt: self.offset("mount", "mnt")?,
            mount_mnt_parent: self.offset("mount", "mnt_parent")?,
            mount_mnt_mountpoint: self.offset("mount", "mnt_mountpoint")?,
            task_fs: self.offset("task_struct", "fs")?,
            fs_struct_root: self.offset("fs_struct", "root")?,
            cgroup_kn: self.offset("cgroup", "kn")?,
            cgroup_root: self.offset("cgroup", "root")?,
            kernfs_node_id: self.offset("kernfs_node", "id")?,
            cgroup_root_hierarchy_id: self.offset("cgroup_root", "hierarchy_id")?,
            task_cgroups: self.offset("task_struct", "cgroups")?,
            css_set_dfl_cgrp: self.offset("css_set", "dfl_cgrp")?,
            cgroup_level: self.offset("cgroup", "level")?,
            cgroup_self: self.offset("cgroup", "self")?,
            css_parent: self.offset("cgroup_subsys_state", "parent")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_kernel_offsets() {
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!("skipped: no /sys/kernel/btf/vmlinux");
            return;
        };
        let off = btf.kernel_offsets().unwrap();
        // Layouts that have been stable for years: struct path is {mnt, dentry}, a qstr
        // keeps its length in the upper half of hash_len (little endian) and the name
        // pointer right after.
        assert_eq!((off.path_mnt, off.path_dentry), (0, 8));
        assert_eq!((off.qstr_len, off.qstr_name), (4, 8));
        assert!(off.mount_mnt > 0 && off.task_fs > 0);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Btf::parse(b"nope").is_err());
        let mut hdr = vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0];
        hdr.extend_from_slice(&[0, 0, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(Btf::parse(&hdr).is_err());
    }
}
