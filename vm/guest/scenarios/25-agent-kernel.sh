# The agent's kernel integration tests (agent/tests/enforcement.rs, exec_semantics.rs),
# run unchanged in the guest: real programs on this kernel, in whatever mode the agent
# chooses here (lsm where bpf is an active LSM: a denied exec fails with EPERM; fentry,
# kprobe or sigkill otherwise: SIGKILL), or in a forced one (the agents the tests start
# read RTHOOKS_ENFORCEMENT). One scenario per test binary: under TCG each takes minutes.

# agent_test_binary NAME: this run's build of agent/tests/NAME.rs, as cargo named it to
# cargo xtask e2e (RTHOOKS_TEST_BINARIES: NAME=PATH lines; nothing if it is not there).
agent_test_binary() {
    local line
    while IFS= read -r line; do
        if [ "${line%%=*}" = "$1" ] && [ -x "${line#*=}" ]; then
            echo "${line#*=}"
            return
        fi
    done <<<"${RTHOOKS_TEST_BINARIES:-}"
}

# agent_tests SUITE [MODE [TEST FILTER]]: runs agent/tests/SUITE.rs (with
# RTHOOKS_ENFORCEMENT=MODE unless MODE is auto), records the mode the agents chose.
agent_tests() {
    local suite=$1 forced=${2:-auto} filter=${3:-} t modes out m
    [ "$forced" = auto ] || export RTHOOKS_ENFORCEMENT=$forced
    t=$(agent_test_binary "$suite")
    modes=$(agent_test_binary exec_semantics)
    [ -n "$t" ] && [ -n "$modes" ] ||
        skip "the agent's test binaries were not built by this run (cargo xtask e2e without --no-build builds them)"
    # The mode the agents choose here, and why (that test prints it).
    out=$("$modes" --exact the_chosen_mode_is_reported_with_its_reason --nocapture 2>&1)
    m=$(echo "$out" | sed -n 's/^rthooks enforcement mode: //p' | head -n 1)
    echo "enforcement mode: $m"
    if [ -z "$m" ]; then
        echo "$out" | tail -n 30
        if [ "$forced" != auto ] && echo "$out" | grep -q 'mode requested but unavailable'; then
            skip "--enforcement $forced is not available on this kernel" \
                "$(echo "$out" | grep -m1 -o "not $forced:[^\"]*" | head -c 300)"
        fi
        fail "the agent did not start" "$(echo "$out" | grep -m1 -E 'panicked|exited')"
    fi
    mode "${m%% *}"
    # shellcheck disable=SC2086 # an empty filter runs every test
    if out=$("$t" --test-threads=1 $filter 2>&1); then
        echo "$out" | tail -n 20
        pass "$(echo "$out" | grep -m1 '^test result')"
    else
        echo "$out"
        fail "agent kernel tests ($suite) failed" "$(echo "$out" | grep -E 'panicked|FAILED' | head -n 5 | tr '\n' ' ')"
    fi
}
scenario agent_kernel_tests "" agent_tests enforcement
scenario agent_kernel_exec_semantics "" agent_tests exec_semantics
# The kprobe path, forced where auto would choose lsm or fentry: every exec row, and
# enforcement through an agent crash (its link is pinned). Named apart, so that
# `--scenario agent_kernel` and `--scenario agent_kprobe` select one half each.
scenario agent_kprobe_exec_semantics "" agent_tests exec_semantics kprobe
scenario agent_kprobe_restart "" agent_tests enforcement kprobe enforcement_survives_an_agent_crash_and_restart
