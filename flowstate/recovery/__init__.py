"""Recovery: per-state recovery settings (the recoverer and delayer services build on them)."""

__all__: list[str] = []
