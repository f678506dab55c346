# The agent loads its BPF programs, serves its API, and reports an enforcement mode that
# the kernel can honour: never "lsm" unless `bpf` is an active LSM (5.10 without
# lsm=...,bpf attaches LSM programs that never run).
agent_starts() {
    local agent ctl
    agent=$(bin rthooks-agent) ctl=$(bin rthooksctl)
    [ -x "$agent" ] || skip "rthooks-agent is not built"
    [ -x "$ctl" ] || skip "rthooksctl is not built"
    local run=/tmp/agent sock
    mkdir -p "$run/policies" "$run/state"
    sock=unix://$run/agent.sock
    # Its log is the scenario's log (results share).
    "$agent" --grpc-address "$sock" --bpf-pin-dir /sys/fs/bpf/rthooks-e2e --policy-dir "$run/policies" \
        --state-dir "$run/state" 2>&1 &
    local pid=$!
    if ! wait_for 60 "$ctl" --address "$sock" status; then
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            fail "the agent did not answer within 60 s"
        fi
        wait "$pid"
        fail "the agent exited with status $? before answering"
    fi
    local status m why
    status=$("$ctl" --address "$sock" status -o json)
    m=$(printf '%s' "$status" | jq -r .enforcement_mode)
    why=$(printf '%s' "$status" | jq -r '.enforcement_reason // ""')
    kill "$pid"
    wait "$pid" 2>/dev/null
    # Its pinned programs would otherwise keep enforcing for the rest of the guest.
    "$agent" --unpin --bpf-pin-dir /sys/fs/bpf/rthooks-e2e || echo "agent_starts: unpinning failed"
    mode "$m"
    case $m in
    lsm) lsm_has_bpf || fail "the agent claims LSM mode but bpf is not an active LSM" "$why" ;;
    fentry | kprobe | sigkill) ;;
    *) fail "unknown enforcement mode '$m'" "$status" ;;
    esac
    pass "$m${why:+: $why}"
}
scenario agent_starts "" agent_starts
