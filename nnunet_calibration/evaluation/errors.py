"""The evaluator's named error (standard library only)."""
from nnunet_calibration.errors import UserError


class EvaluationInputError(UserError):
    """Bad input (the message names the file and what is wrong)."""
