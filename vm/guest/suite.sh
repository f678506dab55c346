#!/bin/bash
# The guest-side e2e suite runner (run by the job `cargo xtask e2e` writes; see
# xtask/src/vm/mod.rs for the environment it sets).
#
# Scenarios live in scenarios/*.sh. Each file defines functions and registers them:
#     scenario NAME RUNTIME FUNCTION [ARGS...]
# A scenario function runs in its own bash, under a timeout, with its output in
# $RTHOOKS_RESULTS_DIR/logs/, and ends with exactly one verdict:
#     pass [DETAIL]   fail REASON [DETAIL]   skip REASON [DETAIL]
# optionally after `mode lsm|fentry|kprobe|sigkill` for the enforcement mode it observed.
# No verdict (or a non-zero exit without one) is a failure.
#
# Results are JSON lines in $RTHOOKS_RESULTS_DIR/results.jsonl: first the plan, then one
# object per scenario. A test binary (the e2e crate's CRI scenarios) can add its own
# lines to the same file with the same fields.
set -u
here=$(dirname "$(readlink -f "$0")")
. "$here/lib.sh"

# Libraries the guest userland brings that the host root lacks (crun's libyajl); /etc
# is a writable overlay in the guest.
if [ -d "$RTHOOKS_USERLAND/runtimes/usr/lib/x86_64-linux-gnu" ]; then
    echo "$RTHOOKS_USERLAND/runtimes/usr/lib/x86_64-linux-gnu" >/etc/ld.so.conf.d/zz-rthooks-userland.conf &&
        ldconfig || echo "suite: cannot add the userland libraries to the loader's path"
fi

results=$RTHOOKS_RESULTS_DIR/results.jsonl
logs=$RTHOOKS_RESULTS_DIR/logs
mkdir -p "$logs"
: >"$results"

NAMES=() RUNTIMES=() CALLS=()
scenario() {
    local name=$1 runtime=$2
    shift 2
    if [ -n "${RTHOOKS_SCENARIO_FILTER:-}" ] && [[ $name != *"$RTHOOKS_SCENARIO_FILTER"* ]]; then
        return
    fi
    # Another guest runs these (cargo xtask e2e --crio-guest).
    if [ -n "${RTHOOKS_SCENARIO_EXCLUDE:-}" ] && [[ "$name $runtime" == *"$RTHOOKS_SCENARIO_EXCLUDE"* ]]; then
        return
    fi
    NAMES+=("$name") RUNTIMES+=("$runtime") CALLS+=("$*")
}
for f in "$here"/scenarios/*.sh; do . "$f"; done

plan='{"plan":['
for i in "${!NAMES[@]}"; do
    [ "$i" -gt 0 ] && plan+=','
    plan+="{\"scenario\":$(json_str "${NAMES[$i]}"),\"runtime\":$(json_str "${RUNTIMES[$i]}")}"
done
echo "$plan]}" >>"$results"

uname_r=$(uname -r)
failed=0
for i in "${!NAMES[@]}"; do
    name=${NAMES[$i]} runtime=${RUNTIMES[$i]}
    tag=$name${runtime:+-$runtime}
    vdir=$(mktemp -d)
    echo "suite: $tag ..."
    t0=$(date +%s.%N)
    # shellcheck disable=SC2086 # CALLS holds a function name and its words
    VERDICT_DIR=$vdir timeout -k 5 "${RTHOOKS_SCENARIO_TIMEOUT:-180}" \
        bash -c '. "$1/lib.sh"; scenario() { :; }; for f in "$1"/scenarios/*.sh; do . "$f"; done; shift; "$@"' \
        _ "$here" ${CALLS[$i]} </dev/null >"$logs/$tag.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    seconds=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
    result=$(cat "$vdir/result" 2>/dev/null)
    reason=$(cat "$vdir/reason" 2>/dev/null)
    detail=$(cat "$vdir/detail" 2>/dev/null)
    mode=$(cat "$vdir/mode" 2>/dev/null)
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        result=fail reason="timed out after ${RTHOOKS_SCENARIO_TIMEOUT:-180} s"
    elif [ -z "$result" ]; then
        result=fail reason="no verdict (exit code $rc)"
    fi
    if [ "$result" = fail ] && [ -z "$detail" ]; then
        detail=$(tail -n 5 "$logs/$tag.log" | tr '\n' ' ')
    fi
    rm -rf "$vdir"
    printf '{"scenario":%s,"runtime":%s,"result":%s,"reason":%s,"detail":%s,"seconds":%s,"enforcement_mode":%s,"uname":%s}\n' \
        "$(json_str "$name")" "$(json_str "$runtime")" "$(json_str "$result")" "$(json_str "$reason")" \
        "$(json_str "$detail")" "$seconds" "$(json_str "$mode")" "$(json_str "$uname_r")" >>"$results"
    echo "suite: $tag -> $result${reason:+: $reason} (${seconds} s)"
    if [ "$result" = fail ]; then
        failed=$((failed + 1))
        sed 's/^/suite:   | /' "$logs/$tag.log" | tail -n 20
    fi
done

# The e2e crate's scenarios (CRI-driven), when its binary has the `guest` subcommand: it
# appends its own plan and result lines to the same file (see vm/README.md).
e2e_bin=$RTHOOKS_BIN_DIR/rthooks-e2e
if [ -x "$e2e_bin" ] && "$e2e_bin" guest --help >/dev/null 2>&1; then
    echo "suite: running $e2e_bin guest"
    "$e2e_bin" guest --results "$results" || failed=$((failed + 1))
fi
sync
echo "suite: ${#NAMES[@]} shell scenario(s), $failed failed"
[ "$failed" = 0 ]
