"""Re-export of nnunet-calibration's trainers for nnU-Net's by-name trainer lookup.

The import is guarded: if nnunet-calibration is broken or half-installed, nnU-Net's own trainers
must keep working, so a failure here only warns.
"""
import warnings

try:
    from nnunet_calibration.trainers import *  # noqa: F401,F403
except Exception as _e:  # pragma: no cover - exercised only when the plugin is broken
    warnings.warn(f"nnunet-calibration trainers could not be imported and are unavailable: {_e!r}")
