# Sourced (not run) by references/lxt_env.sh and references/contextcite_env.sh: how both make
# their isolated virtual environment, idempotently, with torch pinned to the local CPU wheel.
#
#   venv_install NAME VENV TORCH_SPEC TRANSFORMERS_SPEC PACKAGE_SPEC [DEP_SPEC ...]
#       When VENV was completed before with the same specs (marker VENV/.NAME_complete), ends
#       the calling script at once (exit 0). Otherwise creates VENV if it has no python, then
#       installs torch alone first (the local CPU wheel), then transformers and the deps with
#       torch pinned again in the same command (so the resolver can never swap in a CUDA
#       build), then the package itself with --no-deps (its declared requirements are the
#       caller's business), and removes the vision/audio torch add-ons if anything pulled them
#       in. pip is quiet on success; on failure its log (VENV/.NAME_pip.log) is shown and the
#       script stops.
#   venv_verify <<'EOF' ... EOF
#       Runs the Python check on stdin in VENV; only when it passes is the marker written, so
#       an interrupted or broken install is redone on the next run.
#
# Environment: PYTHON, the interpreter that creates the venv (default python3).

venv_install() {
    VENV_NAME="$1" VENV="$2"
    local torch_spec="$3" transformers_spec="$4" package_spec="$5"
    shift 5
    local deps=("$@")
    VENV_SPEC="$torch_spec $transformers_spec $package_spec ${deps[*]}"
    VENV_MARKER="$VENV/.${VENV_NAME}_complete"
    if [[ -f "$VENV_MARKER" && "$(cat "$VENV_MARKER")" == "$VENV_SPEC" && -x "$VENV/bin/python" ]]; then
        exit 0
    fi

    export PIP_DISABLE_PIP_VERSION_CHECK=1
    rm -f "$VENV_MARKER"
    if [[ ! -x "$VENV/bin/python" ]]; then
        "${PYTHON:-python3}" -m venv "$VENV"
    fi
    VENV_LOG="$VENV/.${VENV_NAME}_pip.log"
    : > "$VENV_LOG"

    _venv_pip install "$torch_spec"
    _venv_pip install "$torch_spec" "$transformers_spec" "${deps[@]}"
    _venv_pip install --no-deps "$package_spec"
    local pkg
    for pkg in torchvision torchaudio torchcodec; do
        if "$VENV/bin/python" -m pip show -q "$pkg" >/dev/null 2>&1; then
            "$VENV/bin/python" -m pip -q uninstall -y "$pkg" >/dev/null 2>&1 || true
        fi
    done
}

_venv_pip() {
    if ! "$VENV/bin/python" -m pip -q "$@" >>"$VENV_LOG" 2>&1; then
        grep -v "^WARNING: Location 'file://" "$VENV_LOG" >&2 || true
        echo "$VENV_NAME.sh: pip $* failed (log: $VENV_LOG)" >&2
        exit 1
    fi
}

venv_verify() {
    "$VENV/bin/python" -
    printf '%s' "$VENV_SPEC" > "$VENV_MARKER"
}
