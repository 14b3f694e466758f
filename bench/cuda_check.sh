#!/usr/bin/env bash
# CUDA check (not part of CI; issue 19): on a machine with one GPU, train nnUNetTrainerSDC_DC and
# nnUNetTrainerDiceCE for a few hundred iterations on the ACDC subset with nnU-Net's GPU defaults
# (AMP, torch.compile, augmentation workers), predict fold 0's validation cases with probabilities,
# run calib-evaluate on them, and print the time per iteration of both trainers and whether every
# loss of the package stays finite under autocast.
#
#   bash bench/cuda_check.sh [ACDC_FOLDER] [WORK_FOLDER]
#   (defaults: ../shared/data/acdc-subset and /tmp/calib_cuda_check; ITERATIONS=300 EPOCHS=3 to change)
#
# Run it in the environment calib-experiment uses (pip install nnunet-calibration, CUDA torch).
set -euo pipefail

SRC=${1:-../shared/data/acdc-subset}
WORK=${2:-/tmp/calib_cuda_check}
ITERATIONS=${ITERATIONS:-300}
EPOCHS=${EPOCHS:-3}
PER_EPOCH=$(( ITERATIONS / EPOCHS ))
TRAINERS=(nnUNetTrainerSDC_DC nnUNetTrainerDiceCE)

python - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("cuda_check: no CUDA device visible to torch; run this on a GPU machine")
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
EOF

# nnU-Net's GPU defaults: none of the CPU settings of this project's tests
unset nnUNet_compile nnUNet_def_n_proc nnUNet_npp nnUNet_nps nnUNet_n_proc_DA
export nnUNet_raw=$WORK/nnUNet_raw nnUNet_preprocessed=$WORK/nnUNet_preprocessed nnUNet_results=$WORK/nnUNet_results
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
DS=Dataset027_ACDC

if [ ! -d "$nnUNet_raw/$DS" ]; then calib-convert acdc "$SRC" -d 27; fi
if [ ! -d "$nnUNet_preprocessed/$DS/nnUNetPlans_2d" ]; then nnUNetv2_plan_and_preprocess -d 27 -c 2d; fi

# fold 0's validation images, for nnUNetv2_predict
VAL_IN=$WORK/val_images_fold0
rm -rf "$VAL_IN" && mkdir -p "$VAL_IN"
python - "$nnUNet_preprocessed/$DS/splits_final.json" "$nnUNet_raw/$DS/imagesTr" "$VAL_IN" <<'EOF'
import json, os, sys
from pathlib import Path
cases = json.load(open(sys.argv[1]))[0]["val"]
for f in Path(sys.argv[2]).iterdir():
    if f.name.rsplit("_", 1)[0] in cases:
        os.symlink(f, Path(sys.argv[3]) / f.name)
EOF

export NNUNET_CALIB_HPARAMS="num_epochs=$EPOCHS,num_iterations_per_epoch=$PER_EPOCH,num_val_iterations_per_epoch=10"
for T in "${TRAINERS[@]}"; do
    rm -rf "$nnUNet_results/$DS/${T}__nnUNetPlans__2d/fold_0"
    nnUNetv2_train 27 2d 0 -tr "$T" --npz
    nnUNetv2_predict -i "$VAL_IN" -o "$WORK/pred_$T" -d 27 -c 2d -f 0 -tr "$T" --save_probabilities
    calib-evaluate "$WORK/pred_$T" --gt "$nnUNet_raw/$DS/labelsTr" -o "$WORK/pred_$T/calibration" \
        --cases-from-split "$nnUNet_preprocessed/$DS/splits_final.json" 0
done

echo "=== summary ($ITERATIONS iterations: $EPOCHS epochs x $PER_EPOCH) ==="
python - "$nnUNet_results/$DS" "$PER_EPOCH" "$WORK" "${TRAINERS[@]}" <<'EOF'
import json, math, re, sys
from pathlib import Path
import torch
from nnunet_calibration.losses import available_losses, build_loss

root, per_epoch, work, trainers = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
ok = True
for t in trainers:
    logs = sorted((root / f"{t}__nnUNetPlans__2d" / "fold_0").glob("training_log_*.txt"))
    text = logs[-1].read_text() if logs else ""
    times = [float(x) for x in re.findall(r"Epoch time: ([\d.]+) s", text)]
    losses = [float(x) for x in re.findall(r"train_loss (\S+)", text)]
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    ok &= finite
    steady = times[1:] or times  # the first epoch includes torch.compile
    per_it = sum(steady) / len(steady) / per_epoch if steady else float("nan")
    summary = work / f"pred_{t}" / "calibration" / "summary.json"
    print(f"{t}: {per_it:.3f} s/iteration (epochs after the first), train losses finite: {finite}, "
          f"calib-evaluate: {'written' if summary.is_file() else 'MISSING'} {summary}")

# every loss of the package under autocast (fp16 logits, as nnU-Net's AMP gives them), forward and backward
dev = torch.device("cuda")
bad = []
for name in available_losses():
    loss = build_loss(name).to(dev)
    logits = (torch.randn(2, 4, 64, 64, device=dev) * 8).requires_grad_()
    target = torch.randint(0, 4, (2, 1, 64, 64), device=dev).float()
    extra = {"sdf_pred": torch.tanh(torch.randn(2, 3, 64, 64, device=dev))} if name.startswith("sdc") else {}
    with torch.autocast("cuda", dtype=torch.float16):
        value = loss(logits, target, **extra)
    value = value[0] if isinstance(value, (tuple, list)) else value
    value.float().backward()
    if not (torch.isfinite(value).all() and torch.isfinite(logits.grad).all()):
        bad.append(name)
print(f"losses under autocast: {len(available_losses()) - len(bad)}/{len(available_losses())} finite"
      + (f"; NOT finite: {bad}" if bad else ""))
sys.exit(0 if ok and not bad else 1)
EOF
