"""SDC's auxiliary signed-distance head for nnU-Net's U-Nets, and the loss adapter that feeds it.

The head
--------
:class:`SDFHeadNetwork` wraps the network nnU-Net builds from the plans (``PlainConvUNet``,
``ResidualEncoderUNet``, ... — anything whose ``decoder.seg_layers[-1]`` is the full-resolution
1x1(x1) segmentation convolution, which holds for every U-Net of ``dynamic_network_architectures``)
and adds ``sdf_head``: a 1x1(x1) convolution on the *input of the last segmentation layer* (the
decoder's last, full-resolution features), followed by ``tanh``.

* The head is always built, so ``nnUNetv2_predict -tr nnUNetTrainerSDC`` (which calls the trainer's
  static ``build_network_architecture``) creates the same module and loads the checkpoint strictly.
* It has one output channel per network output channel. nnU-Net's static
  ``build_network_architecture`` only knows the number of segmentation heads, not whether they are
  regions, so for plain labels the head also has a (never supervised) background channel 0: the SDF
  term uses channels ``1:`` (one per foreground class); for regions it uses all channels (one per
  region). The unused channel costs one row of a 1x1 convolution and gets an exactly-zero gradient.
* ``forward(x)`` always returns exactly what the wrapped network returns (a list of logits with deep
  supervision, a tensor without). Only when the module is in training mode and ``sdf_enabled`` is
  true, it also computes the SDF prediction and stores it in ``last_sdf`` (a side channel; the
  features are captured by a forward pre-hook on ``decoder.seg_layers[-1]``). In eval mode nothing
  else happens, so nnU-Net's predictor, sliding-window inference and end-of-training validation
  work untouched.
* ``decoder`` and ``encoder`` are exposed, so nnU-Net's ``set_deep_supervision_enabled`` works; the
  trainer unwraps DDP (``.module``) and ``torch.compile`` (``._orig_mod``) as nnU-Net does.

The loss
--------
:class:`SDFHeadLoss` wraps the trainer's (deep-supervision-wrapped) loss. On each call it takes
``last_sdf`` from the network (and clears it, so a stale prediction is never reused). The total is

    ``loss(output, target) + sdf_term(output[0], target[0], sdf)``

i.e. the deep-supervision-weighted ``CE + alpha * local`` of every output (nnU-Net's own
``DeepSupervisionWrapper``) plus the SDF term of the **full-resolution output only, with weight
exactly** ``lambda_sdf`` (:meth:`~nnunet_calibration.losses.SDCLoss.sdf_term` includes
``lambda_sdf``); the deep-supervision weights do not scale it, so the effective weight is the
paper's Eq. 1 ``lambda_SDF``. In eval mode (nnU-Net's validation loss) there is no SDF prediction
and the SDF term is left out. With ``lambda_sdf = 0`` the head is still computed and kept in the
graph with weight 0 (DDP requires every parameter to take part in the backward pass).

This keeps nnU-Net's ``train_step`` / ``validation_step`` (autocast, grad scaler, gradient clipping)
completely untouched.

Networks without a U-Net decoder
--------------------------------
The head needs the decoder's full-resolution features in front of a 1x1(x1) segmentation
convolution. nnU-Net's Primus (transformer) trainers end in a transposed-convolution patch decoder
without ``decoder.seg_layers``; combining an SDC trainer with them stops when the network is built
with :class:`SDFHeadUnsupportedNetworkError`, naming the network, instead of training something else.

Fine-tuning (``nnUNetv2_train ... -pretrained_weights CHECKPOINT``)
-------------------------------------------------------------------
nnU-Net's ``load_pretrained_weights`` requires every key of the new network except
``.seg_layers.`` to be in the checkpoint. The SDC network's keys are ``network.<U-Net key>`` and
``sdf_head.*``, so a checkpoint of a plain U-Net (``nnUNetTrainer`` and every trainer without the
head) never passes, and an SDC checkpoint does not fit a plain network. nnU-Net has no hook for
this (``nnUNetv2_train`` calls the module-level function ``load_pretrained_weights`` of
``nnunetv2.run.run_training`` right after ``trainer.initialize()``, and the trainer never sees the
file name), so every trainer of this package, in its ``initialize()``, rebinds that name in
``nnunetv2.run.run_training`` (in this process only; no nnU-Net file is changed) to a wrapper of
:func:`load_pretrained_weights`:

* neither side has the head: nnU-Net's own function, unchanged;
* SDC network, checkpoint without head (``nnUNetTrainer``, DiceCE, every other plain U-Net): nnU-Net's
  own function on the wrapped U-Net (its rule: every key except ``.seg_layers.`` present with the
  same shape, segmentation layers re-initialised); the SDF head keeps its fresh initialisation;
* SDC checkpoint: nnU-Net's rule re-applied to its U-Net part (:func:`transfer_unet_weights`, same
  checks and the same keys skipped) and the head loaded into an SDC network (if its shape fits: the
  same number of output channels; else it starts fresh), not used by a network without head;

and the training log says which (``-pretrained_weights ...: SDF head ...``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn


class SDFHeadUnsupportedNetworkError(TypeError):
    """The network has no U-Net decoder (``decoder.seg_layers`` ending in a 1x1(x1) convolution) to
    attach SDC's SDF head to, e.g. nnU-Net's Primus transformers."""


def _check_supported(network: nn.Module) -> nn.Module:
    """The full-resolution segmentation convolution the head attaches to, or the named error."""
    decoder = getattr(network, "decoder", None)
    seg_layers = getattr(decoder, "seg_layers", None)
    last = seg_layers[-1] if isinstance(seg_layers, (nn.ModuleList, nn.Sequential, list)) and len(seg_layers) else None
    if not isinstance(last, (nn.Conv2d, nn.Conv3d)):
        what = ("no decoder.seg_layers" if seg_layers is None or last is None
                else f"decoder.seg_layers[-1] is a {type(last).__name__}, not a Conv2d/Conv3d")
        raise SDFHeadUnsupportedNetworkError(
            f"SDC's SDF head cannot be attached to {type(network).__name__} ({what}): it needs a U-Net "
            f"whose decoder ends in a 1x1(x1) segmentation convolution (nnU-Net's PlainConvUNet, "
            f"ResidualEncoderUNet, ...). Train this architecture (e.g. nnU-Net's Primus) with a "
            f"calibration trainer without the SDF head (e.g. nnUNetTrainerNACL_DC, nnUNetTrainerDSCPlusPlus).")
    return last


class SDFHeadNetwork(nn.Module):
    """An nnU-Net U-Net plus SDC's auxiliary SDF head (see the module docstring).

    Parameters
    ----------
    network
        The segmentation network (must have ``decoder.seg_layers``).
    num_sdf_channels
        Output channels of the head (nnU-Net's number of segmentation heads).
    """

    def __init__(self, network: nn.Module, num_sdf_channels: int):
        super().__init__()
        last = _check_supported(network)
        self.network = network
        self.sdf_head = nn.Sequential(
            type(last)(last.in_channels, int(num_sdf_channels), kernel_size=1, stride=1, padding=0, bias=True),
            nn.Tanh(),
        )
        #: compute the SDF prediction in training mode (the head is never used in eval mode)
        self.sdf_enabled = True
        #: SDF prediction of the last training-mode forward, or None
        self.last_sdf: Optional[Tensor] = None
        self._capture = False
        self._features: Optional[Tensor] = None
        last.register_forward_pre_hook(self._capture_features)

    def _capture_features(self, module, args):
        if self._capture:
            self._features = args[0]

    @property
    def decoder(self) -> nn.Module:
        return self.network.decoder

    @property
    def encoder(self) -> nn.Module:
        return self.network.encoder

    def forward(self, x: Tensor):
        want = self.training and self.sdf_enabled
        self._capture = want
        out = self.network(x)
        self._capture = False
        if want:
            feats = self._features
            self._features = None
            self.last_sdf = self.sdf_head(feats)
        else:
            self.last_sdf = None
        return out

    def pop_sdf(self) -> Optional[Tensor]:
        """Return ``last_sdf`` and clear it."""
        sdf = self.last_sdf
        self.last_sdf = None
        return sdf

    def compute_conv_feature_map_size(self, input_size):  # used by nnU-Net's planners only
        return self.network.compute_conv_feature_map_size(input_size)

    def load_pretrained_head(self, head_weights: dict) -> str:
        """Load the SDF head from ``head_weights`` (keys of ``sdf_head``) if they fit; says what happened."""
        own = self.sdf_head.state_dict()
        if not head_weights:
            return "SDF head starts fresh (random initialisation): the checkpoint has no SDF head"
        theirs = {k: tuple(v.shape) for k, v in head_weights.items()}
        mine = {k: tuple(v.shape) for k, v in own.items()}
        if theirs != mine:
            return (f"SDF head starts fresh (random initialisation): the checkpoint's SDF head {theirs} does not "
                    f"fit this network's {mine} (another number of output channels)")
        self.sdf_head.load_state_dict(head_weights)
        return "SDF head loaded from the checkpoint"


def unwrap_network(network: nn.Module) -> nn.Module:
    """Remove DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, as nnU-Net does."""
    from torch._dynamo import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel as DDP

    mod = network
    for _ in range(3):
        if isinstance(mod, DDP):
            mod = mod.module
        elif isinstance(mod, OptimizedModule):
            mod = mod._orig_mod
        else:
            break
    return mod


class SDFHeadLoss(nn.Module):
    """``loss(output, target) + sdf_term(full-resolution output, target, sdf)`` (see the module docstring).

    Parameters
    ----------
    loss
        The loss without the SDF term, possibly wrapped in nnU-Net's ``DeepSupervisionWrapper``.
    sdf_source
        Callable returning the network's last SDF prediction (or None) and clearing it, e.g.
        :meth:`SDFHeadNetwork.pop_sdf`.
    foreground_only
        Plain labels: drop the head's background channel 0 (the SDF term is per foreground class).
    sdf_term
        ``sdf_term(net_output, target, sdf_pred)`` of one resolution, weight included, e.g.
        :meth:`nnunet_calibration.losses.SDCLoss.sdf_term`. Added once, unweighted by deep
        supervision.
    """

    def __init__(self, loss: nn.Module, sdf_source: Callable[[], Optional[Tensor]], foreground_only: bool,
                 sdf_term: Callable[[Tensor, Tensor, Tensor], Tensor]):
        super().__init__()
        self.loss = loss
        # bound methods, not modules: the network must not become a sub-module of the loss
        self._sdf_source = sdf_source
        self._sdf_term = sdf_term
        self.foreground_only = bool(foreground_only)

    def forward(self, output, target):
        sdf = self._sdf_source()
        loss = self.loss(output, target)
        if sdf is None:
            return loss
        head = sdf
        if self.foreground_only:
            sdf = sdf[:, 1:]
        if isinstance(output, (list, tuple)):
            loss = loss + self._sdf_term(output[0], target[0], sdf)
        else:
            loss = loss + self._sdf_term(output, target, sdf)
        # keeps the head in the autograd graph even if the SDF term is 0 (lambda_sdf = 0), so
        # that DDP sees every parameter used; numerically a no-op (tanh output is finite)
        return loss + 0.0 * head.sum()

    def extra_repr(self) -> str:
        return f"foreground_only={self.foreground_only}"


# ----------------------------------------------------------------------------------------------
# Fine-tuning: nnU-Net's -pretrained_weights with and without the SDF head (see the module docstring)
# ----------------------------------------------------------------------------------------------
#: nnU-Net's load_pretrained_weights neither checks nor transfers keys containing these
NOT_TRANSFERRED = (".seg_layers.",)


def is_sdf_checkpoint(weights: dict) -> bool:
    """Whether ``network_weights`` of a checkpoint come from an :class:`SDFHeadNetwork`."""
    return any(k.startswith("sdf_head.") for k in weights) and any(k.startswith("network.") for k in weights)


def split_sdf_weights(weights: dict) -> tuple[dict, dict]:
    """(U-Net weights, SDF head weights) of a checkpoint's ``network_weights``; a plain U-Net
    checkpoint is all U-Net."""
    if not is_sdf_checkpoint(weights):
        return dict(weights), {}
    unet = {k[len("network."):]: v for k, v in weights.items() if k.startswith("network.")}
    head = {k[len("sdf_head."):]: v for k, v in weights.items() if k.startswith("sdf_head.")}
    return unet, head


def transfer_unet_weights(network: nn.Module, weights: dict, source: str) -> int:
    """nnU-Net's fine-tuning rule on a U-Net: every key except the segmentation layers must be in
    ``weights`` with the same shape (else ``RuntimeError``); all of them are loaded, the segmentation
    layers keep their fresh initialisation. Returns the number of tensors loaded."""
    own = network.state_dict()
    for key, value in own.items():
        if any(s in key for s in NOT_TRANSFERRED):
            continue
        if key not in weights:
            raise RuntimeError(f"Key {key} is missing in the pretrained model weights {source}: the checkpoint "
                               f"does not fit this network ({type(network).__name__})")
        if tuple(weights[key].shape) != tuple(value.shape):
            raise RuntimeError(f"Key {key} has shape {tuple(weights[key].shape)} in the pretrained model weights "
                               f"{source} but {tuple(value.shape)} in this network ({type(network).__name__})")
    transfer = {k: v for k, v in weights.items() if k in own and not any(s in k for s in NOT_TRANSFERRED)}
    own.update(transfer)
    network.load_state_dict(own)
    return len(transfer)


def load_pretrained_weights(network: nn.Module, fname: str, verbose: bool = False,
                            log: Callable[[str], None] = print, fallback: Optional[Callable] = None) -> None:
    """nnU-Net's ``load_pretrained_weights(network, fname, verbose)`` that also handles the SDF head.

    * neither the network nor the checkpoint has the head: nnU-Net's own function (``fallback``,
      default: nnU-Net's) runs unchanged on ``network``;
    * an SDC network, a checkpoint without head (``nnUNetTrainer``, DiceCE, any plain U-Net): nnU-Net's
      own function runs on the wrapped U-Net (``network.network``); the head keeps its fresh
      initialisation;
    * an SDC checkpoint: nnU-Net's rule (:func:`transfer_unet_weights`) on the U-Net part, and the head
      loaded (SDC network with a head of the same shape) or not used (see the module docstring).

    ``log`` receives one line saying what was loaded (nnU-Net's trainer log under ``nnUNetv2_train``).
    """
    if fallback is None:
        from nnunetv2.run.load_pretrained_weights import load_pretrained_weights as fallback
    mod = unwrap_network(network)
    checkpoint = torch.load(fname, map_location="cpu", weights_only=False)
    weights = checkpoint["network_weights"]
    source = f"-pretrained_weights {fname} (trainer {checkpoint.get('trainer_name', '?')})"
    has_head, sdf_checkpoint = isinstance(mod, SDFHeadNetwork), is_sdf_checkpoint(weights)
    if not has_head and not sdf_checkpoint:
        return fallback(network, fname, verbose=verbose)
    if not sdf_checkpoint:
        fallback(mod.network, fname, verbose=verbose)
        log(f"{source}: the U-Net loaded by nnU-Net's load_pretrained_weights (segmentation layers "
            f"re-initialised); {mod.load_pretrained_head({})}")
        return
    unet, head = split_sdf_weights(weights)
    target = mod.network if has_head else mod
    n = transfer_unet_weights(target, unet, fname)
    head_msg = mod.load_pretrained_head(head) if has_head else "the checkpoint's SDF head is not used (this network has none)"
    log(f"{source}: {n} tensors of the U-Net loaded, segmentation layers (.seg_layers.) re-initialised as "
        f"nnU-Net does; {head_msg}")


def install_pretrained_loader(log: Callable[[str], None] = print) -> bool:
    """Make ``nnUNetv2_train -pretrained_weights`` use :func:`load_pretrained_weights` in this process.

    Replaces the name ``load_pretrained_weights`` in ``nnunetv2.run.run_training`` (what its
    ``maybe_load_checkpoint`` calls after ``trainer.initialize()``) by a wrapper logging with ``log``;
    nnU-Net's files are not touched and every other network / checkpoint goes to nnU-Net's function.
    Returns False (nothing changed) where nnU-Net has no such name."""
    try:
        from nnunetv2.run import run_training
    except ImportError:  # pragma: no cover - nnU-Net always has it
        return False
    current = getattr(run_training, "load_pretrained_weights", None)
    if current is None:
        return False
    original = getattr(current, "nnunet_original", current)

    def wrapper(network, fname, verbose=False):
        return load_pretrained_weights(network, fname, verbose=verbose, log=log, fallback=original)

    wrapper.nnunet_original = original
    run_training.load_pretrained_weights = wrapper
    return True
