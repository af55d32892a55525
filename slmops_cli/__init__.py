"""The `slmops` console command: one group per program, loaded only when used."""

__all__: list[str] = []
