"""Error types raised where input enters standin/; each message says what to fix."""


class StandInError(Exception):
    """Base class of every error this package raises on purpose."""


class UnknownPresetError(StandInError, ValueError):
    """A model preset name that `standin.presets.PRESETS` does not hold."""


class CheckpointError(StandInError):
    """A checkpoint file or directory is missing, unreadable, or does not match the model."""


class InvalidRequestError(StandInError, ValueError):
    """A generation parameter is out of range or malformed."""


class InvalidImageError(StandInError, ValueError):
    """An uploaded image cannot be decoded safely."""


class InvalidVideoError(StandInError, ValueError):
    """An uploaded video cannot be decoded safely, or is too short or small to use."""


class FaceModelError(StandInError):
    """A face detector or parser model directory or file is missing or broken."""


class CancelledError(StandInError):
    """The caller asked to stop a generation between two steps."""
