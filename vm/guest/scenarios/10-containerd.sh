# containerd from the guest userland starts with its root on tmpfs and answers ctr.
containerd_starts() {
    local name=$1 major=$2
    local dir=$(userland "$name")/usr/bin
    [ -x "$dir/containerd" ] || skip "$name is not unpacked (cargo xtask vm)"
    local run=/tmp/$name
    mkdir -p "$run"
    sed "s|@DIR@|$run|g" "$RTHOOKS_WORKSPACE/vm/guest/containerd/config-$major.toml" >"$run/config.toml"
    # Its log goes to the scenario's log (results share): start-up under TCG on a busy
    # host takes tens of seconds, and the log says where they went.
    PATH=$dir:$PATH "$dir/containerd" --config "$run/config.toml" 2>&1 &
    local pid=$!
    if ! wait_for 120 "$dir/ctr" --address "$run/containerd.sock" version; then
        kill "$pid" 2>/dev/null
        fail "containerd did not answer within 120 s"
    fi
    local v
    v=$("$dir/ctr" --address "$run/containerd.sock" version | awk '/Server:/ { s = 1 } s && /Version:/ { print $2; exit }')
    kill "$pid"
    wait "$pid" 2>/dev/null
    pass "server $v"
}
scenario containerd_starts containerd-1.7 containerd_starts containerd-1.7 1
scenario containerd_starts containerd-2.1 containerd_starts containerd-2.1 2
