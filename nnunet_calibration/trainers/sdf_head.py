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
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn


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
        decoder = getattr(network, "decoder", None)
        seg_layers = getattr(decoder, "seg_layers", None)
        if seg_layers is None or len(seg_layers) == 0:
            raise TypeError(f"SDFHeadNetwork needs a network with decoder.seg_layers (nnU-Net's U-Nets), "
                            f"got {type(network).__name__}")
        last = seg_layers[-1]
        if not isinstance(last, (nn.Conv2d, nn.Conv3d)):
            raise TypeError(f"decoder.seg_layers[-1] must be a Conv2d/Conv3d, got {type(last).__name__}")
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
