"""One nnU-Net trainer per calibration loss (and per morphological variant), plus ``_DC`` variants.

Every class here only chooses a loss: it overrides ``_build_loss`` as nnU-Net's own loss variants
(``nnUNetTrainerCELoss``, ...) do, and nothing else except SDC, whose network also gets the
auxiliary SDF head (:mod:`nnunet_calibration.trainers.sdf_head`). Training, data augmentation,
optimiser, schedule and inference are nnU-Net's defaults.

* Losses come from :mod:`nnunet_calibration.losses` (``build_loss(key, regions=..., ignore_label=...,
  **kwargs)``); the trainer passes nnU-Net's label manager's ``has_regions`` and ``ignore_label``,
  so the ignore label is honoured and region datasets (sigmoid outputs) are supported where the
  loss supports them. A loss that cannot handle regions stops the trainer in its constructor
  (before any folder or network is created) with an error naming the trainer and the loss.
* Deep supervision: the per-resolution loss is wrapped in nnU-Net's ``DeepSupervisionWrapper`` with
  exactly the weights of nnU-Net's default ``_build_loss`` (1, 1/2, 1/4, ..., lowest 0 — 1e-6 under
  DDP without compile —, normalised), see ``nnUNetTrainerCalibBase._wrap_deep_supervision``.
* Hyperparameters: ``loss_hparams`` (defaults of the SDC paper's Table 1) can be overridden per run
  with ``NNUNET_CALIB_HPARAMS`` (see :mod:`nnunet_calibration.trainers.base`). What defines a
  variant (NACL kernel, morphological operator, Dice term) is the loss's registry name
  (``loss_key``), which is not overridable; ``loss_fixed`` may hold further fixed constructor
  arguments for user subclasses. All of it is written to ``calibration_hparams.json``.
* ``_DC`` variants add nnU-Net's Dice term exactly as its default loss does (registry name
  ``<key>_dc``, i.e. ``losses.WithDice``: memory-efficient soft Dice, smooth 1e-5, ``batch_dice``
  from the plans, background excluded for labels / included for regions, weight 1 next to the
  loss's weight 1).
"""
from __future__ import annotations

import torch

from nnunet_calibration.trainers.base import nnUNetTrainerCalibBase
from nnunet_calibration.trainers.sdf_head import SDFHeadLoss, SDFHeadNetwork, unwrap_network


class nnUNetTrainerCalibLoss(nnUNetTrainerCalibBase):
    """Base of the calibration-loss trainers: builds ``losses.build_loss(loss_key, ...)``.

    Not a trainer to run by itself (it has no loss); subclasses set :attr:`loss_key`,
    :attr:`loss_hparams`, optionally :attr:`loss_fixed` and :attr:`add_dice`.
    """

    #: registry key of the loss in :func:`nnunet_calibration.losses.build_loss`
    loss_key: str | None = None
    #: constructor arguments that define this variant (not overridable per run)
    loss_fixed: dict = {}
    #: add nnU-Net's default Dice term (``_DC`` variants)
    add_dice: bool = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.loss_key is None:
            raise TypeError(f"{self.__class__.__name__} has no loss_key; it is a base class, not a trainer")
        # fail at start-up (regions not supported, bad hyperparameter values), not after planning the network
        self.build_calibration_loss()

    def loss_kwargs(self) -> dict:
        """Hyperparameters passed to the loss constructor (besides regions / ignore label / Dice args)."""
        return {**self.loss_hparams, **self.loss_fixed}

    def registry_name(self) -> str:
        """Name in :func:`nnunet_calibration.losses.build_loss` (``<key>_dc`` adds nnU-Net's Dice)."""
        return f"{self.loss_key}_dc" if self.add_dice else self.loss_key

    def build_calibration_loss(self) -> torch.nn.Module:
        """The per-resolution loss (not yet wrapped for deep supervision)."""
        from nnunet_calibration.losses import build_loss

        lm = self.label_manager
        try:
            return build_loss(self.registry_name(), regions=lm.has_regions, ignore_label=lm.ignore_label,
                              batch_dice=bool(self.configuration_manager.batch_dice), ddp=bool(self.is_ddp),
                              **self.loss_kwargs())
        except ValueError as e:
            what = "a region-based dataset (regions_class_order)" if lm.has_regions else "a label dataset"
            raise ValueError(f"{self.__class__.__name__}: cannot build loss {self.registry_name()!r} with "
                             f"{self.loss_kwargs()} for {what} (ignore_label={lm.ignore_label}): {e}") from e

    def _build_loss(self):
        return self._wrap_deep_supervision(self.build_calibration_loss())

    def used_hparams(self) -> dict:
        out = super().used_hparams()
        out["loss_key"] = self.registry_name()
        out["loss_fixed"] = dict(self.loss_fixed)
        out["dice_term"] = bool(self.add_dice)
        out["regions"] = bool(self.label_manager.has_regions)
        out["ignore_label"] = self.label_manager.ignore_label
        return out


# ----------------------------------------------------------------------------------------------
# CE-type calibration losses (SDC paper, Table 1 defaults)
# ----------------------------------------------------------------------------------------------
class nnUNetTrainerFocal(nnUNetTrainerCalibLoss):
    """Focal loss, -(1-p_t)^gamma log p_t (Lin et al. 2017); gamma = 3."""
    loss_name = "Focal"
    loss_key = "focal"
    loss_hparams = {"gamma": 3.0}


class nnUNetTrainerECP(nnUNetTrainerCalibLoss):
    """Entropy confidence penalty, CE - lam * entropy (Pereyra et al. 2017); lam = 0.1."""
    loss_name = "ECP"
    loss_key = "ecp"
    loss_hparams = {"lam": 0.1}


class nnUNetTrainerLS(nnUNetTrainerCalibLoss):
    """Label smoothing, CE against (1-alpha) onehot + alpha/C (Szegedy et al. 2016); alpha = 0.1."""
    loss_name = "LS"
    loss_key = "ls"
    loss_hparams = {"alpha": 0.1}


class nnUNetTrainerSVLS(nnUNetTrainerCalibLoss):
    """Spatially varying label smoothing (Islam & Glocker, IPMI 2021); sigma = 2.0."""
    loss_name = "SVLS"
    loss_key = "svls"
    loss_hparams = {"sigma": 2.0}


class nnUNetTrainerMbLS(nnUNetTrainerCalibLoss):
    """Margin-based label smoothing, CE + alpha * relu(logit distance - m) (Liu et al., CVPR 2022);
    m = 10, alpha = 0.1."""
    loss_name = "MbLS"
    loss_key = "mbls"
    loss_hparams = {"margin": 10.0, "alpha": 0.1}


class nnUNetTrainerNACL(nnUNetTrainerCalibLoss):
    """Neighbour-aware calibration loss (Murugesan et al., MICCAI 2023) with the "min" kernel
    (as the SDC paper's Table 1 footnote); alpha = 0.1, 3x3(x3) window."""
    loss_name = "NACL"
    loss_key = "nacl_min"
    loss_hparams = {"alpha": 0.1, "kernel_size": 3}


class nnUNetTrainerNACL_mean(nnUNetTrainerNACL):
    """NACL with the "mean" kernel (label proportions in the window); alpha = 0.1."""
    loss_name = "NACL-mean"
    loss_key = "nacl"


class nnUNetTrainerFCL(nnUNetTrainerCalibLoss):
    """Focal calibration loss, focal + lam * squared error of the probabilities (Liang et al. 2024);
    gamma = 3, lam = 0.1."""
    loss_name = "FCL"
    loss_key = "fcl"
    loss_hparams = {"gamma": 3.0, "lam": 0.1}


# ----------------------------------------------------------------------------------------------
# SDC: signed distance calibration loss with the auxiliary SDF head
# ----------------------------------------------------------------------------------------------
class nnUNetTrainerSDC(nnUNetTrainerCalibLoss):
    """Signed distance calibration loss (Liang et al. 2025); alpha = 0.1, lambda_sdf = 0.1.

    CE + alpha * local calibration term + lambda_sdf * L1(SDF head, reference SDF). The network
    carries the auxiliary SDF head (:class:`~nnunet_calibration.trainers.sdf_head.SDFHeadNetwork`),
    always built so that ``nnUNetv2_predict -tr nnUNetTrainerSDC`` loads the checkpoint strictly;
    in eval mode it returns exactly the segmentation logits. Deep supervision: the SDF term is
    applied to the full-resolution output only (the CE and local terms to every output, with
    nnU-Net's weights).
    """
    loss_name = "SDC"
    loss_key = "sdc"
    loss_hparams = {"alpha": 0.1, "lambda_sdf": 0.1}

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True
                                   ) -> torch.nn.Module:
        net = nnUNetTrainerCalibBase.build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels,
            enable_deep_supervision)
        return SDFHeadNetwork(net, num_output_channels)

    def _build_loss(self):
        loss = self._wrap_deep_supervision(self.build_calibration_loss())
        network = unwrap_network(self.network)
        return SDFHeadLoss(loss, network.pop_sdf, foreground_only=not self.label_manager.has_regions)


# ----------------------------------------------------------------------------------------------
# DSC++ and mL1-ACE
# ----------------------------------------------------------------------------------------------
class nnUNetTrainerDSCPlusPlus(nnUNetTrainerCalibLoss):
    """DSC++ loss (Yeung et al. 2023); gamma = 2."""
    loss_name = "DSC++"
    loss_key = "dscpp"
    loss_hparams = {"gamma": 2.0}


class nnUNetTrainerDSCPlusPlusCE(nnUNetTrainerCalibLoss):
    """DSC++ + CE (Yeung et al. 2023), equal weights; gamma = 2."""
    loss_name = "DSC++CE"
    loss_key = "dscpp_ce"
    loss_hparams = {"gamma": 2.0}


class _ACETrainer(nnUNetTrainerCalibLoss):
    """mL1-ACE combinations (Barfoot et al., MICCAI 2024): 20 hard bins, equal term weights.

    The Dice term (where present) is nnU-Net's (``batch_dice`` from the plans)."""
    loss_hparams = {"num_bins": 20}


class nnUNetTrainerCE_ACE(_ACETrainer):
    """CE + mL1-ACE (Barfoot et al., MICCAI 2024), equal weights, 20 bins."""
    loss_name = "CE+mL1-ACE"
    loss_key = "ace_ce"


class nnUNetTrainerDice_ACE(_ACETrainer):
    """nnU-Net's Dice + mL1-ACE (Barfoot et al., MICCAI 2024), equal weights, 20 bins."""
    loss_name = "Dice+mL1-ACE"
    loss_key = "ace_dice"


class nnUNetTrainerDiceCE_ACE(_ACETrainer):
    """nnU-Net's Dice + CE + mL1-ACE (Barfoot et al., MICCAI 2024), equal weights, 20 bins."""
    loss_name = "DiceCE+mL1-ACE"
    loss_key = "ace_dice_ce"


# ----------------------------------------------------------------------------------------------
# Morphological margin variants (SDC paper section 3.2, Table 6): operator on the one-hot reference
# (3x3 / 3x3x3 element) before NACL's (mean kernel) / SVLS's local target is built
# ----------------------------------------------------------------------------------------------
class nnUNetTrainerNACL_MorphErosion(nnUNetTrainerNACL):
    """NACL (mean kernel) on the eroded one-hot reference."""
    loss_name = "NACL-erosion"
    loss_key = "nacl_erosion"


class nnUNetTrainerNACL_MorphDilation(nnUNetTrainerNACL):
    """NACL (mean kernel) on the dilated one-hot reference."""
    loss_name = "NACL-dilation"
    loss_key = "nacl_dilation"


class nnUNetTrainerNACL_MorphOpening(nnUNetTrainerNACL):
    """NACL (mean kernel) on the opened one-hot reference."""
    loss_name = "NACL-opening"
    loss_key = "nacl_opening"


class nnUNetTrainerNACL_MorphClosing(nnUNetTrainerNACL):
    """NACL (mean kernel) on the closed one-hot reference."""
    loss_name = "NACL-closing"
    loss_key = "nacl_closing"


class nnUNetTrainerNACL_MorphGradient(nnUNetTrainerNACL):
    """NACL (mean kernel) on the morphological gradient of the one-hot reference (the paper's default)."""
    loss_name = "NACL-gradient"
    loss_key = "nacl_gradient"


class nnUNetTrainerNACL_MorphInternalBoundary(nnUNetTrainerNACL):
    """NACL (mean kernel) on the internal boundary (x minus its erosion) of the one-hot reference."""
    loss_name = "NACL-internal_boundary"
    loss_key = "nacl_internal_boundary"


class nnUNetTrainerNACL_MorphExternalBoundary(nnUNetTrainerNACL):
    """NACL (mean kernel) on the external boundary (dilation minus x) of the one-hot reference."""
    loss_name = "NACL-external_boundary"
    loss_key = "nacl_external_boundary"


class nnUNetTrainerSVLS_MorphErosion(nnUNetTrainerSVLS):
    """SVLS on the eroded one-hot reference."""
    loss_name = "SVLS-erosion"
    loss_key = "svls_erosion"


class nnUNetTrainerSVLS_MorphDilation(nnUNetTrainerSVLS):
    """SVLS on the dilated one-hot reference."""
    loss_name = "SVLS-dilation"
    loss_key = "svls_dilation"


class nnUNetTrainerSVLS_MorphOpening(nnUNetTrainerSVLS):
    """SVLS on the opened one-hot reference."""
    loss_name = "SVLS-opening"
    loss_key = "svls_opening"


class nnUNetTrainerSVLS_MorphClosing(nnUNetTrainerSVLS):
    """SVLS on the closed one-hot reference."""
    loss_name = "SVLS-closing"
    loss_key = "svls_closing"


class nnUNetTrainerSVLS_MorphGradient(nnUNetTrainerSVLS):
    """SVLS on the morphological gradient of the one-hot reference (the paper's default)."""
    loss_name = "SVLS-gradient"
    loss_key = "svls_gradient"


class nnUNetTrainerSVLS_MorphInternalBoundary(nnUNetTrainerSVLS):
    """SVLS on the internal boundary (x minus its erosion) of the one-hot reference."""
    loss_name = "SVLS-internal_boundary"
    loss_key = "svls_internal_boundary"


class nnUNetTrainerSVLS_MorphExternalBoundary(nnUNetTrainerSVLS):
    """SVLS on the external boundary (dilation minus x) of the one-hot reference."""
    loss_name = "SVLS-external_boundary"
    loss_key = "svls_external_boundary"


# ----------------------------------------------------------------------------------------------
# _DC variants: the CE-based losses plus nnU-Net's default Dice term
# ----------------------------------------------------------------------------------------------
class nnUNetTrainerFocal_DC(nnUNetTrainerFocal):
    """Focal loss + nnU-Net's default Dice term."""
    loss_name = "Focal+Dice"
    add_dice = True


class nnUNetTrainerECP_DC(nnUNetTrainerECP):
    """ECP + nnU-Net's default Dice term."""
    loss_name = "ECP+Dice"
    add_dice = True


class nnUNetTrainerLS_DC(nnUNetTrainerLS):
    """Label smoothing + nnU-Net's default Dice term."""
    loss_name = "LS+Dice"
    add_dice = True


class nnUNetTrainerSVLS_DC(nnUNetTrainerSVLS):
    """SVLS + nnU-Net's default Dice term."""
    loss_name = "SVLS+Dice"
    add_dice = True


class nnUNetTrainerMbLS_DC(nnUNetTrainerMbLS):
    """MbLS + nnU-Net's default Dice term."""
    loss_name = "MbLS+Dice"
    add_dice = True


class nnUNetTrainerNACL_DC(nnUNetTrainerNACL):
    """NACL ("min" kernel) + nnU-Net's default Dice term."""
    loss_name = "NACL+Dice"
    add_dice = True


class nnUNetTrainerNACL_mean_DC(nnUNetTrainerNACL_mean):
    """NACL ("mean" kernel) + nnU-Net's default Dice term."""
    loss_name = "NACL-mean+Dice"
    add_dice = True


class nnUNetTrainerFCL_DC(nnUNetTrainerFCL):
    """FCL + nnU-Net's default Dice term."""
    loss_name = "FCL+Dice"
    add_dice = True


class nnUNetTrainerSDC_DC(nnUNetTrainerSDC):
    """SDC (with its SDF head) + nnU-Net's default Dice term."""
    loss_name = "SDC+Dice"
    add_dice = True


#: every runnable trainer of this module, in a stable order
CALIBRATION_TRAINERS = [
    nnUNetTrainerFocal, nnUNetTrainerECP, nnUNetTrainerLS, nnUNetTrainerSVLS, nnUNetTrainerMbLS,
    nnUNetTrainerNACL, nnUNetTrainerNACL_mean, nnUNetTrainerFCL, nnUNetTrainerSDC,
    nnUNetTrainerDSCPlusPlus, nnUNetTrainerDSCPlusPlusCE,
    nnUNetTrainerCE_ACE, nnUNetTrainerDice_ACE, nnUNetTrainerDiceCE_ACE,
    nnUNetTrainerNACL_MorphErosion, nnUNetTrainerNACL_MorphDilation, nnUNetTrainerNACL_MorphOpening,
    nnUNetTrainerNACL_MorphClosing, nnUNetTrainerNACL_MorphGradient,
    nnUNetTrainerNACL_MorphInternalBoundary, nnUNetTrainerNACL_MorphExternalBoundary,
    nnUNetTrainerSVLS_MorphErosion, nnUNetTrainerSVLS_MorphDilation, nnUNetTrainerSVLS_MorphOpening,
    nnUNetTrainerSVLS_MorphClosing, nnUNetTrainerSVLS_MorphGradient,
    nnUNetTrainerSVLS_MorphInternalBoundary, nnUNetTrainerSVLS_MorphExternalBoundary,
    nnUNetTrainerFocal_DC, nnUNetTrainerECP_DC, nnUNetTrainerLS_DC, nnUNetTrainerSVLS_DC,
    nnUNetTrainerMbLS_DC, nnUNetTrainerNACL_DC, nnUNetTrainerNACL_mean_DC, nnUNetTrainerFCL_DC,
    nnUNetTrainerSDC_DC,
]
