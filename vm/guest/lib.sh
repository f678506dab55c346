# Helpers for guest scenarios (sourced; see suite.sh for the contract).

# A JSON string literal: control characters dropped, quotes and backslashes escaped.
json_str() {
    local s
    s=$(printf '%s' "$1" | tr -d '\000-\010\013\014\016-\037')
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\t'/\\t}
    s=${s//$'\r'/\\r}
    s=${s//$'\n'/\\n}
    printf '"%s"' "$s"
}

_verdict() {
    printf '%s' "$1" >"$VERDICT_DIR/result"
    printf '%s' "$2" >"$VERDICT_DIR/reason"
    printf '%s' "$3" >"$VERDICT_DIR/detail"
    exit 0
}
pass() { _verdict pass "" "${1:-}"; }
fail() { _verdict fail "$1" "${2:-}"; }
skip() { _verdict skip "$1" "${2:-}"; }
mode() { printf '%s' "$1" >"$VERDICT_DIR/mode"; }

# wait_for SECONDS COMMAND...: polls every 0.2 s until COMMAND succeeds.
wait_for() {
    local deadline=$(($(date +%s) + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -ge "$deadline" ] && return 1
        sleep 0.2
    done
}

# The bpf LSM is active only when the kernel lists it (5.10 needs lsm=...,bpf).
lsm_has_bpf() {
    tr ',' '\n' </sys/kernel/security/lsm 2>/dev/null | grep -qx bpf
}

userland() { echo "$RTHOOKS_USERLAND/$1"; }
bin() { echo "$RTHOOKS_BIN_DIR/$1"; }

# ---- A real rthooks-agent for a scenario (the hook scenarios, scenarios/40-hook.sh) ----

# True when PID has exited (also when it is a zombie not yet reaped by `wait`).
_exited() {
    [ ! -e "/proc/$1" ] || [ "$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null)" = Z ]
}

# agent_start DIR [AGENT FLAGS...]: starts rthooks-agent with everything of its own in
# DIR: socket DIR/agent.sock, policies DIR/policies (write them before: the agent loads
# the directory before it answers), state DIR/state, events as JSON lines in
# DIR/events.jsonl, log DIR/agent.log; its pins in $AGENT_PIN (default
# /sys/fs/bpf/rthooks-e2e-<name of DIR>). Waits until it answers. Sets AGENT_DIR,
# AGENT_SOCK (unix://...), AGENT_PIN, AGENT_PID. Starting again with the same DIR after
# agent_stop is an agent restart (same state, pins and policies).
agent_start() {
    AGENT_DIR=$1
    shift
    : "${AGENT_PIN:=/sys/fs/bpf/rthooks-e2e-$(basename "$AGENT_DIR")}"
    AGENT_SOCK=unix://$AGENT_DIR/agent.sock
    mkdir -p "$AGENT_DIR/policies" "$AGENT_DIR/state"
    echo "=== agent_start $(date +%T) $*" >>"$AGENT_DIR/agent.log"
    NO_COLOR=1 "$(bin rthooks-agent)" --grpc-address "$AGENT_SOCK" --bpf-pin-dir "$AGENT_PIN" \
        --policy-dir "$AGENT_DIR/policies" --state-dir "$AGENT_DIR/state" \
        --events-file "$AGENT_DIR/events.jsonl" "$@" >>"$AGENT_DIR/agent.log" 2>&1 &
    AGENT_PID=$!
    local deadline=$(($(date +%s) + 120))
    until ctl status >/dev/null 2>&1; do
        if _exited "$AGENT_PID"; then
            wait "$AGENT_PID"
            echo "agent_start: the agent exited with status $? before answering"
            AGENT_PID=""
            return 1
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "agent_start: the agent did not answer within 120 s"
            return 1
        fi
        sleep 0.2
    done
}

# ctl ARGS...: rthooksctl against the scenario's agent.
ctl() { "$(bin rthooksctl)" --address "$AGENT_SOCK" "$@"; }

# agent_stop: SIGTERM, reaped within 30 s or SIGKILLed. Pins stay (enforcement goes on).
agent_stop() {
    [ -n "${AGENT_PID:-}" ] || return 0
    kill "$AGENT_PID" 2>/dev/null
    wait_for 30 _exited "$AGENT_PID" || kill -9 "$AGENT_PID" 2>/dev/null
    wait "$AGENT_PID" 2>/dev/null
    echo "=== agent stopped $(date +%T) (status $?)" >>"$AGENT_DIR/agent.log"
    AGENT_PID=""
}

# agent_cleanup: stops the agent, removes its pins (programs detach) and prints its log
# into the scenario's log.
agent_cleanup() {
    [ -n "${AGENT_DIR:-}" ] || return 0
    agent_stop
    "$(bin rthooks-agent)" --unpin --bpf-pin-dir "$AGENT_PIN" >>"$AGENT_DIR/agent.log" 2>&1 ||
        echo "agent_cleanup: unpinning $AGENT_PIN failed"
    [ -e "$AGENT_PIN" ] && echo "agent_cleanup: $AGENT_PIN still exists"
    sed 's/^/agent| /' "$AGENT_DIR/agent.log"
}

# agent_events: the events the agent wrote so far (JSON lines).
agent_events() { cat "$AGENT_DIR/events.jsonl" 2>/dev/null; }

# bpf_map_keys PINNED_MAP: the keys (u64, decimal, one a line) of a pinned BPF hash map,
# read from the kernel with the bpf(2) syscall (python3; no bpftool in the userland).
bpf_map_keys() {
    python3 - "$1" <<'PY'
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
def bpf(cmd, attr):  # x86_64: __NR_bpf = 321
    buf = ctypes.create_string_buffer(attr, 128)
    r = libc.syscall(321, cmd, buf, 128)
    return r if r >= 0 else -ctypes.get_errno()
path = ctypes.create_string_buffer(sys.argv[1].encode())
fd = bpf(7, struct.pack("=QII", ctypes.addressof(path), 0, 0))  # BPF_OBJ_GET
if fd < 0:
    sys.exit("BPF_OBJ_GET %s: %s" % (sys.argv[1], os.strerror(-fd)))
key, nxt, first = ctypes.create_string_buffer(8), ctypes.create_string_buffer(8), True
while True:  # BPF_MAP_GET_NEXT_KEY until ENOENT
    r = bpf(4, struct.pack("=IIQQ", fd, 0, 0 if first else ctypes.addressof(key), ctypes.addressof(nxt)))
    if r == -2:
        break
    if r < 0:
        sys.exit("BPF_MAP_GET_NEXT_KEY: %s" % os.strerror(-r))
    print(struct.unpack("=Q", nxt.raw)[0])
    ctypes.memmove(key, nxt, 8)
    first = False
PY
}
