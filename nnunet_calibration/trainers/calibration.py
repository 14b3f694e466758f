"""One nnU-Net trainer per calibration loss (and per morphological variant), plus ``_DC`` variants.

Names: a trainer is ``nnUNetTrainer<Loss>`` and builds the loss registered as :attr:`loss_key`
(the loss's one name, also in ``calibration_hparams.json``); ``_DC`` adds nnU-Net's Dice term
(registry ``<key>_dc``); a morphological variant ``<Loss>_Morph<Op>`` inherits from the trainer
whose loss it modifies (``nnUNetTrainerNACL_MorphGradient`` from ``nnUNetTrainerNACL``, its ``_DC``
form from both that and ``nnUNetTrainerNACL_DC``). The list of trainers
(:data:`CALIBRATION_TRAINERS`) is derived from the classes defined here.

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
  DDP without compile —, normalised), see ``nnUNetTrainerHparamsBase._wrap_deep_supervision``.
* Hyperparameters: ``loss_hparams`` (defaults of the SDC paper's Table 1) can be overridden per run
  with ``NNUNET_CALIB_HPARAMS`` (see :mod:`nnunet_calibration.trainers.base`). What defines a
  variant (NACL kernel, morphological operator, Dice term) is the loss's registry name
  (``loss_key``), which is not overridable; ``loss_fixed`` may hold further fixed constructor
  arguments for user subclasses. All of it is written to ``calibration_hparams.json``.
* Fine-tuning (``-pretrained_weights``): from checkpoints with or without SDC's SDF head, see
  :mod:`nnunet_calibration.trainers.sdf_head` (installed by ``nnUNetTrainerHparamsBase.initialize``).
* 3D: the loss gets the configuration's spacing (``configuration_manager.spacing``): for an
  anisotropic spacing by nnU-Net's rule (max / min > 3, one low-resolution axis) morphology and
  local filters are in-plane 3x3x1, otherwise 3x3x3; SDC's reference SDF is in millimetres
  (exact anisotropic EDT). 2D configurations are unchanged (3x3, voxel units).
* ``_DC`` variants add nnU-Net's Dice term exactly as its default loss does (registry name
  ``<key>_dc``, i.e. ``losses.WithDice``: memory-efficient soft Dice, smooth 1e-5, ``batch_dice``
  from the plans, background excluded for labels / included for regions, weight 1 next to the
  loss's weight 1; for regions with an ignore label the calibration loss is scaled by the number
  of regions, as nnU-Net's ``DC_and_BCE_loss`` scales its BCE).
"""
from __future__ import annotations

import torch

from nnunet_calibration.losses import MORPH_VARIANTS, WithDice, build_loss
from nnunet_calibration.trainers.base import nnUNetTrainerHparamsBase
from nnunet_calibration.trainers.sdf_head import SDFHeadLoss, SDFHeadNetwork, unwrap_network


class nnUNetTrainerCalibLossBase(nnUNetTrainerHparamsBase):
    """Base of the calibration-loss trainers: builds ``losses.build_loss(loss_key, ...)``.

    Not a trainer to run by itself (it has no loss); subclasses set :attr:`loss_key`,
    :attr:`loss_hparams`, optionally :attr:`loss_fixed` and :attr:`add_dice`.
    """

    #: registry key of the loss in :func:`nnunet_calibration.losses.build_loss`: the loss's one name
    loss_key: str | None = None
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

    @classmethod
    def registry_name(cls) -> str:
        """Name in :func:`nnunet_calibration.losses.build_loss` (``<key>_dc`` adds nnU-Net's Dice)."""
        return f"{cls.loss_key}_dc" if cls.add_dice else cls.loss_key

    def build_calibration_loss(self) -> torch.nn.Module:
        """The per-resolution loss (not yet wrapped for deep supervision)."""
        lm = self.label_manager
        try:
            return build_loss(self.registry_name(), regions=lm.has_regions, ignore_label=lm.ignore_label,
                              batch_dice=bool(self.configuration_manager.batch_dice), ddp=bool(self.is_ddp),
                              spacing=tuple(self.configuration_manager.spacing), **self.loss_kwargs())
        except ValueError as e:
            what = "a region-based dataset (regions_class_order)" if lm.has_regions else "a label dataset"
            raise ValueError(f"{self.__class__.__name__}: cannot build loss {self.registry_name()!r} with "
                             f"{self.loss_kwargs()} for {what} (ignore_label={lm.ignore_label}): {e}") from e

    def _build_loss(self):
        return self._wrap_deep_supervision(self.build_calibration_loss())

    def used_hparams(self) -> dict:
        out = super().used_hparams()
        out["dice_term"] = bool(self.add_dice)
        out["regions"] = bool(self.label_manager.has_regions)
        out["ignore_label"] = self.label_manager.ignore_label
        out["spacing"] = [float(v) for v in self.configuration_manager.spacing]
        return out


# ----------------------------------------------------------------------------------------------
# CE-type calibration losses (SDC paper, Table 1 defaults)
# ----------------------------------------------------------------------------------------------
class nnUNetTrainerFocal(nnUNetTrainerCalibLossBase):
    """Focal loss, -(1-p_t)^gamma log p_t (Lin et al. 2017); gamma = 3."""
    loss_key = "focal"
    loss_hparams = {"gamma": 3.0}


class nnUNetTrainerECP(nnUNetTrainerCalibLossBase):
    """Entropy confidence penalty, CE - lam * entropy (Pereyra et al. 2017); lam = 0.1."""
    loss_key = "ecp"
    loss_hparams = {"lam": 0.1}


class nnUNetTrainerLS(nnUNetTrainerCalibLossBase):
    """Label smoothing, CE against (1-alpha) onehot + alpha/C (Szegedy et al. 2016); alpha = 0.1."""
    loss_key = "ls"
    loss_hparams = {"alpha": 0.1}


class nnUNetTrainerSVLS(nnUNetTrainerCalibLossBase):
    """Spatially varying label smoothing (Islam & Glocker, IPMI 2021); sigma = 2.0."""
    loss_key = "svls"
    loss_hparams = {"sigma": 2.0}


class nnUNetTrainerMbLS(nnUNetTrainerCalibLossBase):
    """Margin-based label smoothing, CE + alpha * relu(logit distance - m) (Liu et al., CVPR 2022);
    m = 10, alpha = 0.1."""
    loss_key = "mbls"
    loss_hparams = {"margin": 10.0, "alpha": 0.1}


class nnUNetTrainerNACL(nnUNetTrainerCalibLossBase):
    """Neighbour-aware calibration loss (Murugesan et al., MICCAI 2023), CE + alpha * |t - logits|
    with NACL's own default "mean" kernel (label proportions in the 3x3(x3) window; NACL's code);
    alpha = 0.1. The SDC paper's Table 1 "min" kernel: :class:`nnUNetTrainerNACL_MinKernel`."""
    loss_key = "nacl"
    loss_hparams = {"alpha": 0.1, "kernel_size": 3}


class nnUNetTrainerNACL_MinKernel(nnUNetTrainerNACL):
    """NACL with the "min" kernel (one-hot of the smallest label in the window), as the SDC paper's
    Table 1 footnote; alpha = 0.1."""
    loss_key = "nacl_min"


class nnUNetTrainerFCL(nnUNetTrainerCalibLossBase):
    """Focal calibration loss, focal + lam * squared error of the probabilities (Liang et al. 2024);
    gamma = 3, lam = 0.1."""
    loss_key = "fcl"
    loss_hparams = {"gamma": 3.0, "lam": 0.1}


# ----------------------------------------------------------------------------------------------
# SDC: signed distance calibration loss with the auxiliary SDF head
# ----------------------------------------------------------------------------------------------
class nnUNetTrainerSDC(nnUNetTrainerCalibLossBase):
    """Signed distance calibration loss (Liang et al. 2025); alpha = 0.1, lambda_sdf = 0.1.

    CE + alpha * local calibration term + lambda_sdf * L1(SDF head, reference SDF; millimetres in
    3D). The network carries the auxiliary SDF head (:class:`~nnunet_calibration.trainers.sdf_head.SDFHeadNetwork`),
    always built so that ``nnUNetv2_predict -tr nnUNetTrainerSDC`` loads the checkpoint strictly;
    in eval mode it returns exactly the segmentation logits. Deep supervision: CE and the local
    term on every output with nnU-Net's weights; the SDF term on the full-resolution output only,
    with weight exactly ``lambda_sdf`` (Eq. 1; not scaled by the deep-supervision weight).
    """
    loss_key = "sdc"
    loss_hparams = {"alpha": 0.1, "lambda_sdf": 0.1}

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True
                                   ) -> torch.nn.Module:
        """The network of the next class in the method resolution order plus the SDF head.

        A classmethod (nnU-Net calls it on the instance in ``initialize`` and on the class in
        ``nnUNetv2_predict``, with the same arguments), so that a trainer combining SDC with another
        nnU-Net trainer (``class T(nnUNetTrainerSDC_DC, nnUNet_Primus_S_Trainer)``) gets that
        trainer's network, not silently the plans' U-Net; one without a U-Net decoder stops with
        :class:`~nnunet_calibration.trainers.sdf_head.SDFHeadUnsupportedNetworkError`.
        """
        net = super().build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                 num_output_channels, enable_deep_supervision)
        return SDFHeadNetwork(net, num_output_channels)

    def _build_loss(self):
        per_res = self.build_calibration_loss()
        sdc = per_res.loss if isinstance(per_res, WithDice) else per_res
        network = unwrap_network(self.network)
        return SDFHeadLoss(self._wrap_deep_supervision(per_res), network.pop_sdf,
                           foreground_only=not self.label_manager.has_regions, sdf_term=sdc.sdf_term)


# ----------------------------------------------------------------------------------------------
# DSC++ and mL1-ACE
# ----------------------------------------------------------------------------------------------
class nnUNetTrainerDSCPlusPlus(nnUNetTrainerCalibLossBase):
    """DSC++ loss (Yeung et al. 2023); gamma = 2."""
    loss_key = "dscpp"
    loss_hparams = {"gamma": 2.0}


class nnUNetTrainerDSCPlusPlusCE(nnUNetTrainerCalibLossBase):
    """DSC++ + CE (Yeung et al. 2023), equal weights; gamma = 2."""
    loss_key = "dscpp_ce"
    loss_hparams = {"gamma": 2.0}


class nnUNetTrainerACEBase(nnUNetTrainerCalibLossBase):
    """Base of the mL1-ACE combinations (Barfoot et al., MICCAI 2024): 20 hard bins (``n_bins``),
    equal term weights. The Dice term (where present) is nnU-Net's (``batch_dice`` from the plans).
    Not a trainer by itself."""
    loss_hparams = {"n_bins": 20}


class nnUNetTrainerCE_ACE(nnUNetTrainerACEBase):
    """CE + mL1-ACE (Barfoot et al., MICCAI 2024), equal weights, 20 bins."""
    loss_key = "ace_ce"


class nnUNetTrainerDice_ACE(nnUNetTrainerACEBase):
    """nnU-Net's Dice + mL1-ACE (Barfoot et al., MICCAI 2024), equal weights, 20 bins."""
    loss_key = "ace_dice"


class nnUNetTrainerDiceCE_ACE(nnUNetTrainerACEBase):
    """nnU-Net's Dice + CE + mL1-ACE (Barfoot et al., MICCAI 2024), equal weights, 20 bins."""
    loss_key = "ace_dice_ce"


# ----------------------------------------------------------------------------------------------
# _DC variants: the CE-based losses plus nnU-Net's default Dice term
# ----------------------------------------------------------------------------------------------
class nnUNetTrainerFocal_DC(nnUNetTrainerFocal):
    """Focal loss + nnU-Net's default Dice term."""
    add_dice = True


class nnUNetTrainerECP_DC(nnUNetTrainerECP):
    """ECP + nnU-Net's default Dice term."""
    add_dice = True


class nnUNetTrainerLS_DC(nnUNetTrainerLS):
    """Label smoothing + nnU-Net's default Dice term."""
    add_dice = True


class nnUNetTrainerSVLS_DC(nnUNetTrainerSVLS):
    """SVLS + nnU-Net's default Dice term."""
    add_dice = True


class nnUNetTrainerMbLS_DC(nnUNetTrainerMbLS):
    """MbLS + nnU-Net's default Dice term."""
    add_dice = True


class nnUNetTrainerNACL_DC(nnUNetTrainerNACL):
    """NACL ("mean" kernel, NACL's default) + nnU-Net's default Dice term."""
    add_dice = True


class nnUNetTrainerNACL_MinKernel_DC(nnUNetTrainerNACL_MinKernel, nnUNetTrainerNACL_DC):
    """NACL ("min" kernel, the SDC paper's Table 1) + nnU-Net's default Dice term."""
    add_dice = True


class nnUNetTrainerFCL_DC(nnUNetTrainerFCL):
    """FCL + nnU-Net's default Dice term."""
    add_dice = True


class nnUNetTrainerSDC_DC(nnUNetTrainerSDC):
    """SDC (with its SDF head) + nnU-Net's default Dice term."""
    add_dice = True


# ----------------------------------------------------------------------------------------------
# Morphological margin variants (SDC paper section 3.2, Eq. 2, Table 6), generated per operator:
# nnUNetTrainer{NACL,SVLS}_Morph<Op> and their _DC forms
# ----------------------------------------------------------------------------------------------
_OP_DOC = {
    "erosion": "the eroded mask", "dilation": "the dilated mask", "opening": "the opened mask",
    "closing": "the closed mask", "gradient": "the morphological gradient (dilation minus erosion)",
    "internal_boundary": "the internal boundary (mask minus its erosion)",
    "external_boundary": "the external boundary (dilation minus the mask)",
}
_MORPH_BASES = {
    # base trainer, its _DC form, extra hyperparameters, filter described in the docstring
    "NACL": (nnUNetTrainerNACL, nnUNetTrainerNACL_DC, {"alpha": 0.1, "kernel_size": 3, "margin_on": "probs",
                                                       "ce_target": "y"},
             "NACL's 3x3(x3) mean filter", "'logits' (NACL's logit term, the earlier form)"),
    "SVLS": (nnUNetTrainerSVLS, nnUNetTrainerSVLS_DC, {"sigma": 2.0, "alpha": 0.1, "margin_on": "probs",
                                                       "ce_target": "y"},
             "the SVLS kernel (sigma 2)", "'soft_target' (SVLS soft-label CE, the earlier form)"),
}


def _camel(op: str) -> str:
    return "".join(part.capitalize() for part in op.split("_"))


def _define(name: str, bases: tuple, attrs: dict) -> type:
    cls = type(name, bases, {"__module__": __name__, "__qualname__": name, **attrs})
    globals()[name] = cls
    return cls


for _loss, (_base, _base_dc, _hp, _filt, _old) in _MORPH_BASES.items():
    for _op in MORPH_VARIANTS:
        _doc = (f"{_loss} modified by {_op} (SDC paper Eq. 2, Table 6): CE on the mask + alpha * "
                f"mean |p - y~_m|, y~_m = {_filt} of {_OP_DOC[_op]} of each class, normalised over classes "
                f"(as the authors' code); alpha = 0.1. margin_on={_old}. ce_target='transformed': the CE "
                f"against the transformed mask instead (Eq. 2 literally, for ablations).")
        _m = _define(f"nnUNetTrainer{_loss}_Morph{_camel(_op)}", (_base,),
                     {"__doc__": _doc, "loss_key": f"{_loss.lower()}_{_op}", "loss_hparams": dict(_hp)})
        _define(f"{_m.__name__}_DC", (_m, _base_dc),
                {"__doc__": _doc.replace(": CE on", " + nnU-Net's default Dice term: CE on"), "add_dice": True})
del _loss, _base, _base_dc, _hp, _filt, _old, _op, _doc, _m


def _is_trainer(obj) -> bool:
    return (isinstance(obj, type) and issubclass(obj, nnUNetTrainerCalibLossBase)
            and obj.__module__ == __name__ and obj.loss_key is not None)


#: every runnable trainer of this module, in definition order (derived from the classes)
CALIBRATION_TRAINERS = [obj for name, obj in list(globals().items()) if _is_trainer(obj) and name == obj.__name__]
