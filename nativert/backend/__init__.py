"""Compile-time and run-time backend machinery: delegates, lowering, to_backend."""
