"""Decisions: ``decide()`` (an answer, option probabilities, a calibrated confidence, a verifier's verdict,
whether to escalate to a person), option scoring under the runtime, calibration, the grounding verifier,
escalation rules and their metrics. A layer above the runtime and below serving (4a in docs/ARCHITECTURE.md); see docs/DECISIONS.md."""
