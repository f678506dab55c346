# Enforcement through the OCI hook on the three runtime paths without CRI: a runc bundle,
# a crun bundle, and podman reading our hooks.d file. Each scenario is a whole stack of
# its own: the real rthooks-agent (own socket, pins, state, policy dir, events file), the
# real rthooks-oci-hook as the createRuntime hook, a policy file, and containers whose
# annotations carry the identity the hook reads (containerd CRI keys plus the
# rthooks.io/pod-labels annotation, which the agent is told to trust).
#
# The rootfs is busybox: /bin/sh, /bin/sleep, ... are links to /bin/busybox, the binary the
# policies name (the kernel resolves the links, so an applet *is* /bin/busybox).
# /bin/busybox-ok is a copy of it at another path, which no policy names: containers that
# must keep running use it (busybox runs `busybox-ok APPLET ...` as it runs `busybox
# APPLET ...`). /shared is a directory of the scenario bind-mounted into every container,
# so a container's first line leaves a file there.

HK_POLICIES=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../policies
HK_DENY=$(cat "$HK_POLICIES/deny-busybox-blocked.yaml")
HK_AUDIT=$(cat "$HK_POLICIES/audit-busybox-audited.yaml")

# hk_setup RUNTIME TOPIC POLICY_YAML: the stack for one scenario, everything under
# W=/tmp/hook-TOPIC-RUNTIME; cleaned up on exit (containers, agent, pins, cgroups).
hk_setup() {
    HK_RT=$1
    W=/tmp/hook-$2-$1
    HK_NAMES=()
    local b
    for b in rthooks-agent rthooksctl rthooks-oci-hook; do
        [ -x "$(bin "$b")" ] || skip "$b is not built"
    done
    HOOK=$(bin rthooks-oci-hook)
    rm -rf "$W"
    trap hk_cleanup EXIT
    trap 'exit 1' TERM INT
    mkdir -p "$W/shared" "$W/b" "$W/state" "$W/rootfs/bin" "$W/rootfs/shared"
    chmod 777 "$W/shared"
    cp "$(userland busybox)/usr/bin/busybox" "$W/rootfs/bin/busybox" ||
        skip "busybox is not unpacked (cargo xtask vm)"
    cp "$W/rootfs/bin/busybox" "$W/rootfs/bin/busybox-ok"
    for b in sh sleep cat echo true; do ln -s busybox "$W/rootfs/bin/$b"; done
    HK_CGROUP=rthooks-e2e-hook-$2-$1
    AGENT_PIN=/sys/fs/bpf/$HK_CGROUP
    HK_SOCK=unix://$W/agent/agent.sock
    HK_HOOK_ARGS=("--grpc-address=$HK_SOCK" "--log-fname=$W/hook.log"
        "--config-file=/nonexistent/rthooks-oci-hook.json")
    HK_HOOK_TIMEOUT=5
    if [ "${RTHOOKS_VM_ACCEL:-}" = tcg ]; then
        # Under TCG a registration takes the debug agent 0.6-1.9 s (four hooks at once):
        # too close to the hook's 2 s default deadline to tell enforcement from timing.
        HK_HOOK_ARGS+=("--grpc-timeout=10s")
        HK_HOOK_TIMEOUT=15
    fi
    HK_HOOK_ARGS_JSON=$(jq -cn '$ARGS.positional' --args -- "${HK_HOOK_ARGS[@]}")
    local u
    u=$(userland runtimes)
    case $HK_RT in
    runc | crun)
        RT=$u/usr/sbin/$HK_RT
        [ -x "$RT" ] || RT=$u/usr/bin/$HK_RT
        [ -x "$RT" ] || skip "$HK_RT is not unpacked (cargo xtask vm)"
        (cd "$W" && "$RT" spec) || fail "$HK_RT spec failed"
        mv "$W/config.json" "$W/base.json"
        HK_VERSION=$("$RT" --version | head -n 1)
        ;;
    podman)
        PM=$u/usr/bin/podman
        [ -x "$PM" ] || skip "podman is not unpacked (cargo xtask vm)"
        local out setup
        setup=$(bin rthooks-setup)
        [ -x "$setup" ] || skip "rthooks-setup is not built"
        out=$("$setup" install hooks-d --binary "$HOOK" --hooks-dir "$W/hooks.d" --install-dir "$W/opt" \
            --state-dir "$W/install-state" --hook-timeout "$HK_HOOK_TIMEOUT" "${HK_HOOK_ARGS[@]/#/--hook-arg=}" 2>&1) ||
            fail "rthooks-setup install hooks-d failed" "$out"
        echo "$out"
        cat "$W/hooks.d/rthooks.json" || fail "install hooks-d wrote no $W/hooks.d/rthooks.json"
        PM_OPTS=(--root "$W/pm/root" --runroot "$W/pm/runroot" --tmpdir "$W/pm/tmp"
            --storage-driver vfs --cgroup-manager cgroupfs --events-backend file
            --conmon "$u/usr/bin/conmon" --runtime "$u/usr/sbin/runc" --hooks-dir "$W/hooks.d")
        tar -C "$W/rootfs" -c . | "$PM" "${PM_OPTS[@]}" import - localhost/bb:1 >/dev/null ||
            fail "podman import failed"
        HK_VERSION=$("$PM" --version)
        ;;
    *) fail "unknown runtime $HK_RT" ;;
    esac
    mkdir -p "$W/agent/policies"
    printf '%s' "$3" >"$W/agent/policies/policy.yaml"
    hk_agent_start
}

# The agent, trusting the labels annotation; reconciliation is slowed down so that a
# removed container is forgotten through the kernel's cgroup_rmdir event, not the sweep.
hk_agent_start() {
    agent_start "$W/agent" --trust-label-annotation --reconcile-interval 60m ||
        fail "the agent did not start" "$(tail -n 5 "$W/agent/agent.log" | tr '\n' ' ')"
    local s
    s=$(ctl status -o json) || fail "rthooksctl status failed"
    MODE=$(printf '%s' "$s" | jq -r .enforcement_mode)
    mode "$MODE"
    [ "$(printf '%s' "$s" | jq .policies)" = 1 ] || fail "the agent did not load the policy" "$s"
}

hk_cleanup() {
    set +e
    local n
    for n in "${HK_NAMES[@]}"; do hk_rm "$n"; done
    agent_cleanup
    [ -n "${HK_CGROUP:-}" ] && [ -d "/sys/fs/cgroup/$HK_CGROUP" ] &&
        find "/sys/fs/cgroup/$HK_CGROUP" -depth -type d -exec rmdir {} \; 2>/dev/null
    echo "--- hook log"
    cat "$W/hook.log" 2>/dev/null
    rm -rf "$W"
}

# The CRI annotations of container NAME in pod pod-NAME (jq: $n, $ns, $l, $uid).
HK_ANNOTATIONS='{
    "io.kubernetes.cri.container-type": "container",
    "io.kubernetes.cri.container-name": $n,
    "io.kubernetes.cri.image-name": "localhost/bb:1",
    "io.kubernetes.cri.sandbox-name": ("pod-" + $n),
    "io.kubernetes.cri.sandbox-uid": $uid,
    "io.kubernetes.cri.sandbox-namespace": $ns,
    "rthooks.io/pod-labels": $l }'

# hk_annotations NAME NAMESPACE LABELS_JSON: those annotations as a JSON object.
hk_annotations() {
    jq -cn --arg n "$1" --arg ns "$2" --arg l "$3" --arg uid "$(cat /proc/sys/kernel/random/uuid)" "$HK_ANNOTATIONS"
}

# hk_bundle NAME NAMESPACE LABELS_JSON CMD...: $W/b/NAME/config.json, with the hook as
# createRuntime hook (OCI timeout as install hooks-d writes it). One jq: under TCG each process
# start counts.
hk_bundle() {
    local name=$1 ns=$2 labels=$3
    shift 3
    mkdir -p "$W/b/$name"
    jq --arg root "$W/rootfs" --arg shared "$W/shared" --arg cg "/$HK_CGROUP/$name" \
        --arg n "$name" --arg ns "$ns" --arg l "$labels" --arg uid "$(cat /proc/sys/kernel/random/uuid)" \
        --arg hook "$HOOK" --argjson hookargs "$HK_HOOK_ARGS_JSON" "
        .process.terminal = false | .process.args = \$ARGS.positional
        | .root = {path: \$root, readonly: true}
        | .linux.cgroupsPath = \$cg | .annotations = $HK_ANNOTATIONS
        | .hooks = {createRuntime: [{path: \$hook, args: ([\"rthooks-oci-hook\", \"createRuntime\"] + \$hookargs), timeout: $HK_HOOK_TIMEOUT}]}
        | .mounts += [{destination: \"/shared\", type: \"bind\", source: \$shared, options: [\"rbind\", \"rw\"]}]" \
        "$W/base.json" --args -- "$@" >"$W/b/$name/config.json"
}

hk_podman_args() {
    local a
    a=(--name "$1" --network none -v "$W/shared:/shared:rw")
    local k v
    # podman parses --annotation as CSV: quote values with quotes or commas (JSON).
    while IFS=$'\t' read -r k v; do
        case $v in
        *[\",]*) a+=(--annotation "\"$k=${v//\"/\"\"}\"") ;;
        *) a+=(--annotation "$k=$v") ;;
        esac
    done < <(
        hk_annotations "$1" "$2" "$3" | jq -r 'to_entries[] | "\(.key)\t\(.value)"')
    printf '%s\0' "${a[@]}"
}

# hk_run NAME NAMESPACE LABELS_JSON CMD...: a fresh container run in the foreground and
# removed afterwards; sets HK_OUT (its output and the runtime's) and HK_RC.
hk_run() {
    local name=$1 ns=$2 labels=$3
    shift 3
    case $HK_RT in
    runc | crun)
        hk_bundle "$name" "$ns" "$labels" "$@"
        HK_OUT=$("$RT" --root "$W/state" run --bundle "$W/b/$name" "$name" </dev/null 2>&1)
        HK_RC=$?
        "$RT" --root "$W/state" delete -f "$name" >/dev/null 2>&1
        ;;
    podman)
        local a
        mapfile -d '' a < <(hk_podman_args "$name" "$ns" "$labels")
        HK_OUT=$("$PM" "${PM_OPTS[@]}" run --rm "${a[@]}" localhost/bb:1 "$@" </dev/null 2>&1)
        HK_RC=$?
        "$PM" "${PM_OPTS[@]}" rm -f -t 0 "$name" >/dev/null 2>&1
        ;;
    esac
    echo "run $name ($ns $labels) $*: rc=$HK_RC: $HK_OUT"
}

# hk_start NAME NAMESPACE LABELS_JSON CMD...: a container left running (removed at
# cleanup); sets HK_OUT, HK_RC.
hk_start() {
    local name=$1 ns=$2 labels=$3
    shift 3
    HK_NAMES+=("$name")
    case $HK_RT in
    runc | crun)
        hk_bundle "$name" "$ns" "$labels" "$@"
        # The container inherits these descriptors: a file, not a pipe, or $(...) would
        # wait for the container to end.
        "$RT" --root "$W/state" run -d --bundle "$W/b/$name" "$name" </dev/null >"$W/$name.out" 2>&1
        HK_RC=$?
        ;;
    podman)
        local a
        mapfile -d '' a < <(hk_podman_args "$name" "$ns" "$labels")
        "$PM" "${PM_OPTS[@]}" run -d "${a[@]}" localhost/bb:1 "$@" </dev/null >"$W/$name.out" 2>&1
        HK_RC=$?
        ;;
    esac
    HK_OUT=$(cat "$W/$name.out")
    echo "start $name ($ns $labels) $*: rc=$HK_RC: $HK_OUT"
}

# hk_exec NAME CMD...: a process in a running container; sets HK_OUT, HK_RC. In these
# guests (PID 1 chroots into the host root) the process joins the container's namespaces
# and cgroup, but setns(2) leaves it at the mount namespace's root, the initramfs, not
# the container's rootfs: only paths that exist there (/bin/busybox, /bin/sh) work.
hk_exec() {
    local name=$1
    shift
    case $HK_RT in
    runc | crun) HK_OUT=$("$RT" --root "$W/state" exec "$name" "$@" </dev/null 2>&1) ;;
    podman) HK_OUT=$("$PM" "${PM_OPTS[@]}" exec "$name" "$@" </dev/null 2>&1) ;;
    esac
    HK_RC=$?
    echo "exec in $name: $*: rc=$HK_RC: $HK_OUT"
}

# hk_rm NAME: kills and deletes a container (its cgroup goes away).
hk_rm() {
    case $HK_RT in
    runc | crun)
        "$RT" --root "$W/state" kill "$1" KILL >/dev/null 2>&1
        "$RT" --root "$W/state" delete -f "$1"
        ;;
    podman) "$PM" "${PM_OPTS[@]}" rm -f -t 0 "$1" >/dev/null ;;
    esac
}

# hk_running NAME: the container's process is alive.
hk_running() {
    case $HK_RT in
    runc | crun) [ "$("$RT" --root "$W/state" state "$1" 2>/dev/null | jq -r .status)" = running ] ;;
    podman) [ "$("$PM" "${PM_OPTS[@]}" inspect -f '{{.State.Running}}' "$1" 2>/dev/null)" = true ] ;;
    esac
}

# hk_decision NAME: the hook's decision for container NAME at createRuntime (last one).
hk_decision() {
    jq -r --arg n "$1" 'select(.stage == "createRuntime" and .container_name == $n) | .decision' \
        "$W/hook.log" 2>/dev/null | tail -n 1
}

# hk_event_count NAME ACTION: enforcement events of ACTION on /bin/busybox that name
# container NAME (pod pod-NAME).
hk_event_count() {
    agent_events | jq -c --arg n "$1" --arg a "$2" 'select(.action == $a and .binary == "/bin/busybox"
        and .container.container_name == $n and .container.pod_name == ("pod-" + $n))' | wc -l
}
hk_has_event() { [ "$(hk_event_count "$1" "$2")" -ge 1 ]; }

# The action an enforcement event reports for a Deny rule in this mode.
hk_deny_action() { [ "$MODE" = lsm ] && echo deny || echo kill; }

# hk_refused_by_kernel NAME: container NAME's first exec was refused (lsm: the runtime
# reports EPERM; sigkill: the process died of SIGKILL) and its first line never ran.
# Prints why not, on failure.
hk_refused_by_kernel() {
    local name=$1
    if [ -e "$W/shared/$name" ]; then
        echo "its first line ran (/shared/$name written; rc $HK_RC)"
        return 1
    fi
    [ "$HK_RC" != 0 ] || {
        echo "it exited 0"
        return 1
    }
    case $MODE in
    lsm)
        case $HK_OUT in
        *"operation not permitted"* | *"Operation not permitted"*) ;;
        *)
            echo "no EPERM in the runtime's error (rc $HK_RC): $HK_OUT"
            return 1
            ;;
        esac
        ;;
    fentry | kprobe | sigkill)
        [ "$HK_RC" = 137 ] || {
            echo "exit status $HK_RC, not 137 (SIGKILL): $HK_OUT"
            return 1
        }
        ;;
    esac
}

# 1. A container matching a Deny policy on /bin/busybox, whose entrypoint is busybox,
# never runs it: 20 fresh containers, none writes its first line.
hook_first_instruction() {
    hk_setup "$1" first "$HK_DENY"
    # Four at a time: in a TCG guest on a busy host a start takes runc ~3 s and podman
    # ~10 s (~7 s each, four at a time). More at once does not help: the agent registers
    # one container at a time (0.5-0.9 s each under TCG), so eight concurrent podman
    # hooks waited up to 7.5 s for it.
    local i j name why n=20 par=4 refused=0 registered=0
    mkdir -p "$W/runs"
    local pids
    for ((i = 1; i <= n; i += par)); do
        pids=()
        for ((j = i; j < i + par && j <= n; j++)); do
            name=first-$j
            (
                hk_run "$name" shop '{"app":"blocked","tier":"web"}' /bin/sh -c "echo ran >/shared/$name"
                printf '%s' "$HK_RC" >"$W/runs/$name.rc"
                printf '%s' "$HK_OUT" >"$W/runs/$name.out"
            ) &
            pids+=($!)
        done
        wait "${pids[@]}" # not a bare wait: the agent is a child too
    done
    for i in $(seq 1 $n); do
        name=first-$i
        HK_RC=$(cat "$W/runs/$name.rc") HK_OUT=$(cat "$W/runs/$name.out")
        why=$(hk_refused_by_kernel "$name") || fail "start $i of $n: $why" "$why"
        refused=$((refused + 1))
    done
    registered=$(jq -r 'select(.stage == "createRuntime" and .decision == "registered") | .container_name' \
        "$W/hook.log" | grep -c '^first-')
    [ "$registered" = "$n" ] ||
        fail "the hook registered $registered of $n containers" "$(tail -n 3 "$W/hook.log")"
    local act
    act=$(hk_deny_action)
    _all_events() {
        [ "$(agent_events | jq -r --arg a "$act" 'select(.action == $a and .binary == "/bin/busybox"
            and .container.pod_name == ("pod-" + .container.container_name)) | .container.container_name' |
            grep '^first-' | sort -u | wc -l)" = "$n" ]
    }
    wait_for 30 _all_events || fail "not every start has a '$act' event naming its container and pod" \
        "$(agent_events | tail -n 3)"
    local how="EPERM at exec"
    [ "$MODE" = lsm ] || how="SIGKILL (exit 137)"
    pass "$refused/$n refused ($MODE: $how; $par at a time), first line never ran; $n/$n '$act' events name pod and container; $HK_VERSION"
}

# 2. Same binary, labels that do not match: the container runs.
hook_non_matching() {
    hk_setup "$1" nonmatch "$HK_DENY"
    hk_run nonmatch shop '{"app":"web","tier":"blocked"}' /bin/sh -c 'echo ran >/shared/nonmatch; echo hello-from-nonmatch'
    [ "$(hk_decision nonmatch)" = registered ] ||
        fail "the hook did not register the container ($(hk_decision nonmatch))" "$(tail -n 3 "$W/hook.log")"
    [ "$HK_RC" = 0 ] || fail "exit status $HK_RC" "$HK_OUT"
    case $HK_OUT in *hello-from-nonmatch*) ;; *) fail "its output is missing" "$HK_OUT" ;; esac
    [ -e "$W/shared/nonmatch" ] || fail "/shared/nonmatch was not written" "$HK_OUT"
    [ "$(agent_events | wc -l)" = 0 ] || fail "the agent reported events for it" "$(agent_events | head -n 3)"
    pass "registered, labels app=web: exit 0, output seen, no event; $HK_VERSION"
}

# 3. An Audit policy: the container runs, and the event carries its identity.
hook_audit() {
    hk_setup "$1" audit "$HK_AUDIT"
    hk_run audit team-a '{"app":"audited","tier":"web"}' /bin/sh -c 'echo ran >/shared/audit; echo hello-from-audit'
    [ "$HK_RC" = 0 ] || fail "exit status $HK_RC" "$HK_OUT"
    case $HK_OUT in *hello-from-audit*) ;; *) fail "its output is missing" "$HK_OUT" ;; esac
    [ -e "$W/shared/audit" ] || fail "/shared/audit was not written" "$HK_OUT"
    _audit_event() {
        agent_events | jq -e -s 'map(select(.action == "audit" and .binary == "/bin/busybox"
            and .container.pod_namespace == "team-a" and .container.pod_name == "pod-audit"
            and .container.container_name == "audit" and .container.pod_labels.app == "audited"
            and .container.pod_labels.tier == "web")) | length > 0'
    }
    wait_for 30 _audit_event || fail "no audit event with the container's namespace, pod, labels and name" \
        "$(agent_events | head -n 3)"
    local e
    e=$(agent_events | jq -c 'select(.action == "audit") | {policies, c: .container | {pod_namespace, pod_name, container_name, pod_labels}}' | head -n 1)
    pass "exit 0, output seen; event $e; $HK_VERSION"
}

# The long-running container's entrypoint: it runs each command line written to
# /shared/req-N (through `eval`, so in a child process of its shell) and leaves its output
# and exit status in /shared/out-N and /shared/rc-N. Everything it runs itself is
# busybox-ok, which no policy names. (The exec is done by the container's own process:
# `runc exec`/`crun exec` processes land outside the container's root in these guests,
# see hk_exec.)
HK_SERVER='while :; do
    for f in /shared/req-*; do
        [ -e "$f" ] || continue
        read -r c <"$f"; n=${f#/shared/req-}; /bin/busybox-ok rm -f "$f"
        eval "$c" >"/shared/out-$n" 2>&1; echo $? >"/shared/rc-$n"
    done
    /bin/busybox-ok sleep 0.2
done'

# hk_in_container N CMDLINE: has the running hk_start'ed HK_SERVER container run
# CMDLINE; sets HK_OUT, HK_RC.
hk_in_container() {
    printf '%s\n' "$2" >"$W/shared/.req-$1"
    mv "$W/shared/.req-$1" "$W/shared/req-$1"
    wait_for 60 test -s "$W/shared/rc-$1" || {
        HK_RC=timeout HK_OUT="the container did not run it within 60 s"
        return 1
    }
    HK_RC=$(cat "$W/shared/rc-$1") HK_OUT=$(cat "$W/shared/out-$1")
    echo "in the container: $2: rc=$HK_RC: $HK_OUT"
}

# hk_exec_refused: the last hk_exec/hk_in_container was refused by the kernel (lsm:
# EPERM; sigkill: SIGKILL, status 137). Prints why not, on failure.
hk_exec_refused() {
    [ "$HK_RC" != 0 ] || {
        echo "it exited 0"
        return 1
    }
    case $MODE in
    lsm) case $HK_OUT in *"not permitted"*) ;; *)
        echo "no EPERM (rc $HK_RC): $HK_OUT"
        return 1
        ;;
    esac ;;
    fentry | kprobe | sigkill) [ "$HK_RC" = 137 ] || {
        echo "status $HK_RC, not 137 (SIGKILL): $HK_OUT"
        return 1
    } ;;
    esac
}

# 4. The agent down: the hook fails closed except in kube-system; a container matched
# while the agent ran stays enforced (pinned programs); after a restart new containers
# are covered again.
hook_agent_down() {
    hk_setup "$1" down "$HK_DENY"
    local act why
    act=$(hk_deny_action)
    hk_start down-long shop '{"app":"blocked"}' /bin/busybox-ok sh -c "$HK_SERVER"
    [ "$HK_RC" = 0 ] || fail "the long-running container did not start (rc $HK_RC)" "$HK_OUT"
    wait_for 30 hk_running down-long || fail "the long-running container is not running"
    [ "$(hk_decision down-long)" = registered ] || fail "the hook did not register down-long"
    hk_in_container ok1 '/bin/busybox-ok true' && [ "$HK_RC" = 0 ] ||
        fail "busybox-ok did not run in down-long (rc $HK_RC)" "$HK_OUT"
    hk_in_container deny1 '/bin/busybox sh -c "echo ran >/shared/ran-deny1"'
    why=$(hk_exec_refused) || fail "with the agent up, busybox in down-long: $why" "$why"
    [ ! -e "$W/shared/ran-deny1" ] || fail "with the agent up, busybox ran in down-long"

    agent_stop
    ctl status >/dev/null 2>&1 && fail "the agent still answers after it was stopped"

    # Fail closed: a normal namespace is refused before anything runs in it.
    hk_run down-shop shop '{"app":"web"}' /bin/busybox-ok sh -c 'echo ran >/shared/down-shop'
    [ "$HK_RC" != 0 ] || fail "a container in 'shop' started without the agent" "$HK_OUT"
    [ ! -e "$W/shared/down-shop" ] || fail "the refused container ran"
    [ "$(hk_decision down-shop)" = refused ] || fail "the hook's decision was '$(hk_decision down-shop)', not refused"
    # runc and podman put the hook's stderr in their error; crun only its exit status.
    case $HK_RT:$HK_OUT in *refusing* | crun:*"exit code: 1"*) ;;
    *) fail "the runtime's error does not carry the hook's reason" "$HK_OUT" ;;
    esac
    local shop_rc=$HK_RC
    # kube-system is on the allow list.
    hk_run down-ks kube-system '{"app":"web"}' /bin/busybox-ok sh -c 'echo ran >/shared/down-ks'
    [ "$HK_RC" = 0 ] && [ -e "$W/shared/down-ks" ] ||
        fail "a kube-system container did not run without the agent (rc $HK_RC)" "$HK_OUT"
    [ "$(hk_decision down-ks)" = allowed-unregistered ] ||
        fail "the hook's decision was '$(hk_decision down-ks)', not allowed-unregistered"
    # The pinned programs still enforce for down-long: from its own process, and in a
    # process the runtime adds to it (exec joins its cgroup).
    hk_in_container ok2 '/bin/busybox-ok true' && [ "$HK_RC" = 0 ] ||
        fail "with the agent down, busybox-ok did not run in down-long (rc $HK_RC)" "$HK_OUT"
    hk_in_container deny2 '/bin/busybox sh -c "echo ran >/shared/ran-deny2"'
    why=$(hk_exec_refused) || fail "with the agent down, busybox in down-long: $why" "$why"
    [ ! -e "$W/shared/ran-deny2" ] || fail "with the agent down, busybox ran in down-long"
    local in_rc=$HK_RC
    hk_exec down-long /bin/sh -c 'echo ran'
    why=$(hk_exec_refused) || fail "with the agent down, $HK_RT exec of busybox in down-long: $why" "$why"
    local exec_rc=$HK_RC
    hk_running down-long || fail "down-long is not running any more"

    hk_agent_start
    ctl containers -o json | jq -e '.[] | select(.container_name == "down-long")' >/dev/null ||
        fail "the restarted agent does not list down-long" "$(ctl containers)"
    hk_run down-after shop '{"app":"blocked"}' /bin/sh -c 'echo ran >/shared/down-after'
    why=$(hk_refused_by_kernel down-after) || fail "after the restart: $why" "$why"
    [ "$(hk_decision down-after)" = registered ] || fail "the restarted agent did not register down-after"
    wait_for 30 hk_has_event down-after "$act" || fail "no '$act' event for down-after" "$(agent_events | tail -n 3)"
    pass "agent down: shop refused by the hook (rc $shop_rc), kube-system ran; in the running matched container busybox still refused (own process rc $in_rc, $HK_RT exec rc $exec_rc); after restart: listed again, a new container refused ($MODE); $HK_VERSION"
}

# 5. After the container is deleted the agent forgets it and its map entry is gone.
hook_removal() {
    hk_setup "$1" removal "$HK_DENY"
    hk_start removal shop '{"app":"blocked"}' /bin/busybox-ok sleep 600
    [ "$HK_RC" = 0 ] || fail "the container did not start (rc $HK_RC)" "$HK_OUT"
    wait_for 30 hk_running removal || fail "the container is not running"
    local c id cmap=$AGENT_PIN/RTHOOKS_CONTAINERS
    c=$(ctl containers -o json | jq -c '.[] | select(.container_name == "removal")')
    [ -n "$c" ] || fail "the agent does not list the container" "$(ctl containers)"
    echo "listed: $c"
    id=$(printf '%s' "$c" | jq -r .cgroup_id)
    [ "$(printf '%s' "$c" | jq -r '.policies | length')" -ge 1 ] || fail "no policy selects it" "$c"
    [ -e "$cmap" ] || fail "no pinned map at $cmap" "$(ls "$AGENT_PIN")"
    local keys
    keys=$(bpf_map_keys "$cmap") || fail "cannot read $cmap" "$keys"
    echo "$cmap: $keys"
    grep -qx "$id" <<<"$keys" || fail "cgroup id $id is not in $cmap" "$keys"
    [ "$(ctl status -o json | jq '.maps[] | select(.name == "containers") | .entries')" = 1 ] ||
        fail "the agent's status does not count one container map entry" "$(ctl status)"

    local t0=$(date +%s.%N)
    hk_rm removal || fail "deleting the container failed"
    HK_NAMES=()
    _forgotten() {
        ! ctl containers -o json | jq -e '.[] | select(.container_name == "removal")' &&
            ! bpf_map_keys "$cmap" | grep -qx "$id" &&
            [ "$(ctl status -o json | jq '.maps[] | select(.name == "containers") | .entries')" = 0 ]
    }
    wait_for 30 _forgotten || fail "30 s after the delete, the agent or the map still has it" \
        "$(ctl containers); map: $(bpf_map_keys "$cmap" | tr '\n' ' ')"
    local took
    took=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    local via="reconciliation"
    grep -q "cgroup removed; container forgotten" "$W/agent/agent.log" && via="the kernel's cgroup_rmdir event"
    pass "cgroup id $id: listed and in RTHOOKS_CONTAINERS before; ${took} s after delete: not listed, map key gone (bpf syscall), status 0 entries (via $via); $HK_VERSION"
}

for rt in runc crun podman; do
    scenario hook_first_instruction "$rt" hook_first_instruction "$rt"
    scenario hook_non_matching "$rt" hook_non_matching "$rt"
    scenario hook_audit "$rt" hook_audit "$rt"
    scenario hook_agent_down "$rt" hook_agent_down "$rt"
    scenario hook_removal "$rt" hook_removal "$rt"
done
