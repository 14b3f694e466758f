"""Re-export of nnunet-calibration's trainers for nnU-Net's by-name trainer lookup.

The import is guarded: if nnunet-calibration is broken or half-installed, nnU-Net's own trainers
must keep working, so a failure here only warns. Renamed trainers (``DEPRECATED_NAMES``) are
forwarded on access only (nnU-Net's lookup uses ``hasattr``), so that old result folders still
find their trainer while the warning appears only when such a name is actually used.
"""
import warnings

try:
    from nnunet_calibration.trainers import *  # noqa: F401,F403
    from nnunet_calibration.trainers import DEPRECATED_NAMES as _DEPRECATED
except Exception as _e:  # pragma: no cover - exercised only when the plugin is broken
    _DEPRECATED = {}
    warnings.warn(f"nnunet-calibration trainers could not be imported and are unavailable: {_e!r}")


def __getattr__(name: str):
    if name in _DEPRECATED:
        import nnunet_calibration.trainers as _trainers  # already imported above; no cost

        return getattr(_trainers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
