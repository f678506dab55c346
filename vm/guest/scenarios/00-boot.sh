# The guest booted into the host root with the mounts the agent needs.
boot_check() {
    local btf=no lsm cg=no bpffs=no
    [ -r /sys/kernel/btf/vmlinux ] && btf=yes
    lsm=$(cat /sys/kernel/security/lsm 2>/dev/null || echo '?')
    grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts && cg=yes
    grep -q ' /sys/fs/bpf bpf ' /proc/mounts && bpffs=yes
    local bpf_lsm=no
    lsm_has_bpf && bpf_lsm=yes
    local detail="btf=$btf bpf_lsm=$bpf_lsm lsm=$lsm cgroup2=$cg bpffs=$bpffs"
    echo "$detail"
    [ "$btf" = yes ] || fail "no BTF at /sys/kernel/btf/vmlinux" "$detail"
    [ "$cg" = yes ] && [ "$bpffs" = yes ] || fail "cgroup2 or bpffs missing" "$detail"
    pass "$detail"
}
scenario boot "" boot_check
