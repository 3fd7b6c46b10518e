#!/usr/bin/env bash
# The tests, as CI runs them (.ci/run calls this with CI=true), from any folder:
#
#   bash scripts/test.sh              # install what the tests need, then ruff, the suite, the long group
#   QUICK=1 bash scripts/test.sh      # quicker development subset: requirements-test.txt, ruff, the suite only
#   bash scripts/test.sh -x           # arguments go to each pytest run
#
# The optional extras are installed where they cannot disturb the pinned stack of requirements.txt. One that
# cannot be installed is reported (a WARNING line, repeated at the end) and its tests skip and say why (-rs);
# the rest still runs. pytest's exit status 5 (no test ran) counts as a failure.
set -euo pipefail

# 1 = quicker development subset: no optional extras, no `long` group (not what CI runs)
QUICK="${QUICK:-0}"
# the FID parity virtualenv (pytorch-fid + torchvision), kept across runs on the same machine (~6 GB, ~6 min once)
export SD_PARITY_VENV="${SD_PARITY_VENV:-$HOME/.cache/sd-parity-venv}"
# free space (KiB) the parity virtualenv needs before it is made
PARITY_FREE_KB="${PARITY_FREE_KB:-10000000}"

cd "$(dirname "$0")/.."
warnings=()
warn() {
    echo "WARNING: $*" >&2
    warnings+=("$*")
}

apt_updated=0
apt_install() {  # Debian package $1 when its command $2 is missing
    command -v "$2" >/dev/null 2>&1 && return 0
    if [ "$apt_updated" = 0 ]; then
        apt-get update -qq || return 1
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
}

install_extras() {
    # PyTorch side of tests/integration/test_interop.py and the CLIP parity test (CPU wheel only, see the file)
    if ! python -m pip install --quiet -r requirements-interop.txt; then
        warn "pip install -r requirements-interop.txt failed: the PyTorch interop and CLIP parity tests will be skipped"
    fi
    # img2dataset for tests/integration/test_img2dataset.py, in a virtualenv of its own in the repository, where
    # the test looks (its dependencies would disturb the pinned stack)
    if ! { [ -x .venv-img2dataset/bin/img2dataset ] || { python -m venv .venv-img2dataset \
            && .venv-img2dataset/bin/python -m pip install --quiet -r requirements-img2dataset.txt; }; }; then
        warn "installing requirements-img2dataset.txt into .venv-img2dataset failed: the img2dataset tests will be skipped"
        rm -rf .venv-img2dataset
    fi
    # the elastic-launch test (tests/integration/test_elastic.py): the etcd3 client and Debian's etcd server (the
    # test starts its own loopback instance)
    if ! python -m pip install --quiet -r requirements-elastic.txt; then
        warn "pip install -r requirements-elastic.txt failed: the elastic launcher test will be skipped"
    fi
    if ! apt_install etcd-server etcd; then
        warn "apt-get install etcd-server failed: the elastic launcher test will be skipped"
    fi
    # headless Chromium for tests/integration/test_visualdl_browser.py
    if ! apt_install chromium chromium; then
        warn "apt-get install chromium failed: the VisualDL browser test will be skipped"
    fi
    # the FID parity virtualenv (requirements-parity.txt; its pins are x86_64 wheels)
    if ! "$SD_PARITY_VENV/bin/python" -c "import pytorch_fid.inception, torchvision" >/dev/null 2>&1; then
        local parity_pins free_kb
        case "$(uname -m)" in
            x86_64) parity_pins=(-r requirements-parity.txt) ;;
            *) parity_pins=(torch==2.9.1 torchvision==0.24.1 pytorch-fid==0.3.0 scipy pillow) ;;
        esac
        mkdir -p "$(dirname "$SD_PARITY_VENV")"
        free_kb=$(df -Pk "$(dirname "$SD_PARITY_VENV")" | awk 'NR==2 {print $4}')
        if [ "${free_kb:-0}" -lt "$PARITY_FREE_KB" ] || ! { rm -rf "$SD_PARITY_VENV" && python -m venv "$SD_PARITY_VENV" \
                && "$SD_PARITY_VENV/bin/python" -m pip install --quiet "${parity_pins[@]}"; }; then
            warn "the FID parity venv ($SD_PARITY_VENV) could not be created (needs ~6 GB free and the" \
                 "torch/torchvision wheels): the pytorch-fid parity tests will be skipped"
            rm -rf "$SD_PARITY_VENV"
        fi
    fi
}

run_pytest() {  # pytest with the given arguments; exit status 5 (no test collected) is a failure too
    local status=0
    python -m pytest "$@" || status=$?
    if [ "$status" = 5 ]; then
        echo "error: python -m pytest $* ran no test" >&2
        return 1
    fi
    return "$status"
}

report_warnings() {
    local w
    for w in "${warnings[@]+"${warnings[@]}"}"; do
        echo "WARNING: $w" >&2
    done
}
trap report_warnings EXIT

python -m pip install --quiet -r requirements-test.txt
# CLIP's BPE merges for the real-size kit's tokenizer (open_clip's package data; --no-deps: no PyTorch)
python -m pip install --quiet --no-deps -r requirements-kit.txt
if [ "$QUICK" != 1 ]; then
    install_extras
fi
ruff check .
run_pytest -q -rs tests "$@"
if [ "$QUICK" != 1 ]; then
    # the long integration and parity runs (pyproject.toml), after the suite, one at a time (some are timed:
    # etcd leases)
    run_pytest -q -rs -m long -n 0 tests "$@"
fi
