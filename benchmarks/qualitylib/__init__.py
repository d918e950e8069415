"""The parts of ``benchmarks/quality.py`` (one module per stage) that its companion scripts reuse."""
