"""The one base of nnunet-calibration's named errors (standard library only).

:class:`UserError`: bad input or set-up, with a message that names the file, key or option and what
is wrong. Every package's own error derives from it (``SettingsError``, ``EvaluationInputError``,
``ConversionError``, ``CalibrationError``, ...), so that every console script handles them alike
(:func:`nnunet_calibration.utils.cli_main`: one line on stderr, exit status 2).
"""


class UserError(ValueError):
    """Bad input or set-up; the message names the file, key or option and what is wrong."""
