# The agent's kernel integration tests (agent/tests/enforcement.rs), run unchanged in the
# guest: real programs on this kernel, in whatever mode the agent chooses here (lsm where
# bpf is an active LSM: a denied exec fails with EPERM; sigkill otherwise).
agent_kernel_tests() {
    local t
    t=$(ls -t "$RTHOOKS_BIN_DIR"/deps/enforcement-* 2>/dev/null | grep -v '\.d$' | head -n 1)
    [ -n "$t" ] && [ -x "$t" ] || skip "the agent's test binaries are not built (cargo test --no-run -p rthooks-agent)"
    local out
    if out=$("$t" --test-threads=1 2>&1); then
        local want=sigkill
        lsm_has_bpf && want=lsm
        echo "$out" | tail -n 20
        mode "$want"
        pass "$(echo "$out" | grep -m1 '^test result')"
    else
        echo "$out"
        fail "agent kernel tests failed" "$(echo "$out" | grep -E 'panicked|FAILED' | head -n 5 | tr '\n' ' ')"
    fi
}
scenario agent_kernel_tests "" agent_kernel_tests
