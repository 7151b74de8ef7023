"""The one error type of neverdark.artifacts (a module of its own: every other module raises it)."""


class ArtifactError(RuntimeError):
    pass
