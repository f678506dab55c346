# CRI-O is not obtainable on the project's machines; with its binaries (--crio-dir) the
# CRI scenarios will run against it too. Until then the column says why it is empty,
# and is never reported as passing.
crio_available() {
    [ -n "${RTHOOKS_CRIO_DIR:-}" ] ||
        skip "CRI-O not obtainable here (no --crio-dir with crio, pinns, conmon)"
    local b
    for b in crio pinns conmon; do
        [ -x "$RTHOOKS_CRIO_DIR/$b" ] || fail "$b is missing in --crio-dir $RTHOOKS_CRIO_DIR"
    done
    skip "CRI-O binaries found, but the CRI-O scenarios are not written yet" "$("$RTHOOKS_CRIO_DIR/crio" --version 2>&1 | head -n 1)"
}
scenario crio_available crio crio_available
