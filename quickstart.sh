#!/usr/bin/env bash
# Quick start: one command sets up and runs the end-to-end demo, one sets up and runs the tests.
#
#   bash quickstart.sh demo [ACDC_FOLDER]   # default ../shared/data/acdc-subset; "synthetic" for the embedded toy data
#   bash quickstart.sh test [PYTEST_ARGS]    # pytest -n 2 [PYTEST_ARGS]
#
# Set-up: a virtual environment (.venv, or $VENV) and a normal, non-editable `pip install .[test]`,
# as a user installs it (so the trainers are found by nnU-Net's -tr lookup).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
what="${1:-}"; shift || true
case "$what" in demo|test) ;; *) echo "usage: bash quickstart.sh demo [ACDC_FOLDER] | test [PYTEST_ARGS]" >&2; exit 2;; esac

VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet ".[test]"

# nnU-Net on small CPU machines: no worker pools, no torch.compile (see nnunet_calibration/nnunet_utils.py)
export nnUNet_compile="${nnUNet_compile:-f}" nnUNet_def_n_proc="${nnUNet_def_n_proc:-1}"
export nnUNet_npp="${nnUNet_npp:-0}" nnUNet_nps="${nnUNet_nps:-0}"

if [ "$what" = demo ]; then
    if [ $# -eq 0 ]; then
        if [ -d ../shared/data/acdc-subset/database ]; then
            set -- ../shared/data/acdc-subset
        else
            cat >&2 <<'MSG'
No ACDC data at ../shared/data/acdc-subset: running the demo on the embedded synthetic dataset instead.
For the real demo, download ACDC (https://www.creatis.insa-lyon.fr/Challenge/acdc/, "database" folder with
training/patientXXX/) and run:   bash quickstart.sh demo /path/to/ACDC
(calib-demo converts it itself; by hand: calib-convert acdc /path/to/ACDC -d 27, then calib-plan-small 27).
MSG
            set -- synthetic
        fi
    fi
    if [ "$1" = synthetic ]; then shift; exec "$VENV/bin/calib-demo" "$@"; fi
    exec "$VENV/bin/calib-demo" "$@"
else
    # run pytest from the venv's bin so the *installed* package (and nnU-Net plugin) is what is tested;
    # two pytest-xdist workers (README "Development"); later arguments win (e.g. -n 0)
    exec "$VENV/bin/pytest" -n 2 "$@"
fi
