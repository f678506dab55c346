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
