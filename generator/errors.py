"""User-facing errors. The CLI prints them as one line on stderr and exits with `exit_code`."""

from __future__ import annotations


class PuzzleGenError(Exception):
    """A user error: bad input, or a fact that cannot be inferred."""

    exit_code = 1


class UsageError(PuzzleGenError):
    """Arguments that do not make sense together."""

    exit_code = 2


class UnknownModelType(PuzzleGenError):
    """The model type is not a causal LM transformers knows."""

    exit_code = 2

    def __init__(self, model_type: str, close: list[str], where: str = ""):
        hint = f"; closest known types: {', '.join(close)}" if close else ""
        super().__init__(f"unknown model type {model_type!r}{where}{hint}")
        self.model_type = model_type
        self.close = close


class InferenceError(PuzzleGenError):
    """A fact of the descriptor could not be inferred; names the fact and the evidence seen."""

    def __init__(self, fact: str, reason: str, evidence: list[str] | tuple[str, ...] = ()):
        seen = f" (evidence: {'; '.join(evidence)})" if evidence else ""
        super().__init__(f"cannot infer {fact}: {reason}{seen}")
        self.fact = fact
        self.reason = reason
        self.evidence = tuple(evidence)


class ProbeMismatch(InferenceError):
    """A static finding disagrees with the probed module tree."""

    def __init__(self, fact: str, static: str, probed: str):
        super().__init__(fact, f"static analysis says {static}, but the probe finds {probed}")
        self.static = static
        self.probed = probed


class StaticGap(InferenceError):
    """A static build of parsed code (a checkpoint's own code, never imported) does not decide
    something a descriptor needs: a condition on a value config.json lacks, a class picked at run
    time, a shape computed by code that is not read. Never a model rejecting its config: where a
    real build's failure means "this config is not taken", a StaticGap still stops inference."""
