# podman (with conmon and runc from the guest userland) imports a busybox rootfs and runs
# it: the path the hooks.d scenarios build on. Store and run state live in tmpfs.
podman_runs() {
    local u pm
    u=$(userland runtimes)
    pm=$u/usr/bin/podman
    [ -x "$pm" ] || skip "podman is not unpacked (cargo xtask vm)"
    local d=/tmp/podman
    mkdir -p "$d/rootfs/bin"
    cp "$(userland busybox)/usr/bin/busybox" "$d/rootfs/bin/busybox"
    ln -sf busybox "$d/rootfs/bin/cat"
    local opts=(--root "$d/root" --runroot "$d/runroot" --storage-driver vfs
        --cgroup-manager cgroupfs --events-backend file
        --conmon "$u/usr/bin/conmon" --runtime "$u/usr/sbin/runc")
    tar -C "$d/rootfs" -c . | "$pm" "${opts[@]}" import - localhost/bb:1 ||
        fail "podman import failed"
    local out
    out=$("$pm" "${opts[@]}" run --rm --network none localhost/bb:1 /bin/cat /proc/self/cgroup 2>&1) ||
        fail "podman run failed" "$out"
    echo "$out"
    case $out in
    *0::/*) pass "$("$pm" --version); cgroup ${out##*0::}" ;;
    *) fail "unexpected /proc/self/cgroup in the container" "$out" ;;
    esac
}
scenario podman_runs podman podman_runs
