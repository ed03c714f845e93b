"""Decisions: ``decide()`` (an answer, option probabilities, a calibrated confidence, a verifier's verdict,
whether to escalate to a person), option scoring under the runtime, calibration, the grounding verifier,
escalation rules and their metrics. Layer 5 (above the runtime, below serving); see docs/DECISIONS.md."""
