#!/bin/bash
# Wall time of `rthooks-oci-hook createRuntime` against the real agent (README, "Performance").
# Run as root from the workspace root after building:
#   cargo build --release --target x86_64-unknown-linux-musl -p rthooks-oci-hook
#   cargo build --release -p rthooks-agent
# Env: HOOK, AGENT (binaries), RUNS (1000), OUT (/tmp/hookbench), HYPERFINE (hyperfine).
set -euo pipefail
T=${CARGO_TARGET_DIR:-target}
HOOK=${HOOK:-$T/x86_64-unknown-linux-musl/release/rthooks-oci-hook}
AGENT=${AGENT:-$T/release/rthooks-agent}
RUNS=${RUNS:-1000}
OUT=${OUT:-/tmp/hookbench}
HF=${HYPERFINE:-hyperfine}
HERE=$(cd "$(dirname "$0")" && pwd)
HOOK=$(realpath "$HOOK"); AGENT=$(realpath "$AGENT")

# The bundle: a containerd-like spec whose cgroup exists (the agent resolves its id).
B=/tmp/hb
CG=/sys/fs/cgroup/unified/rthooks-bench-hook
[ -d /sys/fs/cgroup/unified ] || CG=/sys/fs/cgroup/rthooks-bench-hook   # pure cgroup v2
mkdir -p "$B/rootfs" "$OUT/state" "$OUT/policies" "$CG"
cp "$HERE/config.json" "$HERE/state.json" "$B/"

# The real agent on its own socket, pin directory and state, so nothing else collides.
"$AGENT" --grpc-address "unix://$OUT/agent.sock" --bpf-pin-dir /sys/fs/bpf/rthooks-hookbench \
  --state-dir "$OUT/state" --policy-dir "$OUT/policies" --log-level warn >"$OUT/agent.log" 2>&1 &
APID=$!
trap 'kill $APID 2>/dev/null; wait $APID 2>/dev/null; "$AGENT" --unpin --bpf-pin-dir /sys/fs/bpf/rthooks-hookbench >/dev/null 2>&1 || true' EXIT
for _ in $(seq 100); do [ -S "$OUT/agent.sock" ] && break; sleep 0.1; done

# hyperfine >= 1.16 feeds the state on stdin; older ones run in the bundle directory,
# where the hook finds config.json as it does when a runtime passes no state.
INPUT=()
if "$HF" --help | grep -q -- '--input'; then INPUT=(--input "$B/state.json"); fi
cd "$B"
run() { # name, command, extra hyperfine flags...
  local name=$1 cmd=$2; shift 2
  "$HF" -N --warmup 50 --runs "$RUNS" "$@" --export-json "$OUT/$name.json" "$cmd" >/dev/null 2>&1
}
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
rm -f "$OUT"/up.log "$OUT"/down.log
run up "$HOOK createRuntime --grpc-address unix://$OUT/agent.sock --log-fname $OUT/up.log" "${INPUT[@]}"
# Agent down: the hook refuses (exit 1), which hyperfine must not treat as a failure.
run down "$HOOK createRuntime --grpc-address unix://$OUT/none.sock --log-fname $OUT/down.log" -i "${INPUT[@]}"
run true /bin/true
echo "load after:  $(cut -d' ' -f1-3 /proc/loadavg)"
echo "binary: $(stat -c %s "$HOOK") bytes"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def pct(t, p): return t[min(len(t) - 1, int(len(t) * p))]
for name in ["up", "down", "true"]:
    r = json.load(open(f"{out}/{name}.json"))["results"][0]
    t = sorted(r["times"])
    print(f"{name:5} wall p50 {pct(t,.5)*1e3:.2f} ms  p90 {pct(t,.9)*1e3:.2f}  p99 {pct(t,.99)*1e3:.2f}"
          f"  (user {r['user']*1e3:.2f} ms, sys {r['system']*1e3:.2f} ms)")
for name in ["up", "down"]:
    lines = [json.loads(l) for l in open(f"{out}/{name}.log")]
    dec = sorted({l["decision"] for l in lines})
    t = sorted(l["total_ms"] for l in lines)
    print(f"{name:5} decisions {dec}; in-process p50 {pct(t,.5):.3f} ms p99 {pct(t,.99):.3f}")
PY
