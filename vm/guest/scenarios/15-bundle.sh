# An OCI runtime from the guest userland runs a plain bundle (busybox rootfs) in the
# guest's cgroup v2: the path the runc/crun bundle scenarios build on.
bundle_runs() {
    local runtime=$1
    local rt
    rt=$(userland runtimes)/usr/sbin/$runtime
    [ -x "$rt" ] || rt=$(userland runtimes)/usr/bin/$runtime
    [ -x "$rt" ] || skip "$runtime is not unpacked (cargo xtask vm)"
    local b=/tmp/bundle-$runtime
    mkdir -p "$b/rootfs/bin" "$b/state"
    cp "$(userland busybox)/usr/bin/busybox" "$b/rootfs/bin/busybox"
    ln -s busybox "$b/rootfs/bin/sh"
    ln -s busybox "$b/rootfs/bin/cat"
    (cd "$b" && "$rt" spec) || fail "$runtime spec failed"
    # Not a terminal; print the cgroup the process landed in.
    jq '.process.terminal = false | .process.args = ["/bin/cat", "/proc/self/cgroup"]' \
        "$b/config.json" >"$b/config.new" && mv "$b/config.new" "$b/config.json"
    local out
    out=$(cd "$b" && "$rt" --root "$b/state" run "e2e-$runtime" 2>&1) ||
        fail "$runtime run failed" "$out"
    echo "$out"
    case $out in
    0::/*) pass "$("$rt" --version | head -n 1); cgroup $out" ;;
    *) fail "unexpected /proc/self/cgroup in the container" "$out" ;;
    esac
}
scenario bundle_runs runc bundle_runs runc
scenario bundle_runs crun bundle_runs crun
