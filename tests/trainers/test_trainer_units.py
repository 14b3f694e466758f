"""In-process checks of the trainers: registration, deep-supervision weights, SDC's SDF head wiring,
start-up errors. Expected values are computed here from nnU-Net's own trainer and from the losses
called directly."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

import nnunet_calibration.trainers as T
from nnunet_calibration.losses import LOSSES, CrossEntropy, build_loss
from nnunet_calibration.trainers.sdf_head import SDFHeadLoss, SDFHeadNetwork, unwrap_network

from trainers_testlib import ds_wrapper, make_trainer, random_targets


# ------------------------------------------------------------------ registration (no data needed)
def _nnunet_trainer_class_names() -> set:
    import nnunetv2

    root = Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"
    names = set()
    for py in root.rglob("*.py"):
        if "zz_nnunet_calibration" in py.parts:
            continue
        tree = ast.parse(py.read_text(encoding="utf-8", errors="replace"))
        names |= {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    return names


def test_trainers_exported_unique_and_documented():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    ours = set(T.TRAINER_NAMES)
    assert len(ours) == len(T.TRAINER_NAMES)
    assert ours <= set(T.__all__)
    clash = ours & _nnunet_trainer_class_names()
    assert not clash, f"names already used by nnU-Net: {clash}"
    for name in T.TRAINER_NAMES:
        cls = getattr(T, name)
        assert cls.__name__ == name and issubclass(cls, nnUNetTrainer)
        assert cls.__doc__ and cls.__doc__.strip(), name
    # the list, including every morphological variant and every _DC variant
    for op in ("Erosion", "Dilation", "Opening", "Closing", "Gradient", "InternalBoundary", "ExternalBoundary"):
        assert f"nnUNetTrainerNACL_Morph{op}" in ours and f"nnUNetTrainerSVLS_Morph{op}" in ours
    for base in ("Focal", "ECP", "LS", "SVLS", "MbLS", "NACL", "NACL_mean", "FCL", "SDC"):
        assert f"nnUNetTrainer{base}" in ours and f"nnUNetTrainer{base}_DC" in ours
    for extra in ("DSCPlusPlus", "DSCPlusPlusCE", "CE_ACE", "Dice_ACE", "DiceCE_ACE"):
        assert f"nnUNetTrainer{extra}" in ours


def test_loss_keys_exist_and_table1_defaults():
    for cls in T.CALIBRATION_TRAINERS:
        # registry name valid and the hyperparameters accepted by the loss constructor
        trainer_like = cls.__new__(cls)
        name = cls.registry_name(trainer_like)
        build_loss(name, **cls.loss_hparams)
    assert T.nnUNetTrainerFocal.loss_hparams == {"gamma": 3.0}
    assert T.nnUNetTrainerECP.loss_hparams == {"lam": 0.1}
    assert T.nnUNetTrainerLS.loss_hparams == {"alpha": 0.1}
    assert T.nnUNetTrainerSVLS.loss_hparams == {"sigma": 2.0}
    assert T.nnUNetTrainerMbLS.loss_hparams == {"margin": 10.0, "alpha": 0.1}
    assert T.nnUNetTrainerNACL.loss_hparams["alpha"] == 0.1 and T.nnUNetTrainerNACL.loss_key == "nacl_min"
    assert T.nnUNetTrainerFCL.loss_hparams == {"gamma": 3.0, "lam": 0.1}
    assert T.nnUNetTrainerSDC.loss_hparams == {"alpha": 0.1, "lambda_sdf": 0.1}
    assert T.nnUNetTrainerDSCPlusPlus.loss_hparams == {"gamma": 2.0}
    assert T.nnUNetTrainerCE_ACE.loss_hparams == {"num_bins": 20}


def test_build_network_architecture_signature_is_nnunets():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    ref = inspect.signature(nnUNetTrainer.build_network_architecture)
    sig = inspect.signature(T.nnUNetTrainerSDC.build_network_architecture)
    assert list(sig.parameters) == list(ref.parameters)
    assert isinstance(inspect.getattr_static(T.nnUNetTrainerSDC, "build_network_architecture"), staticmethod)


# ------------------------------------------------------------------ SDF head on plain U-Nets
def _unet(dim: int, n_classes: int = 3, ds: bool = True):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    conv = torch.nn.Conv2d if dim == 2 else torch.nn.Conv3d
    norm = torch.nn.InstanceNorm2d if dim == 2 else torch.nn.InstanceNorm3d
    torch.manual_seed(0)
    return PlainConvUNet(1, 3, (4, 8, 16), conv, 3, (1, 2, 2), 1, n_classes, 1, norm_op=norm,
                         norm_op_kwargs={"affine": True}, nonlin=torch.nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=ds)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("ds", [True, False])
def test_sdf_head_absent_from_eval_outputs(dim, ds):
    inner = _unet(dim, ds=ds)
    net = SDFHeadNetwork(inner, 3)
    x = torch.randn(2, 1, *([8] * dim))
    net.eval()
    with torch.no_grad():
        out = net(x)
        ref = inner(x)
    assert net.last_sdf is None
    if ds:
        assert isinstance(out, list) and len(out) == len(ref) == 2
        for a, b in zip(out, ref):
            assert torch.equal(a, b)
    else:
        assert isinstance(out, torch.Tensor) and torch.equal(out, ref)
    # training mode: same segmentation output type, SDF stored on the side, in [-1, 1], full resolution
    net.train()
    out_t = net(x)
    assert type(out_t) is type(out)
    sdf = net.last_sdf
    assert sdf.shape == (2, 3, *([8] * dim))
    assert sdf.abs().max() <= 1
    # it is tanh(1x1 conv) of the features entering the last segmentation layer
    feats = {}
    h = inner.decoder.seg_layers[-1].register_forward_pre_hook(lambda m, a: feats.setdefault("x", a[0]))
    inner.train()
    inner(x)
    h.remove()
    conv = net.sdf_head[0]
    torch.testing.assert_close(sdf, torch.tanh(conv(feats["x"])))
    assert net.pop_sdf() is sdf and net.last_sdf is None
    # sdf_enabled=False: nothing computed even in training mode
    net.sdf_enabled = False
    net(x)
    assert net.last_sdf is None
    # nnU-Net's set_deep_supervision_enabled goes through .decoder
    assert net.decoder is inner.decoder and net.encoder is inner.encoder
    assert any(k.startswith("sdf_head.") for k in net.state_dict())


def test_sdf_head_under_torch_compile():
    """Dynamo tracing (nnU-Net compiles the network on CUDA) keeps the side channel working."""
    net = SDFHeadNetwork(_unet(2), 3).train()
    x = torch.randn(2, 1, 8, 8)
    out = net(x)
    ref_sdf = net.pop_sdf()
    compiled = torch.compile(net, backend="eager")
    assert unwrap_network(compiled) is net
    out_c = compiled(x)
    assert net.last_sdf is not None
    torch.testing.assert_close(net.last_sdf, ref_sdf)
    for a, b in zip(out_c, out):
        torch.testing.assert_close(a, b)
    compiled.eval()
    out_e = compiled(x)
    assert net.last_sdf is None and isinstance(out_e, list)


def test_sdf_head_loss_passes_sdf_to_full_resolution_only():
    calls = []

    class Rec(torch.nn.Module):
        def forward(self, o, t, s=None):
            calls.append(s)
            return o.sum() * 0

    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    sdf = torch.randn(1, 4, 8, 8)
    loss = SDFHeadLoss(DeepSupervisionWrapper(Rec(), [0.5, 0.3, 0.2]), lambda: sdf, foreground_only=True)
    outs = [torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 2, 2)]
    loss(outs, outs)
    assert torch.equal(calls[0], sdf[:, 1:]) and calls[1:] == [None, None]
    calls.clear()
    SDFHeadLoss(Rec(), lambda: sdf, foreground_only=False)(outs[0], outs[0])
    assert calls[0] is sdf


# ------------------------------------------------------------------ with nnU-Net plans (fixtures)
def _nnunet_default_weights(preprocessed, configuration, is_ddp):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    ref = make_trainer(nnUNetTrainer, preprocessed, configuration, initialize=False)
    ref.is_ddp = is_ddp
    return ref._build_loss().weight_factors


@pytest.mark.nnunet
@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_deep_supervision_weights_equal_nnunet_default(configuration, synthetic_labels):
    pre = synthetic_labels.preprocessed
    for is_ddp in (False, True):
        expected = _nnunet_default_weights(pre, configuration, is_ddp)
        assert bool(expected[-1] > 0) is is_ddp  # nnU-Net's DDP quirk (1e-6 before normalising) is exercised
        for name in T.TRAINER_NAMES:
            cls = getattr(T, name)
            tr = make_trainer(cls, pre, configuration, initialize=False)
            tr.is_ddp = is_ddp
            if cls is T.nnUNetTrainerSDC or issubclass(cls, T.nnUNetTrainerSDC):
                tr.network = cls.build_network_architecture(
                    tr.plans_manager, tr.configuration_manager, 1, tr.label_manager.num_segmentation_heads, True)
            loss = ds_wrapper(tr._build_loss())
            assert loss.weight_factors == pytest.approx(expected, abs=0, rel=0), name


@pytest.mark.nnunet
def test_unknown_hparam_key_in_constructor(synthetic_labels, monkeypatch):
    monkeypatch.setenv("NNUNET_CALIB_HPARAMS", "num_epochs=1,gama=2")
    with pytest.raises(ValueError, match=r"unknown key.*gama.*valid keys.*gamma"):
        make_trainer(T.nnUNetTrainerFocal, synthetic_labels.preprocessed, initialize=False)
    monkeypatch.setenv("NNUNET_CALIB_HPARAMS", "gamma=2")
    tr = make_trainer(T.nnUNetTrainerFocal, synthetic_labels.preprocessed, initialize=False)
    loss = ds_wrapper(tr._build_loss()).loss
    assert loss.gamma == 2.0


@pytest.mark.nnunet
def test_loss_without_regions_rejected_in_constructor(synthetic_labels, synthetic_regions, monkeypatch):
    class LabelsOnly(CrossEntropy):
        supports_regions = False

    class nnUNetTrainerLabelsOnlyTest(T.nnUNetTrainerCalibLoss):
        """test trainer"""
        loss_key = "labels_only_test"

    monkeypatch.setitem(LOSSES, "labels_only_test", LabelsOnly)
    with pytest.raises(ValueError, match=r"nnUNetTrainerLabelsOnlyTest.*region-based.*does not support region"):
        make_trainer(nnUNetTrainerLabelsOnlyTest, synthetic_regions.preprocessed, initialize=False)
    make_trainer(nnUNetTrainerLabelsOnlyTest, synthetic_labels.preprocessed, initialize=False)


def _sdc_wiring(trainer_cls, preprocessed, regions: bool):
    tr = make_trainer(trainer_cls, preprocessed, "2d")
    net = unwrap_network(tr.network)
    assert isinstance(net, SDFHeadNetwork)
    n_heads = tr.label_manager.num_segmentation_heads
    torch.manual_seed(0)
    x = torch.randn(2, tr.num_input_channels, *tr.configuration_manager.patch_size)
    net.train()
    out = net(x)
    sdf = net.last_sdf
    assert sdf is not None and sdf.shape == (2, n_heads, *x.shape[2:])
    tgt = random_targets(out, regions)
    actual = tr.loss(out, tgt)
    assert net.last_sdf is None  # consumed
    # expected: nnU-Net's DS weights, SDC on every output, SDF term on the full resolution only
    per_res = build_loss("sdc_dc" if trainer_cls.add_dice else "sdc", regions=regions,
                         batch_dice=tr.configuration_manager.batch_dice, **tr.loss_hparams)
    weights = ds_wrapper(tr.loss).weight_factors
    sdf_fg = sdf if regions else sdf[:, 1:]
    expected = sum(w * per_res(o, t, sdf_fg if i == 0 else None)
                   for i, (w, o, t) in enumerate(zip(weights, out, tgt)) if w != 0)
    torch.testing.assert_close(actual, expected)
    without_sdf = sum(w * per_res(o, t) for w, o, t in zip(weights, out, tgt) if w != 0)
    assert not torch.allclose(actual, without_sdf)
    # gradients reach the SDF head: foreground channels only for labels, every region for regions
    actual.backward()
    g = net.sdf_head[0].weight.grad.flatten(1).abs().sum(1)
    if regions:
        assert (g > 0).all()
    else:
        assert g[0] == 0 and (g[1:] > 0).all()
    # eval mode (nnU-Net's validation loss): plain logits, no SDF term
    net.eval()
    with torch.no_grad():
        out_e = net(x)
        val = tr.loss(out_e, tgt)
        expected_val = sum(w * per_res(o, t) for w, o, t in zip(weights, out_e, tgt) if w != 0)
    torch.testing.assert_close(val, expected_val)
    # nnU-Net's own train_step runs unchanged and updates the head
    net.train()
    before = net.sdf_head[0].weight.detach().clone()
    res = tr.train_step({"data": x, "target": tgt})
    assert np.isfinite(res["loss"])
    assert not torch.equal(before, net.sdf_head[0].weight.detach())


@pytest.mark.nnunet
@pytest.mark.parametrize("trainer", ["nnUNetTrainerSDC", "nnUNetTrainerSDC_DC"])
def test_sdc_sdf_reaches_loss_labels(trainer, synthetic_labels):
    _sdc_wiring(getattr(T, trainer), synthetic_labels.preprocessed, regions=False)


@pytest.mark.nnunet
def test_sdc_sdf_reaches_loss_regions(synthetic_regions):
    _sdc_wiring(T.nnUNetTrainerSDC, synthetic_regions.preprocessed, regions=True)


@pytest.mark.nnunet
@pytest.mark.parametrize("trainer", [n for n in T.TRAINER_NAMES if n != "nnUNetTrainerDiceCE"])
def test_trainer_loss_is_the_registry_loss(trainer, synthetic_labels):
    """Each trainer's loss equals nnU-Net's DS weighting of the loss built directly from the registry."""
    cls = getattr(T, trainer)
    tr = make_trainer(cls, synthetic_labels.preprocessed, "2d")
    torch.manual_seed(1)
    x = torch.randn(2, tr.num_input_channels, *tr.configuration_manager.patch_size)
    net = unwrap_network(tr.network).eval()  # eval: no SDF prediction, plain logits
    with torch.no_grad():
        out = net(x)
        tgt = random_targets(out, False)
        per_res = build_loss(tr.registry_name(), batch_dice=tr.configuration_manager.batch_dice,
                             **tr.loss_hparams)
        w = ds_wrapper(tr.loss).weight_factors
        expected = sum(wi * per_res(o, t) for wi, o, t in zip(w, out, tgt) if wi != 0)
        torch.testing.assert_close(tr.loss(out, tgt), expected)


def test_sdf_head_stays_in_graph_with_lambda_zero():
    """DDP (find_unused_parameters=False) needs a gradient for every parameter, also when lambda_sdf = 0."""
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    net = SDFHeadNetwork(_unet(2, n_classes=3), 3).train()
    x = torch.randn(2, 1, 8, 8)
    out = net(x)
    tgt = random_targets(out, False)
    for lam in (0.0, 0.1):
        sdc = build_loss("sdc", lambda_sdf=lam)
        loss = SDFHeadLoss(DeepSupervisionWrapper(sdc, [2 / 3, 1 / 3]), net.pop_sdf, foreground_only=True)
        net.zero_grad(set_to_none=True)
        out = net(x)
        value = loss(out, tgt)
        if lam == 0:  # value unchanged by keeping the head in the graph
            expected = (2 / 3) * sdc(out[0], tgt[0]) + (1 / 3) * sdc(out[1], tgt[1])
            torch.testing.assert_close(value, expected)
        value.backward()
        grad = net.sdf_head[0].weight.grad
        assert grad is not None
        assert bool(grad.abs().sum() > 0) is (lam > 0)


_DDP_SCRIPT = r'''
import os, sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
sys.path[:0] = [sys.argv[1], os.path.dirname(sys.argv[1])]  # tests/trainers and tests/, as pytest does
from test_trainer_units import _unet
from trainers_testlib import random_targets
from nnunet_calibration.losses import build_loss
from nnunet_calibration.trainers.sdf_head import SDFHeadLoss, SDFHeadNetwork, unwrap_network
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=0, world_size=1)
for lam in (0.0, 0.1):
    net = DDP(SDFHeadNetwork(_unet(2, n_classes=3), 3).train())
    # nnU-Net's DDP quirk: the lowest output keeps a tiny weight so that its seg layer is used
    loss = SDFHeadLoss(DeepSupervisionWrapper(build_loss("sdc", lambda_sdf=lam), [0.6, 0.4 - 1e-6, 1e-6][:2]),
                       unwrap_network(net).pop_sdf, foreground_only=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(2, 1, 8, 8)
    for it in range(3):
        opt.zero_grad()
        out = net(x)
        loss(out, random_targets(out, False)).backward()
        opt.step()
dist.destroy_process_group()
print("DDP OK")
'''


def test_sdf_head_under_ddp(tmp_path):
    """Real DistributedDataParallel (gloo, one CPU process, in a subprocess): the side channel works
    through DDP's forward and every parameter gets a gradient, also with lambda_sdf = 0."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "ddp_check.py"
    script.write_text(_DDP_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(Path(__file__).parent), str(port)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "DDP OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
