#!/bin/bash
# The guest side of the e2e suite (run by the job `cargo xtask e2e` writes; see
# xtask/src/vm/mod.rs for the environment it sets): boot glue, then the one Rust
# scenario set, `rthooks-e2e guest` (e2e/src/scenarios/), which writes the plan and
# one result line per scenario into $RTHOOKS_RESULTS_DIR/results.jsonl and reads the
# filters (RTHOOKS_SCENARIO_FILTER, RTHOOKS_SCENARIO_EXCLUDE, RTHOOKS_GUEST_SHARE) and the per-scenario
# timeout (RTHOOKS_SCENARIO_TIMEOUT) from the environment.
set -u

# Libraries the guest userland brings that the host root lacks (crun's libyajl); /etc
# is a writable overlay in the guest.
if [ -d "$RTHOOKS_USERLAND/runtimes/usr/lib/x86_64-linux-gnu" ]; then
    echo "$RTHOOKS_USERLAND/runtimes/usr/lib/x86_64-linux-gnu" >/etc/ld.so.conf.d/zz-rthooks-userland.conf &&
        ldconfig || echo "suite: cannot add the userland libraries to the loader's path"
fi

results=$RTHOOKS_RESULTS_DIR/results.jsonl
mkdir -p "$RTHOOKS_RESULTS_DIR/logs"
: >"$results"

e2e_bin=$RTHOOKS_BIN_DIR/rthooks-e2e
if [ ! -x "$e2e_bin" ]; then
    echo "suite: $e2e_bin is not built (cargo build --bins)"
    exit 1
fi
echo "suite: running $e2e_bin guest"
"$e2e_bin" guest --results "$results"
rc=$?
sync
exit $rc
