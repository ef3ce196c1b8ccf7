"""The exceptions of the scripting API, in one place: what a script author catches, and what the API
raises when a script or a scenario is wrong.

- :class:`CallFailed` (from :mod:`p2psip.errors`): a request of a :class:`~sipapi.UserAgent` ended with a
  failure; ``.status`` is the SIP status (408 after a timeout, 503 when nothing could be sent).
- :class:`SIPStatusError`: the stack's one "answer with status N" exception (``status``, ``reason``,
  ``headers``); :class:`ParseError` (a malformed message, URI or SDP) is one, and so is CallFailed.
- :class:`ScriptError`: a script used the API wrongly (answered twice, proxied an answered request).
- :class:`ScenarioError`: a scenario file that cannot be used; :class:`StepFailed`: one call of a scenario
  did not go as its steps say.
- :class:`ScriptTimeout`: raised inside a script that overran its deadline; a ``BaseException``, so a
  script's ``except Exception`` cannot swallow it.
"""

from __future__ import annotations

from p2psip.errors import CallFailed, P2PSIPError, ParseError, SIPStatusError

__all__ = [
    "CallFailed",
    "CallFailedError",
    "ParseError",
    "SIPStatusError",
    "ScenarioError",
    "ScriptError",
    "ScriptTimeout",
    "StepFailed",
]


class ScriptError(P2PSIPError):
    """A script used the API wrongly (e.g. answered twice); the call gets a 500 and the error is logged."""


class ScenarioError(P2PSIPError):
    """A scenario file that cannot be used (no ``steps`` or ``call``, a bad step)."""


class StepFailed(P2PSIPError):
    """One call did not go as its scenario says; the message is the reason counted in the statistics."""


CallFailedError = StepFailed
"""The former name of :class:`StepFailed`."""


class ScriptTimeout(BaseException):
    """Raised inside a script that overran its deadline (a BaseException so ``except Exception`` in the
    script cannot swallow it)."""
