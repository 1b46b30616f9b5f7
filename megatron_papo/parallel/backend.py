"""The one place that picks transformer-engine or local (torch) megatron-core layer specs."""
from __future__ import annotations


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def use_transformer_engine(requested: bool | None = None) -> bool:
    """None: TE when it imports. True without TE is an error (naming the option)."""
    if requested is None:
        return te_available()
    if requested and not te_available():
        raise ValueError("use_te=True but transformer_engine does not import; set use_te to false/None")
    return requested
